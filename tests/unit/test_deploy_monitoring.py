"""The alert rules and the Grafana dashboard in deploy/ name only metrics the node exports
(a renamed metric would silently blind an alert)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import generate_latest

from dicom_node.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
NAME = re.compile(r"\b(orthonode_[a-z0-9_]+)")


def exported() -> set[str]:
    metrics = Metrics()
    # Touch every labelled family once, so that it appears in the exposition.
    metrics.instances.labels(sop_class="x", status="0x0000").inc()
    metrics.retries.labels(destination="x").inc()
    metrics.dead_letters.labels(destination="x").inc()
    metrics.end_to_end.labels(task="x").observe(1)
    metrics.studies.labels(state="done").set(0)
    metrics.model.labels(task="x", version="1", sha256="0").set(1)
    metrics.processed.labels(task="x").inc()
    metrics.failed.labels(task="x").inc()
    metrics.not_applicable.labels(task="x", reason="anatomy").inc()
    metrics.associations.labels(result="accepted", reason="").inc()
    metrics.dropped.labels(reason="timeout").inc()
    metrics.outbox.labels(state="dead").set(0)
    metrics.latency.labels(task="x").observe(1)
    metrics.problems.labels(kind="unrouted").set(0)
    text = generate_latest(metrics.registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}


def test_alert_rules_use_exported_metrics() -> None:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    names = exported()
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    assert len(alerts) >= 8
    for rule in alerts:
        assert rule["annotations"]["summary"] and rule["labels"]["severity"]
        for name in NAME.findall(rule["expr"]):
            assert name in names, f"{rule['alert']}: {name} is not exported"


def test_dashboard_uses_exported_metrics() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "orthonode-dashboard.json").read_text())
    names = exported()
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(expressions) >= 12
    for expr in expressions:
        for name in NAME.findall(expr):
            assert name in names, f"{name} is not exported"


def test_a_degraded_node_alerts() -> None:
    """Dead letters or failed studies make the node degraded (orthonode_health_state 1): an
    alert of its own, apart from not ready (2)."""
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert alerts["OrthonodeDegraded"]["expr"] == "orthonode_health_state == 1"
    assert alerts["OrthonodeDegraded"]["labels"]["severity"] == "warning"
    assert alerts["OrthonodeNotReady"]["expr"] == "orthonode_health_state == 2"
    names = exported()
    assert {"orthonode_health_state", "orthonode_dead_letters_waiting"} <= names
