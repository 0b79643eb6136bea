"""STOW-RS egress against a real HTTP(S) service on 127.0.0.1 that answers as scripted: 200,
202 with FailedSOPSequence, 401, 409, 503, 400, a TLS certificate not trusted, no service at
all; each instance's fate (sent, retried, dead-lettered) as :mod:`dicom_node.send.stow` says.
Then the node's outbox over it: a 503 is retried and the outputs arrive, and a refusal is a
dead letter that the status page's requeue sends again. Orthanc's own DICOMweb plugin as the
destination is tests/e2e/test_dicomweb_e2e.py.
"""

# ruff: noqa: F811  (fixtures imported from other test modules are redefined as parameters)

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dicom_node.config import DestinationConfig, TlsConfig
from dicom_node.http import HttpEndpoint
from dicom_node.send.stow import stow_files
from tests.conftest import make_set
from tests.factories import RecordingPacs, free_port, manifest_rows, tiny_bundle, wait_for
from tests.net.test_node_service import (  # noqa: F401  (fixtures)
    _node_config,
    _send,
    knee_only,
    pacs,
    start_node,
)
from tests.net.test_tls import node_tls, pki  # noqa: F401  (fixture)


@dataclass
class StowService:
    """A STOW-RS origin server that parses what it gets and answers ``script(uids)``."""

    script: Callable[[list[str], set[str]], tuple[int, dict[str, Any] | None]]
    tls: TlsConfig | None = None
    received: list[list[str]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> StowService:
        async def studies(request: Request) -> Response:
            _, params = parse_options_header(request.headers["content-type"])
            parts: list[bytearray] = []
            parser = MultipartParser(
                params[b"boundary"],
                {
                    "on_part_begin": lambda: parts.append(bytearray()),
                    "on_part_data": lambda d, s, e: parts[-1].extend(d[s:e]),
                },
            )
            async for chunk in request.stream():
                parser.write(chunk)
            parser.finalize()
            datasets = [pydicom.dcmread(_bytes(p), stop_before_pixels=True) for p in parts]
            uids = [str(ds.SOPInstanceUID) for ds in datasets]
            with self._lock:
                self.received.append(uids)
                self.headers.append(dict(request.headers))
            status, body = self.script(uids, {str(ds.StudyInstanceUID) for ds in datasets})
            if body is None:
                return Response(status_code=status)
            return Response(
                pydicom.Dataset.from_json(body).to_json(),
                status_code=status,
                media_type="application/dicom+json",
            )

        app = Starlette(routes=[Route("/web/studies", studies, methods=["POST"])])
        self.endpoint = HttpEndpoint("127.0.0.1", 0, app, tls=self.tls)
        scheme = "https" if self.tls else "http"
        self.url = f"{scheme}://localhost:{self.endpoint.port}/web"
        return self

    def stop(self) -> None:
        self.endpoint.stop()


def _bytes(data: bytearray) -> Any:
    import io

    return io.BytesIO(bytes(data))


def _items(uids: list[str], reason: int | None = None) -> dict[str, Any]:
    items = []
    for uid in uids:
        item: dict[str, Any] = {"00081155": {"vr": "UI", "Value": [uid]}}
        if reason is not None:
            item["00081197"] = {"vr": "US", "Value": [reason]}
        items.append(item)
    return {"vr": "SQ", "Value": items}


@pytest.fixture
def service() -> Iterator[Callable[..., StowService]]:
    started: list[StowService] = []

    def start(script: Callable[..., Any], tls: TlsConfig | None = None) -> StowService:
        stow = StowService(script, tls).start()
        started.append(stow)
        return stow

    yield start
    for stow in started:
        stow.stop()


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three DICOM files to send (phantom radiographs stand in for the node's outputs)."""
    folder = make_set(tmp_path_factory.mktemp("out"), "hip", task="hip", patients=3, seed=5)
    return [folder / row["path"] for row in manifest_rows(folder)]


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _destination(url: str, **extra: Any) -> DestinationConfig:
    return DestinationConfig(type="dicomweb", name="web", url=url, **extra)


def test_each_answer_decides_each_instance(
    service: Callable[..., StowService], outputs: list[Path], tmp_path: Path
) -> None:
    a, b, c = outputs
    ok = service(lambda uids, studies: (200, None))
    assert stow_files(_destination(ok.url), outputs) == dict.fromkeys(outputs)
    assert ok.received == [[_uid(p) for p in outputs]]
    assert "multipart/related" in ok.headers[0]["content-type"]
    # Sent with its length (some services refuse chunked uploads).
    assert int(ok.headers[0]["content-length"]) > sum(p.stat().st_size for p in outputs)
    assert "transfer-encoding" not in ok.headers[0]

    # 200 whose answer still lists a failure; 202 that does not say which failed; a
    # FailureReason without a value (a processing failure: retried).
    listed = service(lambda uids, studies: (200, {"00081198": _items([uids[0]], 0xC000)}))
    result = stow_files(_destination(listed.url), outputs)
    assert result[a].permanent and result[b] is None and result[c] is None  # type: ignore[union-attr]
    silent = service(lambda uids, studies: (202, None))
    assert all(
        not r.permanent and "202" in r  # type: ignore[union-attr]
        for r in stow_files(_destination(silent.url), outputs).values()
    )
    empty = {"00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["X"]}}]}}
    empty["00081198"]["Value"] = [
        {"00081155": {"vr": "UI", "Value": [_uid(a)]}, "00081197": {"vr": "US"}}
    ]
    unnamed = service(lambda uids, studies: (409, empty))
    [failure] = stow_files(_destination(unnamed.url), [a]).values()
    assert "0x0110" in str(failure) and not failure.permanent  # type: ignore[union-attr]

    # 202: a stored, b out of resources (retried), c cannot understand (dead at once).
    partial = service(
        lambda uids, studies: (
            202,
            {
                "00081199": _items([uids[0]]),
                "00081198": {
                    "vr": "SQ",
                    "Value": [
                        _items([uids[1]], 0xA700)["Value"][0],
                        _items([uids[2]], 0xC000)["Value"][0],
                    ],
                },
            },
        )
    )
    result = stow_files(_destination(partial.url), outputs)
    assert result[a] is None
    assert "0xA700" in str(result[b]) and not result[b].permanent  # type: ignore[union-attr]
    assert "0xC000" in str(result[c]) and result[c].permanent  # type: ignore[union-attr]

    # 409 with the reasons, and 409 / 400 without a body: the service will not take them.
    conflict = service(lambda uids, studies: (409, {"00081198": _items(uids, 0xA900)}))
    assert all(r.permanent for r in stow_files(_destination(conflict.url), outputs).values())  # type: ignore[union-attr]
    for code in (409, 400, 415):
        refusing = service(lambda uids, studies, code=code: (code, None))
        [failure] = set(stow_files(_destination(refusing.url), [a]).values())
        assert f"HTTP {code}" in str(failure) and failure.permanent  # type: ignore[union-attr]

    # 503 and 401: retried (busy; a token being fixed), and said so.
    for code, words in ((503, "busy"), (401, "credentials refused")):
        failing = service(lambda uids, studies, code=code: (code, None))
        [failure] = set(stow_files(_destination(failing.url), [a]).values())
        assert words in str(failure) and not failure.permanent  # type: ignore[union-attr]

    # No service at all: retried.
    [failure] = set(stow_files(_destination(f"http://127.0.0.1:{free_port()}/x"), [a]).values())
    assert not failure.permanent  # type: ignore[union-attr]


def test_credentials_travel_as_configured(
    service: Callable[..., StowService],
    outputs: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stow = service(lambda uids, studies: (200, None))
    token = tmp_path / "token"
    token.write_text("tok-123\n")
    assert stow_files(_destination(stow.url, token_file=token), outputs[:1]) == {outputs[0]: None}
    assert stow.headers[-1]["authorization"] == "Bearer tok-123"
    monkeypatch.setenv("PACS_PASSWORD", "pw")
    assert stow_files(
        _destination(stow.url, username="orthonode", password_env="PACS_PASSWORD"), outputs[:1]
    ) == {outputs[0]: None}
    assert (
        stow.headers[-1]["authorization"] == "Basic " + base64.b64encode(b"orthonode:pw").decode()
    )
    # A token variable that is empty: nothing is sent, the reason is given, it is retried.
    monkeypatch.setenv("EMPTY_TOKEN", "")
    [failure] = stow_files(_destination(stow.url, token_env="EMPTY_TOKEN"), outputs[:1]).values()
    assert "EMPTY_TOKEN" in str(failure) and not failure.permanent  # type: ignore[union-attr]
    assert len(stow.received) == 2


def test_https_is_verified(
    service: Callable[..., StowService], outputs: list[Path], pki: Path
) -> None:
    stow = service(lambda uids, studies: (200, None), tls=node_tls(pki))
    # The test CA is not trusted by default: refused, retried, and it says TLS.
    [failure] = stow_files(_destination(stow.url), outputs[:1]).values()
    assert str(failure).startswith("TLS") and not failure.permanent  # type: ignore[union-attr]
    assert stow.received == []
    trusting = _destination(stow.url, tls=TlsConfig(ca_certificates=pki / "ca.pem"))
    assert stow_files(trusting, outputs[:1]) == {outputs[0]: None}
    assert len(stow.received) == 1


@pytest.mark.slow
def test_the_outbox_retries_then_requeues_from_the_status_page(
    tmp_path: Path,
    pacs: RecordingPacs,
    start_node: Callable[..., Any],
    service: Callable[..., StowService],
) -> None:
    seen: set[str] = set()
    refuse: set[str] = set()  # studies whose outputs are refused with 400 until "fixed"

    def script(uids: list[str], studies: set[str]) -> tuple[int, None]:
        if refuse & studies:
            return 400, None
        first_time = not seen & set(uids)
        seen.update(uids)
        return (503 if first_time else 200), None

    stow = service(script)
    bundle = tmp_path / "knee-bundle"
    tiny_bundle(bundle, "knee")
    config = _node_config(tmp_path, pacs, knee_only(bundle))
    config["destinations"] = [{"name": "web", "type": "dicomweb", "url": stow.url}]
    config["node"]["http_port"] = free_port()
    config["routing"] = {"image_check": "off"}
    node = start_node(config)
    folder = make_set(tmp_path, "knee", task="knee", patients=2, seed=21)
    rows = manifest_rows(folder)
    first = [r for r in rows if r["study_instance_uid"] == rows[0]["study_instance_uid"]]
    assert _send(node.scp.port, [pydicom.dcmread(folder / r["path"]) for r in first]) == [0, 0]
    # 503 first: retried after the backoff, then 200: SR + 2 SC arrive.
    wait_for(lambda: node.spool.outbox_counts().get("sent", 0) == 3, 120, "3 outputs sent")
    sent = [uid for request in stow.received for uid in request]
    assert len(sent) == 6 and len(set(sent)) == 3  # each output twice: 503, then 200

    # The second study is refused with 400: dead letters, shown on the page, requeued there.
    second = [r for r in rows if r not in first]
    refuse.add(second[0]["study_instance_uid"])
    assert _send(node.scp.port, [pydicom.dcmread(folder / r["path"]) for r in second]) == [0, 0]
    wait_for(lambda: len(node.spool.dead_letters()) == 3, 120, "3 dead letters")
    base = f"http://127.0.0.1:{config['node']['http_port']}"
    page = requests.get(base + "/", timeout=30).text
    assert "HTTP 400" in page and page.count('class="requeue"') == 3
    refuse.clear()
    item = node.spool.dead_letters()[0].id
    answer = requests.post(f"{base}/api/dead-letters/{item}/requeue", timeout=30)
    assert answer.status_code == 200 and answer.json() == {"requeued": 1}
    wait_for(lambda: node.spool.outbox_counts().get("sent", 0) == 4, 60, "the requeued one sent")
    assert requests.post(f"{base}/api/dead-letters/{item}/requeue", timeout=30).status_code == 404
    answer = requests.post(f"{base}/api/dead-letters/requeue", timeout=30)
    assert answer.json() == {"requeued": 2}
    wait_for(lambda: node.spool.outbox_counts().get("sent", 0) == 6, 60, "all sent")
