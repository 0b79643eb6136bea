"""Association requests that say why they failed: :class:`RequestorAE`.

pynetdicom 3.0 reports a failed association request only in its log, at ERROR, two or three
lines from its transport and ACSE loggers ("Association request failed: unable to connect to
remote", "TCP Initialisation Error: [Errno 111] Connection refused"; "Association Rejected",
"Result: ...", "Reason: ..."), and hands its caller an association that is not established.
:meth:`RequestorAE.request` raises a :class:`~dicom_node.errors.SendError` naming the cause
instead: connection refused, timed out, host unreachable, host name not resolved, TLS handshake
failed, rejected (with the A-ASSOCIATE-RJ's result, source and reason), aborted by the
destination, closed without an answer, no answer within the ACSE timeout, no presentation
context accepted. The caller logs that as its one line; pynetdicom's records about the failed
request go to this module's DEBUG log.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import ssl
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import EventHandlerType
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT
from pynetdicom.transport import T_CONNECT, AddressInformation, AssociationSocket

from dicom_node.errors import SendError

__all__ = ["RequestorAE", "describe_connect_error"]

log = logging.getLogger(__name__)

#: The loggers on which pynetdicom 3.0 reports a failed association request, at ERROR: the
#: transport (``AssociationSocket.connect``: the OSError's text), the ACSE (rejected, aborted,
#: ACSE timeout, no accepted context), the association.
_REQUEST_LOGGERS = ("pynetdicom.transport", "pynetdicom.acse", "pynetdicom.association")
_REJECT_SOURCES = {
    1: "service user",
    2: "service provider (ACSE)",
    3: "service provider (presentation)",
}
_ABORT_REASONS = {
    0: "reason not specified",
    1: "unrecognised PDU",
    2: "unexpected PDU",
    4: "unrecognised PDU parameter",
    5: "unexpected PDU parameter",
    6: "invalid PDU parameter value",
}


@dataclass
class _Attempt:
    """What one association request went through, for saying why it failed."""

    connected: bool = False
    error: OSError | None = None  # why the TCP connection (or its TLS handshake) failed
    answer: A_ASSOCIATE | A_ABORT | A_P_ABORT | None = None  # the first ACSE primitive
    abort: A_ABORT_RQ | None = None  # an A-ABORT PDU the destination sent
    held: list[logging.LogRecord] = field(default_factory=list)  # pynetdicom's, WARNING+


_current = threading.local()  # .attempt: the _Attempt this thread is working on


@contextlib.contextmanager
def _attempting(attempt: _Attempt) -> Iterator[None]:
    previous = getattr(_current, "attempt", None)
    _current.attempt = attempt
    try:
        yield
    finally:
        _current.attempt = previous


class _RequestFilter(logging.Filter):
    """Holds back pynetdicom's WARNING and ERROR records on the thread requesting an
    association (and on its DUL thread while it connects), keeping the exception being
    handled: when the request fails the requestor logs one line naming the cause instead (and
    those records at DEBUG); when it succeeds they are logged as they were. Inert on other
    threads and at other times, so pynetdicom's other errors are logged as they are."""

    def filter(self, record: logging.LogRecord) -> bool:
        attempt: _Attempt | None = getattr(_current, "attempt", None)
        if attempt is None or record.levelno < logging.WARNING:
            return True
        # pynetdicom logs a failed connect from inside its ``except OSError``: that error.
        error = sys.exc_info()[1]
        if attempt.error is None and isinstance(error, OSError):
            attempt.error = error
        attempt.held.append(record)
        return False


_REQUEST_FILTER = _RequestFilter()
for _name in _REQUEST_LOGGERS:  # inert until a RequestorAE requests an association
    logging.getLogger(_name).addFilter(_REQUEST_FILTER)


class _RequestorSocket(AssociationSocket):
    """pynetdicom's socket, connecting under the request's :class:`_RequestFilter` (the
    connect runs on the association's DUL thread, not on the requesting one)."""

    def __init__(
        self, assoc: Association, address: AddressInformation, attempt: _Attempt | None
    ) -> None:
        super().__init__(assoc, address=address)
        self._attempt = attempt

    def connect(self, primitive: T_CONNECT) -> None:
        if self._attempt is None:
            super().connect(primitive)
            return
        with _attempting(self._attempt):
            super().connect(primitive)


def _log_held(attempt: _Attempt, ae_title: str) -> None:
    """What pynetdicom said about a failed request, at DEBUG: the caller logs the failure."""
    if attempt.held:
        said = " | ".join(record.getMessage() for record in attempt.held)
        log.debug("association with %s: pynetdicom said: %s", ae_title, said)


def describe_connect_error(error: OSError, tls: bool = False) -> str:
    """Words for why a TCP connection (and its TLS handshake) failed: "connection refused",
    "connection timed out", "host unreachable", "host name not resolved", "TLS handshake
    failed: ..."; the system's own words for anything else."""
    if isinstance(error, socket.gaierror):
        return f"host name not resolved ({error.strerror or error})"
    if isinstance(error, ssl.SSLError):  # its details are set only when OpenSSL raised it
        details = getattr(error, "verify_message", None) or getattr(error, "reason", None)
        return f"TLS handshake failed: {details or error.strerror or type(error).__name__}"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, TimeoutError):  # the connect's timeout covers the handshake too
        return "connection or TLS handshake timed out" if tls else "connection timed out"
    if isinstance(error, ConnectionResetError):
        return "connection reset by the peer" + (" during the TLS handshake" if tls else "")
    if error.errno in (errno.EHOSTUNREACH, errno.EHOSTDOWN):
        return "host unreachable"
    if error.errno == errno.ENETUNREACH:
        return "network unreachable"
    return error.strerror or str(error) or type(error).__name__


class RequestorAE(AE):
    """pynetdicom's AE, whose :meth:`request` says why an association was not established.

    pynetdicom only logs that (at ERROR, two or three lines, the socket error in words);
    here those lines go to this module's DEBUG log, and the reason comes back in a
    :class:`~dicom_node.errors.SendError` for the caller's one line.
    """

    def request(
        self,
        host: str,
        port: int,
        ae_title: str,
        tls_args: tuple[ssl.SSLContext, str] | None = None,
    ) -> Association:
        """An established association with ``ae_title`` at ``host:port``.

        Raises
        ------
        SendError
            Not established; the message names why ("association with PACS at
            10.0.0.5:104 failed: connection refused").
        """
        attempt = _Attempt()

        def opened(event: evt.Event) -> None:
            attempt.connected = True

        def answered(event: evt.Event) -> None:
            if attempt.answer is None:
                attempt.answer = getattr(event, "primitive", None)

        def received(event: evt.Event) -> None:
            if isinstance(event.pdu, A_ABORT_RQ):
                attempt.abort = event.pdu

        handlers: list[EventHandlerType] = [
            (evt.EVT_CONN_OPEN, opened),
            (evt.EVT_ACSE_RECV, answered),
            (evt.EVT_PDU_RECV, received),
        ]
        where = f"association with {ae_title} at {host}:{port}"
        try:
            with _attempting(attempt):
                assoc = self.associate(
                    host, port, ae_title=ae_title, tls_args=tls_args, evt_handlers=handlers
                )
        except OSError as error:  # pynetdicom resolves the host name before connecting
            raise SendError(f"{where} failed: {describe_connect_error(error)}") from None
        except BaseException:
            _log_held(attempt, ae_title)
            raise
        for event, handler, *_ in handlers:
            assoc.unbind(event, handler)
        if assoc.is_established:
            for record in attempt.held:  # nothing went wrong: pynetdicom's words as they were
                logging.getLogger(record.name).handle(record)
            return assoc
        _log_held(attempt, ae_title)
        raise SendError(f"{where} {self._why(attempt, tls_args is not None)}")

    def _why(self, attempt: _Attempt, tls: bool) -> str:
        answer = attempt.answer
        if isinstance(answer, A_ASSOCIATE) and answer.result in (0x01, 0x02):
            source = int(answer.result_source or 0)
            return (
                f"rejected: {answer.reason_str} "
                f"({'permanent' if answer.result == 0x01 else 'transient'}, from the "
                f"{_REJECT_SOURCES.get(source, 'unknown source')}; result {answer.result}, "
                f"source {source}, reason {answer.diagnostic or 0})"
            )
        if isinstance(answer, A_ASSOCIATE) and answer.result == 0x00:
            return (
                "failed: the destination accepted none of the presentation contexts proposed "
                "(their SOP classes or transfer syntaxes)"
            )
        if isinstance(answer, A_ASSOCIATE):
            return "failed: the destination's A-ASSOCIATE answer is invalid"
        if attempt.abort is not None:
            origin = "service user" if attempt.abort.source == 0x00 else "service provider"
            reason = _ABORT_REASONS.get(attempt.abort.reason_diagnostic or 0, "reserved")
            return f"aborted by the destination (A-ABORT from its {origin}: {reason})"
        if isinstance(answer, A_ABORT | A_P_ABORT):
            return "failed: the destination closed the connection without answering"
        if not attempt.connected:
            if attempt.error is None:  # pynetdicom's records were not made (logging off)
                return "failed: cannot connect"
            return f"failed: {describe_connect_error(attempt.error, tls)}"
        within = "" if self.acse_timeout is None else f" within {self.acse_timeout:g} s"
        return f"failed: no answer to the A-ASSOCIATE-RQ{within}"

    def _create_socket(
        self,
        assoc: Association,
        address: AddressInformation,
        tls_args: tuple[ssl.SSLContext, str] | None,
    ) -> AssociationSocket:
        # Called by associate() on the requesting thread: the attempt it is working on.
        sock = _RequestorSocket(assoc, address, getattr(_current, "attempt", None))
        sock.tls_args = tls_args
        return sock
