"""The running node does not answer on images it has no business reading, over real associations.

The shipped bundles and the shipped image check; phantoms without the task's implant, with
another task's tags, and without tags. Outputs go by C-STORE to a recording Storage SCP and are
validated like every SR (dciodvfy, dsrdump, pixelmed, highdicom).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from prometheus_client import generate_latest

from dicom_node.config import Config
from dicom_node.service import Service
from dicom_node.status import StatusPage
from dicom_node.tasks import builtin_task
from tests.conftest import make_set, require_tool
from tests.factories import (
    PIXELMED_SR_VALIDATOR,
    RecordingPacs,
    error_lines,
    manifest_rows,
    referenced_instances,
    wait_for,
)
from tests.net.test_node_service import _codes, _node_config, _send

ROOT = Path(__file__).resolve().parents[2]
NOT_APPLICABLE = ("385432009", "SCT")
TASKS = {t: {"bundle": str(ROOT / "weights" / t)} for t in ("knee", "hip", "spine")}


def _config(tmp_path: Path, pacs: RecordingPacs, **extra: Any) -> Config:
    return Config.model_validate({**_node_config(tmp_path, pacs, TASKS), **extra})


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("na")
    size = {"rows": 512, "cols": 512}
    return {
        "native-knee": make_set(
            root, "nk", task="knee", patients=1, seed=31, implant="none", **size
        ),
        "plate-knee": make_set(
            root, "pk", task="knee", patients=1, seed=32, implant="other", **size
        ),
        "knee-as-hip": make_set(
            root, "kh", task="knee", patients=1, seed=33, tags_as="hip", **size
        ),
        "hip-untagged": make_set(root, "hu", task="hip", patients=1, seed=34, no_tags=True, **size),
    }


@pytest.fixture
def pacs() -> Iterator[RecordingPacs]:
    recorder = RecordingPacs()
    yield recorder
    recorder.stop()


def _study(folder: Path) -> tuple[str, list[pydicom.Dataset]]:
    rows = manifest_rows(folder)
    return rows[0]["study_instance_uid"], [pydicom.dcmread(folder / r["path"]) for r in rows]


def _validate(report: pydicom.Dataset, path: Path) -> None:
    report.save_as(path, enforce_file_format=True)
    assert error_lines(["dciodvfy", str(path)]) == []
    assert subprocess.run(["dsrdump", "-q", str(path)], capture_output=True).returncode == 0
    assert error_lines([*PIXELMED_SR_VALIDATOR, str(path)]) == []
    assert hd.sr.srread(path).SOPInstanceUID == report.SOPInstanceUID


def _class_codes(task: str) -> set[tuple[str, str]]:
    return {(c.code_value, c.coding_scheme) for c in builtin_task(task).classes}


@pytest.mark.integration
@pytest.mark.slow
def test_confirm_reports_not_applicable_and_why(
    tmp_path: Path, pacs: RecordingPacs, sets: dict[str, Path]
) -> None:
    for tool in ("dciodvfy", "dsrdump", "java"):
        require_tool(tool)
    service = Service(_config(tmp_path, pacs), safety_net_s=5.0)
    service.start()
    try:
        cases = {
            "native-knee": ("knee", {"NA-NO-IMPLANT"}),
            "plate-knee": ("knee", {"NA-NO-IMPLANT", "NA-OOD"}),
            "knee-as-hip": ("hip", {"NA-ANATOMY"}),
        }
        sent = {}
        for name in cases:
            study, datasets = _study(sets[name])
            assert _send(service.scp.port, datasets) == [0] * len(datasets)
            sent[name] = (study, {ds.SOPInstanceUID for ds in datasets})
        for name, (task, allowed) in cases.items():
            study, instances = sent[name]
            wait_for(lambda s=study: pacs.of_study(s, "SR"), 90, f"{name}: an SR")
            [report] = pacs.of_study(study, "SR")
            codes = _codes(report)
            assert NOT_APPLICABLE in codes, name
            assert not codes & _class_codes(task), f"{name}: a class was named"
            assert not codes & {("52101004", "SCT"), ("272519000", "SCT")}, name
            reasons = {v for v, s in codes if s == "99ORTHONODE" and v.startswith("NA-")}
            reasons -= {"NA-REASON"}
            assert reasons and reasons <= allowed, f"{name}: {reasons}"
            assert "NOT APPLICABLE" in report.SeriesDescription
            assert referenced_instances(report) >= instances
            assert pacs.of_study(study, "OT") == []  # no saliency for an image not analysed
            _validate(report, tmp_path / f"{name}.dcm")
        # The status page says why, with no thumbnail (no image was analysed).
        shown = {
            (st["study_instance_uid"], st["task"]): st
            for st in StatusPage(service).snapshot()["studies"]
        }
        for name, (task, _) in cases.items():
            study, _ = sent[name]
            entry = shown[(study, task)]
            assert "not applicable" in entry["result"], (name, entry["result"])
            assert entry["thumbnails"] == [] and entry["report"], name
        metrics = generate_latest(service.metrics.registry).decode()
        assert 'orthonode_not_applicable_total{reason="no-implant",task="knee"}' in metrics
        assert 'orthonode_not_applicable_total{reason="anatomy",task="hip"}' in metrics
        accepted = service.metrics.associations.labels(result="accepted", reason="")
        assert accepted._value.get() >= len(cases)
    finally:
        service.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_fallback_routes_by_the_image_and_skip_sends_nothing(
    tmp_path: Path, pacs: RecordingPacs, sets: dict[str, Path]
) -> None:
    config = _config(
        tmp_path,
        pacs,
        routing={"image_check": "fallback"},
        outputs={"when_not_applicable": "skip"},
    )
    service = Service(config, safety_net_s=5.0)
    service.start()
    try:
        untagged, untagged_data = _study(sets["hip-untagged"])
        assert "BodyPartExamined" not in untagged_data[0]
        assert "ViewPosition" not in untagged_data[0]
        mislabelled, mislabelled_data = _study(sets["knee-as-hip"])
        native, native_data = _study(sets["native-knee"])
        for datasets in (untagged_data, mislabelled_data, native_data):
            assert _send(service.scp.port, datasets) == [0] * len(datasets)
        wait_for(lambda: pacs.of_study(untagged, "SR"), 90, "the untagged hip's SR")
        wait_for(lambda: pacs.of_study(mislabelled, "SR"), 90, "the mislabelled knee's SR")
        [hip] = pacs.of_study(untagged, "SR")
        assert "hip" in hip.SeriesDescription and NOT_APPLICABLE not in _codes(hip)
        assert _codes(hip) & _class_codes("hip")  # answered: loose or well-fixed
        [knee] = pacs.of_study(mislabelled, "SR")  # tags said hip; the image, knee
        assert "knee" in knee.SeriesDescription and _codes(knee) & _class_codes("knee")
        # The native knee: done, and nothing sent.
        wait_for(
            lambda: (s := service.spool.study(native, "knee")) is not None and s.state == "done",
            90,
            "the native knee done",
        )
        assert pacs.of_study(native, "SR") == [] and pacs.of_study(native, "OT") == []
    finally:
        service.stop()
