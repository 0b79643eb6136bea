"""End to end: storescu → orthonode (subprocess) → a real Orthanc, outputs validated.

Orthanc runs with temporary storage on free ports, the node registered as a modality; the node
runs as ``python -m dicom_node serve`` with bundles built here (random weights, so the test can
run the same bundle itself and compare). Waits are polls with deadlines, never fixed sleeps.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest

from dicom_node.domain import InstanceRef, RoutedView, StudyJob
from dicom_node.infer import Predictor
from dicom_node.models.bundle import load_bundle
from tests.conftest import make_set, require_tool, system_tool
from tests.factories import PIXELMED_SR_VALIDATOR, error_lines, free_port, wait_for
from tests.stack import Node, Orthanc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, Orthanc, Path]]:
    for tool in ("storescu", "echoscu", "dciodvfy", "dcentvfy", "dsrdump", "java", "Orthanc"):
        require_tool(tool)
    root = tmp_path_factory.mktemp("e2e")
    node_port = free_port()
    orthanc = Orthanc(root, node_port)
    config = {
        "node": {"ae_title": "ORTHONODE", "port": node_port, "http_port": free_port()},
        "destinations": [
            {
                "name": "orthanc",
                "ae_title": "ORTHANC",
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
            }
        ],
        "spool": {"directory": str(root / "spool"), "min_free_mb": 10},
        "assembly": {"stable_after_s": 2},
        # The shipped demo bundles, as conf.yaml names them.
        "tasks": {t: {"bundle": str(ROOT / "weights" / t)} for t in ("knee", "hip", "spine")},
        "routing": {"image_check_bundle": str(ROOT / "weights" / "image-check")},
        "send": {"backoff_initial_s": 1, "max_attempts": 5},
    }
    try:
        node = Node(root, config)
    except BaseException:
        orthanc.stop()
        raise
    yield node, orthanc, root
    code = node.stop()
    orthanc.stop()
    assert code == 0, (root / "node.log").read_text()[-3000:]


def _send(node: Node, paths: list[Path]) -> None:
    result = subprocess.run(
        [
            require_tool("storescu"),
            "-aet",
            "MODALITY",
            "-aec",
            "ORTHONODE",
            "127.0.0.1",
            str(node.port),
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("task", "views"), [("knee", 2), ("hip", 1), ("spine", 2)])
def test_study_round_trip(
    stack: tuple[Node, Orthanc, Path], task: str, views: int, tmp_path: Path
) -> None:
    node, orthanc, _ = stack
    # Detector-sized images (1024 px), as the demo bundles were trained on.
    folder = make_set(tmp_path, task, task=task, patients=1, seed=40 + views, rows=1024, cols=1024)
    with (folder / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    sources = [folder / r["path"] for r in rows]
    study_uid = rows[0]["study_instance_uid"]
    _send(node, sources)

    instances = wait_for(
        lambda: (found := orthanc.study_instances(study_uid)) and len(found) >= views + 1 and found,
        240,
        f"{task}: SR + {views} SC in Orthanc",
    )
    out = tmp_path / "out"
    out.mkdir()
    files = []
    for i, instance in enumerate(instances):
        path = out / f"{i}.dcm"
        path.write_bytes(orthanc.get_bytes(f"/instances/{instance['ID']}/file"))
        files.append(path)
    datasets = [pydicom.dcmread(p) for p in files]
    modalities = sorted(ds.Modality for ds in datasets)
    assert modalities == ["OT"] * views + ["SR"]
    sr_path = next(p for p, ds in zip(files, datasets, strict=True) if ds.Modality == "SR")
    sc_paths = [p for p, ds in zip(files, datasets, strict=True) if ds.Modality == "OT"]

    # Every check of shared/OUTPUTS.md.
    for path in files:
        assert error_lines(["dciodvfy", str(path)]) == [], path
    assert error_lines(["dcentvfy", *map(str, sources), str(sr_path), *map(str, sc_paths)]) == []
    assert subprocess.run(["dsrdump", "-q", str(sr_path)], capture_output=True).returncode == 0
    assert error_lines([*PIXELMED_SR_VALIDATOR, str(sr_path)]) == []

    # The SR's result equals the bundle run directly on the same images.
    bundle = load_bundle(ROOT / "weights" / task)
    job = StudyJob(
        study_uid,
        task,
        tuple(
            RoutedView(
                InstanceRef(
                    r["sop_instance_uid"],
                    "",
                    study_uid,
                    r["series_instance_uid"],
                    folder / r["path"],
                ),
                task,
                r["view"],
                r["laterality"],
            )
            for r in rows
        ),
    )
    [(expected, _)] = Predictor({task: bundle}).predict([job])
    report = hd.sr.srread(sr_path)  # highdicom reads it back as a TID 1500 document
    assert isinstance(report, hd.sr.Comprehensive3DSR)
    expected_class = expected.classes[expected.predicted_index]
    sr = pydicom.dcmread(sr_path)
    assert expected_class.code_value in _coded_values(sr)
    # ... and the demo bundle names the phantom's true class.
    assert expected_class.name == rows[0]["label"], (expected_class.name, rows[0]["label"])
    certainty = _certainties(sr)
    assert any(abs(c - 100 * expected.certainty) < 0.05 for c in certainty), (certainty, expected)

    # DICOMweb serves the study back.
    series = json.loads(
        orthanc.get_bytes(f"/dicom-web/studies/{study_uid}/series", accept="application/dicom+json")
    )
    # The SR series and one SC series per source series (each phantom view is its own series).
    assert len(series) == 1 + views
    numbers = sorted(int(s["00200011"]["Value"][0]) for s in series)
    assert numbers == list(range(9001, 9002 + views))


def _walk(items: Any) -> Iterator[Any]:
    for item in items or []:
        yield item
        yield from _walk(item.get("ContentSequence"))


def _certainties(sr: pydicom.Dataset) -> list[float]:
    values = []
    for item in _walk(sr.ContentSequence):
        if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == "111012":
            values.append(float(item.MeasuredValueSequence[0].NumericValue))
    return values


def _coded_values(sr: pydicom.Dataset) -> set[str]:
    return {
        item.ConceptCodeSequence[0].CodeValue
        for item in _walk(sr.ContentSequence)
        if item.ValueType == "CODE"
    }


def test_unmatched_study_yields_nothing(stack: tuple[Node, Orthanc, Path], tmp_path: Path) -> None:
    node, orthanc, _ = stack
    folder = make_set(tmp_path, "chest", task="hip", patients=1, seed=77)
    path = next((folder / "dicom").rglob("*.dcm"))
    ds = pydicom.dcmread(path)
    ds.BodyPartExamined = "CHEST"
    ds.AnatomicRegionSequence[0].CodeValue = "51185008"
    ds.AnatomicRegionSequence[0].CodeMeaning = "Chest"
    ds.save_as(path)
    before = node.metric("orthonode_instances_unrouted_total")
    received = node.metric("orthonode_instances_received_total")
    _send(node, [path])
    wait_for(
        lambda: node.metric("orthonode_instances_unrouted_total") >= before + 1,
        60,
        "the node to count the unrouted instance",
    )
    # Acknowledged and kept (counted as received), routed nowhere, nothing sent back.
    assert node.metric("orthonode_instances_received_total") == received + 1
    assert node.metric("orthonode_instances_unrouted_total") == before + 1
    assert orthanc.study_instances(ds.StudyInstanceUID) == []
    assert node.echo()


def test_tools_present_under_ci() -> None:
    if os.environ.get("CI", "").lower() == "true":
        for tool in ("storescu", "dciodvfy", "dcentvfy", "dsrdump", "Orthanc", "java"):
            assert system_tool(tool), tool
