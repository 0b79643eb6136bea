"""The released OHIF viewer for the e2e tests: its cached dist, a one-origin server, Chromium.

OHIF is not built here: ``.ci/run`` fetches the released ``@ohif/app`` package with npm into a
cache outside the clone (``${XDG_CACHE_HOME:-~/.cache}/orthonode/ohif-<version>/``, about 50 MB
packed, 205 MB unpacked: 136 MB of it ``ort/``, onnxruntime-web for the AI segmentation tools,
never loaded here) and the tests find it with :func:`ohif_dist` (``$ORTHONODE_OHIF_DIST``, the
``dist`` folder itself, overrides).

:class:`ViewerServer` serves that dist on 127.0.0.1 and proxies ``/dicom-web/*`` to Orthanc's
DICOMweb root, so the viewer and DICOMweb share one origin (no CORS, and the BulkDataURIs Orthanc
writes into its metadata point back at the proxy: it builds them from the forwarded Host
header). ``/app-config.js`` is the server's own: one ``dicomweb`` data source on that origin.
Unknown paths without a file extension (``/viewer``) serve ``index.html``, as OHIF's router
needs; files answer single HTTP ranges.

:func:`chromium` starts headless Chromium (Debian chromium + chromium-driver) with a fresh
profile and the browser console log kept.
"""

from __future__ import annotations

import http.client
import json
import mimetypes
import os
import re
import shutil
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from tests.conftest import require_tool

__all__ = ["OHIF_VERSION", "ViewerServer", "app_config", "chromium", "ohif_dist"]

#: The released ``@ohif/app`` whose ``dist/`` the tests run; ``.ci/run`` fetches the same one.
OHIF_VERSION = "3.13.2"

_CHUNK = 256 * 1024
_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".wasm": "application/wasm",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".html": "text/html; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".ttf": "font/ttf",
    ".txt": "text/plain; charset=utf-8",
    ".xml": "application/xml",
}
#: Request headers passed on to Orthanc (the rest stay with the proxy).
_FORWARD = ("accept", "accept-encoding", "range", "content-type", "if-none-match")
#: Response headers passed back from Orthanc.
_BACK = ("content-type", "content-encoding", "content-range", "accept-ranges", "etag")


def ohif_dist(version: str = OHIF_VERSION) -> Path:
    """The released OHIF ``dist`` folder: ``$ORTHONODE_OHIF_DIST``, else the cache ``.ci/run``
    fills. Missing: a failure under CI=true (``.ci/run`` fetches it), a skip otherwise."""
    override = os.environ.get("ORTHONODE_OHIF_DIST")
    if override:
        dist = Path(override)
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        dist = cache / "orthonode" / f"ohif-{version}" / "dist"
    if (dist / "index.html").is_file() and (dist / "app-config.js").is_file():
        return dist
    why = (
        f"the OHIF {version} dist is not at {dist} (`bash .ci/run` fetches it with "
        f"`npm pack @ohif/app@{version}`; or set ORTHONODE_OHIF_DIST to a dist folder)"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(why + ", and CI=true requires it")
    pytest.skip(why)


def app_config(dicomweb_root: str = "/dicom-web") -> str:
    """OHIF's ``app-config.js``: one DICOMweb data source (Orthanc, through the proxy) on the
    viewer's own origin; no study list-only extras, no confirmation prompts turned off (the
    tests answer them as a reader would)."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "dicomweb",
        "configuration": {
            "friendlyName": "Orthanc (orthonode e2e)",
            "name": "orthanc",
            "wadoUriRoot": dicomweb_root,
            "qidoRoot": dicomweb_root,
            "wadoRoot": dicomweb_root,
            "qidoSupportsIncludeField": False,
            "supportsReject": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "bulkDataURI": {"enabled": True},
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "maxNumRequests": {"interaction": 100, "thumbnail": 10, "prefetch": 10},
        "showErrorDetails": "always",
        "defaultDataSourceName": "dicomweb",
        "dataSources": [source],
    }
    return "window.config = " + json.dumps(config, indent=2) + ";\n"


class ViewerServer:
    """The OHIF dist and a ``/dicom-web`` proxy to ``upstream`` (Orthanc's HTTP port) on one
    free 127.0.0.1 port, served from a daemon thread until :meth:`stop`.

    ``requests`` keeps the last requests as ``(method, path, status)``, for a failure message.
    """

    def __init__(self, dist: Path, upstream_port: int, dicomweb_root: str = "/dicom-web/") -> None:
        self.dist = dist.resolve()
        self.upstream_port = upstream_port
        self.upstream_root = dicomweb_root.rstrip("/")
        self.config = app_config("/dicom-web").encode()
        self.requests: deque[tuple[str, str, int]] = deque(maxlen=2000)
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"server_state": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="ohif-server", daemon=True
        )
        self._thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, path, status))

    def failures(self) -> list[tuple[str, str, int]]:
        """Requests answered 400 or above (a missing bundle, a refused DICOMweb call)."""
        with self._lock:
            return [r for r in self.requests if r[2] >= 400]

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_state: ViewerServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are recorded, not printed

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path.startswith("/dicom-web/"):
            self._proxy()
        else:
            self._plain(HTTPStatus.METHOD_NOT_ALLOWED, b"read-only\n")

    def _route(self, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        if path == "/dicom-web" or path.startswith("/dicom-web/"):
            self._proxy()
        elif path == "/app-config.js":
            self._bytes(self.server_state.config, "text/javascript; charset=utf-8", head)
        else:
            self._static(path, head)

    # -- the dist -------------------------------------------------------------------------

    def _static(self, path: str, head: bool) -> None:
        state = self.server_state
        target = (state.dist / path.lstrip("/")).resolve()
        if not target.is_relative_to(state.dist):
            self._plain(HTTPStatus.FORBIDDEN, b"outside the dist\n")
            return
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            if Path(path).suffix:  # a missing bundle or asset: say so, not index.html
                self._plain(HTTPStatus.NOT_FOUND, b"not found\n")
                return
            target = state.dist / "index.html"  # the single-page app's own routes
        size = target.stat().st_size
        start, end = 0, size - 1
        status = HTTPStatus.OK
        wanted = self.headers.get("Range")
        if wanted:
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", wanted.strip())
            if match and (match[1] or match[2]):
                if match[1]:
                    start = int(match[1])
                    end = min(int(match[2]), size - 1) if match[2] else size - 1
                else:  # a suffix: the last N bytes
                    start = max(size - int(match[2]), 0)
                if start > end or start >= size:
                    self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    state.record(self.command, path, 416)
                    return
                status = HTTPStatus.PARTIAL_CONTENT
        self.send_response(status)
        self.send_header("Content-Type", _content_type(target))
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Cache-Control", "no-cache")
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self._isolation_headers()
        self.end_headers()
        state.record(self.command, path, int(status))
        if head:
            return
        with target.open("rb") as handle:
            handle.seek(start)
            left = end - start + 1
            while left > 0:
                chunk = handle.read(min(_CHUNK, left))
                if not chunk:
                    break
                self.wfile.write(chunk)
                left -= len(chunk)

    # -- DICOMweb, through to Orthanc -----------------------------------------------------

    def _proxy(self) -> None:
        state = self.server_state
        split = urlsplit(self.path)
        upstream = state.upstream_root + split.path[len("/dicom-web") :]
        if split.query:
            upstream += "?" + split.query
        headers = {k: v for k, v in self.headers.items() if k.lower() in _FORWARD}
        # Orthanc writes BulkDataURIs from the Host it is asked under: the proxy's own.
        headers["Host"] = self.headers.get("Host") or f"127.0.0.1:{state.port}"
        body = None
        if self.command == "POST":
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        connection = http.client.HTTPConnection("127.0.0.1", state.upstream_port, timeout=120)
        try:
            connection.request(self.command, upstream, body=body, headers=headers)
            answer = connection.getresponse()
            data = answer.read()
        except (OSError, http.client.HTTPException) as error:
            self._plain(HTTPStatus.BAD_GATEWAY, f"Orthanc: {error}\n".encode())
            return
        finally:
            connection.close()
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() in _BACK:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self._isolation_headers()
        self.end_headers()
        state.record(self.command, split.path, answer.status)
        if self.command != "HEAD":
            self.wfile.write(data)

    # -- small answers --------------------------------------------------------------------

    def _isolation_headers(self) -> None:
        # Cross-origin isolation: OHIF's workers may use SharedArrayBuffer; everything the
        # page loads is same-origin, so require-corp costs nothing.
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")

    def _bytes(self, data: bytes, content_type: str, head: bool) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache")
        self._isolation_headers()
        self.end_headers()
        self.server_state.record(self.command, urlsplit(self.path).path, 200)
        if not head:
            self.wfile.write(data)

    def _plain(self, status: HTTPStatus, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.server_state.record(self.command, urlsplit(self.path).path, int(status))
        if self.command != "HEAD":
            self.wfile.write(data)


def _content_type(path: Path) -> str:
    known = _TYPES.get(path.suffix.lower())
    if known:
        return known
    guessed, _ = mimetypes.guess_type(path.name)
    return guessed or "application/octet-stream"


@contextmanager
def chromium(profile: Path, width: int = 1600, height: int = 1000) -> Iterator[Any]:
    """Headless Chromium (selenium) with a fresh profile under ``profile``; the browser
    console is kept (``driver.get_log("browser")``)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService

    options = webdriver.ChromeOptions()
    options.binary_location = require_tool("chromium")
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--enable-unsafe-swiftshader",
        f"--user-data-dir={profile}", f"--window-size={width},{height}",
    ):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = ChromeService(require_tool("chromedriver"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
