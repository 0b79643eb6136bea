"""The running node: C-STORE receiver, assembler, inference worker, sender, metrics endpoint.

Threads hand work over through the spool (durable) and wake each other with events, never with
fixed sleeps on the hot path. On start, studies caught mid-processing by a crash go back to the
queue and unsent outputs are retried. ``stop()`` (SIGTERM) stops accepting associations, lets
the current step finish and closes the spool.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import start_http_server

from dicom_node.assemble import Assembler
from dicom_node.config import Config
from dicom_node.errors import BundleError, DicomNodeError
from dicom_node.infer import Predictor, select_device
from dicom_node.metrics import Metrics
from dicom_node.models.bundle import Bundle, load_bundle
from dicom_node.pipeline import Pipeline
from dicom_node.receive import Peer, ScpSettings, StorageScp
from dicom_node.send import Sender
from dicom_node.store import Spool

__all__ = ["Service", "load_bundles"]

log = logging.getLogger(__name__)

_TRAIN_HINT = (
    "python -m train synth --task {task} --patients 400 --out data/{task} && "
    "python -m train fit --data data/{task} --out runs/{task} && "
    "python -m train export --bundle runs/{task} --out {path}"
)


def load_bundles(config: Config, device: str = "cpu") -> dict[str, Bundle]:
    """Every enabled task's bundle, verified; refuses with the missing file and the fix."""
    bundles = {}
    for task, task_config in config.tasks.items():
        if not task_config.enabled:
            continue
        path = task_config.bundle
        try:
            bundles[task] = load_bundle(path, device)
        except BundleError as error:
            raise BundleError(
                f"task {task}: {error}. Make a bundle with "
                f"`{_TRAIN_HINT.format(task=task, path=path)}`, point tasks.{task}.bundle at "
                f"one, or set tasks.{task}.enabled: false in conf.yaml"
            ) from None
    if not bundles:
        raise BundleError("no task is enabled in conf.yaml (tasks.<name>.enabled)")
    return bundles


@dataclass
class Service:
    """Everything ``python -m dicom_node serve`` runs."""

    config: Config
    clock: Callable[[], float] = time.time
    tick_s: float = 0.5
    _stop: threading.Event = field(default_factory=threading.Event)
    _wake: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        from dicom_node.encode import build_secondary_capture, build_structured_report

        config = self.config
        device = select_device(config.inference.device)
        bundles = load_bundles(config, str(device))
        self.metrics = Metrics()
        self.spool = Spool(
            config.spool.directory,
            min_free_bytes=config.spool.min_free_mb * 2**20,
            clock=self.clock,
        )
        resumed = self.spool.resume()
        if resumed:
            log.info("resuming %d study job(s) interrupted by the last stop", resumed)
        self.assembler = Assembler(
            self.spool,
            config.routing,
            set(bundles),
            config.assembly.stable_after_s,
            self.clock,
            on_unmatched=self.metrics.unrouted.inc,
        )
        self.pipeline = Pipeline(
            predictor=Predictor(bundles, device),
            spool=self.spool,
            destinations=[d.name or d.ae_title for d in config.destinations],
            build_structured_report=build_structured_report,
            build_secondary_capture=build_secondary_capture,
            saliency=config.inference.saliency,
        )
        self.sender = Sender(self.spool, config.destinations, config.send, config.node.ae_title)
        settings = ScpSettings(
            ae_title=config.node.ae_title,
            host=config.node.host,
            port=config.node.port,
            peers=tuple(Peer(p.ae_title, p.host) for p in config.peers),
            max_associations=config.node.max_associations,
            max_pdu=config.node.max_pdu,
            acse_timeout=config.node.acse_timeout_s,
            dimse_timeout=config.node.dimse_timeout_s,
            network_timeout=config.node.network_timeout_s,
        )
        self.scp = StorageScp(settings, self.spool, on_stored=self._on_stored)
        self.scp.start()
        if config.node.http_port:
            start_http_server(
                config.node.http_port, addr=config.node.host, registry=self.metrics.registry
            )
        for name, loop in (
            ("assembler", self._assemble_loop),
            ("inference", self._infer_loop),
            ("sender", self._send_loop),
        ):
            thread = threading.Thread(
                target=self._guard(loop), name=f"orthonode-{name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        log.info(
            "orthonode listening as %s on port %d; tasks %s on %s",
            config.node.ae_title,
            self.scp.port,
            ", ".join(f"{t} ({b.card.version})" for t, b in bundles.items()),
            device,
        )

    def _on_stored(self, study_instance_uid: str, sop_instance_uid: str) -> None:
        self.metrics.received.inc()
        self._wake.set()

    def _guard(self, loop: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            while not self._stop.is_set():
                try:
                    loop()
                except Exception:
                    log.exception("worker step failed; continuing")
                    self._stop.wait(self.tick_s)

        return run

    def _assemble_loop(self) -> None:
        self._wake.wait(self.tick_s)
        self._wake.clear()
        self.assembler.route_new()
        if self.assembler.promote_ready():
            self._wake.set()

    def _infer_loop(self) -> None:
        ready = self.spool.studies_in("ready")
        if not ready:
            self._stop.wait(self.tick_s)
            return
        jobs = []
        for study in ready[: self.config.inference.batch_size]:
            if self.spool.set_study_state(
                study.study_instance_uid, study.task, "processing", expect="ready"
            ):
                jobs.append(self.assembler.job(study.study_instance_uid, study.task, study.version))
        if not jobs:
            return
        started = time.perf_counter()
        try:
            # One batch through the models for every claimed study (views of a task together).
            self.pipeline.run(jobs)
            done = jobs
        except Exception:
            # Something in the batch is bad: run the studies one by one to isolate it. A study
            # that fails is marked failed (visible in `status`), never left in 'processing'.
            done = []
            for job in jobs:
                try:
                    self.pipeline.run([job])
                    done.append(job)
                except Exception as error:
                    reason = str(error)
                    if not isinstance(error, DicomNodeError):
                        # Library messages may quote element values: keep them out of the
                        # ERROR log and the spool; the traceback goes to DEBUG only.
                        reason = f"unexpected {type(error).__name__} (traceback at DEBUG level)"
                        log.debug("study %s traceback", job.study_instance_uid, exc_info=True)
                    self.spool.set_study_state(job.study_instance_uid, job.task, "failed", reason)
                    self.metrics.failed.labels(task=job.task).inc()
                    log.error(
                        "study %s task %s failed: %s", job.study_instance_uid, job.task, reason
                    )
        elapsed = (time.perf_counter() - started) / max(len(jobs), 1)
        for job in done:
            self.spool.set_study_state(
                job.study_instance_uid, job.task, "done", expect="processing", version=job.version
            )
            self.metrics.processed.labels(task=job.task).inc()
            self.metrics.latency.labels(task=job.task).observe(elapsed)

    def _send_loop(self) -> None:
        if not self.sender.step():
            self._stop.wait(self.tick_s)
        counts = self.spool.outbox_counts()
        for state in ("pending", "sent", "dead"):
            self.metrics.outbox.labels(state=state).set(counts.get(state, 0))

    def stop(self) -> None:
        """Stop receiving, finish the current steps, close the spool. Safe to call twice."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        if hasattr(self, "scp"):
            self.scp.stop()
        for thread in self._threads:
            thread.join(timeout=30)
        if hasattr(self, "spool"):
            self.spool.close()
        log.info("orthonode stopped")

    def wait(self) -> None:
        self._stop.wait()
