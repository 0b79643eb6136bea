# ruff: noqa: F811  (the pki fixture imported from test_tls is redefined as a parameter)
"""What the destination answers decides what happens to an output (docs/reliability.md,
"Egress"): a scripted Storage SCP on 127.0.0.1 answers each C-STORE with the next status of
its script (or sleeps past the DIMSE timeout); the sender and spool are the node's own."""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import CTImageStorage
from pynetdicom import AE, AllStoragePresentationContexts, evt

from dicom_node.config import DestinationConfig, NodeConfig, SendConfig, TlsConfig
from dicom_node.receive import StorageScp
from dicom_node.send import Sender
from dicom_node.send.failures import classify
from dicom_node.send.requestor import describe_connect_error
from dicom_node.send.scu import send_files
from dicom_node.store import Spool
from tests.conftest import make_set
from tests.factories import MemorySink, free_port, queue_outputs, wait_for
from tests.net.test_tls import node_tls, pki  # noqa: F401  (fixture)


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


# -- an association that cannot be had: one log line, naming why ------------------------------


def problems(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Every record at WARNING or above, from any logger (pynetdicom's included)."""
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_closed_port_is_one_warning_naming_connection_refused(
    outputs: list[Path], spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    """pynetdicom logs a refused connection at ERROR twice ("unable to connect to remote",
    "TCP Initialisation Error"); the node logs one warning, its own, with the cause."""
    port = free_port()
    queue_outputs(spool, "1.2.3", outputs, ["pacs"])
    sender = Sender(spool, [destination(port)], POLICY, "ORTHONODE")
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="dicom_node.send.requestor")
    assert sender.step() == 1
    [line] = problems(caplog)
    assert line.name == "dicom_node.send.sender"
    assert f"association with PACS at 127.0.0.1:{port} failed: connection refused" in (
        line.getMessage()
    )
    assert "aborted or unreachable" not in line.getMessage()
    [item] = wait_for(spool.due, 5, "the retry to be due")  # backoff 0.05 s
    assert item.last_error is not None and "connection refused" in item.last_error
    # What pynetdicom said is still there, at DEBUG.
    assert any(
        r.levelno == logging.DEBUG and "Connection refused" in r.getMessage()
        for r in caplog.records
    )


def test_a_rejected_association_is_one_warning_naming_the_rejection(
    outputs: list[Path], spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    """A PACS that does not know the called AE title answers A-ASSOCIATE-RJ (permanent, service
    user, called AE title not recognised): pynetdicom's three ERROR lines become our one."""
    ae = AE(ae_title="PACS")
    ae.require_called_aet = True
    ae.supported_contexts = AllStoragePresentationContexts
    server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        wrong = DestinationConfig(
            name="pacs", ae_title="NOT-PACS", host="127.0.0.1", port=server.server_address[1]
        )
        queue_outputs(spool, "1.2.3", outputs, ["pacs"])
        sender = Sender(spool, [wrong], POLICY, "ORTHONODE")
        with caplog.at_level(logging.INFO):
            assert sender.step() == 1
    finally:
        server.shutdown()
    [line] = problems(caplog)
    assert line.name == "dicom_node.send.sender"
    message = line.getMessage()
    assert "association with NOT-PACS" in message and "rejected: Called AE title not " in message
    assert "(permanent, from the service user; result 1, source 1, reason 7)" in message
    assert spool.outbox_counts() == {"pending": 1}  # retried: the PACS's list may be fixed


class RawPeer:
    """A TCP listener on 127.0.0.1 that reads the A-ASSOCIATE-RQ and then does ``answer``:
    "close" (closes the connection), "abort" (an A-ABORT PDU, service provider, invalid PDU
    parameter value) or "silent" (keeps it open, says nothing)."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        connection, _ = self._listener.accept()
        with connection:
            connection.settimeout(5)
            connection.recv(65536)
            if self.answer == "abort":
                connection.sendall(struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, 0x06))
            if self.answer in ("abort", "silent"):
                self._done.wait(10)

    def stop(self) -> None:
        self._done.set()
        self._listener.close()
        self._thread.join(10)


@pytest.mark.parametrize(
    ("peer", "words"),
    [
        ("close", "failed: the destination closed the connection without answering"),
        (
            "abort",
            "aborted by the destination (A-ABORT from its service provider: invalid PDU "
            "parameter value)",
        ),
        ("silent", "failed: no answer to the A-ASSOCIATE-RQ within 1 s"),
        (
            "no-contexts",
            "failed: the destination accepted none of the presentation contexts proposed",
        ),
        ("unresolvable", "failed: host name not resolved"),
    ],
)
def test_each_failed_association_says_why_and_pynetdicom_stays_quiet(
    outputs: list[Path], caplog: pytest.LogCaptureFixture, peer: str, words: str
) -> None:
    stop: Callable[[], None] = lambda: None  # noqa: E731
    host = "127.0.0.1"
    if peer == "no-contexts":  # a PACS that stores CT only
        ae = AE(ae_title="PACS")
        ae.add_supported_context(CTImageStorage)
        server = ae.start_server(("127.0.0.1", 0), block=False)
        port, stop = int(server.server_address[1]), server.shutdown
    elif peer == "unresolvable":
        host, port = "no-such-pacs.invalid", 104  # .invalid never resolves (RFC 2606)
    else:
        raw = RawPeer(peer)
        port, stop = raw.port, raw.stop
    try:
        with caplog.at_level(logging.INFO):
            started = time.monotonic()
            [failure] = send_files(
                DestinationConfig(name="pacs", ae_title="PACS", host=host, port=port),
                outputs,
                "ORTHONODE",
                timeout_s=1.0,
            ).values()
            assert time.monotonic() - started < 5.0
    finally:
        stop()
    assert failure is not None and f"association with PACS at {host}:{port} " in failure
    assert words in failure
    assert not getattr(failure, "permanent", False)  # retried, as before
    assert problems(caplog) == []  # pynetdicom's ERROR lines are not logged; the caller's is


def test_a_failed_tls_handshake_is_named(
    outputs: list[Path], pki: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A DICOM TLS destination whose certificate does not carry the expected name: pynetdicom
    logs the SSL error at ERROR with its traceback; the failure names it, pynetdicom is quiet."""
    node = NodeConfig(ae_title="PACS", host="127.0.0.1", port=0, tls=node_tls(pki))
    scp = StorageScp(node, MemorySink())
    scp.start()
    try:
        wrong_name = DestinationConfig(
            name="pacs",
            ae_title="PACS",
            host="127.0.0.1",
            port=scp.port,
            tls=TlsConfig(ca_certificates=pki / "ca.pem", server_name="pacs.example"),
        )
        with caplog.at_level(logging.INFO):
            [failure] = send_files(wrong_name, outputs, "ORTHONODE", timeout_s=5.0).values()
    finally:
        scp.stop()
    assert failure is not None
    assert (
        "failed: TLS handshake failed: Hostname mismatch" in failure and "pacs.example" in failure
    )
    assert [r for r in problems(caplog) if r.name.startswith("pynetdicom")] == []


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "connection refused"),
        (TimeoutError("timed out"), "connection timed out"),
        (OSError(errno.EHOSTUNREACH, "No route to host"), "host unreachable"),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), "network unreachable"),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "host name not resolved"),
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), "connection reset"),
        (
            ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"),
            "TLS handshake failed",
        ),
        (OSError(errno.EACCES, "Permission denied"), "Permission denied"),
    ],
)
def test_connect_errors_in_words(error: OSError, words: str) -> None:
    assert describe_connect_error(error).startswith(words)
