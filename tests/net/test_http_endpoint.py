"""The node's HTTP endpoint in a running node: /healthz, /readyz (ready, then not ready when
the disk drops below the reserve, ready again when space returns, degraded while a dead letter
waits) and /metrics (at /metrics itself, no redirect)."""

# ruff: noqa: F811  (fixtures imported from test_node_service are redefined as parameters)

from __future__ import annotations

import http.client
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
        "state": "ready",
        "checks": {"models": "ok", "dicom": "ok", "workers": "ok", "spool": "ok"},
        "warnings": [],
    }
    # The disk below the reserve: not ready, and the answer says why.
    service.spool.min_free_bytes = 1 << 60
    status, body = get(port, "/readyz")
    assert status == 503
    [problem] = json.loads(body)["checks"]["spool"]
    assert problem.startswith("disk:") and "spool.min_free_mb" in problem
    assert json.loads(body)["state"] == "not ready"
    service.spool.min_free_bytes = 1 << 20
    assert get(port, "/readyz")[0] == 200
    # /metrics answers 200 itself (urllib would follow a redirect: http.client does not).
    for path in ("/metrics", "/metrics/"):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", path)
        answer = connection.getresponse()
        metrics = answer.read().decode()
        connection.close()
        assert answer.status == 200, (path, answer.status, answer.getheader("location"))
        assert "orthonode_associations_total" in metrics
        assert "orthonode_connections_dropped_total" in metrics
        assert "orthonode_health_state 0.0" in metrics
    assert get(port, "/nothing")[0] == 404
    # A dead letter makes the node degraded: still 200, and the reason; the gauge says 1.
    service.spool._db.execute(
        "INSERT INTO outbox (study_instance_uid, task, path, destination, state, attempts, "
        "next_attempt_at, last_error, created_at, updated_at) "
        "VALUES ('1.2.3', 'knee', '/x/knee-v1-sr.dcm', 'pacs', 'dead', 3, 0, 'refused', 0, 0)"
    )
    status, body = get(port, "/readyz")
    assert status == 200 and json.loads(body)["state"] == "degraded"
    assert json.loads(body)["warnings"] == [
        "1 dead letter(s) wait to be requeued (health.dead_letters_warning: 1)"
    ]
    assert "orthonode_health_state 1.0" in get(port, "/metrics")[1]
