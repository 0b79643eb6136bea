"""The outbound worker: drains the spool's durable outbox to the configured destinations, with
retries after a backoff and a dead letter, over each destination's transport.

Each destination's transport is opened from the registry of destination types
(:mod:`dicom_node.send.transport`: C-STORE for ``type: dimse``, STOW-RS for ``type: dicomweb``,
...); this worker never names one. What each answer means (delivered, retried, dead-lettered
at once) is :mod:`dicom_node.send.failures`' rule, the same for every transport. Dead letters
are re-queued by ``python -m dicom_node send --retry-dead``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from dicom_node.audit import Audit, NullAudit
from dicom_node.config import DestinationConfig, SendConfig
from dicom_node.send.failures import retry_delay, send_failed
from dicom_node.send.transport import OnEach, Results, Transport, open_transport
from dicom_node.store import Outbox, OutboxItem

__all__ = ["Sender"]

log = logging.getLogger(__name__)


class _FunctionTransport:
    """A send function standing in for every destination's transport (``Sender(transport=)``):
    ``function(destination, paths, calling_ae_title)``; its results are recorded when it
    returns."""

    def __init__(
        self,
        function: Callable[..., Results],
        destination: DestinationConfig,
        calling_ae_title: str,
    ) -> None:
        self.function = function
        self.destination = destination
        self.calling_ae_title = calling_ae_title

    def send(self, paths: Sequence[Path], on_each: OnEach | None = None) -> Results:
        return self.function(self.destination, paths, self.calling_ae_title)


class Sender:
    """Drains the spool's outbox over up to ``policy.associations`` concurrent associations per
    destination (PACS store instances in parallel; one association at a time pays each
    instance's storage latency in turn).

    :meth:`step` sends every due item, split over the associations (each on a thread of the
    sender's pool), and returns once they are all done.

    Each destination is sent to by the transport of its ``type``
    (:func:`~dicom_node.send.transport.open_transport`); ``transport``, when given, is a function
    ``transport(destination, paths, calling_ae_title) -> {path: None or why}`` used for every
    destination instead (tests wrap the node's own this way).
    """

    def __init__(
        self,
        spool: Outbox,
        destinations: Sequence[DestinationConfig],
        policy: SendConfig,
        calling_ae_title: str,
        transport: Callable[..., Results] | None = None,
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
        self.transports: dict[str, Transport] = {
            key: (
                open_transport(destination, policy, calling_ae_title)
                if transport is None
                else _FunctionTransport(transport, destination, calling_ae_title)
            )
            for key, destination in self.destinations.items()
        }
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
            if name not in self.destinations:
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
                futures.append(self._pool.submit(self._send, name, items[index::chunks]))
        for future in futures:
            future.result()
        return len(due)

    def close(self) -> None:
        """Let running sends finish; no new ones start."""
        self._pool.shutdown(wait=True)

    def _send(self, name: str, items: list[OutboxItem]) -> None:
        """One association (one request): send ``items``, record each result (never raises)."""
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
                # A transport that learns each result on its own records it as it is answered.
                results = self.transports[name].send(paths, on_each=record)
            except Exception as error:  # whatever it is, the items back off and are retried
                results = {i.path: send_failed(error) for i in items}
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
        delay = retry_delay(problem, item.attempts + 1, self.policy)
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
