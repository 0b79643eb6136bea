"""Bundle upgrades without downtime: reload between batches, refuse a bad bundle and keep
serving, queued studies processed by the new version (and their SRs say so); the `reload`
command signals the running node."""

# ruff: noqa: F811  (fixtures imported from test_node_service are redefined as parameters)

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pydicom

from dicom_node.cli import PID_FILE
from dicom_node.models.bundle import update_card
from dicom_node.service import Service
from tests.conftest import make_set
from tests.factories import RecordingPacs, manifest_rows, wait_for
from tests.net.test_node_service import (  # noqa: F401  (fixtures)
    ROOT,
    _node_config,
    _send,
    knee_only,
    pacs,
    start_node,
)


def algorithm_version(report: pydicom.Dataset) -> str:
    """The Algorithm Version (111003, DCM) the SR names."""
    found = []

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            for concept in item.get("ConceptNameCodeSequence", []):
                if concept.CodeValue == "111003" and "TextValue" in item:
                    found.append(str(item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(report.ContentSequence)
    assert found, "no Algorithm Version in the SR"
    return found[0]


def study_of(folder: Path) -> tuple[str, list[pydicom.Dataset]]:
    rows = manifest_rows(folder)
    return rows[0]["study_instance_uid"], [pydicom.dcmread(folder / r["path"]) for r in rows]


def test_reload_uses_the_new_version_and_refuses_a_bad_bundle(
    tmp_path: Path, pacs: RecordingPacs, start_node: Callable[..., Service]
) -> None:
    bundle = tmp_path / "knee"
    shutil.copytree(ROOT / "weights" / "knee", bundle)
    tasks = knee_only(bundle)
    config = _node_config(tmp_path, pacs, tasks)
    config["routing"] = {"image_check": "off"}
    config["assembly"] = {"stable_after_s": 1}
    service = start_node(config)
    old = service.bundles["knee"].card.version
    sets = [make_set(tmp_path, f"k{i}", task="knee", patients=1, seed=70 + i) for i in range(3)]

    update_card(bundle, {"version": "9.9.9-reloaded"})
    assert service.reload() is True
    first, datasets = study_of(sets[0])
    assert _send(service.scp.port, datasets) == [0, 0]
    wait_for(lambda: pacs.of_study(first, "SR"), 90, "the SR")
    assert algorithm_version(pacs.of_study(first, "SR")[0]) == "9.9.9-reloaded" != old

    # A bundle whose weights do not match its card: refused, the running one serves on.
    (bundle / "model.pt").write_bytes(b"not the weights")
    assert service.reload() is False
    assert service.bundles["knee"].card.version == "9.9.9-reloaded"
    second, datasets = study_of(sets[1])
    assert _send(service.scp.port, datasets) == [0, 0]
    wait_for(lambda: pacs.of_study(second, "SR"), 90, "the SR after a refused reload")
    assert algorithm_version(pacs.of_study(second, "SR")[0]) == "9.9.9-reloaded"
    audit = [json.loads(line) for line in (tmp_path / "spool" / "audit.jsonl").open()]
    assert [e["event"] for e in audit if e["event"].startswith("reload")] == [
        "reload",
        "reload-refused",
    ]
    refused = next(e for e in audit if e["event"] == "reload-refused")
    assert "model.pt" in refused["error"] and refused["serving"] == {"knee": "9.9.9-reloaded"}


def test_the_reload_command_signals_the_running_node(tmp_path: Path) -> None:
    """`python -m dicom_node reload` finds the node through the spool's pid file and sends
    SIGHUP (here to a stand-in that reports it)."""
    spool = tmp_path / "spool"
    spool.mkdir()
    (tmp_path / "conf.yaml").write_text(f"spool: {{directory: {spool}}}\n")
    stand_in = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys, time\n"
            "signal.signal(signal.SIGHUP, lambda *a: (print('HUP', flush=True), sys.exit(0)))\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert stand_in.stdout is not None and stand_in.stdout.readline().strip() == "ready"
        (spool / PID_FILE).write_text(f"{stand_in.pid}\n")
        result = subprocess.run(
            [sys.executable, "-m", "dicom_node", "reload", "--config", str(tmp_path / "conf.yaml")],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert "SIGHUP" in result.stdout
        assert stand_in.wait(timeout=20) == 0
        assert stand_in.stdout.read().strip() == "HUP"
    finally:
        if stand_in.poll() is None:
            stand_in.kill()
    (spool / PID_FILE).unlink()
    started = time.monotonic()
    missing = subprocess.run(
        [sys.executable, "-m", "dicom_node", "reload", "--config", str(tmp_path / "conf.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert missing.returncode == 1 and "no running node" in missing.stderr
    assert time.monotonic() - started < 60
