"""The audit trail and the no-patient-identifiers rule, through a running node.

A study whose tags carry a distinctive patient name, ID, birth date and accession number goes
through the node at INFO and at DEBUG (pynetdicom's own debug logging included). Every log
line, every metric line and every audit line is scanned for them; the audit trail must say who
associated from where, what was stored and refused, and what was sent where.
"""

# ruff: noqa: F811  (fixtures imported from other test modules are redefined as parameters)

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from prometheus_client import generate_latest
from pynetdicom import AE

from dicom_node.service import Service
from tests.conftest import make_set
from tests.factories import RecordingPacs, manifest_rows, wait_for
from tests.net.test_node_service import (  # noqa: F401  (fixtures)
    ROOT,
    _node_config,
    _send,
    knee_only,
    pacs,
    start_node,
)

IDENTIFIERS = {
    "PatientName": "Quixote^Dulcinea^Maria",
    "PatientID": "MRN-55017734",
    "PatientBirthDate": "19480229",
    "AccessionNumber": "ACC-90021877",
    "OtherPatientIDs": "ALT-66610928",
}
# What must never appear: each value, and the name's parts as a viewer or a log might print them.
NEEDLES = [
    *IDENTIFIERS.values(),
    "Quixote",
    "Dulcinea",
    "55017734",
    "1948-02-29",
    "90021877",
]


@pytest.fixture(scope="module")
def knee_study(tmp_path_factory: pytest.TempPathFactory) -> list[pydicom.Dataset]:
    folder = make_set(tmp_path_factory.mktemp("privacy"), "k", task="knee", patients=1, seed=41)
    datasets = [pydicom.dcmread(folder / row["path"]) for row in manifest_rows(folder)]
    for ds in datasets:
        for keyword, value in IDENTIFIERS.items():
            setattr(ds, keyword, value)
    return datasets


def audit_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG], ids=["INFO", "DEBUG"])
def test_no_patient_identifier_in_logs_metrics_or_audit_and_the_audit_says_what_happened(
    tmp_path: Path,
    pacs: RecordingPacs,
    start_node: Callable[..., Service],
    knee_study: list[pydicom.Dataset],
    caplog: pytest.LogCaptureFixture,
    level: int,
) -> None:
    tasks = knee_only()
    config = _node_config(tmp_path, pacs, tasks)
    config["audit"] = {"file": str(tmp_path / "audit.jsonl")}
    caplog.set_level(level)  # the root logger: the node's and pynetdicom's records
    for name in ("pynetdicom", "dicom_node"):
        logging.getLogger(name).setLevel(level)
    try:
        service = start_node(config)
        port = service.scp.port
        assert _send(port, knee_study) == [0, 0]
        assert _send(port, knee_study[:1]) == [0]  # a duplicate: success, nothing rewritten
        # A wrong called AE title: rejected, and audited with the reason.
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context("1.2.840.10008.1.1")
        rejected = ae.associate("127.0.0.1", port, ae_title="SOMEONE")
        assert rejected.is_rejected
        ae.shutdown()
        study = knee_study[0].StudyInstanceUID
        wait_for(lambda: pacs.of_study(study, "SR") and pacs.of_study(study, "OT"), 90, "outputs")
        wait_for(
            lambda: (
                sum(e["event"] == "output-sent" for e in audit_lines(tmp_path / "audit.jsonl")) >= 3
            ),
            30,
            "the outputs audited as sent",
        )
        metrics = generate_latest(service.metrics.registry).decode()
    finally:
        for name in ("pynetdicom", "dicom_node"):
            logging.getLogger(name).setLevel(logging.NOTSET)
    service.stop()

    events = audit_lines(tmp_path / "audit.jsonl")
    texts = [r.getMessage() for r in caplog.records] + [
        json.dumps(r.__dict__.get("args"), default=str) for r in caplog.records
    ]
    for needle in NEEDLES:
        assert not [t for t in texts if needle in t], f"{needle!r} in a log line"
        assert needle not in metrics, f"{needle!r} in the metrics"
        assert not [e for e in events if needle in json.dumps(e)], f"{needle!r} in the audit"
    if level == logging.DEBUG:
        assert any(r.name.startswith("pynetdicom") for r in caplog.records)  # it did log

    # The metrics of what just happened (docs/operations.md, "Watching it").
    def value(line_start: str) -> float:
        [line] = [m for m in metrics.splitlines() if m.startswith(line_start)]
        return float(line.rsplit(" ", 1)[1])

    dx = knee_study[0].SOPClassUID
    assert value(f'orthonode_instances_total{{sop_class="{dx}",status="0x0000"}}') == 3
    assert value('orthonode_stage_seconds_count{stage="receive"}') == 3
    assert value('orthonode_end_to_end_seconds_count{task="knee"}') >= 3
    assert value('orthonode_model_info{sha256="') == 1.0
    assert value('orthonode_associations_total{reason="called AE title not recognised"') == 1

    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "stop"
    start = events[0]
    assert start["bundles"]["knee"]["sha256"] and len(start["config_sha256"]) == 64
    accepted = [e for e in events if e["event"] == "association" and e["result"] == "accepted"]
    assert len(accepted) >= 2
    assert {(e["calling_ae"], e["address"]) for e in accepted} >= {("MODALITY", "127.0.0.1")}
    [refusal] = [e for e in events if e["event"] == "association" and e["result"] == "rejected"]
    assert refusal["called_ae"] == "SOMEONE" and "called AE" in refusal["reason"]
    stored = [e for e in events if e["event"] == "instance-stored"]
    assert {e["sop_instance_uid"] for e in stored} == {ds.SOPInstanceUID for ds in knee_study}
    assert [e["duplicate"] for e in stored] == [False, False, True]
    sent = [e for e in events if e["event"] == "output-sent"]
    assert {e["destination"] for e in sent} == {"pacs"}
    assert all(e["study_instance_uid"] == study for e in sent)
    assert {e.get("time", "")[-1:] for e in events} == {"Z"}


def test_a_configuration_change_is_audited(
    tmp_path: Path, pacs: RecordingPacs, start_node: Callable[..., Service]
) -> None:
    tasks = knee_only()
    config = _node_config(tmp_path, pacs, tasks)
    config["routing"] = {"image_check": "off"}
    start_node(config).stop()
    start_node(config).stop()  # the same configuration: no change
    config["node"]["max_associations"] = 7
    start_node(config).stop()
    events = audit_lines(tmp_path / "spool" / "audit.jsonl")  # the default place
    kinds = [e["event"] for e in events]
    assert kinds == ["start", "stop", "start", "stop", "config-changed", "start", "stop"]
    change = events[4]
    assert change["previous"] == events[0]["config_sha256"] != change["current"]
