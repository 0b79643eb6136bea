"""The CLI (echo, check-config, status, send --retry-dead) and the sender against a real SCP."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import torch

from dicom_node.cli import main as node_main
from dicom_node.config import DestinationConfig, NodeConfig, SendConfig
from dicom_node.models.backbones import build_backbone
from dicom_node.models.bundle import save_bundle
from dicom_node.models.codes import card_classes
from dicom_node.receive import StorageScp
from dicom_node.send import Sender
from dicom_node.store import Spool
from tests.conftest import make_set
from tests.factories import MemorySink, queue_outputs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def pacs() -> Iterator[tuple[StorageScp, MemorySink]]:
    sink = MemorySink()
    scp = StorageScp(NodeConfig(ae_title="PACS", host="127.0.0.1", port=0), sink)
    scp.start()
    yield scp, sink
    scp.stop()


def test_echo_command(
    pacs: tuple[StorageScp, MemorySink], capsys: pytest.CaptureFixture[str]
) -> None:
    scp, _ = pacs
    assert node_main(["echo", f"PACS@127.0.0.1:{scp.port}"]) == 0
    assert "success" in capsys.readouterr().out
    assert node_main(["echo", f"WRONG@127.0.0.1:{scp.port}"]) == 1
    assert node_main(["echo", "not-an-address"]) == 2


def test_check_config_names_the_missing_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "conf.yaml"
    conf.write_text(
        "tasks:\n  knee: {bundle: nowhere/knee}\n  hip: {enabled: false, bundle: x}\n"
        "  spine: {enabled: false, bundle: x}\n"
    )
    assert node_main(["check-config", "--config", str(conf)]) == 2
    error = capsys.readouterr().err
    assert "nowhere/knee/card.json is missing" in error
    assert "python -m train" in error and "enabled: false" in error


def test_check_config_lists_bundles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    classes = card_classes("hip")
    save_bundle(
        tmp_path / "hip",
        build_backbone("mobilenet_v3_small", 2),
        {
            "task": "hip",
            "name": "hip test",
            "version": "9.9",
            "device_uid": "2.25.9",
            "classes": classes,
            "backbone": "mobilenet_v3_small",
            "input_size": 64,
        },
    )
    conf = tmp_path / "conf.yaml"
    conf.write_text(
        "tasks:\n  hip: {bundle: hip}\n  knee: {enabled: false, bundle: x}\n"
        "  spine: {enabled: false, bundle: x}\n"
        f"routing: {{image_check_bundle: {ROOT / 'weights' / 'image-check'}}}\n"
    )
    assert node_main(["check-config", "--config", str(conf)]) == 0
    out = capsys.readouterr().out
    assert "hip: hip test 9.9" in out and "DEMO WEIGHTS" in out
    assert "image check (confirm): orthonode image check" in out
    # Relative paths are read from conf.yaml's folder: a missing image check names the key.
    conf.write_text(conf.read_text().replace(str(ROOT / "weights"), "nowhere"))
    assert node_main(["check-config", "--config", str(conf)]) == 2
    assert "routing.image_check_bundle" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_refuses_to_start_without_bundles(tmp_path: Path) -> None:
    """A configured task without its bundle stops serve before it listens, with the fix."""
    conf = tmp_path / "conf.yaml"
    conf.write_text((ROOT / "conf.yaml").read_text().replace("weights/", "missing-weights/"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_node",
            "serve",
            "--config",
            str(conf),
            "--port",
            "0",
            "--spool",
            str(tmp_path / "spool"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "missing-weights/knee/card.json is missing" in result.stderr
    assert "python -m train" in result.stderr


def test_sender_delivers_retries_and_dead_letters(
    tmp_path: Path, pacs: tuple[StorageScp, MemorySink]
) -> None:
    scp, sink = pacs
    folder = make_set(tmp_path, "h", task="hip", patients=2, seed=3)
    paths = sorted((folder / "dicom").rglob("*.dcm"))
    spool = Spool(tmp_path / "spool")
    good = DestinationConfig(name="pacs", ae_title="PACS", host="127.0.0.1", port=scp.port)
    bad = DestinationConfig(name="down", ae_title="PACS", host="127.0.0.1", port=1)
    policy = SendConfig(max_attempts=2, backoff_initial_s=0.01, backoff_max_s=0.01)
    queue_outputs(spool, "1.2.3", paths, ["pacs", "down"])
    sender = Sender(spool, [good, bad], policy, "ORTHONODE")
    assert sender.step() == 4
    for path in paths:
        assert pydicom.dcmread(path).SOPInstanceUID in sink.stored
    counts = spool.outbox_counts()
    assert counts == {"sent": 2, "pending": 2}
    # After the backoff the unreachable destination is retried, then dead-lettered.
    deadline = time.monotonic() + 10
    while spool.outbox_counts().get("dead", 0) < 2 and time.monotonic() < deadline:
        sender.step()
    assert spool.outbox_counts() == {"sent": 2, "dead": 2}
    assert all(
        (d.last_error or "").startswith(
            "association with PACS at 127.0.0.1:1 failed: connection refused"
        )
        for d in spool.dead_letters()
    )
    spool.close()


def test_status_and_retry_dead_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spool = Spool(tmp_path / "spool")
    queue_outputs(spool, "1.2.3", [tmp_path / "x.dcm"], ["pacs"])
    [item] = spool.due()
    spool.mark_failed(item.id, "C-STORE status 0xA700", None)
    spool.close()
    conf = tmp_path / "conf.yaml"
    conf.write_text("spool: {directory: spool}\n")
    assert node_main(["status", "--config", str(conf)]) == 0
    out = capsys.readouterr().out
    assert "dead 1" in out and "0xA700" in out
    assert node_main(["send", "--retry-dead", "--config", str(conf)]) == 0
    assert "1 dead letter(s) queued again" in capsys.readouterr().out
    reopened = Spool(tmp_path / "spool")
    assert reopened.outbox_counts() == {"pending": 1}


def test_sender_uses_parallel_associations(
    tmp_path: Path, pacs: tuple[StorageScp, MemorySink]
) -> None:
    """Each due item of a destination goes out on its own association, at the same time."""
    import threading

    from dicom_node.send import send_files

    scp, sink = pacs
    folder = make_set(tmp_path, "k", task="knee", patients=2, seed=4)
    paths = sorted((folder / "dicom").rglob("*.dcm"))
    spool = Spool(tmp_path / "spool")
    queue_outputs(spool, "1.2.3", paths, ["pacs"])
    running, most, lock = [0], [0], threading.Lock()
    barrier = threading.Barrier(3, timeout=10)

    def transport(destination: DestinationConfig, chunk: list[Path], ae: str) -> dict:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        barrier.wait()  # three associations must be open together, or this times out
        try:
            return send_files(destination, chunk, ae)
        finally:
            with lock:
                running[0] -= 1

    good = DestinationConfig(name="pacs", ae_title="PACS", host="127.0.0.1", port=scp.port)
    policy = SendConfig(associations=3)
    sender = Sender(spool, [good], policy, "ORTHONODE", transport=transport)
    assert sender.step() == len(paths) == 4
    sender.close()
    assert most[0] == 3
    assert spool.outbox_counts() == {"sent": 4}
    assert {pydicom.dcmread(p).SOPInstanceUID for p in paths} <= set(sink.stored)
    spool.close()
