"""The node's HTTP port (``node.http_port``), a Starlette app served by uvicorn:

* ``/metrics`` for Prometheus (``/metrics`` and ``/metrics/`` alike, no redirect);
  ``/healthz`` (the process answers) and ``/readyz`` (it can take and process studies now:
  models loaded, DICOM listener up, workers running, spool writable and above its disk
  reserve; otherwise 503 with each problem in one line). Ready with warnings (dead letters or
  failed studies at ``health:``'s thresholds) is still 200, with ``"state": "degraded"`` and
  the warnings (:mod:`dicom_node.status.health`);
* ``POST /dicomweb/studies`` and ``POST /dicomweb/studies/{StudyInstanceUID}``: STOW-RS
  (:mod:`dicom_node.receive.dicomweb`);
* ``/``, ``/studies/{StudyInstanceUID}``, ``/problems``: the status page for administrators,
  and its JSON API (:mod:`dicom_node.status`); ``POST /api/dead-letters/{id}/requeue``,
  ``POST /api/dead-letters/requeue`` and ``POST /api/destinations/{n}/check``.

Reading needs no token. Writing (STOW-RS, requeue, a destination check) needs
``Authorization: Bearer <token>`` with a token from ``http.tokens_file`` or
``ORTHONODE_HTTP_TOKENS``; when no token is configured, only clients on this host (loopback)
may write. The status page shows a study's accession number and patient ID only to a request
with a valid bearer token (:func:`bearer`); other answers carry UIDs, never patient data.
HTTPS with ``http.tls``.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry, make_asgi_app
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from dicom_node.config import TlsConfig
from dicom_node.status.health import assess

__all__ = ["HttpEndpoint", "Tokens", "bearer", "make_app", "writer"]

log = logging.getLogger(__name__)

Checks = Callable[[], Mapping[str, list[str]]]
Warnings = Callable[[], list[str]]
TOKENS_ENV = "ORTHONODE_HTTP_TOKENS"


class Tokens:
    """Bearer tokens allowed to write, by name.

    ``tokens_file``: one token per line, ``name token`` or ``token`` alone (named
    ``token-N``); blank lines and ``#`` comments are skipped. The file is read again when it
    changes, so a token is added or revoked without a restart. ``ORTHONODE_HTTP_TOKENS``:
    comma-separated tokens (named ``env-N``).
    """

    def __init__(self, tokens_file: Path | None = None, environ: Mapping[str, str] | None = None):
        self._file = tokens_file
        self._stamp: float | None = None
        self._from_file: dict[str, str] = {}
        env = (os.environ if environ is None else environ).get(TOKENS_ENV, "")
        self._from_env = {
            token.strip(): f"env-{n}"
            for n, token in enumerate(env.split(","), start=1)
            if token.strip()
        }
        self._lock = threading.Lock()
        self._load()

    def _load(self) -> None:
        if self._file is None:
            return
        try:
            stamp = self._file.stat().st_mtime
        except OSError as error:
            self._from_file, self._stamp = {}, None  # gone: its tokens are no longer valid
            raise OSError(f"http.tokens_file {self._file}: {error.strerror}") from error
        if stamp == self._stamp:
            return
        found = {}
        for n, line in enumerate(self._file.read_text().splitlines(), start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name, _, token = line.rpartition(" ")
            found[token] = name.strip() or f"token-{n}"
        self._from_file, self._stamp = found, stamp

    @property
    def configured(self) -> bool:
        with self._lock:
            return bool(self._from_env or self._from_file or self._file is not None)

    def name(self, presented: str) -> str | None:
        """The name of a presented token, or None when it is not one of ours."""
        with self._lock:
            try:
                self._load()
            except OSError as error:
                log.error("%s; no token from that file is accepted until it is back", error)
            found = None
            for token, name in (*self._from_file.items(), *self._from_env.items()):
                if hmac.compare_digest(token.encode(), presented.encode()):
                    found = name
            return found


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bearer(request: Request, tokens: Tokens) -> str | None:
    """The name of the valid bearer token the request carries, or None (none, or not valid).
    Unlike :func:`writer`, a local client without a token is nobody here."""
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return None
    return tokens.name(presented.strip())


def writer(request: Request, tokens: Tokens) -> tuple[str | None, Response | None]:
    """Who may write: (the sender's name, None), or (None, the 401/403 to answer).

    A browser's request from another site's page (an ``Origin`` that is not this host) is
    refused whatever it carries, so a page elsewhere cannot make a local browser requeue."""
    origin = request.headers.get("origin")
    host = request.headers.get("host", "")
    if origin is not None and origin.split("://", 1)[-1] != host:
        return None, _json(403, {"error": f"cross-site request from {origin!r} refused"})
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() == "bearer" and presented.strip():
        name = tokens.name(presented.strip())
        if name is not None:
            return name, None
        return None, _json(
            401,
            {"error": "the bearer token is not valid"},
            {"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    if not tokens.configured:
        if _is_loopback(request.client.host if request.client else None):
            return "local", None
        return None, _json(
            403,
            {
                "error": "no http.tokens_file is configured, so only this host may write; "
                "configure tokens to send from elsewhere"
            },
        )
    return None, _json(
        401,
        {"error": "send Authorization: Bearer <token> (http.tokens_file)"},
        {"WWW-Authenticate": 'Bearer realm="orthonode"'},
    )


def _json(status: int, body: object, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        json.dumps(body, indent=1) + "\n",
        status_code=status,
        media_type="application/json",
        headers=dict(headers or {}),
    )


StowHandler = Callable[[Request, str, "str | None"], Awaitable[Response]]
Asgi = Callable[[Any, Any, Any], Awaitable[None]]


class _Metrics:
    """Prometheus' ASGI app at ``/metrics`` itself (a ``Mount`` alone redirects it to
    ``/metrics/``), after ``refresh`` has updated the gauges read at scrape time (off the
    event loop: it reads the spool)."""

    def __init__(self, app: Asgi, refresh: Callable[[], None] | None) -> None:
        self._app = app
        self._refresh = refresh

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self._refresh is not None:
            try:
                await run_in_threadpool(self._refresh)
            except Exception:  # a scrape still answers, with the gauges as they were
                log.exception("refreshing the metrics before a scrape failed")
        await self._app(scope, receive, send)


def make_app(
    registry: CollectorRegistry,
    checks: Checks,
    *,
    tokens: Tokens | None = None,
    stow: StowHandler | None = None,
    status: Any = None,
    warnings: Warnings | None = None,
    on_scrape: Callable[[], None] | None = None,
) -> Starlette:
    """The ASGI application. ``status`` is a :class:`dicom_node.status.StatusPage` (or None:
    no status page); ``warnings`` what makes the node degraded (:mod:`dicom_node.status.health`);
    ``on_scrape`` updates gauges before each ``/metrics`` answer."""
    tokens = tokens or Tokens()

    async def healthz(request: Request) -> Response:
        return _json(200, {"alive": True})

    def assessed() -> dict[str, Any]:
        try:
            found = {name: list(problems) for name, problems in checks().items()}
        except Exception as error:  # a check that fails is itself a reason not to be ready
            found = {"checks": [f"could not run: {type(error).__name__}"]}
        try:
            warned = list(warnings()) if warnings is not None else []
        except Exception as error:  # warnings that cannot be read are a warning
            warned = [f"the warnings could not be read: {type(error).__name__}"]
        return assess(found, warned).as_json()

    async def readyz(request: Request) -> Response:
        # The checks touch the disk and the index: off the event loop.
        body = await run_in_threadpool(assessed)
        return _json(200 if body["ready"] else 503, body)

    async def store(request: Request) -> Response:
        if stow is None:
            return _json(404, {"error": "STOW-RS is not enabled"})
        sender, refusal = await run_in_threadpool(writer, request, tokens)
        if refusal is not None:
            return refusal
        assert sender is not None
        return await stow(request, sender, request.path_params.get("study"))

    routes: list[Any] = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/dicomweb/studies", store, methods=["POST"]),
        Route("/dicomweb/studies/{study}", store, methods=["POST"]),
        Route("/metrics", _Metrics(make_asgi_app(registry), on_scrape), methods=["GET"]),
        Mount("/metrics", app=_Metrics(make_asgi_app(registry), on_scrape)),
    ]
    if status is not None:
        routes += status.routes(
            lambda request: writer(request, tokens), lambda request: bearer(request, tokens)
        )

    async def not_found(request: Request, exc: Exception) -> Response:
        return _json(404, {"error": f"no such path {request.url.path!r}"})

    async def not_allowed(request: Request, exc: Exception) -> Response:
        return _json(405, {"error": f"{request.method} is not allowed on {request.url.path!r}"})

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_allowed})
    return app


class HttpEndpoint:
    """The app served by uvicorn from a daemon thread; ``port`` 0 picks a free one."""

    def __init__(self, host: str, port: int, app: Starlette, tls: TlsConfig | None = None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.set_inheritable(True)
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_keep_alive=15,
            timeout_graceful_shutdown=10,  # uploads in flight get 10 s at a stop
            # The client's address is the socket's: a proxy's X-Forwarded-For is not believed
            # (behind a reverse proxy every client would otherwise look local).
            proxy_headers=False,
            ssl_certfile=str(tls.certificate) if tls and tls.certificate else None,
            ssl_keyfile=str(tls.private_key) if tls and tls.private_key else None,
        )
        self._server = uvicorn.Server(config)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="orthonode-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the HTTP port {host}:{port} did not start")
            time.sleep(0.01)

    def _serve(self) -> None:
        asyncio.run(self._server.serve(sockets=[self._sock]))

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=20)
        self._sock.close()
