"""End to end: a study stored into Orthanc only comes back from the node, via the Orthanc plugin.

A real Orthanc runs deploy/orthanc/orthonode_forward.py (Debian's orthanc-python) with the
Orthonode section and UserMetadata of deploy/orthanc/orthanc.json. The phantom studies are
uploaded to Orthanc's REST API while the node is still down, so the plugin's first send fails
and is retried; then the node starts and the SR and both Secondary Captures must arrive in the
same Orthanc study, each original sent exactly once, and a chest study never sent. Run once
with ``"Transport": "dimse"`` (C-STORE to the node's modality entry) and once with
``"dicomweb"`` (STOW-RS to the node's DicomWeb.Servers entry). Waits are polls with deadlines,
never fixed sleeps.
"""

from __future__ import annotations

import csv
import io
import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.conftest import make_set, require_tool
from tests.factories import free_port, wait_for
from tests.stack import Node, Orthanc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = Path("/usr/share/orthanc/plugins")
PYTHON_PLUGIN = PLUGINS / "libOrthancPython.so"
DICOMWEB_PLUGIN = PLUGINS / "libOrthancDicomWeb.so"
SITE_CONFIG = ROOT / "deploy" / "orthanc" / "orthanc.json"
SCRIPT = ROOT / "deploy" / "orthanc" / "orthonode_forward.py"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _require_file(path: Path, package: str) -> None:
    """Like require_tool: skip without it, but fail under CI=true (CI must have it)."""
    if path.exists():
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{path} is missing, and CI=true requires it (apt install {package})")
    pytest.skip(f"{path} missing: apt install {package} (set CI=true to make this a failure)")


def _upload(orthanc: Orthanc, path: Path) -> None:
    request = urllib.request.Request(
        orthanc.url("/instances"), data=path.read_bytes(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.loads(response.read())["Status"] == "Success"


def _changes(orthanc: Orthanc) -> list[dict[str, Any]]:
    changes: list[dict[str, Any]] = []
    since = 0
    while True:
        page = orthanc.get(f"/changes?since={since}&limit=1000")
        changes += page["Changes"]
        if page["Done"]:
            return changes
        since = page["Last"]


def _log(root: Path) -> list[str]:
    return [
        line
        for line in (root / "orthanc.log").read_text(errors="replace").splitlines()
        if "orthonode_forward: " in line
    ]


def _referenced_uids(ds: pydicom.Dataset) -> set[str]:
    uids = set()
    for element in ds.iterall():
        if element.keyword == "ReferencedSOPInstanceUID":
            uids.add(str(element.value))
    return uids


@pytest.fixture(params=["dimse", "dicomweb"])
def orthanc_only(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Orthanc, int, int, Path]]:
    for tool in ("Orthanc", "echoscu"):
        require_tool(tool)
    _require_file(PYTHON_PLUGIN, "orthanc-python")
    _require_file(DICOMWEB_PLUGIN, "orthanc-dicomweb")
    site = json.loads(SITE_CONFIG.read_text())
    node_port, node_http = free_port(), free_port()
    extra = {
        "Plugins": [str(DICOMWEB_PLUGIN), str(PYTHON_PLUGIN)],
        "PythonScript": str(SCRIPT),
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "Servers": {"orthonode": [f"http://127.0.0.1:{node_http}/dicomweb/"]},
        },
        "UserMetadata": site["UserMetadata"],
        # The shipped section, with retries quick enough for a test.
        "Orthonode": {
            **site["Orthonode"],
            "RetryIntervalSeconds": 1,
            "RetryMaxIntervalSeconds": 2,
            "SweepIntervalSeconds": 1,
            "Verbose": True,
            "Transport": request.param,
        },
        "StableAge": 1,
    }
    root = tmp_path / "orthanc"
    root.mkdir()
    orthanc = Orthanc(root, node_port, extra=extra)
    try:
        wait_for(lambda: any("forwarding stable studies" in x for x in _log(root)), 30, "plugin")
        yield orthanc, node_port, node_http, root
    finally:
        orthanc.stop()
        print("\n".join(_log(root)[-40:]))


def test_stable_study_goes_to_the_node_and_results_come_back(
    orthanc_only: tuple[Orthanc, int, int, Path], tmp_path: Path
) -> None:
    orthanc, node_port, node_http, root = orthanc_only
    # A two-view knee study at detector size (the demo bundles' input), and a chest study.
    knee = make_set(tmp_path, "knee", task="knee", patients=1, seed=61, rows=1024, cols=1024)
    with (knee / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    study_uid = rows[0]["study_instance_uid"]
    sources = {r["sop_instance_uid"] for r in rows}
    chest_folder = make_set(tmp_path, "chest", task="hip", patients=1, seed=78)
    chest = next((chest_folder / "dicom").rglob("*.dcm"))
    ds = pydicom.dcmread(chest)
    ds.BodyPartExamined = "CHEST"
    ds.AnatomicRegionSequence[0].CodeValue = "51185008"
    ds.AnatomicRegionSequence[0].CodeMeaning = "Chest"
    ds.save_as(chest)
    chest_uid = str(ds.StudyInstanceUID)

    # Into Orthanc only, while the node is down: the first send fails and is retried.
    for row in rows:
        _upload(orthanc, knee / row["path"])
    _upload(orthanc, chest)
    wait_for(  # C-STORE to a closed port, or STOW-RS to a closed HTTP port
        lambda: any(study_uid in x and "failed" in x and "will retry" in x for x in _log(root)),
        30,
        "the plugin to log the failed send",
    )
    wait_for(
        lambda: any(chest_uid in x and "nothing to forward" in x for x in _log(root)),
        30,
        "the plugin to look at the chest study",
    )

    node_root = tmp_path / "node"
    node_root.mkdir()
    config = {
        "node": {"ae_title": "ORTHONODE", "port": node_port, "http_port": node_http},
        "destinations": [
            {
                "name": "orthanc",
                "ae_title": "ORTHANC",
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
            }
        ],
        "spool": {"directory": str(node_root / "spool"), "min_free_mb": 10},
        "assembly": {"stable_after_s": 2},
        "tasks": {t: {"bundle": str(ROOT / "weights" / t)} for t in ("knee", "hip", "spine")},
        "routing": {"image_check_bundle": str(ROOT / "weights" / "image-check")},
        "send": {"backoff_initial_s": 1, "max_attempts": 5},
    }
    node = Node(node_root, config)
    try:
        instances = wait_for(
            lambda: len(found := orthanc.study_instances(study_uid)) >= 5 and found,
            180,
            "2 originals + SR + 2 SC in the Orthanc study",
        )
        datasets = [
            pydicom.dcmread(io.BytesIO(orthanc.get_bytes(f"/instances/{i['ID']}/file")))
            for i in instances
        ]
        assert sorted(d.Modality for d in datasets) == ["DX", "DX", "OT", "OT", "SR"]
        scs = [d for d in datasets if d.Modality == "OT"]
        assert all(d.SOPClassUID == SECONDARY_CAPTURE for d in scs)
        [sr] = [d for d in datasets if d.Modality == "SR"]
        assert sources <= _referenced_uids(sr)
        assert {str(d.StudyInstanceUID) for d in datasets} == {study_uid}
        assert any(study_uid in x and "forwarded 2 instance(s)" in x for x in _log(root))

        # The outputs make the study stable again; the plugin looks and sends nothing more.
        study_id = orthanc.get(f"/series/{instances[0]['ParentSeries']}")["ParentStudy"]
        outputs = {
            i["ID"] for i in instances if i["MainDicomTags"]["SOPInstanceUID"] not in sources
        }
        last_output = max(
            c["Seq"]
            for c in _changes(orthanc)
            if c["ChangeType"] == "NewInstance" and c["ID"] in outputs
        )
        wait_for(
            lambda: any(
                c["ChangeType"] == "StableStudy" and c["ID"] == study_id and c["Seq"] > last_output
                for c in _changes(orthanc)
            ),
            30,
            "a StableStudy after the outputs arrived",
        )
        wait_for(  # the plugin saw the whole study: both originals sent, the 3 outputs
            lambda: any(
                study_uid in x and "nothing to forward (2 forwarded, 3 output)" in x
                for x in _log(root)
            ),
            30,
            "the plugin to look at the study again",
        )
        assert node.metric("orthonode_instances_received_total") == 2
        assert sum(f"study {study_uid}: forwarded " in x for x in _log(root)) == 1
        # The chest study was never sent: it is in Orthanc, unmarked, and the node got 2 only.
        [chest_instance] = orthanc.study_instances(chest_uid)
        metadata = orthanc.get(f"/instances/{chest_instance['ID']}/metadata")
        assert "OrthonodeForwarded" not in metadata
        for instance in instances:
            metadata = orthanc.get(f"/instances/{instance['ID']}/metadata")
            assert ("OrthonodeForwarded" in metadata) == (
                instance["MainDicomTags"]["SOPInstanceUID"] in sources
            )
        # Nothing is left to retry.
        assert not [x for x in _log(root) if "giving up" in x or "unexpected" in x]
    finally:
        code = node.stop()
    assert code == 0, (node_root / "node.log").read_text()[-3000:]
