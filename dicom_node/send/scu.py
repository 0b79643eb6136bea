"""C-STORE SCU and the outbound worker: durable queue, exponential backoff, dead letter.

A ``type: dicomweb`` destination is sent to over STOW-RS instead (:mod:`dicom_node.send.stow`,
same queue, retries and dead letter).

Several associations per destination run at once (``send.associations``). What the
destination answers decides what happens to an output (PS3.4 B.2.3, PS3.7 C):

* 0x0000 success, or the warnings 0xB000 (coercion), 0xB006 (elements discarded), 0xB007
  (data set does not match SOP class): sent (a warning is logged);
* 0x0111 duplicate SOP instance: sent (the destination has it);
* 0xA7xx out of resources, 0x0110 processing failure, 0x0210 duplicate invocation, 0x0213
  resource limitation, no answer (refused or aborted association, a destination slower than
  ``send.dimse_timeout_s``): retried after ``backoff_delay`` until ``max_attempts``;
* 0xA9xx data set does not match SOP class, 0xCxxx cannot understand, 0x0122 SOP class not
  supported and the other 0x01xx / 0x02xx failures: the destination will never take it, so
  it is dead-lettered at once, without a retry.

Dead letters are re-queued by ``python -m dicom_node send --retry-dead``.

An association that cannot be had is one log line per output naming why (connection refused,
rejected with its reason, ...: :mod:`dicom_node.send.requestor`), not pynetdicom's ERROR lines.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pynetdicom import _config, build_context

from dicom_node.audit import Audit, NullAudit
from dicom_node.config import DestinationConfig, SendConfig
from dicom_node.errors import SendError
from dicom_node.send.requestor import RequestorAE
from dicom_node.store import OutboxItem, Spool
from dicom_node.tls import client_context

__all__ = ["Failure", "Sender", "backoff_delay", "classify", "send_files"]

log = logging.getLogger(__name__)

_SUCCESS = {0x0000, 0xB000, 0xB006, 0xB007, 0x0111}
_WARNINGS = {
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
    0x0111: "duplicate SOP instance",
}
_TRANSIENT = {0x0110, 0x0210, 0x0213}


class Failure(str):
    """Why an output was not delivered; ``permanent`` when retrying cannot help."""

    permanent: bool

    def __new__(cls, message: str, permanent: bool = False) -> Failure:
        failure = super().__new__(cls, message)
        failure.permanent = permanent
        return failure


def classify(code: int) -> Failure | None:
    """None when the C-STORE status means delivered, else the failure it is."""
    if code in _SUCCESS or (code & 0xF000) == 0xB000:  # every 0xBxxx is a warning: stored
        return None
    transient = (code & 0xFF00) == 0xA700 or code in _TRANSIENT
    return Failure(f"C-STORE status 0x{code:04X}", permanent=not transient)


def backoff_delay(attempt: int, policy: SendConfig) -> float | None:
    """Seconds before retry number ``attempt`` (1-based), or None when it is time to give up."""
    if attempt >= policy.max_attempts:
        return None
    return float(min(policy.backoff_initial_s * 2 ** (attempt - 1), policy.backoff_max_s))


def send_files(
    destination: DestinationConfig,
    paths: Sequence[Path],
    calling_ae_title: str,
    timeout_s: float = 30.0,
    on_each: Callable[[Path, str | None], None] | None = None,
) -> dict[Path, str | None]:
    """Send files over one association; returns path → None (sent) or a :class:`Failure`.

    ``on_each(path, result)`` is called as soon as each C-STORE is answered, so that the
    outbox records a delivery before the next object goes: a crash mid-association then resends
    at most the one object in flight, not all those sent since the association opened.

    Each file is sent as it is on disk (pynetdicom's chunked sending: the data set is streamed
    from the file without being decoded and re-encoded), under a presentation context for its
    SOP class and transfer syntax, read from its file meta information.
    """
    _config.STORE_SEND_CHUNKED_DATASET = True  # only this sender sends C-STOREs in the node
    assert destination.ae_title is not None and destination.host is not None  # type: dimse
    results: dict[Path, str | None] = {}
    metas = {}
    for path in paths:
        try:
            metas[path] = read_file_meta_info(path)
        except Exception as error:  # a damaged output file: it will never go
            results[path] = Failure(f"cannot read {path.name}: {type(error).__name__}", True)
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
                results[path] = Failure(f"send failed: {type(error).__name__}: {error}")
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
            if code != 0x0000 and results[path] is None:
                log.warning(
                    "%s answered 0x%04X (%s) for %s: delivered",
                    destination.key,
                    code,
                    _WARNINGS.get(code, "warning"),
                    path.name,
                )
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def _send_by_type(
    destination: DestinationConfig,
    paths: Sequence[Path],
    calling_ae_title: str,
    timeout_s: float = 30.0,
    on_each: Callable[[Path, str | None], None] | None = None,
) -> dict[Path, str | None]:
    """C-STORE for a ``dimse`` destination, STOW-RS for a ``dicomweb`` one (one request: its
    results all come with the answer)."""
    if destination.type == "dicomweb":
        from dicom_node.send.stow import stow_files

        return stow_files(destination, paths, calling_ae_title)
    return send_files(destination, paths, calling_ae_title, timeout_s, on_each)


class Sender:
    """Drains the spool's outbox over up to ``policy.associations`` concurrent associations per
    destination (PACS store instances in parallel; one association at a time pays each
    instance's storage latency in turn).

    :meth:`step` sends every due item, split over the associations (each on a thread of the
    sender's pool), and returns once they are all done.
    """

    def __init__(
        self,
        spool: Spool,
        destinations: Sequence[DestinationConfig],
        policy: SendConfig,
        calling_ae_title: str,
        transport: Callable[..., dict[Path, str | None]] | None = None,
        observe: Callable[[str, float], None] | None = None,
        clock: Callable[[], float] = time.time,
        audit: Audit | None = None,
        on_result: Callable[[OutboxItem, str, str | None, bool], None] | None = None,
    ) -> None:
        self.spool = spool
        # on_result(item, destination, problem, retried): the metrics' view of each attempt
        self.on_result = on_result or (lambda item, name, problem, retried: None)
        self.audit: Audit = audit or NullAudit()
        self.destinations = {d.key: d for d in destinations}
        self.policy = policy
        self.calling_ae_title = calling_ae_title
        self._records_each = transport is None
        self.transport = transport or functools.partial(
            _send_by_type, timeout_s=policy.dimse_timeout_s
        )
        self.observe = observe
        self.clock = clock
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, policy.associations * max(1, len(self.destinations))),
            thread_name_prefix="orthonode-send",
        )

    def step(self) -> int:
        """Try every due item once; returns how many were attempted."""
        due = self.spool.due()
        by_destination: dict[str, list[OutboxItem]] = {}
        for item in due:
            by_destination.setdefault(item.destination, []).append(item)
        futures: list[Future[None]] = []
        for name, items in by_destination.items():
            destination = self.destinations.get(name)
            if destination is None:
                for item in items:
                    self.spool.mark_failed(item.id, f"destination {name!r} is not configured", None)
                continue
            if self.observe is not None:
                now = self.clock()
                for item in items:
                    if item.attempts == 0:
                        self.observe("queue_wait", max(0.0, now - item.created_at))
            chunks = max(1, min(self.policy.associations, len(items)))
            for index in range(chunks):
                futures.append(
                    self._pool.submit(self._send, destination, name, items[index::chunks])
                )
        for future in futures:
            future.result()
        return len(due)

    def close(self) -> None:
        """Let running sends finish; no new ones start."""
        self._pool.shutdown(wait=True)

    def _send(self, destination: DestinationConfig, name: str, items: list[OutboxItem]) -> None:
        """One association: send ``items``, record each result (never raises)."""
        try:
            started = time.perf_counter()
            by_path = {i.path: i for i in items}
            recorded: set[Path] = set()

            def record(path: Path, result: str | None) -> None:
                if path in by_path and path not in recorded:
                    recorded.add(path)
                    self._record(by_path[path], name, result)

            paths = [i.path for i in items]
            try:
                # The node's own transport records each object as it is answered.
                more = {"on_each": record} if self._records_each else {}
                results = self.transport(destination, paths, self.calling_ae_title, **more)
            except Exception as error:  # whatever it is, the items back off and are retried
                results = {
                    i.path: Failure(f"send failed: {type(error).__name__}: {error}") for i in items
                }
            if self.observe is not None:
                per_item = (time.perf_counter() - started) / len(items)
                for _ in items:
                    self.observe("send", per_item)
            for item in items:
                record(item.path, results.get(item.path, "not attempted"))
        except Exception:
            log.exception("sending to %s failed unexpectedly; the items stay queued", name)

    def _record(self, item: OutboxItem, name: str, problem: str | None) -> None:
        if problem is None:
            self.spool.mark_sent(item.id)
            self.on_result(item, name, None, False)
            self.audit.record(
                "output-sent",
                file=item.path.name,
                study_instance_uid=item.study_instance_uid,
                destination=name,
            )
            log.info("sent %s of study %s to %s", item.path.name, item.study_instance_uid, name)
            return
        permanent = bool(getattr(problem, "permanent", False))
        delay = None if permanent else backoff_delay(item.attempts + 1, self.policy)
        self.spool.mark_failed(item.id, problem, delay)
        self.on_result(item, name, problem, delay is not None)
        self.audit.record(
            "output-failed",
            file=item.path.name,
            study_instance_uid=item.study_instance_uid,
            destination=name,
            error=problem,
            dead_lettered=delay is None,
        )
        log.warning(
            "sending %s of study %s to %s failed (%s); %s",
            item.path.name,
            item.study_instance_uid,
            name,
            problem,
            "dead-lettered without a retry (the destination will not take it)"
            if permanent
            else "dead-lettered"
            if delay is None
            else f"retry in {delay:.0f} s",
        )
