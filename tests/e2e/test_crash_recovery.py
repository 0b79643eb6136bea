"""SIGKILL during a burst: nothing acknowledged is lost, nothing is left unanalysed, every
output arrives (docs/reliability.md, "Faults").

The node runs as ``python -m dicom_node serve`` (a subprocess, so it can be killed for real).
Three senders store 20 two-view knee studies at once, each retrying what was not acknowledged
(as a modality or PACS does); the node is killed with SIGKILL three times at random moments
(seeded) and restarted each time. Then every acknowledged instance must be referenced by the
newest SR of its study, every output the node queued must have reached the destination (a
recording Storage SCP), and the outbox must be empty.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml
from pynetdicom import AE, StoragePresentationContexts

from tests.conftest import make_set
from tests.factories import RecordingPacs, free_port, manifest_rows, referenced_instances, wait_for
from tests.net.test_node_service import knee_only

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
STUDIES = 20
SENDERS = 3
KILLS = 3


class KillableNode:
    def __init__(self, root: Path, config: dict[str, Any]) -> None:
        self.config_path = root / "conf.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.port = config["node"]["port"]
        self.log_path = root / "node.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        log = self.log_path.open("a")
        log.write(f"\n===== start {self.starts} =====\n")
        log.flush()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)},
        )
        self.starts += 1
        wait_for(self.echo, 120, "the node to answer C-ECHO")

    def echo(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError("node exited:\n" + self.log_path.read_text()[-3000:])
        ae = AE(ae_title="PROBE")
        ae.acse_timeout = ae.network_timeout = 5
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", self.port, ae_title="ORTHONODE")
        try:
            return bool(assoc.is_established)
        finally:
            if assoc.is_established:
                assoc.release()
            ae.shutdown()

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def sender(
    port: int, studies: list[list[pydicom.Dataset]], acknowledged: set[str], lock: threading.Lock
) -> None:
    """Store each study over one association; resend whatever was not acknowledged, as long
    as it takes (bounded by the test's deadline)."""
    deadline = time.monotonic() + 300
    for datasets in studies:
        pending = list(datasets)
        while pending:
            assert time.monotonic() < deadline, "a sender could not deliver its studies"
            ae = AE(ae_title=f"SENDER{threading.get_ident() % 100}")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
            ae.requested_contexts = StoragePresentationContexts
            assoc = ae.associate("127.0.0.1", port, ae_title="ORTHONODE")
            try:
                if not assoc.is_established:
                    time.sleep(0.2)  # a real SCU waits before it tries again
                    continue
                for ds in list(pending):
                    status = assoc.send_c_store(ds)
                    if status and "Status" in status and int(status.Status) == 0:
                        with lock:
                            acknowledged.add(ds.SOPInstanceUID)
                        pending.remove(ds)
                    else:
                        break
            finally:
                if assoc.is_established:
                    assoc.release()
                ae.shutdown()


def test_sigkill_during_a_burst_loses_nothing(tmp_path: Path) -> None:
    folder = make_set(tmp_path, "burst", task="knee", patients=STUDIES, seed=61)
    by_study: dict[str, list[pydicom.Dataset]] = {}
    for row in manifest_rows(folder):
        by_study.setdefault(row["study_instance_uid"], []).append(
            pydicom.dcmread(folder / row["path"])
        )
    assert len(by_study) == STUDIES
    pacs = RecordingPacs()
    config = {
        "node": {"ae_title": "ORTHONODE", "port": free_port(), "http_port": 0},
        "destinations": [
            {"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}
        ],
        "spool": {"directory": str(tmp_path / "spool"), "min_free_mb": 10},
        "assembly": {"stable_after_s": 3},
        "tasks": knee_only(),
        "routing": {"image_check": "off"},
        "inference": {"device": "cpu"},
        "send": {"backoff_initial_s": 0.5, "backoff_max_s": 2, "max_attempts": 50},
    }
    node = KillableNode(tmp_path, config)
    node.start()
    acknowledged: set[str] = set()
    lock = threading.Lock()
    studies = list(by_study.values())
    threads = [
        threading.Thread(
            target=sender, args=(node.port, studies[i::SENDERS], acknowledged, lock), daemon=True
        )
        for i in range(SENDERS)
    ]
    rng = np.random.default_rng(12)
    kills: list[tuple[float, int]] = []
    started = time.monotonic()
    try:
        for thread in threads:
            thread.start()
        for _ in range(KILLS):
            time.sleep(float(rng.uniform(0.3, 2.5)))  # a random moment of the burst
            with lock:
                kills.append((round(time.monotonic() - started, 2), len(acknowledged)))
            node.kill()
            node.start()
        for thread in threads:
            thread.join(timeout=300)
            assert not thread.is_alive(), "a sender is still trying"
        everything = {ds.SOPInstanceUID for study in studies for ds in study}
        assert acknowledged == everything  # the senders got every instance in, in the end

        def newest_report(study: str) -> pydicom.Dataset | None:
            reports = pacs.of_study(study, "SR")
            if not reports:
                return None
            return max(reports, key=lambda r: (str(r.ContentDate), str(r.ContentTime)))

        def all_analysed() -> bool:
            for study, datasets in by_study.items():
                report = newest_report(study)
                if report is None:
                    return False
                if not {ds.SOPInstanceUID for ds in datasets} <= referenced_instances(report):
                    return False
            return True

        wait_for(all_analysed, 300, "every acknowledged instance in the newest SR of its study")
        assert node.stop() == 0
    finally:
        if node.process is not None and node.process.poll() is None:
            node.process.kill()
        pacs.stop()

    # Every output the node queued was delivered; the outbox is empty.
    db = sqlite3.connect(tmp_path / "spool" / "orthonode.sqlite")
    try:
        states = Counter(state for (state,) in db.execute("SELECT state FROM outbox"))
        paths = [Path(path) for (path,) in db.execute("SELECT path FROM outbox")]
    finally:
        db.close()
    assert set(states) == {"sent"}, states
    queued = {
        pydicom.dcmread(
            p if p.is_absolute() else tmp_path / "spool" / p, stop_before_pixels=True
        ).SOPInstanceUID
        for p in paths
    }
    received = Counter(ds.SOPInstanceUID for ds in pacs.received)
    assert queued <= set(received), "an output the node queued never arrived"
    # A kill between the destination's acknowledgement and the node's record of it means
    # one resend of the same object (same SOP Instance UID, so the PACS keeps one copy):
    # at most one per kill.
    resent = sum(n - 1 for n in received.values())
    assert resent <= KILLS, f"{resent} objects delivered twice, {KILLS} kills"
    print(f"kills (seconds, instances acknowledged so far): {kills}; resent {resent}")
