"""The node's HTTP endpoint in a running node: /healthz, /readyz (ready, then not ready when
the disk drops below the reserve, ready again when space returns) and /metrics."""

# ruff: noqa: F811  (fixtures imported from test_node_service are redefined as parameters)

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from dicom_node.service import Service
from tests.factories import RecordingPacs, free_port
from tests.net.test_node_service import (  # noqa: F401  (fixtures)
    ROOT,
    _node_config,
    knee_only,
    pacs,
    start_node,
)


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_health_readiness_and_metrics(
    tmp_path: Path, pacs: RecordingPacs, start_node: Callable[..., Service]
) -> None:
    tasks = knee_only()
    config = _node_config(tmp_path, pacs, tasks)
    config["node"]["http_port"] = free_port()
    config["routing"] = {"image_check": "off"}
    service = start_node(config)
    port = config["node"]["http_port"]
    assert get(port, "/healthz") == (200, json.dumps({"alive": True}, indent=1) + "\n")
    status, body = get(port, "/readyz")
    assert status == 200, body
    assert json.loads(body) == {
        "ready": True,
        "checks": {"models": "ok", "dicom": "ok", "workers": "ok", "spool": "ok"},
    }
    # The disk below the reserve: not ready, and the answer says why.
    service.spool.min_free_bytes = 1 << 60
    status, body = get(port, "/readyz")
    assert status == 503
    [problem] = json.loads(body)["checks"]["spool"]
    assert problem.startswith("disk:") and "spool.min_free_mb" in problem
    service.spool.min_free_bytes = 1 << 20
    assert get(port, "/readyz")[0] == 200
    status, metrics = get(port, "/metrics")
    assert status == 200
    assert "orthonode_associations_total" in metrics
    assert "orthonode_connections_dropped_total" in metrics
    assert get(port, "/nothing")[0] == 404
