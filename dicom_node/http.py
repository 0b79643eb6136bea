"""The node's HTTP endpoint (``node.http_port``): ``/metrics`` for Prometheus, ``/healthz``
(the process answers) and ``/readyz`` (it can take and process studies now).

``/readyz`` answers 200 with ``{"ready": true, "checks": {...}}`` when the models are loaded,
the DICOM listener is up, the worker threads run, the spool is writable and its disk is above
the reserve (``spool.min_free_mb``); otherwise 503 with each problem in one line, so that a
load balancer or Kubernetes stops sending to it and an administrator sees why. Answers carry
no patient data.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

__all__ = ["HttpEndpoint", "make_app"]

log = logging.getLogger(__name__)

Checks = Callable[[], Mapping[str, list[str]]]


def make_app(registry: CollectorRegistry, checks: Checks) -> Callable[..., Iterable[bytes]]:
    """The WSGI application: /metrics, /healthz, /readyz; 404 for anything else."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics(environ, start_response)
        if path == "/healthz":
            return _answer(start_response, "200 OK", {"alive": True})
        if path == "/readyz":
            try:
                found = {name: list(problems) for name, problems in checks().items()}
            except Exception as error:  # a check that fails is itself a reason not to be ready
                found = {"checks": [f"could not run: {type(error).__name__}"]}
            ready = not any(found.values())
            body = {"ready": ready, "checks": {k: v or "ok" for k, v in found.items()}}
            return _answer(start_response, "200 OK" if ready else "503 Service Unavailable", body)
        return _answer(start_response, "404 Not Found", {"error": f"no such path {path!r}"})

    return app


def _answer(start_response: Callable[..., Any], status: str, body: object) -> list[bytes]:
    data = (json.dumps(body, indent=1) + "\n").encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)


class HttpEndpoint:
    """The WSGI app served from a daemon thread; ``port`` 0 picks a free one."""

    def __init__(self, host: str, port: int, app: Callable[..., Iterable[bytes]]) -> None:
        self._server = make_server(host, port, app, _Server, handler_class=_QuietHandler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="orthonode-http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
