"""What the destination answers decides what happens to an output (docs/reliability.md,
"Egress"): a scripted Storage SCP on 127.0.0.1 answers each C-STORE with the next status of
its script (or sleeps past the DIMSE timeout); the sender and spool are the node's own."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt

from dicom_node.config import DestinationConfig, SendConfig
from dicom_node.send import Sender
from dicom_node.send.scu import classify
from dicom_node.store import Spool
from tests.conftest import make_set
from tests.factories import free_port, queue_outputs, wait_for


class ScriptedPacs:
    """Answers C-STOREs from ``script`` (status codes, or "sleep" for a reply slower than the
    sender's DIMSE timeout), then 0x0000; records what it was asked and kept."""

    def __init__(self, script: list[int | str], port: int = 0) -> None:
        self.script = list(script)
        self.calls: list[str] = []
        self.kept: list[str] = []
        self._lock = threading.Lock()
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        self._server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        self.port = int(self._server.server_address[1])

    def _store(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            self.calls.append(uid)
            answer = self.script.pop(0) if self.script else 0x0000
        if answer == "sleep":
            time.sleep(3.0)
            return 0x0000
        assert isinstance(answer, int)
        if answer in (0x0000, 0xB000, 0xB006, 0xB007):
            with self._lock:
                self.kept.append(uid)
        return answer

    def stop(self) -> None:
        self._server.shutdown()


@pytest.fixture
def outputs(tmp_path: Path) -> list[Path]:
    folder = make_set(tmp_path, "h", task="hip", patients=1, seed=7)
    return sorted((folder / "dicom").rglob("*.dcm"))


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    spool = Spool(tmp_path / "spool")
    yield spool
    spool.close()


POLICY = SendConfig(max_attempts=4, backoff_initial_s=0.05, backoff_max_s=0.05, dimse_timeout_s=1.0)


def destination(port: int) -> DestinationConfig:
    return DestinationConfig(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)


def drain(sender: Sender, spool: Spool, until: dict[str, int], seconds: float = 15) -> None:
    wait_for(lambda: (sender.step(), spool.outbox_counts())[1] == until, seconds, str(until))


@pytest.mark.parametrize(
    ("code", "delivered"),
    [(0x0000, True), (0xB000, True), (0xB006, True), (0xB007, True), (0xB123, True)]
    + [(0x0111, True)]
    + [(c, False) for c in (0xA700, 0xA7FF, 0x0110, 0x0213)]
    + [(c, False) for c in (0xA900, 0xA9FF, 0xC000, 0xC211, 0x0122, 0x0124)],
)
def test_status_classes(code: int, delivered: bool) -> None:
    failure = classify(code)
    assert (failure is None) == delivered
    if failure is not None:
        permanent = not ((code & 0xFF00) == 0xA700 or code in (0x0110, 0x0213))
        assert failure.permanent == permanent


def test_out_of_resources_is_retried_later(outputs: list[Path], spool: Spool) -> None:
    pacs = ScriptedPacs([0xA700, 0xA702])
    try:
        queue_outputs(spool, "1.2.3", outputs, ["pacs"])
        sender = Sender(spool, [destination(pacs.port)], POLICY, "ORTHONODE")
        drain(sender, spool, {"sent": 1})
        assert len(pacs.calls) == 3 and len(pacs.kept) == 1  # two refusals, then stored
    finally:
        pacs.stop()


@pytest.mark.parametrize("code", [0xA900, 0xC000, 0x0122])
def test_errors_are_dead_lettered_without_a_hot_retry(
    outputs: list[Path], spool: Spool, code: int
) -> None:
    pacs = ScriptedPacs([code])
    try:
        queue_outputs(spool, "1.2.3", outputs, ["pacs"])
        sender = Sender(spool, [destination(pacs.port)], POLICY, "ORTHONODE")
        assert sender.step() == 1
        assert spool.outbox_counts() == {"dead": 1}
        for _ in range(3):
            sender.step()
        assert len(pacs.calls) == 1  # never asked again
        [dead] = spool.dead_letters()
        assert f"0x{code:04X}" in (dead.last_error or "")
    finally:
        pacs.stop()


@pytest.mark.parametrize("code", [0xB000, 0xB006, 0xB007])
def test_warnings_are_delivered_with_a_log_line(
    outputs: list[Path], spool: Spool, code: int, caplog: pytest.LogCaptureFixture
) -> None:
    pacs = ScriptedPacs([code])
    try:
        queue_outputs(spool, "1.2.3", outputs, ["pacs"])
        sender = Sender(spool, [destination(pacs.port)], POLICY, "ORTHONODE")
        with caplog.at_level(logging.WARNING, logger="dicom_node.send.scu"):
            assert sender.step() == 1
        assert spool.outbox_counts() == {"sent": 1}
        assert any(f"0x{code:04X}" in r.getMessage() for r in caplog.records)
    finally:
        pacs.stop()


def test_a_destination_slower_than_the_dimse_timeout_is_aborted_and_retried(
    outputs: list[Path], spool: Spool
) -> None:
    pacs = ScriptedPacs(["sleep"])
    try:
        queue_outputs(spool, "1.2.3", outputs, ["pacs"])
        sender = Sender(spool, [destination(pacs.port)], POLICY, "ORTHONODE")
        started = time.monotonic()
        assert sender.step() == 1  # returns: no thread hangs on the slow destination
        assert time.monotonic() - started < 2.5
        assert spool.outbox_counts() == {"pending": 1}
        drain(sender, spool, {"sent": 1})
    finally:
        pacs.stop()


def test_a_destination_down_for_a_while_then_dead_letters_and_retry_dead(
    outputs: list[Path], spool: Spool, tmp_path: Path
) -> None:
    """Down: outputs stay queued and back off; back: they go. Down past the retry limit:
    dead-lettered; `send --retry-dead` (Spool.retry_dead) queues them again and they go."""
    port = free_port()
    sender = Sender(spool, [destination(port)], POLICY, "ORTHONODE")
    queue_outputs(spool, "1.2.3", outputs, ["pacs"])
    sender.step()
    assert spool.outbox_counts() == {"pending": 1}
    pacs = ScriptedPacs([], port=port)
    try:
        drain(sender, spool, {"sent": 1})
    finally:
        pacs.stop()
    later = tmp_path / "later.dcm"
    later.write_bytes(outputs[0].read_bytes())
    queue_outputs(spool, "1.2.4", [later], ["pacs"])
    drain(sender, spool, {"sent": 1, "dead": 1})  # max_attempts 4 with nobody listening
    assert spool.retry_dead() == 1
    pacs = ScriptedPacs([], port=port)
    try:
        drain(sender, spool, {"sent": 2})
    finally:
        pacs.stop()
