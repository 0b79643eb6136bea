"""DICOMweb end to end, and the status page in a real headless Chromium.

A real Orthanc (DICOMweb plugin on) and the node as ``python -m dicom_node serve`` with the
shipped demo bundles. A two-view phantom knee study goes in over STOW-RS (dicomweb-client,
with a bearer token); the node's only way to Orthanc is a ``type: dicomweb`` destination, so
the SR and the two SCs reach Orthanc over STOW-RS. A second destination, a C-STORE archive
that is not listening yet, turns the same outputs into dead letters.

Then Chromium (Debian chromium + chromium-driver, driven by selenium) loads the status page:
the study, its result, its overlay thumbnails and its SR text are checked, a screenshot is
kept (``test-artifacts/status-page.png``, or under ``$ORTHONODE_TEST_ARTIFACTS``), and a dead
letter is requeued with the page's button once the archive listens.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from dicom_node.domain import InstanceRef, RoutedView, StudyJob
from dicom_node.infer import Predictor
from dicom_node.models.bundle import load_bundle
from tests.conftest import make_set, require_tool
from tests.factories import RecordingPacs, free_port, referenced_instances, wait_for
from tests.stack import ROOT, Node, Orthanc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "e2e-token-5f1c"


class Stack:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.archive_port = free_port()  # nothing listens there until the test says so
        node_port = free_port()
        self.orthanc = Orthanc(root, node_port)
        (root / "tokens").write_text(f"e2e-client {TOKEN}\n")
        config = {
            "node": {"ae_title": "ORTHONODE", "port": node_port, "http_port": free_port()},
            "http": {"tokens_file": str(root / "tokens")},
            "destinations": [
                {"name": "orthanc-web", "type": "dicomweb", "url": self.orthanc.url("/dicom-web")},
                {
                    "name": "archive",
                    "ae_title": "ARCHIVE",
                    "host": "127.0.0.1",
                    "port": self.archive_port,
                },
            ],
            "spool": {"directory": str(root / "spool"), "min_free_mb": 10},
            "assembly": {"stable_after_s": 2},
            "tasks": {t: {"bundle": str(ROOT / "weights" / t)} for t in ("knee", "hip", "spine")},
            "routing": {"image_check_bundle": str(ROOT / "weights" / "image-check")},
            "send": {"backoff_initial_s": 0.5, "max_attempts": 2},
        }
        try:
            self.node = Node(root, config)
        except BaseException:
            self.orthanc.stop()
            raise
        self.base = f"http://127.0.0.1:{self.node.http_port}"

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.base + "/api/status", timeout=30) as answer:
            return dict(json.loads(answer.read()))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    for tool in ("Orthanc", "echoscu"):
        require_tool(tool)
    stack = Stack(tmp_path_factory.mktemp("dicomweb"))
    yield stack
    code = stack.node.stop()
    stack.orthanc.stop()
    assert code == 0, (stack.root / "node.log").read_text()[-3000:]


@pytest.fixture(scope="module")
def knee(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The knee study sent over STOW-RS, and what the demo bundle itself says of it."""
    folder = make_set(
        tmp_path_factory.mktemp("knee"), "knee", task="knee", patients=1, seed=43, rows=1024,
        cols=1024,
    )  # fmt: skip
    with (folder / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    study = rows[0]["study_instance_uid"]
    client = DICOMwebClient(stack.base + "/dicomweb", headers={"Authorization": f"Bearer {TOKEN}"})
    answer = client.store_instances([pydicom.dcmread(folder / r["path"]) for r in rows])
    job = StudyJob(
        study,
        "knee",
        tuple(
            RoutedView(
                InstanceRef(
                    r["sop_instance_uid"], "", study, r["series_instance_uid"], folder / r["path"]
                ),
                "knee",
                r["view"],
                r["laterality"],
            )
            for r in rows
        ),
    )  # fmt: skip
    [(expected, _)] = Predictor({"knee": load_bundle(ROOT / "weights" / "knee")}).predict([job])
    return {"rows": rows, "study": study, "answer": answer, "expected": expected, "folder": folder}


def test_stow_in_and_stow_out_to_orthanc(stack: Stack, knee: dict[str, Any]) -> None:
    stored = {i.ReferencedSOPInstanceUID for i in knee["answer"].ReferencedSOPSequence}
    assert stored == {r["sop_instance_uid"] for r in knee["rows"]}
    instances = wait_for(
        lambda: (found := stack.orthanc.study_instances(knee["study"])) and len(found) >= 3
        and found,
        240,
        "SR + 2 SC in Orthanc over STOW-RS",
    )  # fmt: skip
    datasets = []
    for instance in instances:
        data = stack.orthanc.get_bytes(f"/instances/{instance['ID']}/file")
        datasets.append(pydicom.dcmread(pydicom.filebase.DicomBytesIO(data)))
        # Orthanc says how each arrived: through a plugin (DICOMweb), not DicomProtocol.
        origin = stack.orthanc.get_bytes(f"/instances/{instance['ID']}/metadata/Origin")
        assert origin == b"Plugins", origin
    assert sorted(ds.Modality for ds in datasets) == ["OT", "OT", "SR"]
    [sr] = [ds for ds in datasets if ds.Modality == "SR"]
    assert referenced_instances(sr) >= {r["sop_instance_uid"] for r in knee["rows"]}
    expected = knee["expected"].classes[knee["expected"].predicted_index]
    assert expected.name == knee["rows"][0]["label"]  # the demo bundle names the true class
    assert expected.code_value in json.dumps(sr.to_json_dict())


def _browser(tmp: str) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService

    options = webdriver.ChromeOptions()
    options.binary_location = require_tool("chromium")
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--disable-quic", f"--user-data-dir={tmp}", "--window-size=1400,2000",
    ):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=ChromeService(require_tool("chromedriver")), options=options)


def _artifacts() -> Path:
    folder = Path(os.environ.get("ORTHONODE_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_status_page_in_chromium(stack: Stack, knee: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By

    study = knee["study"]
    # The archive is not listening: after max_attempts (2) the 3 outputs are dead letters.
    wait_for(
        lambda: (
            len([d for d in stack.status()["dead_letters"] if d["study_instance_uid"] == study])
            == 3
        ),
        120,
        "3 dead letters for the archive",
    )
    expected = knee["expected"].classes[knee["expected"].predicted_index].name
    with tempfile.TemporaryDirectory() as profile:
        browser = _browser(profile)
        try:
            browser.get(stack.base + "/")
            assert "ready" in browser.find_element(By.TAG_NAME, "h1").text
            assert "not for clinical use" in browser.page_source
            [row] = [
                r
                for r in browser.find_elements(By.CSS_SELECTOR, "tr")
                if study in r.text and r.find_elements(By.CSS_SELECTOR, "code.study")
            ]
            assert expected in row.find_element(By.CSS_SELECTOR, ".result").text
            assert "orthanc-web: 3 sent" in row.text and "archive: 3 dead" in row.text
            thumbs = row.find_elements(By.CSS_SELECTOR, "img.thumb")
            assert len(thumbs) == 2
            wait_for(
                lambda: all(browser.execute_script("return arguments[0].complete && "
                    "arguments[0].naturalWidth", t) for t in thumbs),
                30,
                "the thumbnails to load",
            )  # fmt: skip
            # The artefact: the study, its result and its overlay thumbnails on one screen.
            browser.save_screenshot(str(_artifacts() / "status-page.png"))
            row.find_element(By.TAG_NAME, "summary").click()
            report = row.find_element(By.CSS_SELECTOR, "pre.sr")
            wait_for(lambda: "Imaging Measurement Report" in report.text, 30, "the SR text")
            assert expected in report.text

            # Requeue without a token: refused, and the page says so.
            buttons = browser.find_elements(By.CSS_SELECTOR, "button.requeue")
            assert len(buttons) == 3
            buttons[0].click()
            note = browser.find_element(By.ID, "requeue-result")
            wait_for(lambda: "refused (401)" in note.text, 30, "the refusal on the page")
            assert len(stack.status()["dead_letters"]) == 3

            # With the token, once the archive listens: requeued, and sent.
            archive = RecordingPacs("ARCHIVE", port=stack.archive_port)
            try:
                field = browser.find_element(By.ID, "token")
                field.send_keys(TOKEN)
                browser.execute_script("saveToken()")
                browser.find_elements(By.CSS_SELECTOR, "button.requeue")[0].click()
                wait_for(lambda: len(stack.status()["dead_letters"]) == 2, 60, "one requeued")
                wait_for(lambda: len(archive.of_study(study)) == 1, 60, "the archive to get it")
                wait_for(
                    lambda: len(browser.find_elements(By.CSS_SELECTOR, "button.requeue")) == 2,
                    30,
                    "the page to show two dead letters",
                )
                browser.save_screenshot(str(_artifacts() / "status-page-after-requeue.png"))
            finally:
                archive.stop()
        finally:
            browser.quit()
    # What the page shows of a study, it shows without patient identifiers.
    with urllib.request.urlopen(stack.base + "/", timeout=30) as answer:
        page = answer.read().decode()
    source = pydicom.dcmread(knee["folder"] / knee["rows"][0]["path"], stop_before_pixels=True)
    for identifier in (str(source.PatientName), str(source.PatientID)):
        assert identifier and identifier not in page
