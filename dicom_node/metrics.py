"""Prometheus metrics of the node (a registry of its own; labels never carry patient data).

``orthonode_stage_seconds{stage}`` says where a study's time goes: ``receive`` (one C-STORE:
data set in hand → stored durably), ``wait_ready`` (newest instance stored → study claimed;
per study), ``read`` (read + decode + display), ``locate``
(region of interest + classifier input), ``classify``, ``explain`` (per view), ``encode`` (per
object: a Secondary Capture or the SR built and written), ``queue_wait`` (queued → first send
attempt) and ``send`` (per object, on its association). ``orthonode_end_to_end_seconds`` is
the whole way: a study's newest instance stored → each of its outputs delivered.

``orthonode_health_state`` is the node's health as ``/readyz`` and the status page say it
(0 ready, 1 degraded: dead letters or failed studies wait, 2 not ready), and
``orthonode_dead_letters_waiting`` the dead letters in the outbox now; both are read from the
spool before each scrape (the service's ``on_scrape``).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["STAGES", "Metrics"]

STAGES = (
    "receive",
    "wait_ready",
    "read",
    "check",
    "locate",
    "classify",
    "explain",
    "encode",
    "queue_wait",
    "send",
)


class Metrics:
    """Counters and gauges the service updates; served on /metrics."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.received = Counter(
            "orthonode_instances_received", "Instances durably stored", registry=self.registry
        )
        self.unrouted = Counter(
            "orthonode_instances_unrouted",
            "Instances no routing rule matched (ignored)",
            registry=self.registry,
        )
        self.processed = Counter(
            "orthonode_studies_processed", "Study jobs done", ["task"], registry=self.registry
        )
        self.failed = Counter(
            "orthonode_studies_failed", "Study jobs failed", ["task"], registry=self.registry
        )
        self.not_applicable = Counter(
            "orthonode_not_applicable",
            "Images the node did not answer on, by task and reason (anatomy, view, "
            "no-implant, out-of-distribution)",
            ["task", "reason"],
            registry=self.registry,
        )
        self.associations = Counter(
            "orthonode_associations",
            "Association requests by result (accepted, rejected) and reason of a rejection",
            ["result", "reason"],
            registry=self.registry,
        )
        self.dropped = Counter(
            "orthonode_connections_dropped",
            "Connections dropped before or during an association by the network guard: "
            "timeout, closed-before-request, too-many-pending, oversized-pdu, oversized-dataset, "
            "not-associate-rq, tls-failed, tls-timeout",
            ["reason"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "orthonode_study_seconds",
            "Claimed → outputs queued, per study (inference, saliency, encoding)",
            ["task"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120),
            registry=self.registry,
        )
        self.stage = Histogram(
            "orthonode_stage_seconds",
            "Time per stage (see the module docstring for what one observation is)",
            ["stage"],
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        for stage in STAGES:
            self.stage.labels(stage=stage)  # every series exists from the start
        self.outbox = Gauge(
            "orthonode_outbox", "Outbound queue by state", ["state"], registry=self.registry
        )
        self.instances = Counter(
            "orthonode_instances",
            "C-STORE requests by SOP class and the status answered (0x0000, 0xA700, ...)",
            ["sop_class", "status"],
            registry=self.registry,
        )
        self.studies = Gauge(
            "orthonode_studies",
            "Studies in the spool by state (collecting, ready, processing, done, failed)",
            ["state"],
            registry=self.registry,
        )
        self.retries = Counter(
            "orthonode_send_retries",
            "Failed sends that will be retried, by destination",
            ["destination"],
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "orthonode_dead_letters",
            "Outputs dead-lettered, by destination",
            ["destination"],
            registry=self.registry,
        )
        self.end_to_end = Histogram(
            "orthonode_end_to_end_seconds",
            "A study's newest instance stored → each of its outputs delivered",
            ["task"],
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
            registry=self.registry,
        )
        self.model = Gauge(
            "orthonode_model_info",
            "The loaded bundles (value 1): task, version and the weights' sha256",
            ["task", "version", "sha256"],
            registry=self.registry,
        )
        self.health_state = Gauge(
            "orthonode_health_state",
            "Health: 0 ready, 1 degraded (dead letters or failed studies wait; health: in "
            "conf.yaml), 2 not ready (what /readyz answers 503 for)",
            registry=self.registry,
        )
        self.dead_letters_waiting = Gauge(
            "orthonode_dead_letters_waiting",
            "Dead letters in the outbox now (requeue them from the status page)",
            registry=self.registry,
        )
        self.problems = Gauge(
            "orthonode_problems_24h",
            "Instances refused or ignored in the last 24 hours, by kind (unrouted, "
            "not-radiograph, bad-pixel-data, limit, bad-input, storage)",
            ["kind"],
            registry=self.registry,
        )
        self.gpu_memory = Gauge(
            "orthonode_gpu_memory_bytes",
            "CUDA memory allocated by the node's models (absent on CPU)",
            registry=self.registry,
        )

    def watch_gpu(self, allocated: Callable[[], float]) -> None:
        """Report ``allocated()`` (e.g. torch.cuda.memory_allocated) at every scrape."""
        self.gpu_memory.set_function(allocated)

    def observe(self, stage: str, seconds: float) -> None:
        """One observation of a stage's time (the stages' ``observe`` callback)."""
        self.stage.labels(stage=stage).observe(seconds)
