"""The status page's routes on the node's HTTP port (Starlette), over the read model.

Pages: ``/`` (studies, with filters in the query string), ``/studies/{StudyInstanceUID}``,
``/problems``. JSON: ``/api/status`` (the whole snapshot), ``/api/studies?...`` (one page of
studies for the same filters, with the counts and health; ``html=1`` adds the rendered rows
for the page's live refresh), ``/api/studies/{StudyInstanceUID}``, ``/api/problems?...``,
``/api/routing``; each study's SR as text and its Secondary Captures as PNG (a thumbnail, or
``?full=1``). Actions, with the bearer token: requeue dead letters, check a destination
(C-ECHO, or an HTTP request for a DICOMweb one).

Reading needs no token; a valid bearer token also shows the accession number and patient ID
(answers that carry them are ``Cache-Control: no-store``). Nothing here logs an identifier.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

from dicom_node.status.health import assess
from dicom_node.status.html import (
    counts_html,
    health_html,
    pager_html,
    render,
    render_error,
    render_problems,
    render_study,
    study_rows_html,
)
from dicom_node.status.images import capture_png
from dicom_node.status.model import (
    ProblemQuery,
    QueryError,
    StatusModel,
    StudyQuery,
    when,
)
from dicom_node.status.report import read_report
from dicom_node.status.verify import CheckResult, check_destination

__all__ = ["StatusPage"]

log = logging.getLogger(__name__)

Writer = Callable[[Request], tuple[str | None, Response | None]]
Identify = Callable[[Request], str | None]
_DEAD_LETTERS_ON_PAGE = 50
_NO_STORE = {"Cache-Control": "no-store"}


def _json(body: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(body, indent=1, default=str) + "\n",
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


@dataclass
class StatusPage:
    """Reads the running :class:`~dicom_node.service.Service` (typed loosely to keep the
    one-way imports: the service builds the page)."""

    service: Any
    recent: int = 25
    on_requeued: Callable[[], None] | None = None
    _checks: dict[int, CheckResult] = field(default_factory=dict)
    _checking: threading.Lock = field(default_factory=threading.Lock)

    @property
    def model(self) -> StatusModel:
        service = self.service
        return StatusModel(
            service.spool, service.config, clock=getattr(service, "clock", time.time)
        )

    # -- data -------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        service = self.service
        warnings = service.warnings() if hasattr(service, "warnings") else []
        return assess(service.checks(), warnings).as_json()

    def snapshot(self, *, identified: bool = False, recent: bool = True) -> dict[str, Any]:
        """Everything the page shows, as JSON-able data (also ``/api/status``); ``recent``:
        with the most recent studies (the page lists its own, filtered)."""
        service = self.service
        config = service.config
        spool = service.spool
        model = self.model
        health = self.health()
        models = [
            {
                "task": task,
                "name": bundle.card.name,
                "version": bundle.card.version,
                "sha256": bundle.card.model_sha256,
                "demo": bundle.card.demo,
                "views": bundle.card.views,
            }
            for task, bundle in sorted(getattr(service, "bundles", {}).items())
        ]
        destinations = []
        for n, d in enumerate(config.destinations):
            last = self._checks.get(n)
            destinations.append(
                {
                    "name": d.key,
                    "type": d.type,
                    "target": d.url if d.type == "dicomweb" else f"{d.ae_title}@{d.host}:{d.port}",
                    "tls": d.tls is not None or (d.url or "").startswith("https://"),
                    "check": None if last is None else {**last.as_json(), "when": when(last.at)},
                }
            )
        return {
            "node": {
                "ae_title": config.node.ae_title,
                "dicom_port": service.scp.port if hasattr(service, "scp") else config.node.port,
                "tls": config.node.tls is not None,
                "image_check": config.routing.image_check,
            },
            "ready": health["ready"],
            "health": health,
            "checks": health["checks"],
            "models": models,
            "tasks": sorted(config.tasks),
            "peers": [{"ae_title": p.ae_title, "host": p.host or "any"} for p in config.peers],
            "destinations": destinations,
            "queues": {"studies": spool.study_counts(), "outbox": spool.outbox_counts()},
            "counts": model.counts(),
            "studies": model.recent(self.recent, identified=identified) if recent else [],
            "dead_letters": model.dead_letters(),
        }

    def _node(self) -> dict[str, Any]:
        config = self.service.config
        bundles = getattr(self.service, "bundles", {})
        return {
            "ae_title": config.node.ae_title,
            "demo": any(b.card.demo for b in bundles.values()),
        }

    def _query(self, request: Request) -> StudyQuery:
        return StudyQuery.from_params(
            request.query_params, tasks=self.service.config.tasks, default_size=self.recent
        )

    def _page(self, request: Request, identified: bool) -> tuple[str, int]:
        snapshot = self.snapshot(identified=identified, recent=False)
        try:
            query = self._query(request)
        except QueryError as error:
            query, snapshot["error"] = StudyQuery(size=self.recent), str(error)
        listing = self.model.studies(query, identified=identified)
        snapshot["listing"] = listing
        snapshot["query_values"] = {**query.params(), "size": str(query.size)}
        snapshot["api"] = query.url("/api/studies") + "&html=1"
        snapshot["dead_letter_limit"] = _DEAD_LETTERS_ON_PAGE
        return render(snapshot), 400 if "error" in snapshot else 200

    def _studies(self, request: Request, identified: bool) -> tuple[dict[str, Any], int]:
        try:
            query = self._query(request)
        except QueryError as error:
            return {"error": str(error)}, 400
        model = self.model
        listing = model.studies(query, identified=identified)
        counts = model.counts()
        health = self.health()
        body = {**listing, "counts": counts, "health": health}
        if request.query_params.get("html"):
            body["html"] = {
                "rows": study_rows_html(listing["studies"]),
                "pager": pager_html(listing),
                "counts": counts_html(counts),
                "health": health_html(health),
            }
        return body, 200

    # -- routes -----------------------------------------------------------------------------
    def routes(self, writer: Writer, identify: Identify | None = None) -> list[Route]:
        """The routes; ``writer`` says who may write (or the refusal), ``identify`` the name
        of a valid bearer token the request carries (None: none), which shows identifiers."""

        def identified(request: Request) -> bool:
            return identify is not None and identify(request) is not None

        def headers(shown: bool) -> dict[str, str] | None:
            return _NO_STORE if shown else None

        async def page(request: Request) -> Response:
            shown = await run_in_threadpool(identified, request)
            text, status = await run_in_threadpool(self._page, request, shown)
            return HTMLResponse(text, status_code=status, headers=headers(shown))

        async def status(request: Request) -> Response:
            shown = await run_in_threadpool(identified, request)
            snapshot = await run_in_threadpool(lambda: self.snapshot(identified=shown))
            return _json(snapshot, headers=headers(shown))

        async def studies(request: Request) -> Response:
            shown = await run_in_threadpool(identified, request)
            body, code = await run_in_threadpool(self._studies, request, shown)
            return _json(body, code, headers(shown))

        async def study(request: Request) -> Response:
            shown = await run_in_threadpool(identified, request)
            uid = request.path_params["study"]
            found = await run_in_threadpool(lambda: self.model.study(uid, identified=shown))
            if request.url.path.startswith("/api/"):
                if found is None:
                    return _json({"error": f"no study {uid!r} in the spool"}, 404)
                return _json(found, headers=headers(shown))
            if found is None:
                text = render_error(
                    "No such study", f"The spool knows no study {uid}.", self._node()
                )
                return HTMLResponse(text, status_code=404)
            health = await run_in_threadpool(self.health)
            text = render_study(found, self._node(), health)
            return HTMLResponse(text, headers=headers(shown))

        async def problems(request: Request) -> Response:
            try:
                query = ProblemQuery.from_params(request.query_params)
            except QueryError as error:
                if request.url.path.startswith("/api/"):
                    return _json({"error": str(error)}, 400)
                return HTMLResponse(render_error("Bad filter", str(error), self._node()), 400)
            found = await run_in_threadpool(self.model.problems, query)
            if request.url.path.startswith("/api/"):
                return _json(found)
            health = await run_in_threadpool(self.health)
            return HTMLResponse(render_problems(found, self._node(), health))

        async def report(request: Request) -> Response:
            text = await run_in_threadpool(self._read, request, "sr")
            if text is None:
                return PlainTextResponse("no such report\n", status_code=404)
            return PlainTextResponse(text)

        async def capture(request: Request) -> Response:
            data = await run_in_threadpool(self._read, request, f"sc{request.path_params['n']}")
            if data is None:
                return PlainTextResponse("no such image\n", status_code=404)
            return Response(data, media_type="image/png")

        async def requeue(request: Request) -> Response:
            who, refusal = await run_in_threadpool(writer, request)
            if refusal is not None:
                return refusal
            item = request.path_params.get("item")
            spool = self.service.spool
            if item is None:
                count = await run_in_threadpool(spool.retry_dead)
            else:
                count = int(await run_in_threadpool(spool.requeue, int(item)))
            if item is not None and not count:
                return _json({"error": f"{item} is not a dead letter"}, 404)
            await run_in_threadpool(
                self.service.audit.record, "requeue", item=item or "all", count=count, by=who
            )
            log.info("%d dead letter(s) requeued by %s", count, who)
            if self.on_requeued is not None:
                self.on_requeued()
            return _json({"requeued": count})

        async def check(request: Request) -> Response:
            who, refusal = await run_in_threadpool(writer, request)
            if refusal is not None:
                return refusal
            n = int(request.path_params["n"])
            config = self.service.config
            if not 0 <= n < len(config.destinations):
                return _json({"error": f"no destination {n}"}, 404)
            result = await run_in_threadpool(self._check, n)
            log.info(
                "destination %s checked by %s: %s",
                config.destinations[n].key,
                who,
                result.text,
            )
            return _json(
                {
                    "destination": config.destinations[n].key,
                    **result.as_json(),
                    "when": when(result.at),
                },
                200,
            )

        async def routing(request: Request) -> Response:
            rules = [r.model_dump(mode="json") for r in self.service.config.routing.rules]
            return _json({"rules": rules})

        uid = "{study:str}/{task:str}"
        return [
            Route("/", page, methods=["GET"]),
            Route("/studies/{study:str}", study, methods=["GET"]),
            Route("/problems", problems, methods=["GET"]),
            Route("/api/status", status, methods=["GET"]),
            Route("/api/studies", studies, methods=["GET"]),
            Route("/api/studies/{study:str}", study, methods=["GET"]),
            Route("/api/problems", problems, methods=["GET"]),
            Route("/api/routing", routing, methods=["GET"]),
            Route(f"/api/studies/{uid}/report.txt", report, methods=["GET"]),
            Route(f"/api/studies/{uid}/sc/{{n:int}}.png", capture, methods=["GET"]),
            Route("/api/dead-letters/requeue", requeue, methods=["POST"]),
            Route("/api/dead-letters/{item:int}/requeue", requeue, methods=["POST"]),
            Route("/api/destinations/{n:int}/check", check, methods=["POST"]),
        ]

    def _check(self, n: int) -> CheckResult:
        config = self.service.config
        with self._checking:  # one check at a time: a button pressed twice waits its turn
            result = check_destination(config.destinations[n], config.node.ae_title)
        self._checks[n] = result
        return result

    def _read(self, request: Request, kind: str) -> Any:
        """An output of the request's study: the SR as text ("sr"), an SC as a PNG ("scN",
        a thumbnail, or its own size with ``?full=1``); None when there is none."""
        study, task = request.path_params["study"], request.path_params["task"]
        if task not in self.service.config.tasks:
            return None
        state = self.service.spool.study(study, task) if study else None
        if state is None:
            return None
        path = self.model.output(study, task, state.version, kind)
        if path is None:
            return None
        if kind == "sr":
            return read_report(path).text
        return capture_png(path, full=request.query_params.get("full") in ("1", "true", "yes"))
