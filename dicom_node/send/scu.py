"""C-STORE SCU: the transport of a ``type: dimse`` destination (the default).

Each send is one association; the sender opens several at once per destination
(``send.associations``). What the destination answers to each C-STORE is classified by
:mod:`dicom_node.send.failures` (delivered, delivered with a warning logged, retried, or
dead-lettered at once). No answer (a refused or aborted association, a destination slower than
``send.dimse_timeout_s``) is retried; a file the destination accepts no presentation context for
is dead-lettered.

An association that cannot be had is one log line per output naming why (connection refused,
rejected with its reason, ...: :mod:`dicom_node.send.requestor`), not pynetdicom's ERROR lines.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pynetdicom import _config, build_context

from dicom_node.config import DestinationConfig, SendConfig
from dicom_node.errors import SendError
from dicom_node.send.failures import Failure, classify, send_failed, unreadable, warning
from dicom_node.send.requestor import RequestorAE
from dicom_node.send.transport import DestinationType, OnEach, Results, register
from dicom_node.tls import client_context

__all__ = ["DIMSE", "DimseTransport", "check_destination", "send_files"]

log = logging.getLogger(__name__)


def check_destination(destination: DestinationConfig) -> None:
    """What a dimse destination needs (run by the config's validation)."""
    if destination.ae_title is None or destination.host is None:
        raise ValueError("a dimse destination needs ae_title and host (and port)")
    if destination.url is not None:
        raise ValueError("url is for type: dicomweb destinations")


def send_files(
    destination: DestinationConfig,
    paths: Sequence[Path],
    calling_ae_title: str,
    timeout_s: float = 30.0,
    on_each: OnEach | None = None,
) -> Results:
    """Send files over one association; returns path → None (sent) or a :class:`Failure`.

    ``on_each(path, result)`` is called as soon as each C-STORE is answered, so that the
    outbox records a delivery before the next object goes: a crash mid-association then resends
    at most the one object in flight, not all those sent since the association opened.

    Each file is sent as it is on disk (pynetdicom's chunked sending: the data set is streamed
    from the file without being decoded and re-encoded), under a presentation context for its
    SOP class and transfer syntax, read from its file meta information.
    """
    _config.STORE_SEND_CHUNKED_DATASET = True  # only this transport sends C-STOREs in the node
    assert destination.ae_title is not None and destination.host is not None  # type: dimse
    results: Results = {}
    metas = {}
    for path in paths:
        try:
            metas[path] = read_file_meta_info(path)
        except Exception as error:  # a damaged output file: it will never go
            results[path] = unreadable(path, error)
    paths = [p for p in paths if p in metas]
    if not paths:
        return results
    contexts = {
        (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)) for meta in metas.values()
    }
    ae = RequestorAE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s  # pynetdicom's default: the system's (minutes)
    for sop_class, syntax in sorted(contexts):
        ae.requested_contexts.append(build_context(sop_class, [syntax]))
    tls_args = None
    if destination.tls is not None:
        context = client_context(destination.tls, f"destination {destination.key}")
        tls_args = (context, destination.tls.server_name or destination.host)
    try:
        assoc = ae.request(destination.host, destination.port, destination.ae_title, tls_args)
    except SendError as error:
        return {**results, **dict.fromkeys(paths, Failure(str(error)))}
    try:
        for path in paths:
            if not assoc.is_established:  # aborted: a DIMSE timeout, or the peer
                results[path] = Failure(f"association with {destination.ae_title} aborted")
                continue
            try:
                status = assoc.send_c_store(path)
            except ValueError as error:  # no accepted context for this SOP class / syntax
                results[path] = Failure(f"the destination accepts no context: {error}", True)
                continue
            except Exception as error:  # an association that went away mid-call, ...
                results[path] = send_failed(error)
                continue
            code = int(status.Status) if status and "Status" in status else None
            if code is None:
                results[path] = Failure(
                    "no C-STORE response (the destination is slower than the DIMSE timeout, "
                    "or aborted)"
                )
                continue
            results[path] = classify(code)
            if on_each is not None:
                on_each(path, results[path])
            words = warning(code)
            if words is not None:
                log.warning(
                    "%s answered 0x%04X (%s) for %s: delivered",
                    destination.key,
                    code,
                    words,
                    path.name,
                )
    finally:
        if assoc.is_established:
            assoc.release()
    return results


class DimseTransport:
    """:class:`~dicom_node.send.transport.Transport` of a dimse destination: each send is one
    association, calling as the node's AE title, with ``send.dimse_timeout_s`` for each step."""

    def __init__(
        self, destination: DestinationConfig, policy: SendConfig, calling_ae_title: str
    ) -> None:
        self.destination = destination
        self.calling_ae_title = calling_ae_title
        self.timeout_s = policy.dimse_timeout_s

    def send(self, paths: Sequence[Path], on_each: OnEach | None = None) -> Results:
        """C-STORE ``paths`` over one association (:func:`send_files`)."""
        return send_files(self.destination, paths, self.calling_ae_title, self.timeout_s, on_each)


DIMSE = register(DestinationType("dimse", open=DimseTransport, check=check_destination))
