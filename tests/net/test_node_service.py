"""The whole node in-process over real associations: a late instance is never swallowed, and a
fourth task is served from configuration alone.

The node (:class:`dicom_node.service.Service`) listens on 127.0.0.1; images go in with
pynetdicom C-STOREs; results come out by C-STORE into a recording Storage SCP standing in for
the PACS. Waits are polls with deadlines.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, StoragePresentationContexts

from dicom_node.config import Config
from dicom_node.service import Service
from tests.conftest import make_set, require_tool
from tests.factories import (
    KNEE_OA_SPEC,
    PIXELMED_SR_VALIDATOR,
    RecordingPacs,
    error_lines,
    free_port,
    manifest_rows,
    referenced_instances,
    tiny_bundle,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]


def knee_only(bundle: Path = ROOT / "weights" / "knee") -> dict[str, Any]:
    """The ``tasks:`` of a node that serves the knee alone (hip and spine disabled)."""
    return {
        "knee": {"bundle": str(bundle)},
        "hip": {"bundle": "x", "enabled": False},
        "spine": {"bundle": "x", "enabled": False},
    }


@pytest.fixture
def pacs() -> Iterator[RecordingPacs]:
    recorder = RecordingPacs()
    yield recorder
    recorder.stop()


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    started: list[Service] = []

    def start(config: dict[str, Any]) -> Service:
        service = Service(Config.model_validate(config), safety_net_s=5.0)
        service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


def _node_config(tmp_path: Path, pacs: RecordingPacs, tasks: dict[str, Any]) -> dict[str, Any]:
    return {
        "node": {"host": "127.0.0.1", "port": free_port(), "http_port": 0},
        "destinations": [
            {"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}
        ],
        "spool": {"directory": str(tmp_path / "spool"), "min_free_mb": 1},
        "assembly": {"stable_after_s": 30},
        "tasks": tasks,
        "inference": {"device": "cpu"},
        "send": {"backoff_initial_s": 0.2, "max_attempts": 3},
    }


def _send(port: int, datasets: list[pydicom.Dataset]) -> list[int]:
    """C-STORE ``datasets`` over one association; returns the statuses."""
    ae = AE(ae_title="MODALITY")
    ae.requested_contexts = StoragePresentationContexts
    assoc = ae.associate("127.0.0.1", port, ae_title="ORTHONODE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


# Delays between the study's AP + LAT and one more LAT of the same study: before the study is
# claimed, while it is processed, and after its results were made.
LATE_DELAYS_S = (0.0, 0.05, 0.15, 0.3, 0.6, 0.9)


@pytest.mark.slow
def test_a_late_instance_is_always_analysed(
    tmp_path: Path, pacs: RecordingPacs, start_node: Callable[..., Service]
) -> None:
    """Every acknowledged instance is referenced by the newest SR of its study."""
    folder = make_set(tmp_path, "knee", task="knee", patients=len(LATE_DELAYS_S), seed=21)
    tasks = knee_only()
    service = start_node(_node_config(tmp_path, pacs, tasks))
    studies: dict[str, set[str]] = {}
    rows = manifest_rows(folder)
    for delay, study in zip(
        LATE_DELAYS_S, sorted({r["study_instance_uid"] for r in rows}), strict=True
    ):
        mine = [r for r in rows if r["study_instance_uid"] == study]
        views = [pydicom.dcmread(folder / r["path"]) for r in mine]
        late = pydicom.dcmread(next(folder / r["path"] for r in mine if r["view"] == "LAT"))
        late.SOPInstanceUID = generate_uid()
        late.file_meta.MediaStorageSOPInstanceUID = late.SOPInstanceUID
        assert _send(service.scp.port, views) == [0, 0]
        time.sleep(delay)  # the scenario's delay, not a wait for a condition
        assert _send(service.scp.port, [late]) == [0]
        studies[study] = {ds.SOPInstanceUID for ds in [*views, late]}

    def newest_sr_covers(study: str) -> bool:
        reports = pacs.of_study(study, "SR")
        if not reports:
            return False
        # Versions are queued in order and a superseded one is never queued: the last SR
        # to arrive is the newest.
        return studies[study] <= referenced_instances(reports[-1])

    def quiet() -> bool:
        counts = service.spool.outbox_counts()
        states = {s.state for s in service.spool.recent_studies(100)}
        return counts.get("pending", 0) == 0 and states <= {"done"}

    wait_for(lambda: quiet() and all(newest_sr_covers(s) for s in studies), 120, "every SR")
    versions = []
    for study, sent in studies.items():
        covered = set().union(*(referenced_instances(r) for r in pacs.of_study(study, "SR")))
        assert sent <= covered, f"study {study}: {sent - covered} never referenced"
        state = service.spool.study(study, "knee")
        assert state is not None and state.state == "done"
        # Each sent version's SR is a new object; a superseded version sends none.
        assert 1 <= len({r.SOPInstanceUID for r in pacs.of_study(study, "SR")}) <= state.version
        versions.append(state.version)
    assert max(versions) >= 2, versions  # the later delays reach a claimed study


@pytest.mark.integration
@pytest.mark.slow
def test_a_fourth_task_from_configuration_alone(
    tmp_path: Path, pacs: RecordingPacs, start_node: Callable[..., Service]
) -> None:
    """knee-oa (Kellgren-Lawrence 0-4, AP only): a bundle and a spec in conf.yaml, no code."""
    for tool in ("dciodvfy", "dsrdump", "java"):
        require_tool(tool)
    bundle = tmp_path / "knee-oa"
    tiny_bundle(
        bundle,
        "knee-oa",
        classes=KNEE_OA_SPEC["classes"],  # type: ignore[arg-type]
        backbone="orthonode_cnn",
        views=["AP"],
    )
    tasks = {
        "knee-oa": {"bundle": str(bundle), "spec": KNEE_OA_SPEC},
        "knee": {"bundle": "x", "enabled": False},
        "hip": {"bundle": "x", "enabled": False},
        "spine": {"bundle": "x", "enabled": False},
    }
    service = start_node(_node_config(tmp_path, pacs, tasks))
    folder = make_set(tmp_path, "knee", task="knee", patients=1, seed=5, views=("AP",))
    [row] = manifest_rows(folder)
    source = pydicom.dcmread(folder / row["path"])
    assert _send(service.scp.port, [source]) == [0]
    study = row["study_instance_uid"]
    wait_for(lambda: pacs.of_study(study, "SR") and pacs.of_study(study, "OT"), 60, "SR + SC")
    [report] = pacs.of_study(study, "SR")
    [capture] = pacs.of_study(study, "OT")
    assert "knee-oa" in report.SeriesDescription and "knee-oa" in capture.SeriesDescription
    assert referenced_instances(report) >= {source.SOPInstanceUID, capture.SOPInstanceUID}
    codes = _codes(report)
    assert ("KL-GRADE", "99MYSITE") in codes  # the evaluation concept from the spec
    assert ("396275006", "SCT") in codes  # the finding from the spec
    assert {(f"KL-{g}", "99MYSITE") for g in range(5)} <= codes  # every class's probability
    schemes = {item.CodingSchemeDesignator for item in report.CodingSchemeIdentificationSequence}
    assert "99MYSITE" in schemes
    path = tmp_path / "report.dcm"
    report.save_as(path, enforce_file_format=True)
    assert error_lines(["dciodvfy", str(path)]) == []
    assert subprocess.run(["dsrdump", "-q", str(path)], capture_output=True).returncode == 0
    assert error_lines([*PIXELMED_SR_VALIDATOR, str(path)]) == []


def _codes(report: pydicom.Dataset) -> set[tuple[str, str]]:
    found = set()

    def walk(items: Any) -> None:
        for item in items or []:
            for keyword in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
                for code in item.get(keyword, []):
                    found.add((code.CodeValue, code.CodingSchemeDesignator))
            walk(item.get("ContentSequence"))

    walk(report.ContentSequence)
    return found
