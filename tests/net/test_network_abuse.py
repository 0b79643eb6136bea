# ruff: noqa: F811  (fixtures imported from test_scp are redefined as parameters)
"""Hostile or broken peers over real TCP on 127.0.0.x (docs/reliability.md, "Network abuse").

Linux routes all of 127.0.0.0/8 to the loopback interface, so the abusive connections come from
127.0.0.2 and the real peer from 127.0.0.1: two hosts, as on a hospital network.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF

from dicom_node.receive import StorageScp
from tests.factories import MemorySink
from tests.net.test_scp import (  # noqa: F401  (fixtures)
    SCU_AE_TITLE,
    VERIFICATION,
    association,
    dx_contexts,
    dx_file,
    guard_records,
    peer_closes_first,
    phantoms,
    rejection,
    sink,
    start_scp,
    wait_for,
)

ABUSER = "127.0.0.2"
PEER = "127.0.0.1"
ECHO = [(VERIFICATION, [ExplicitVRLittleEndian])]


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def raw_connection(port: int, source: str = ABUSER) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def closed_by_peer(sock: socket.socket, timeout_s: float) -> bool:
    """True when the node closes (or resets) the connection within ``timeout_s``."""
    sock.settimeout(timeout_s)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def peer_association(
    port: int, source: str = PEER, contexts: list | None = None
) -> AbstractContextManager[Association]:
    return association(port, contexts or ECHO, source=source)


def echo_seconds(port: int, source: str = PEER) -> float:
    """Associate, C-ECHO, release: the seconds it took (asserting success)."""
    started = time.perf_counter()
    with peer_association(port, source) as assoc:
        assert assoc.is_established, "the real peer was not served"
        assert int(assoc.send_c_echo().Status) == 0x0000
    return time.perf_counter() - started


@pytest.fixture
def dropped() -> list[str]:
    return []


@pytest.fixture
def guarded(
    start_scp: Callable[..., StorageScp],
    sink: MemorySink,
    dropped: list[str],
) -> Callable[..., StorageScp]:
    def start(**settings: object) -> StorageScp:
        scp = start_scp(sink, **settings)
        assert scp._server is not None
        scp._server.gate.on_dropped = lambda reason, address: dropped.append(reason)
        return scp

    return start


def test_fifty_idle_connections_neither_starve_a_peer_nor_outlive_the_timeout(
    guarded: Callable[..., StorageScp], dropped: list[str]
) -> None:
    """50 connections that never send A-ASSOCIATE-RQ (pynetdicom alone: every slot taken
    for the ACSE timeout): a real peer is served within 1 s, and the node closes each idle
    connection after the pre-association timeout."""
    scp = guarded(max_associations=10, pre_association_timeout_s=2.0, max_pending_per_host=64)
    idle = [raw_connection(scp.port) for _ in range(50)]
    try:
        assert wait_for(lambda: scp._server is not None and scp._server.pending == 50, 5)
        seconds = echo_seconds(scp.port)
        assert seconds < 1.0, f"the real peer waited {seconds:.2f} s"
        opened = time.monotonic()
        assert all(closed_by_peer(s, 5.0) for s in idle)
        assert time.monotonic() - opened < 4.0
        # The socket is closed a moment before the drop is counted: wait for the count.
        assert wait_for(lambda: dropped.count("timeout") == 50, 2.0)
    finally:
        for s in idle:
            s.close()


def test_a_closed_connection_frees_its_slot_at_once(
    guarded: Callable[..., StorageScp], dropped: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node.receive.guard")
    scp = guarded(max_associations=2, pre_association_timeout_s=30.0)
    for _ in range(20):
        raw_connection(scp.port).close()
    assert wait_for(lambda: scp._server is not None and scp._server.pending == 0, 1.0)
    assert echo_seconds(scp.port) < 1.0
    assert wait_for(lambda: dropped.count("closed-before-request") == 20, 2.0)
    # Closed before any PDU: an anomaly, one line each.
    lines = guard_records(caplog, logging.INFO)
    assert (
        lines
        == [
            f"connection from {ABUSER} dropped before association: "
            "A-ASSOCIATE-RQ header: closed after 0 of 6 bytes"
        ]
        * 20
    )


@pytest.mark.parametrize(
    ("ending", "level", "line"),
    [
        ("release", logging.DEBUG, "ended, the peer closed the connection"),
        ("close", logging.INFO, "the peer closed the connection without releasing the association"),
        ("mid-pdu", logging.INFO, "PDU header: closed after 3 of 6 bytes"),
    ],
)
def test_how_an_association_ends_decides_its_log_line(
    guarded: Callable[..., StorageScp],
    dropped: list[str],
    peer_closes_first: None,
    caplog: pytest.LogCaptureFixture,
    ending: str,
    level: int,
    line: str,
) -> None:
    """A peer closing the connection after the A-RELEASE-RP is the normal end (DEBUG); one that
    closes an established association, or closes mid-PDU, is one INFO line."""
    caplog.set_level(logging.DEBUG, logger="dicom_node.receive.guard")
    scp = guarded()
    with peer_association(scp.port) as assoc:
        assert assoc.is_established
        raw = assoc.dul.socket.socket  # type: ignore[union-attr]
        if ending == "mid-pdu":
            raw.sendall(b"\x04\x00\x00")  # half a P-DATA-TF header
        if ending != "release":
            raw.shutdown(socket.SHUT_RDWR)
            assert wait_for(lambda: not assoc.is_established, 5.0)
    expected = f"association with {PEER}: {line}"
    assert wait_for(lambda: expected in guard_records(caplog, level), 5.0)
    logged = [m for n in (logging.INFO, logging.WARNING) for m in guard_records(caplog, n)]
    assert logged == ([] if level == logging.DEBUG else [expected])
    assert dropped == []  # not counted (a closed association is not a dropped connection)


def test_pending_connections_are_bounded_per_host(
    guarded: Callable[..., StorageScp], dropped: list[str]
) -> None:
    """One host past its share of connections waiting for A-ASSOCIATE-RQ is closed at once;
    another host is still served."""
    scp = guarded(max_pending_per_host=5, pre_association_timeout_s=10.0)
    idle = [raw_connection(scp.port) for _ in range(8)]
    try:
        closed = [s for s in idle if closed_by_peer(s, 0.5)]
        assert len(closed) == 3
        assert wait_for(lambda: dropped.count("too-many-pending") == 3, 2.0)
        assert echo_seconds(scp.port) < 1.0
    finally:
        for s in idle:
            s.close()


@pytest.mark.parametrize("declared", [0xFFFFFFFF, 300 * 1024])
def test_an_oversized_association_request_is_dropped_at_the_header(
    guarded: Callable[..., StorageScp], dropped: list[str], declared: int
) -> None:
    """An A-ASSOCIATE-RQ declaring 4 GiB (or just over the 256 KiB cap), followed by junk:
    the node closes the connection after the 6-byte header, and its memory does not grow by
    what the peer sends (pynetdicom alone buffers it: RSS +68 MB for 64 MB)."""
    scp = guarded()
    junk = b"\x00" * (1 << 20)
    before = rss_bytes()
    sock = raw_connection(scp.port)
    sent = 0
    try:
        sock.sendall(struct.pack(">BBL", 0x01, 0, declared))
        for _ in range(64):
            sock.sendall(junk)
            sent += len(junk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        sock.close()
    growth = rss_bytes() - before
    assert sent < 16 << 20, f"the node read {sent >> 20} MiB of a PDU it should have refused"
    assert growth < 5 << 20, f"RSS grew {growth / 2**20:.1f} MB"
    assert wait_for(lambda: "oversized-pdu" in dropped, 2.0)
    assert echo_seconds(scp.port) < 1.0


def test_an_oversized_p_data_pdu_aborts_the_association(
    guarded: Callable[..., StorageScp], dropped: list[str]
) -> None:
    """After a normal association, a P-DATA-TF PDU declaring more than our maximum PDU length
    (16 KiB here) gets an A-ABORT at its header."""
    scp = guarded(max_pdu=16384)
    before = rss_bytes()
    with peer_association(scp.port) as assoc:
        assert assoc.is_established
        raw = assoc.dul.socket.socket  # type: ignore[union-attr]
        try:
            raw.sendall(struct.pack(">BBL", 0x04, 0, 0xFFFFFFFF) + b"\x00" * 65536)
            for _ in range(32):
                raw.sendall(b"\x00" * (1 << 20))
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        assert wait_for(lambda: assoc.is_aborted or not assoc.is_alive(), 5.0)
    assert rss_bytes() - before < 5 << 20
    assert wait_for(lambda: "oversized-pdu" in dropped, 2.0)
    assert echo_seconds(scp.port) < 1.0


def test_a_byte_a_second_association_request_is_dropped_at_the_timeout(
    guarded: Callable[..., StorageScp], dropped: list[str]
) -> None:
    scp = guarded(pre_association_timeout_s=1.5)
    sock = raw_connection(scp.port)
    started = time.monotonic()
    stop = threading.Event()

    def drip() -> None:
        header = struct.pack(">BBL", 0x01, 0, 200) + b"\x00" * 200
        for byte in header:
            if stop.wait(0.3):
                return
            try:
                sock.send(bytes([byte]))
            except OSError:
                return

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        assert closed_by_peer(sock, 5.0)
        assert time.monotonic() - started < 3.0
        assert wait_for(lambda: "timeout" in dropped, 2.0)
    finally:
        stop.set()
        sock.close()
        dripper.join(2)


def test_a_peer_stalling_mid_pdu_is_aborted_and_nothing_is_stored(
    guarded: Callable[..., StorageScp],
    dropped: list[str],
    sink: MemorySink,
) -> None:
    """A P-DATA-TF PDU that stops arriving halfway: pynetdicom alone blocks in recv for
    ever (accepted sockets have no timeout); the guarded node aborts it within the network
    timeout, and nothing partial is stored."""
    scp = guarded(network_timeout_s=1.5)
    with peer_association(scp.port, contexts=dx_contexts()) as assoc:
        assert assoc.is_established
        raw = assoc.dul.socket.socket  # type: ignore[union-attr]
        started = time.monotonic()
        raw.sendall(struct.pack(">BBL", 0x04, 0, 1000) + b"\x00" * 10)
        assert wait_for(lambda: assoc.is_aborted or not assoc.is_alive(), 5.0)
        assert time.monotonic() - started < 3.5
    assert wait_for(lambda: "timeout" in dropped, 2.0)
    assert sink.instances == {}
    assert echo_seconds(scp.port) < 1.0


def test_an_a_abort_mid_data_set_leaves_nothing_stored(
    guarded: Callable[..., StorageScp],
    sink: MemorySink,
    dx_file: Path,
) -> None:
    """The SCU sends the C-STORE command and the data set's first fragments, then A-ABORT."""
    scp = guarded(max_pdu=16384)
    with peer_association(scp.port, contexts=dx_contexts()) as assoc:
        assert assoc.is_established
        ds = pydicom.dcmread(dx_file)
        encoded = DicomBytesIO()
        encoded.is_little_endian, encoded.is_implicit_VR = True, False
        write_dataset(encoded, ds)
        request = C_STORE()
        request.MessageID = 1
        request.AffectedSOPClassUID = ds.SOPClassUID
        request.AffectedSOPInstanceUID = ds.SOPInstanceUID
        request.Priority = 0
        request.DataSet = BytesIO(encoded.getvalue())
        message = C_STORE_RQ()
        message.primitive_to_message(request)
        context_id = assoc.accepted_contexts[0].context_id
        fragments = list(message.encode_msg(context_id, 16384 - 6))
        assert len(fragments) > 4
        raw = assoc.dul.socket.socket  # type: ignore[union-attr]
        for primitive in fragments[:3]:
            pdu = P_DATA_TF()
            pdu.from_primitive(primitive)
            raw.sendall(pdu.encode())
        assoc.abort()
    assert wait_for(lambda: scp._server is not None and not scp._server.active_associations, 5)
    assert sink.instances == {}
    assert echo_seconds(scp.port) < 1.0


def test_one_host_cannot_take_every_association(
    guarded: Callable[..., StorageScp],
) -> None:
    """With max_associations 4 and 2 per host: the third from 127.0.0.2 is rejected as
    transient (local limit exceeded) while its two continue, and 127.0.0.1 is still served."""
    scp = guarded(max_associations=4, max_associations_per_host=2)
    with peer_association(scp.port, ABUSER) as one, peer_association(scp.port, ABUSER) as two:
        assert one.is_established and two.is_established
        with peer_association(scp.port, ABUSER) as three:
            assert three.is_rejected
            assert rejection(three) == (0x02, 0x03, 0x02)
        assert echo_seconds(scp.port, PEER) < 1.0
        assert int(one.send_c_echo().Status) == 0 and int(two.send_c_echo().Status) == 0


def test_a_non_dicom_first_pdu_is_dropped(
    guarded: Callable[..., StorageScp], dropped: list[str]
) -> None:
    scp = guarded()
    sock = raw_connection(scp.port)
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert closed_by_peer(sock, 2.0)
    finally:
        sock.close()
    assert wait_for(lambda: "not-associate-rq" in dropped, 2.0)
    assert echo_seconds(scp.port) < 1.0
