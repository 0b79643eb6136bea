"""``python -m dicom_node status`` prints what the status page shows, and ``serve --http-port``.

The spool is the one :mod:`tests.unit.test_status_model` builds (a study in every state, one
dead letter, one failure); a stub HTTP server stands in for a running node's ``/readyz``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from dicom_node.cli import build_parser, main, serve_config
from dicom_node.errors import ConfigError
from dicom_node.problems import BAD_PIXEL_DATA, UNROUTED
from tests.factories import free_port
from tests.unit.test_status_model import Site, site  # noqa: F401  (the fixture)


@pytest.fixture
def conf(site: Site, tmp_path: Path) -> Iterator[Path]:  # noqa: F811
    site.spool.record_problem(
        UNROUTED,
        "no routing rule matched (or its task is not served)",
        peer="CR-ROOM-2",
        study_instance_uid="1.2.826.0.1.3680043.8.498.1",
        sop_instance_uid="1.2.826.0.1.3680043.8.498.2",
    )
    site.spool.record_problem(
        BAD_PIXEL_DATA, "no Pixel Data", protocol="C-STORE", peer="MODALITY", status="0xA900"
    )
    site.spool.close()
    path = tmp_path / "conf.yaml"
    path.write_text(
        f"spool: {{directory: {tmp_path / 'spool'}}}\n"
        f"node: {{host: 127.0.0.1, http_port: {free_port()}}}\n"
    )
    yield path


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["status", *args]) == 0
    return capsys.readouterr().out


def test_status_prints_the_pages_facts(
    site: Site,  # noqa: F811
    conf: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = _run(capsys, "--config", str(conf))
    lines = out.splitlines()
    assert lines[0].startswith("orthonode ORTHONODE: degraded  (the node does not answer")
    assert (
        "  warning: 1 dead letter(s) wait to be requeued (health.dead_letters_warning: 1)" in lines
    )
    assert (
        "studies: waiting 1, processing 1, answered 3, not applicable 1, failed 1, sending 1, "
        "dead letter 1" in lines
    )
    assert "outbox: pending 1, sent 2, dead 1" in lines
    assert "studies, most recent first: 7 of 7" in lines
    dead = site.studies["dead"]
    assert any(dead in line and "answered + dead letter" in line for line in lines)
    assert "      DX KNEE; Implant model: Zimmer LPS (certainty >99 %)" in lines
    assert "      DX KNEE; not applicable: No implant detected" in lines
    assert "      DX KNEE; failed: cannot read the image" in lines
    # The problems, newest first, with their kind, status, sender and UIDs.
    assert "problems, newest first: 2 of 2 kept" in lines
    [pixel] = [line for line in lines if "bad-pixel-data" in line]
    assert "0xA900" in pixel and "C-STORE MODALITY: no Pixel Data" in pixel
    [unrouted] = [
        line for line in lines if line.lstrip().startswith(("20", "19")) and "unrouted" in line
    ]
    assert "CR-ROOM-2: no routing rule matched" in unrouted
    assert "      study 1.2.826.0.1.3680043.8.498.1, SOP 1.2.826.0.1.3680043.8.498.2" in lines
    assert any(line.startswith("  failed: study " + site.studies["failed"]) for line in lines)
    # Dead letters with their study and task, and the last error.
    assert "dead letters: 1" in lines
    [letter] = [line for line in lines if line.startswith("  dead #")]
    assert f"study {dead} knee knee-v1-sr.dcm -> pacs (1 attempt(s)" in letter
    assert letter.endswith("association with ARCHIVE aborted or unreachable")
    # No patient identifier in a terminal.
    assert "ACC-7731" not in out and "PID-0042" not in out and "Doe" not in out


def test_status_filters(site: Site, conf: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    out = _run(capsys, "--config", str(conf), "--state", "not-applicable")
    assert "studies (not applicable), most recent first: 1 of 1" in out
    assert site.studies["not-applicable"] in out and site.studies["answered"] not in out
    out = _run(capsys, "--config", str(conf), "--task", "hip")
    assert "studies (hip), most recent first: 1 of 1" in out and site.studies["waiting"] in out
    out = _run(capsys, "--config", str(conf), "--limit", "2", "--problems", "0")
    assert "most recent first: 2 of 7" in out and "problems, newest first" not in out
    with pytest.raises(SystemExit):
        main(["status", "--config", str(conf), "--state", "done"])
    assert main(["status", "--config", str(conf), "--task", "elbow"]) == 2


def test_status_reads_the_spool_serve_was_given(
    site: Site,  # noqa: F811
    conf: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """README's "try it" node runs with serve --spool / --http-port: status reads the same."""
    other = tmp_path / "other.yaml"
    other.write_text(f"spool: {{directory: {tmp_path / 'empty'}}}\n")
    out = _run(capsys, "--config", str(other))
    assert "most recent first: 0 of 0" in out
    out = _run(capsys, "--config", str(other), "--spool", str(tmp_path / "spool"))
    assert "most recent first: 7 of 7" in out and site.studies["answered"] in out
    _Readyz.answer = {"ready": True, "state": "ready", "checks": {}, "warnings": []}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Readyz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = str(server.server_address[1])
        out = _run(capsys, "--config", str(other), "--http-port", port)
    finally:
        server.shutdown()
        server.server_close()
    assert out.splitlines()[0] == f"orthonode ORTHONODE: ready  (the node answers on port {port})"


class _Readyz(BaseHTTPRequestHandler):
    answer: ClassVar[dict[str, Any]] = {}

    def do_GET(self) -> None:
        body = json.dumps(self.answer).encode()
        self.send_response(503 if not self.answer["ready"] else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return None


def test_status_shows_the_running_nodes_health(
    site: Site,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    site.spool.close()
    _Readyz.answer = {
        "ready": False,
        "state": "not ready",
        "checks": {"models": "ok", "spool": ["disk: 3 MiB free, below the 1024 MiB reserve"]},
        "warnings": ["1 dead letter(s) wait to be requeued (health.dead_letters_warning: 1)"],
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Readyz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        conf = tmp_path / "conf.yaml"
        conf.write_text(
            f"spool: {{directory: {tmp_path / 'spool'}}}\n"
            f"node: {{host: 0.0.0.0, http_port: {server.server_address[1]}}}\n"
        )
        out = _run(capsys, "--config", str(conf))
    finally:
        server.shutdown()
        server.server_close()
    lines = out.splitlines()
    assert lines[0] == (
        f"orthonode ORTHONODE: not ready  (the node answers on port {server.server_address[1]})"
    )
    assert "  not ready: spool: disk: 3 MiB free, below the 1024 MiB reserve" in lines
    assert (
        "  warning: 1 dead letter(s) wait to be requeued (health.dead_letters_warning: 1)" in lines
    )


def test_serve_http_port_overrides_the_configuration(tmp_path: Path) -> None:
    conf = tmp_path / "conf.yaml"
    conf.write_text("node: {http_port: 8181}\n")
    parser = build_parser()

    def http_port(*args: str) -> int:
        return serve_config(
            parser.parse_args(["serve", "--config", str(conf), *args])
        ).node.http_port

    assert http_port() == 8181
    assert http_port("--http-port", "0") == 0  # no HTTP port at all
    assert http_port("--http-port", "9123", "--port", "11113") == 9123
    with pytest.raises(ConfigError, match=r"node\.http_port"):
        http_port("--http-port", "70000")
