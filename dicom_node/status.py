"""The status page for PACS administrators, at ``/`` on the node's HTTP port.

One server-rendered page (no script needed to read it): health (the ``/readyz`` checks), the
models loaded (task, version, sha256, demo or not), peers and destinations, queue depths, the
recent studies (UIDs, task, state, result or not-applicable reason, timings: waiting for the
study to be complete, analysis, sending; send state per destination), each with its SR as text
and its saliency Secondary Captures as thumbnails, so a first-time user on the embedded default
sees results without a PACS; and the dead letters with a requeue button. Everything is read
from the spool (its SQLite index and output files), so it survives a restart.

Reading needs no token; the requeue buttons send the token typed into the page (kept in the
browser's session storage) as ``Authorization: Bearer``. The page never shows patient
identifiers: UIDs, codes and numbers only — the SR's content tree holds no patient module.
"""

from __future__ import annotations

import datetime as dt
import functools
import html
import io
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import UID
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

__all__ = ["StatusPage", "sr_summary", "sr_text"]

log = logging.getLogger(__name__)

Writer = Callable[[Request], tuple[str | None, Response | None]]
THUMBNAIL_PX = 320


# -- the SR, read back ------------------------------------------------------------------------


def _items(sequence: Any) -> Iterator[Dataset]:
    yield from sequence or []


def _name(item: Dataset) -> str:
    concept = item.get("ConceptNameCodeSequence")
    return str(concept[0].CodeMeaning) if concept else ""


def _value(item: Dataset) -> str:
    kind = item.get("ValueType", "")
    if kind == "CODE" and item.get("ConceptCodeSequence"):
        return str(item.ConceptCodeSequence[0].CodeMeaning)
    if kind == "TEXT":
        return str(item.get("TextValue", ""))
    if kind == "NUM":
        measured = item.get("MeasuredValueSequence")
        if not measured:
            return "(no value)"
        units = measured[0].MeasurementUnitsCodeSequence[0].CodeValue
        return f"{float(measured[0].NumericValue):g} {units}".replace(" %", " %")
    if kind == "UIDREF":
        return str(item.get("UID", ""))
    if kind in ("IMAGE", "COMPOSITE") and item.get("ReferencedSOPSequence"):
        return str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    return ""


def _lines(sequence: Any, depth: int) -> Iterator[str]:
    for item in _items(sequence):
        value = _value(item)
        yield "  " * depth + _name(item) + (f": {value}" if value else "")
        yield from _lines(item.get("ContentSequence"), depth + 1)


def sr_text(report: Dataset) -> str:
    """The SR's title and content tree as indented text (what a viewer shows)."""
    title = _name(report) or "Structured Report"
    return "\n".join([title, *_lines(report.get("ContentSequence"), 1)]) + "\n"


def _walk(sequence: Any) -> Iterator[Dataset]:
    for item in _items(sequence):
        yield item
        yield from _walk(item.get("ContentSequence"))


def sr_summary(report: Dataset) -> str:
    """One line: the study-level result (the last measurement group's coded answers and
    certainty), or the reason the study was not answered on."""
    groups = [i for i in _walk(report.get("ContentSequence")) if _name(i) == "Measurement Group"]
    if groups:
        last = groups[-1]
        answers, certainty = [], ""
        for item in _items(last.get("ContentSequence")):
            name = _name(item)
            if item.get("ValueType") == "CODE" and item.RelationshipType == "CONTAINS":
                if name != "Finding":
                    answers.append(f"{name}: {_value(item)}")
            elif name == "Certainty of Finding":
                certainty = _value(item)
        if answers:
            return "; ".join(answers) + (f" (certainty {certainty})" if certainty else "")
    # Nothing analysed: the Qualitative Evaluations say "Not applicable" and a Comment per image.
    comments = [
        _value(i)
        for i in _walk(report.get("ContentSequence"))
        if i.get("ValueType") == "TEXT" and _name(i) == "Comment"
    ]
    if comments:
        return "; ".join(dict.fromkeys(comments))
    return "(no finding in the report)"


@functools.lru_cache(maxsize=256)
def _report(path: Path, stamp: float) -> tuple[str, str]:
    report = pydicom.dcmread(path)
    return sr_text(report), sr_summary(report)


@functools.lru_cache(maxsize=128)
def _thumbnail(path: Path, stamp: float) -> bytes:
    ds = pydicom.dcmread(path)
    pixels = np.asarray(ds.pixel_array)
    if pixels.dtype != np.uint8:
        low, high = float(pixels.min()), float(pixels.max())
        pixels = ((pixels - low) / max(high - low, 1.0) * 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _stamp(path: Path) -> float:
    return path.stat().st_mtime


# -- the page ---------------------------------------------------------------------------------


@dataclass
class StatusPage:
    """Reads the running :class:`~dicom_node.service.Service` (typed loosely to keep the
    one-way imports: the service builds the page)."""

    service: Any
    recent: int = 25
    on_requeued: Callable[[], None] | None = None

    def routes(self, writer: Writer) -> list[Route]:
        async def page(request: Request) -> Response:
            snapshot = await run_in_threadpool(self.snapshot)
            return HTMLResponse(render(snapshot))

        async def status(request: Request) -> Response:
            snapshot = await run_in_threadpool(self.snapshot)
            return Response(
                json.dumps(snapshot, indent=1, default=str) + "\n", media_type="application/json"
            )

        async def report(request: Request) -> Response:
            text = await run_in_threadpool(self._read, request, "sr")
            if text is None:
                return PlainTextResponse("no such report\n", status_code=404)
            return PlainTextResponse(text)

        async def thumbnail(request: Request) -> Response:
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

        async def routing(request: Request) -> Response:
            rules = [r.model_dump(mode="json") for r in self.service.config.routing.rules]
            return _json({"rules": rules})

        uid = "{study:str}/{task:str}"
        return [
            Route("/", page, methods=["GET"]),
            Route("/api/status", status, methods=["GET"]),
            Route("/api/routing", routing, methods=["GET"]),
            Route(f"/api/studies/{uid}/report.txt", report, methods=["GET"]),
            Route(f"/api/studies/{uid}/sc/{{n:int}}.png", thumbnail, methods=["GET"]),
            Route("/api/dead-letters/requeue", requeue, methods=["POST"]),
            Route("/api/dead-letters/{item:int}/requeue", requeue, methods=["POST"]),
        ]

    def _read(self, request: Request, kind: str) -> Any:
        """An output of the request's study: the SR as text ("sr"), an SC as a PNG thumbnail
        ("scN"); None when there is none."""
        path = self._output(request, kind)
        if path is None:
            return None
        if kind == "sr":
            return _report(path, _stamp(path))[0]
        return _thumbnail(path, _stamp(path))

    def _output(self, request: Request, kind: str) -> Path | None:
        study, task = request.path_params["study"], request.path_params["task"]
        if not UID(study).is_valid or task not in self.service.config.tasks:
            return None
        state = self.service.spool.study(study, task)
        if state is None:
            return None
        path = Path(self.service.spool.outputs_dir) / study / f"{task}-v{state.version}-{kind}.dcm"
        return path if path.is_file() else None

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows, as JSON-able data (also ``/api/status``)."""
        service = self.service
        config = service.config
        spool = service.spool
        checks = {name: problems or "ok" for name, problems in service.checks().items()}
        models = [
            {
                "task": task,
                "name": bundle.card.name,
                "version": bundle.card.version,
                "sha256": bundle.card.model_sha256,
                "demo": bundle.card.demo,
                "views": bundle.card.views,
            }
            for task, bundle in sorted(service.bundles.items())
        ]
        destinations = [
            {
                "name": d.key,
                "type": d.type,
                "target": d.url if d.type == "dicomweb" else f"{d.ae_title}@{d.host}:{d.port}",
                "tls": d.tls is not None or (d.url or "").startswith("https://"),
            }
            for d in config.destinations
        ]
        studies = []
        for state in spool.recent_studies(self.recent):
            studies.append(self._study(state))
        dead = [
            {
                "id": item.id,
                "study_instance_uid": item.study_instance_uid,
                "task": item.task,
                "file": item.path.name,
                "destination": item.destination,
                "attempts": item.attempts,
                "error": item.last_error,
                "since": _when(item.updated_at),
            }
            for item in spool.dead_letters()
        ]
        return {
            "node": {
                "ae_title": config.node.ae_title,
                "dicom_port": service.scp.port if hasattr(service, "scp") else config.node.port,
                "tls": config.node.tls is not None,
                "image_check": config.routing.image_check,
            },
            "ready": not any(v != "ok" for v in checks.values()),
            "checks": checks,
            "models": models,
            "peers": [{"ae_title": p.ae_title, "host": p.host or "any"} for p in config.peers],
            "destinations": destinations,
            "queues": {"studies": spool.study_counts(), "outbox": spool.outbox_counts()},
            "studies": studies,
            "dead_letters": dead,
        }

    def _study(self, state: Any) -> dict[str, Any]:
        spool = self.service.spool
        folder = Path(spool.outputs_dir) / state.study_instance_uid
        prefix = f"{state.task}-v{state.version}-"
        sr = folder / f"{prefix}sr.dcm"
        captures = sorted(
            int(p.stem.rsplit("sc", 1)[1])
            for p in folder.glob(f"{prefix}sc*.dcm")
            if p.stem.rsplit("sc", 1)[1].isdigit()
        )
        result, report = "", None
        if state.state == "done" and sr.is_file():
            try:
                _, result = _report(sr, _stamp(sr))
                report = f"/api/studies/{state.study_instance_uid}/{state.task}/report.txt"
            except Exception as error:  # a damaged output: say so, keep the page up
                result = f"(the report cannot be read: {type(error).__name__})"
        elif state.state == "done":
            result = "(no output: outputs.when_not_applicable is skip)"
        elif state.state == "failed":
            result = f"failed: {state.error}"
        sends: dict[str, dict[str, int]] = {}
        last_sent = None
        for item in spool.outbox_for(state.study_instance_uid, state.task):
            if not item.path.name.startswith(prefix):
                continue  # an earlier version's outputs
            counts = sends.setdefault(item.destination, {})
            counts[item.state] = counts.get(item.state, 0) + 1
            if item.state == "sent":
                last_sent = max(last_sent or 0.0, item.updated_at)
        done = state.updated_at if state.state == "done" else None
        timings = {
            "wait_s": _seconds(state.last_received_at, state.claimed_at),
            "analysis_s": _seconds(state.claimed_at, done),
            "send_s": _seconds(done, last_sent),
            "end_to_end_s": _seconds(state.last_received_at, last_sent),
        }
        base = f"/api/studies/{state.study_instance_uid}/{state.task}"
        return {
            "study_instance_uid": state.study_instance_uid,
            "task": state.task,
            "state": state.state,
            "version": state.version,
            "received": _when(state.last_received_at),
            "result": result,
            "timings": timings,
            "sends": sends,
            "report": report,
            "thumbnails": [f"{base}/sc/{n}.png" for n in captures] if report else [],
        }


def _seconds(start: float | None, end: float | None) -> float | None:
    if start is None or end is None or end < start:
        return None
    return round(end - start, 2)


def _when(stamp: float | None) -> str:
    if not stamp:
        return ""
    return dt.datetime.fromtimestamp(stamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _json(body: object, status: int = 200) -> Response:
    return Response(
        json.dumps(body, indent=1) + "\n", status_code=status, media_type="application/json"
    )


# -- HTML ---------------------------------------------------------------------------------------

_STATIC = resources.files("dicom_node") / "static"
_STYLE = (_STATIC / "status.css").read_text()
_SCRIPT = (_STATIC / "status.js").read_text()


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _table(headers: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f"<p>{_e(empty)}</p>"
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt_s(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f} s"


def render(s: dict[str, Any]) -> str:
    """The page's HTML from a :meth:`StatusPage.snapshot`."""
    node = s["node"]
    ready = '<span class="ok">ready</span>' if s["ready"] else '<span class="bad">NOT READY</span>'
    checks = _table(
        ["part", "state"],
        [
            [_e(name), '<span class="ok">ok</span>' if v == "ok" else _e("; ".join(v))]
            for name, v in s["checks"].items()
        ],
        "no checks",
    )
    demo = any(m["demo"] for m in s["models"])
    models = _table(
        ["task", "model", "version", "sha256", "views"],
        [
            [
                _e(m["task"]),
                _e(m["name"]),
                _e(m["version"]) + (" (demo)" if m["demo"] else ""),
                f"<code>{_e(m['sha256'][:16])}…</code>",
                _e(", ".join(m["views"])),
            ]
            for m in s["models"]
        ],
        "no models loaded",
    )
    peers = _table(
        ["calling AE", "host"],
        [[_e(p["ae_title"]), _e(p["host"])] for p in s["peers"]],
        "Any calling AE may send (peers: is empty).",
    )
    destinations = _table(
        ["name", "type", "target", "TLS"],
        [
            [_e(d["name"]), _e(d["type"]), _e(d["target"]), "yes" if d["tls"] else "no"]
            for d in s["destinations"]
        ],
        "No destinations: results stay in the spool and on this page (destinations: in "
        "conf.yaml sends them to the PACS).",
    )
    queues = s["queues"]
    queue_line = ", ".join(f"{k} {v}" for k, v in sorted(queues["studies"].items())) or "none"
    outbox_line = ", ".join(f"{k} {v}" for k, v in sorted(queues["outbox"].items())) or "empty"
    studies = []
    for st in s["studies"]:
        sends = "; ".join(
            f"{_e(d)}: " + ", ".join(f"{n} {_e(k)}" for k, n in sorted(c.items()))
            for d, c in st["sends"].items()
        )
        t = st["timings"]
        timing = (
            f"wait {_fmt_s(t['wait_s'])}<br>analysis {_fmt_s(t['analysis_s'])}<br>"
            f"send {_fmt_s(t['send_s'])}<br>total {_fmt_s(t['end_to_end_s'])}"
        )
        outputs = "".join(
            f'<img class="thumb" alt="saliency overlay {i}" src="{_e(src)}">'
            for i, src in enumerate(st["thumbnails"], start=1)
        )
        if st["report"]:
            outputs += (
                f'<details><summary>SR as text</summary><pre class="sr" '
                f'data-src="{_e(st["report"])}">loading…</pre></details>'
            )
        studies.append(
            [
                f'<code class="study">{_e(st["study_instance_uid"])}</code><br>'
                f"received {_e(st['received'])}",
                _e(st["task"]) + f" v{st['version']}",
                _e(st["state"]),
                f'<span class="result">{_e(st["result"])}</span>',
                timing,
                sends or "–",
                outputs or "–",
            ]
        )
    study_table = _table(
        ["study", "task", "state", "result", "timings", "sent", "outputs"],
        studies,
        "No studies yet: send one (python -m dicom_node send, storescu, or STOW-RS).",
    )
    dead_rows = [
        [
            _e(d["id"]),
            f"<code>{_e(d['study_instance_uid'])}</code>",
            _e(d["file"]),
            _e(d["destination"]),
            _e(d["attempts"]),
            _e(d["error"]),
            f'<button class="requeue" data-id="{d["id"]}" '
            f"onclick=\"requeue('/api/dead-letters/{d['id']}/requeue')\">requeue</button>",
        ]
        for d in s["dead_letters"]
    ]
    dead = _table(
        ["id", "study", "file", "destination", "attempts", "last error", ""],
        dead_rows,
        "No dead letters.",
    )
    requeue_all = (
        '<p><button id="requeue-all" onclick="requeue(\'/api/dead-letters/requeue\')">'
        "requeue all</button></p>"
        if dead_rows
        else ""
    )
    load_reports = (
        "document.querySelectorAll('pre.sr').forEach(async p=>{"
        "const r=await fetch(p.dataset.src);p.textContent=await r.text();});"
    )
    warning = (
        '<div class="demo"><b>Demo weights: not for clinical use.</b> The models were trained '
        "on synthetic phantoms; every output they make says so.</div>"
        if demo
        else ""
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>orthonode {_e(node["ae_title"])}</title>
<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>
<h1>orthonode {_e(node["ae_title"])} — {ready}</h1>
<p>DICOM port {_e(node["dicom_port"])}{" (TLS)" if node["tls"] else ""}; image check
{_e(node["image_check"])}; <a href="/api/status">JSON</a> · <a href="/metrics">metrics</a> ·
<a href="/readyz">readyz</a> · <a href="/">refresh</a></p>
{warning}
<h2>Health</h2>{checks}
<h2>Models</h2>{models}
<h2>Peers</h2>{peers}
<h2>Destinations</h2>{destinations}
<h2>Queues</h2><p id="queues">studies: {_e(queue_line)}; outbox: {_e(outbox_line)}</p>
<h2>Recent studies</h2>{study_table}
<h2>Dead letters</h2>
<p><label>token <input id="token" type="password" size="30" onchange="saveToken()"></label>
(needed to requeue unless no tokens are configured and you are on this host)
<span id="requeue-result"></span></p>
{dead}{requeue_all}
<script>{load_reports}</script>
</body></html>
"""
