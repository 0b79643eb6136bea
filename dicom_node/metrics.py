"""Prometheus metrics of the node (a registry of its own; labels never carry patient data)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]


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
        self.latency = Histogram(
            "orthonode_study_seconds",
            "Inference + saliency + encoding time per study",
            ["task"],
            buckets=(0.5, 1, 2, 5, 10, 20, 60, 120),
            registry=self.registry,
        )
        self.outbox = Gauge(
            "orthonode_outbox", "Outbound queue by state", ["state"], registry=self.registry
        )
