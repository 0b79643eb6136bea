"""Network hardening around pynetdicom's association server (docs/reliability.md).

pynetdicom 3.0 trusts its peer in four ways that let one script take a node off the air:

1. Every accepted TCP connection becomes an association thread at once, and those threads are
   what ``maximum_associations`` counts. Connections that never send an A-ASSOCIATE-RQ hold
   their slots until the ACSE timeout, even after the peer has closed them (the acceptor waits
   in ``receive_pdu(timeout=acse_timeout)``), so 20 silent connections lock every real peer
   out ("local limit exceeded").
2. The DUL reads each PDU to the length its header declares, 4 GiB if it says so, buffering
   whatever arrives.
3. Accepted sockets have no timeout: once ``select`` says a byte is readable, ``recv`` blocks
   until the PDU is complete, so a peer that stalls mid-PDU (or sends a byte a second) holds
   the thread forever.
4. With TLS the handshake runs in the accept loop: one silent TLS client blocks every other
   connection. The accept loop also runs a full ``gc.collect()`` every 60 connections (half a
   second with the models loaded), and listens with socketserver's backlog of 5.

What this module does instead, without forking pynetdicom:

* :class:`GuardedServer` accepts only. Each connection goes to a short-lived *gate* thread,
  which pynetdicom does not count: it does the TLS handshake and reads the A-ASSOCIATE-RQ
  PDU within ``pre_association_timeout`` and under :data:`MAX_ASSOCIATE_RQ` bytes. A peer
  that closes, stalls, sends anything else or declares too much is dropped there and then.
  Connections waiting at the gate are bounded in all and per host.
* Only a complete A-ASSOCIATE-RQ becomes an association; its PDU is handed to
  :class:`GuardedDUL`, which reads every later PDU against a deadline (the network timeout
  for the whole PDU) and checks its declared length against what we negotiated (our maximum
  PDU length for P-DATA-TF, a few KiB for the others) before reading a byte of its body:
  over it, the association is aborted (A-ABORT, invalid PDU parameter) and the socket closed.

The upstream fix these stand in for is described in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from copy import deepcopy
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import (
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)
from pynetdicom.utils import make_target

if TYPE_CHECKING:  # pragma: no cover
    from pynetdicom.ae import ApplicationEntity

__all__ = [
    "MAX_ASSOCIATE_RQ",
    "MAX_CONTROL_PDU",
    "GateSettings",
    "GuardedDUL",
    "GuardedServer",
    "start_guarded_server",
]

log = logging.getLogger(__name__)

#: Largest A-ASSOCIATE-RQ read (header included). storescu proposing 128 presentation
#: contexts with several transfer syntaxes each sends about 20 KiB.
MAX_ASSOCIATE_RQ = 256 * 1024
#: Largest PDU other than P-DATA-TF (A-ASSOCIATE-AC/RJ, A-RELEASE, A-ABORT).
MAX_CONTROL_PDU = 64 * 1024
#: The largest P-DATA-TF we read, and what we advertise when ``node.max_pdu`` is 0.
MAX_UNLIMITED_PDU = 16 * 1024 * 1024
#: The largest command set (a C-STORE-RQ is a few hundred bytes).
MAX_COMMAND_SET = 1024 * 1024

_HEADER = 6
_ASSOCIATE_RQ = 0x01
_P_DATA_TF = 0x04
_PDU_TYPES = frozenset(range(0x01, 0x08))
#: DUL states in which the peer closing the connection is the association's normal end:
#: Sta13, awaiting the transport close after our A-RELEASE-RP or A-ABORT (PS3.8 9.2).
_CLOSING_STATES = frozenset({"Sta13"})
_ABORT_SERVICE_PROVIDER = 0x02
_INVALID_PDU_PARAMETER = 0x06


class GateSettings:
    """Limits of the pre-association gate (``node:`` in conf.yaml)."""

    def __init__(
        self,
        *,
        pre_association_timeout: float = 5.0,
        max_pending: int = 128,
        max_pending_per_host: int = 16,
        network_timeout: float | None = 60.0,
        max_dataset_bytes: int = 1 << 30,
        tls: ssl.SSLContext | None = None,
        on_dropped: Callable[[str, str], None] | None = None,
    ) -> None:
        self.pre_association_timeout = pre_association_timeout
        self.max_pending = max_pending
        self.max_pending_per_host = max_pending_per_host
        self.network_timeout = network_timeout
        self.max_dataset_bytes = max_dataset_bytes
        self.tls = tls
        # on_dropped(reason, address): for the metrics and the audit trail.
        self.on_dropped = on_dropped or (lambda reason, address: None)


class _Dropped(Exception):
    """The connection is dropped; ``reason`` is the metric label, the message the log line,
    ``received`` how many bytes of what was being read had arrived."""

    def __init__(self, reason: str, message: str, received: int = 0) -> None:
        super().__init__(message)
        self.reason = reason
        self.received = received


def _read_exact(sock: socket.socket, count: int, deadline: float, what: str) -> bytes:
    """``count`` bytes before ``deadline`` (time.monotonic), or _Dropped."""
    chunks = bytearray()
    while len(chunks) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Dropped("timeout", f"{what}: {len(chunks)} of {count} bytes before the timeout")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(65536, count - len(chunks)))
        except TimeoutError:
            raise _Dropped(
                "timeout", f"{what}: {len(chunks)} of {count} bytes before the timeout"
            ) from None
        except (OSError, ssl.SSLError) as error:
            raise _Dropped("closed", f"{what}: {type(error).__name__}") from None
        if not chunk:
            raise _Dropped(
                "closed", f"{what}: closed after {len(chunks)} of {count} bytes", len(chunks)
            )
        chunks += chunk
    return bytes(chunks)


def _header(data: bytes) -> tuple[int, int]:
    pdu_type, _, length = struct.unpack(">BBL", data)
    return int(pdu_type), int(length)


class GuardedDUL(DULServiceProvider):
    """pynetdicom's DUL with deadlines and length limits on every PDU it reads.

    ``first`` is the A-ASSOCIATE-RQ the gate already read; it is delivered before anything is
    read from the socket.
    """

    def __init__(
        self,
        assoc: Association,
        first: bytes | None = None,
        on_dropped: Callable[[str, str], None] | None = None,
        max_dataset_bytes: int = 1 << 30,
    ) -> None:
        super().__init__(assoc)
        self._first = first
        self.max_dataset_bytes = max_dataset_bytes
        self._dataset_bytes = 0  # of the data set being received
        self._command_bytes = 0  # of the command set being received
        self.on_dropped = on_dropped or (lambda reason, address: None)

    def _limit(self, pdu_type: int) -> int:
        """The largest variable field (the PDU length) we read for a PDU type."""
        if pdu_type == _P_DATA_TF:  # what we told the peer in the A-ASSOCIATE-AC
            ours = int(self.assoc.acceptor.maximum_length or 0)
            return ours if ours else MAX_UNLIMITED_PDU
        if pdu_type == _ASSOCIATE_RQ:
            return MAX_ASSOCIATE_RQ
        return MAX_CONTROL_PDU

    def _is_transport_event(self) -> bool:
        if self._first is not None:
            self._read_pdu_data()
            return True
        return bool(super()._is_transport_event())

    def _read_pdu_data(self) -> None:
        if self._first is not None:
            data, self._first = self._first, None
            self._deliver(bytearray(data))
            return
        sock = cast(AssociationSocket, self.socket)
        raw = sock.socket
        if raw is None:
            self.event_queue.put("Evt17")
            return
        timeout = self.assoc.network_timeout
        deadline = time.monotonic() + (timeout if timeout is not None else 3600.0)
        address = self.assoc.requestor.address
        header = b""
        try:
            header = _read_exact(raw, _HEADER, deadline, "PDU header")
            pdu_type, length = _header(header)
            if pdu_type not in _PDU_TYPES:
                log.warning("association with %s: unknown PDU type 0x%02X", address, pdu_type)
                self.event_queue.put("Evt19")  # the state machine aborts
                return
            limit = self._limit(pdu_type)
            if length > limit:
                raise _Dropped(
                    "oversized-pdu",
                    f"PDU type 0x{pdu_type:02X} declares {length} bytes, over the {limit} "
                    "negotiated",
                )
            body = _read_exact(raw, length, deadline, f"PDU type 0x{pdu_type:02X}")
            if pdu_type == _P_DATA_TF:
                self._count_dataset(body)
        except _Dropped as dropped:
            if dropped.reason == "closed":
                self._log_closed(dropped, between_pdus=not header)
            else:
                log.warning("association with %s aborted: %s", address, dropped)
                self._abort(raw)
                self.on_dropped(dropped.reason, str(address))
            sock.close()  # Evt17: the state machine ends the association
            with contextlib.suppress(OSError):
                raw.close()  # pynetdicom skips close() when shutdown() fails (a reset peer)
            return
        finally:
            if sock.socket is not None:
                with contextlib.suppress(OSError):
                    raw.settimeout(timeout)
        self._deliver(bytearray(header + body))

    def _log_closed(self, dropped: _Dropped, between_pdus: bool) -> None:
        """The peer closed the connection: the normal end after a release, else an anomaly."""
        address = self.assoc.requestor.address
        state = self.state_machine.current_state
        if between_pdus and not dropped.received and state in _CLOSING_STATES:
            # Sta13: we sent the A-RELEASE-RP (or an A-ABORT); the requestor closes the
            # connection on reading it (PS3.8 9.2, action AR-3), and dcmtk often does so
            # before pynetdicom's next look at the socket closes our side.
            log.debug("association with %s: ended, the peer closed the connection", address)
        elif between_pdus and not dropped.received:
            log.info(
                "association with %s: the peer closed the connection without releasing the "
                "association",
                address,
            )
        else:
            log.info("association with %s: %s", address, dropped)

    def _count_dataset(self, body: bytes) -> None:
        """Add the data-set fragments of a P-DATA-TF to the message's size (PS3.8 9.3.5.1:
        each PDV item is length, context ID, control header, fragment)."""
        offset = 0
        while offset + 6 <= len(body):
            (item,) = struct.unpack_from(">L", body, offset)
            control = body[offset + 5]
            fragment = max(0, min(item, len(body) - offset - 4) - 2)
            if control & 0x01:  # a command fragment: a command set is a few hundred bytes
                self._command_bytes += fragment
                if self._command_bytes > MAX_COMMAND_SET:
                    raise _Dropped("oversized-dataset", "command set over 1 MiB")
                if control & 0x02:
                    self._command_bytes = 0
            else:  # a data-set fragment
                self._dataset_bytes += fragment
                if self._dataset_bytes > self.max_dataset_bytes:
                    raise _Dropped(
                        "oversized-dataset",
                        f"data set over {self.max_dataset_bytes >> 20} MiB (node.max_dataset_mb)",
                    )
                if control & 0x02:  # its last fragment
                    self._dataset_bytes = 0
            offset += 4 + item

    def _abort(self, raw: socket.socket) -> None:
        pdu = A_ABORT_RQ()
        pdu.source = _ABORT_SERVICE_PROVIDER
        pdu.reason_diagnostic = _INVALID_PDU_PARAMETER
        try:
            raw.settimeout(1.0)
            raw.sendall(pdu.encode())
        except (OSError, ssl.SSLError):
            pass

    def _deliver(self, bytestream: bytearray) -> None:
        try:
            pdu, event = self._decode_pdu(bytestream)
        except Exception as error:
            log.warning("cannot decode a received PDU (%s)", type(error).__name__)
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)


class GuardedAssociation(Association):
    """An acceptor whose DUL is a :class:`GuardedDUL` fed with the gate's A-ASSOCIATE-RQ."""

    def __init__(self, ae: ApplicationEntity, first: bytes, gate: GateSettings) -> None:
        super().__init__(ae, "acceptor")
        self.dul = GuardedDUL(self, first, gate.on_dropped, gate.max_dataset_bytes)
        # The timeouts live on the DUL's timers: set them again on the new one.
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout


class GuardedHandler(RequestHandler):
    """pynetdicom's RequestHandler (3.0.4, ``_create_association``) building a
    :class:`GuardedAssociation` from the connection the gate has admitted."""

    server: GuardedServer

    def handle(self) -> None:
        first = self.server._first_pdus.pop(id(self.request), None)
        if first is None:  # pragma: no cover - only the gate calls finish_request
            return
        assoc = GuardedAssociation(self.ae, first, self.server.gate)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        sock = AssociationSocket(assoc, client_socket=cast(socket.socket, self.request))
        assoc.set_socket(sock)
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)
        assoc.requestor.address_info = self.remote
        handlers = cast(dict[Any, Any], self.server._handlers)
        for event, bound in handlers.items():
            if event.is_intervention and bound:
                assoc.bind(event, *bound)
            elif isinstance(event, evt.NotificationEvent):
                for handler, arguments in bound:
                    assoc.bind(event, handler, arguments)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()


class GuardedServer(ThreadedAssociationServer):
    """Accept, then admit through the gate (see the module docstring)."""

    # socketserver's listen backlog is 5: a burst of connections past it waits for SYN
    # retransmits (1 s, 3 s, ...) before the accept loop even sees them.
    request_queue_size = 256

    def __init__(self, *args: Any, gate: GateSettings, **kwargs: Any) -> None:
        self.gate = gate
        self._pending: Counter[str] = Counter()
        self._pending_lock = threading.Lock()
        self._first_pdus: dict[int, bytes] = {}
        self._closing = False
        super().__init__(*args, request_handler=GuardedHandler, **kwargs)  # type: ignore[misc]

    def service_actions(self) -> None:
        """No full ``gc.collect()`` every 60 loops of the accept thread, as pynetdicom does:
        with the models loaded it takes about half a second, during which nobody is accepted.
        Python's own collector frees dead associations' reference cycles."""

    @property
    def pending(self) -> int:
        """Connections at the gate (accepted, no A-ASSOCIATE-RQ yet)."""
        with self._pending_lock:
            return sum(self._pending.values())

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        # Accept only: the TLS handshake runs in the gate thread, never in the accept loop.
        sock = cast(socket.socket, self.socket)
        client, address = sock.accept()
        return client, address

    def process_request(self, request: Any, client_address: Any) -> None:
        host = str(client_address[0])
        with self._pending_lock:
            total = sum(self._pending.values())
            if total >= self.gate.max_pending or self._pending[host] >= (
                self.gate.max_pending_per_host
            ):
                busy = "all" if total >= self.gate.max_pending else "this host's"
                admitted = False
            else:
                self._pending[host] += 1
                admitted = True
        if not admitted:
            log.warning("connection from %s closed at once: %s pending slots taken", host, busy)
            self.gate.on_dropped("too-many-pending", host)
            self.shutdown_request(request)
            return
        thread = threading.Thread(
            target=self._admit, args=(request, client_address), name=f"Gate@{host}", daemon=True
        )
        try:
            thread.start()
        except RuntimeError:  # no thread to be had: give the slot back and close
            self._release(host)
            log.error("connection from %s closed at once: cannot start a thread", host)
            self.gate.on_dropped("too-many-pending", host)
            self.shutdown_request(request)

    def _release(self, host: str) -> None:
        with self._pending_lock:
            self._pending[host] -= 1
            if self._pending[host] <= 0:
                del self._pending[host]

    def shutdown(self) -> None:
        self._closing = True  # connections still at the gate are not admitted any more
        super().shutdown()

    def _admit(self, request: socket.socket, client_address: Any) -> None:
        host = str(client_address[0])
        deadline = time.monotonic() + self.gate.pre_association_timeout
        sock: socket.socket = request
        try:
            try:
                if self.gate.tls is not None:
                    request.settimeout(self.gate.pre_association_timeout)
                    try:
                        sock = self.gate.tls.wrap_socket(
                            request, server_side=True, do_handshake_on_connect=False
                        )
                        sock.do_handshake()
                    except TimeoutError:
                        raise _Dropped("tls-timeout", "TLS handshake timed out") from None
                    except (OSError, ssl.SSLError) as error:
                        reason = getattr(error, "reason", None) or type(error).__name__
                        raise _Dropped("tls-failed", f"TLS handshake failed: {reason}") from None
                header = _read_exact(sock, _HEADER, deadline, "A-ASSOCIATE-RQ header")
                pdu_type, length = _header(header)
                if pdu_type != _ASSOCIATE_RQ:
                    raise _Dropped(
                        "not-associate-rq",
                        f"first PDU is type 0x{pdu_type:02X}, not an A-ASSOCIATE-RQ",
                    )
                if length + _HEADER > MAX_ASSOCIATE_RQ:
                    raise _Dropped(
                        "oversized-pdu",
                        f"A-ASSOCIATE-RQ declares {length} bytes (at most {MAX_ASSOCIATE_RQ})",
                    )
                body = _read_exact(sock, length, deadline, "A-ASSOCIATE-RQ")
                if self._closing:
                    raise _Dropped("closed-before-request", "the node is stopping")
            except _Dropped as dropped:
                quiet = dropped.reason == "closed"
                (log.info if quiet else log.warning)(
                    "connection from %s dropped before association: %s", host, dropped
                )
                self.shutdown_request(sock)
                reason = "closed-before-request" if quiet else str(dropped.reason)
                self.gate.on_dropped(reason, host)
                return
            except Exception:  # never let a gate thread die with the socket open
                log.exception("connection from %s: gate failed; closed", host)
                self.shutdown_request(sock)
                return
        finally:
            self._release(host)
        try:
            sock.settimeout(self.gate.network_timeout)
            self._first_pdus[id(sock)] = header + body
            self.finish_request(sock, client_address)
        except Exception:
            self._first_pdus.pop(id(sock), None)
            self.handle_error(sock, client_address)
            self.shutdown_request(sock)


def start_guarded_server(
    ae: ApplicationEntity,
    address: tuple[str, int],
    gate: GateSettings,
    evt_handlers: list[Any],
) -> GuardedServer:
    """Like ``ae.start_server(address, block=False, evt_handlers=...)``, with the gate."""
    server = cast(
        GuardedServer,
        ae.make_server(address, evt_handlers=evt_handlers, server_class=GuardedServer, gate=gate),
    )
    thread = threading.Thread(
        target=make_target(server.serve_forever),
        name=f"AcceptorServer@{datetime.now():%Y%m%d%H%M%S}",
        daemon=True,
    )
    thread.start()
    ae._servers.append(server)
    return server
