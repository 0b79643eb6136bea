"""The running node: C-STORE receiver, assembler, inference worker, sender, metrics endpoint.

The stages hand work on through the spool (durable) and wake the next one directly: a stored
instance wakes the assembler, a study promoted to ready wakes the inference worker, queued
outputs wake the sender. Each waits on its event with a timeout that is only a safety net (and,
for the assembler, the end of the next quiet period; for the sender, the next retry). On start,
studies caught mid-processing by a crash go back to the queue and unsent outputs are retried.
``stop()`` (SIGTERM) stops accepting associations, lets the current step finish and closes the
spool.

What is refused or ignored is recorded in the spool for the status page's problems view: each
ingress refusal by :class:`~dicom_node.receive.ingest.Ingest` (the spool is its sink), each
instance no routing rule matched by :meth:`~dicom_node.store.Spool.mark_routed`. Dead letters
and failed studies make the node *degraded* (``health:`` in conf.yaml): ``/readyz`` says so,
and so do the status page and ``orthonode_health_state``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import pydicom
import torch

from dicom_node.applicability import ImageChecker, load_image_checker
from dicom_node.assemble import Assembler
from dicom_node.audit import open_audit, record_start
from dicom_node.config import Config
from dicom_node.domain import InstanceRef
from dicom_node.errors import BundleError, ConfigError
from dicom_node.http import HttpEndpoint, Tokens, make_app
from dicom_node.infer import Predictor, select_device
from dicom_node.metrics import Metrics
from dicom_node.models.bundle import Bundle, load_bundles
from dicom_node.pipeline import Pipeline
from dicom_node.preprocess import display_image
from dicom_node.problems import RECORDED_KINDS
from dicom_node.receive import StorageScp
from dicom_node.receive.dicomweb import StowRs
from dicom_node.receive.ingest import Ingest
from dicom_node.send import Sender
from dicom_node.status import StatusPage
from dicom_node.status.health import assess
from dicom_node.status.model import StatusModel
from dicom_node.store import OutboxItem, Spool
from dicom_node.tasks import TaskSpec

__all__ = ["Service"]

log = logging.getLogger(__name__)


@dataclass
class Service:
    """Everything ``python -m dicom_node serve`` runs.

    ``safety_net_s`` bounds how long a stage sleeps when nobody wakes it (a lost wake-up, or
    work another process added); the hot path never waits for it.
    """

    config: Config
    clock: Callable[[], float] = time.time
    safety_net_s: float = 2.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _assemble: threading.Event = field(default_factory=threading.Event)
    _infer: threading.Event = field(default_factory=threading.Event)
    _send: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _swap: threading.Lock = field(default_factory=threading.Lock)
    _next_predictor: Predictor | None = None
    _reloading: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        from dicom_node.encode import (
            build_secondary_capture,
            build_segmentation,
            build_structured_report,
        )

        config = self.config
        self.device = device = select_device(config.inference.device)
        bundles, image_checker = self._load_models()
        self.bundles = bundles
        self.metrics = metrics = Metrics()
        self.audit = open_audit(config)
        self.spool = Spool(
            config.spool.directory,
            min_free_bytes=config.spool.min_free_mb * 2**20,
            clock=self.clock,
        )
        resumed = self.spool.resume()
        if resumed:
            log.info("resuming %d study job(s) interrupted by the last stop", resumed)
        specs = {task: config.spec(task) for task in bundles}
        self.assembler = Assembler(
            self.spool,
            config.routing.rules,
            {task: bundle.card.views for task, bundle in bundles.items()},
            config.assembly.stable_after_s,
            self.clock,
            on_unmatched=metrics.unrouted.inc,
            image_route=self._image_route(image_checker, specs, list(bundles))
            if image_checker is not None and config.routing.image_check == "fallback"
            else None,
        )
        self.pipeline = Pipeline(
            predictor=self._predictor(bundles, image_checker),
            spool=self.spool,
            specs=specs,
            destinations=[d.key for d in config.destinations],
            build_structured_report=build_structured_report,
            build_secondary_capture=build_secondary_capture,
            observe=metrics.observe,
            on_failed=lambda task: metrics.failed.labels(task=task).inc(),
            on_queued=self._send.set,
            on_not_applicable=lambda task, reason: metrics.not_applicable.labels(
                task=task, reason=reason
            ).inc(),
            when_not_applicable=config.outputs.when_not_applicable,
            saliency=config.outputs.saliency,
            build_segmentation=build_segmentation,
        )
        self.sender = Sender(
            self.spool,
            config.destinations,
            config.send,
            config.node.ae_title,
            observe=metrics.observe,
            clock=self.clock,
            audit=self.audit,
            on_result=self._sent,
        )
        self.scp = StorageScp(
            config.node,
            self.spool,
            peers=config.peers,
            on_stored=self._on_stored,
            on_association=lambda result, reason: metrics.associations.labels(
                result=result, reason=reason
            ).inc(),
            on_dropped=lambda reason: metrics.dropped.labels(reason=reason).inc(),
            audit=self.audit,
            on_instance=self._instance,
        )
        self.scp.start()
        self.http: HttpEndpoint | None = None
        if config.node.http_port:
            stow = StowRs(
                Ingest(
                    self.spool,
                    max_image_pixels=config.node.max_image_pixels,
                    audit=self.audit,
                    on_stored=self._on_stored,
                ),
                self.spool.root / "incoming",
                max_upload_bytes=config.http.max_upload_mb * 2**20,
                max_instance_bytes=config.node.max_dataset_mb * 2**20,
                spool_problems=self.spool.health,
                on_instance=self._instance,
            )
            try:
                tokens = Tokens(config.http.tokens_file)
            except OSError as error:
                raise ConfigError(str(error)) from None
            page = StatusPage(self, config.http.recent_studies, on_requeued=self._send.set)
            app = make_app(
                metrics.registry,
                self.checks,
                tokens=tokens,
                stow=stow,
                status=page,
                warnings=self.warnings,
                on_scrape=self._refresh_gauges,
            )
            self.http = HttpEndpoint(
                config.node.host, config.node.http_port, app, tls=config.http.tls
            )
        for name, step in (
            ("assembler", self._assemble_step),
            ("inference", self._infer_step),
            ("sender", self._send_step),
        ):
            thread = threading.Thread(
                target=self._guard(step), name=f"orthonode-{name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        # Whatever the last run left (unrouted instances, ready studies, due sends) starts now.
        for event in (self._assemble, self._infer, self._send):
            event.set()
        record_start(self.audit, config, bundles, image_checker)
        self._show_models(bundles)
        if device.type == "cuda":
            metrics.watch_gpu(lambda: float(torch.cuda.memory_allocated(device)))
        log.info(
            "orthonode listening as %s on port %d; tasks %s on %s",
            config.node.ae_title,
            self.scp.port,
            ", ".join(f"{t} ({b.card.version})" for t, b in bundles.items()),
            device,
        )

    def _load_models(self) -> tuple[dict[str, Bundle], ImageChecker | None]:
        """The task bundles and the image check, each verified against its sha256."""
        config = self.config
        bundles = load_bundles(config, self.device)
        image_checker = None
        if config.routing.image_check != "off":
            image_checker = load_image_checker(config.routing.image_check_bundle, self.device)
        return bundles, image_checker

    def _predictor(
        self, bundles: dict[str, Bundle], image_checker: ImageChecker | None
    ) -> Predictor:
        return Predictor(
            bundles,
            self.device,
            saliency=self.config.inference.saliency,
            observe=self.metrics.observe,
            image_checker=image_checker,
            specs={task: self.config.spec(task) for task in bundles},
        )

    def _show_models(self, bundles: dict[str, Bundle]) -> None:
        self.metrics.model.clear()
        for task, bundle in bundles.items():
            self.metrics.model.labels(
                task=task, version=bundle.card.version, sha256=bundle.card.model_sha256
            ).set(1)

    def reload(self) -> bool:
        """Load the bundles again from their folders (``python -m dicom_node reload``, SIGHUP).

        Each is verified (card, sha256 of the weights) before anything changes; the new set
        is used from the next batch on, so queued studies are processed by the new versions
        (and their SRs say so). A bundle that fails, or a change in the set of tasks (a restart
        is needed for that), is refused with the reason, and the running bundles keep serving.
        """
        if not self._reloading.acquire(blocking=False):
            log.warning("reload: one is already running; this request is ignored")
            return False
        try:
            return self._reload()
        finally:
            self._reloading.release()

    def _reload(self) -> bool:
        running = {t: b.card.version for t, b in self.bundles.items()}
        try:
            bundles, image_checker = self._load_models()
            if set(bundles) != set(self.bundles):
                raise BundleError(
                    f"the tasks changed ({', '.join(sorted(bundles))} instead of "
                    f"{', '.join(sorted(self.bundles))}): restart the node for that"
                )
            changed = [t for t in bundles if bundles[t].card.views != self.bundles[t].card.views]
            if changed:
                raise BundleError(
                    f"the views of {', '.join(changed)} changed: restart the node for that"
                )
            predictor = self._predictor(bundles, image_checker)
        except Exception as error:  # a bundle that fails in any way is refused
            log.error("reload refused: %s; still serving %s", error, running)
            self.audit.record("reload-refused", error=str(error), serving=running)
            return False
        with self._swap:
            self._next_predictor = predictor
            self.bundles = bundles
        self._show_models(bundles)
        loaded = {t: b.card.version for t, b in bundles.items()}
        self.audit.record(
            "reload",
            bundles={
                t: {"version": b.card.version, "sha256": b.card.model_sha256}
                for t, b in bundles.items()
            },
        )
        log.info("reloaded the bundles: %s (were %s); used from the next batch", loaded, running)
        self._infer.set()
        return True

    def checks(self) -> dict[str, list[str]]:
        """What /readyz reports: problems per part (empty lists: ready)."""
        listening = hasattr(self, "scp") and self.scp._server is not None
        stopped = [t.name for t in self._threads if not t.is_alive()]
        return {
            "models": [] if hasattr(self, "pipeline") else ["not loaded"],
            "dicom": [] if listening else ["the DICOM listener is not running"],
            "workers": [f"{name} is not running" for name in stopped]
            + (["stopping"] if self._stop.is_set() else []),
            "spool": self.spool.health() if hasattr(self, "spool") else ["not open"],
        }

    def warnings(self) -> list[str]:
        """What makes the node degraded now (``health:``): dead letters, failed studies."""
        if not hasattr(self, "spool"):
            return []
        return StatusModel(self.spool, self.config, clock=self.clock).warnings()

    def _refresh_gauges(self) -> None:
        """Before a scrape: health, dead letters waiting, problems of the last 24 hours."""
        metrics = self.metrics
        metrics.health_state.set(assess(self.checks(), self.warnings()).level)
        metrics.dead_letters_waiting.set(self.spool.outbox_counts().get("dead", 0))
        counts = self.spool.problem_counts(since=self.clock() - 86400)
        for kind in RECORDED_KINDS:
            metrics.problems.labels(kind=kind).set(counts.get(kind, 0))

    @staticmethod
    def _image_route(
        checker: ImageChecker, specs: Mapping[str, TaskSpec], tasks: Sequence[str]
    ) -> Callable[[InstanceRef], tuple[str, str] | None]:
        def image_route(instance: InstanceRef) -> tuple[str, str] | None:
            check = checker.check([display_image(pydicom.dcmread(instance.path))])[0]
            return checker.route(check, specs, tasks)

        return image_route

    def _instance(self, sop_class: str, status: int, seconds: float) -> None:
        self.metrics.instances.labels(sop_class=sop_class, status=f"0x{status:04X}").inc()
        if status == 0x0000:
            self.metrics.observe("receive", seconds)

    def _sent(self, item: OutboxItem, destination: str, problem: str | None, retried: bool) -> None:
        if problem is None:
            study = self.spool.study(item.study_instance_uid, item.task)
            if study is not None:
                self.metrics.end_to_end.labels(task=item.task).observe(
                    max(0.0, self.clock() - study.last_received_at)
                )
        elif retried:
            self.metrics.retries.labels(destination=destination).inc()
        else:
            self.metrics.dead_letters.labels(destination=destination).inc()

    def _on_stored(self, study_instance_uid: str, sop_instance_uid: str) -> None:
        self.metrics.received.inc()
        self._assemble.set()

    def _guard(self, step: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            while not self._stop.is_set():
                try:
                    step()
                except Exception:
                    log.exception("worker step failed; continuing")
                    self._stop.wait(self.safety_net_s)

        return run

    def _wait(self, event: threading.Event, timeout: float | None) -> None:
        """Sleep until woken, stopped, or ``timeout`` (capped by the safety net)."""
        limit = self.safety_net_s if timeout is None else min(timeout, self.safety_net_s)
        event.wait(max(limit, 0.0))
        event.clear()  # work is read after this, so a wake-up from now on is not lost

    def _assemble_step(self) -> None:
        self._wait(self._assemble, self.assembler.seconds_to_next_deadline())
        if self._stop.is_set():
            return
        self.assembler.route_new()
        if self.assembler.promote():
            self._infer.set()

    def _infer_step(self) -> None:
        self._wait(self._infer, None)
        while not self._stop.is_set():
            with self._swap:  # a reload takes effect between batches, never within one
                if self._next_predictor is not None:
                    self.pipeline.predictor = self._next_predictor
                    self._next_predictor = None
            jobs = self.spool.claim_ready(self.config.inference.batch_size)
            if not jobs:
                return
            claimed = self.clock()
            for job in jobs:
                self.metrics.observe("wait_ready", max(0.0, claimed - job.last_received_at))
            started = time.perf_counter()
            outputs = self.pipeline.process(jobs)
            elapsed = (time.perf_counter() - started) / len(jobs)
            for output in outputs:
                self.metrics.processed.labels(task=output.task).inc()
                self.metrics.latency.labels(task=output.task).observe(elapsed)

    def _send_step(self) -> None:
        due = self.spool.next_due()
        self._wait(self._send, None if due is None else due - self.clock())
        if self._stop.is_set():
            return
        # Every round takes all that is due by then, so outputs queued during a send go out
        # together on the next association.
        # At most a few rounds per wake-up: an item that cannot even be recorded (a broken
        # index) must not make this loop spin.
        for _ in range(20):
            if not self.sender.step() or self._stop.is_set():
                break
        counts = self.spool.outbox_counts()
        for state in ("pending", "sent", "dead"):
            self.metrics.outbox.labels(state=state).set(counts.get(state, 0))
        studies = self.spool.study_counts()
        for state in ("collecting", "ready", "processing", "done", "failed"):
            self.metrics.studies.labels(state=state).set(studies.get(state, 0))

    def stop(self) -> None:
        """Stop receiving, finish the current steps, close the spool. Safe to call twice."""
        if self._stop.is_set():
            return
        self._stop.set()
        for event in (self._assemble, self._infer, self._send):
            event.set()
        if hasattr(self, "scp"):
            self.scp.stop()
        if getattr(self, "http", None) is not None:
            self.http.stop()  # type: ignore[union-attr]
        for thread in self._threads:
            thread.join(timeout=30)
        if hasattr(self, "sender"):
            self.sender.close()
        if hasattr(self, "spool"):
            self.spool.close()
        if hasattr(self, "audit"):
            self.audit.record("stop")
            self.audit.close()
        log.info("orthonode stopped")

    def wait(self) -> None:
        self._stop.wait()
