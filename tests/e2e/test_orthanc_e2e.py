"""End to end: storescu → orthonode (subprocess) → a real Orthanc, outputs validated.

Orthanc runs with temporary storage on free ports, the node registered as a modality; the node
runs as ``python -m dicom_node serve`` with bundles built here (random weights, so the test can
run the same bundle itself and compare). Waits are polls with deadlines, never fixed sleeps.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
import yaml

from dicom_node.domain import InstanceRef, RoutedView, StudyJob
from dicom_node.infer import Predictor
from dicom_node.models.bundle import load_bundle
from tests.conftest import make_set, require_tool, system_tool
from tests.factories import PIXELMED_SR_VALIDATOR, error_lines, free_port, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


class Orthanc:
    def __init__(self, root: Path, node_port: int) -> None:
        self.http_port, self.dicom_port = free_port(), free_port()
        config: dict[str, Any] = {
            "Name": "orthonode-e2e",
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {"orthonode": ["ORTHONODE", "127.0.0.1", node_port]},
            "DicomCheckCalledAet": False,
            "StableAge": 1,
            "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        (root / "orthanc.json").write_text(json.dumps(config))
        self.log = (root / "orthanc.log").open("w")
        self.process = subprocess.Popen(
            [require_tool("Orthanc"), str(root / "orthanc.json")],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._alive, 60, "Orthanc to answer /system")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def _alive(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError("Orthanc exited; see orthanc.log")
        try:
            return bool(self.get("/system"))
        except (urllib.error.URLError, ConnectionError):
            return False

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url(path), timeout=10) as response:
            return json.loads(response.read())

    def get_bytes(self, path: str, accept: str | None = None) -> bytes:
        request = urllib.request.Request(self.url(path))
        if accept:
            request.add_header("Accept", accept)
        with urllib.request.urlopen(request, timeout=30) as response:
            return bytes(response.read())

    def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        body = json.dumps({"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}).encode()
        request = urllib.request.Request(self.url("/tools/find"), data=body, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            studies = json.loads(response.read())
        if not studies:
            return []
        return list(self.get(f"/studies/{studies[0]}/instances"))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


class Node:
    def __init__(self, root: Path, config: dict[str, Any]) -> None:
        path = root / "conf.yaml"
        path.write_text(yaml.safe_dump(config))
        self.port = config["node"]["port"]
        self.http_port = config["node"]["http_port"]
        self.log_path = root / "node.log"
        self.log = self.log_path.open("w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "serve", "--config", str(path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )
        wait_for(self.echo, 120, "the node to answer C-ECHO")

    def echo(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError("node exited:\n" + self.log_path.read_text()[-3000:])
        result = subprocess.run(
            [
                require_tool("echoscu"),
                "-aet",
                "E2E",
                "-aec",
                "ORTHONODE",
                "127.0.0.1",
                str(self.port),
            ],
            capture_output=True,
            timeout=30,
        )
        return result.returncode == 0

    def metric(self, name: str) -> float:
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return 0.0

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=60)
        finally:
            self.log.close()
        return code


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
    assert len(series) == 2  # the SR series and the SC series


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
