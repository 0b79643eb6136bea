"""DICOMweb end to end, and the status page in a real headless Chromium.

A real Orthanc (DICOMweb plugin on) and the node as ``python -m dicom_node serve`` with the
shipped demo bundles. A two-view phantom knee study goes in over STOW-RS (dicomweb-client,
with a bearer token); the node's only way to Orthanc is a ``type: dicomweb`` destination, so
the SR and the two SCs reach Orthanc over STOW-RS. A second destination, a C-STORE archive
that is not listening yet, turns the same outputs into dead letters.

Then Chromium (Debian chromium + chromium-driver, driven by selenium) loads the status page.
Beside the knee study, a native knee without an implant (answered "not applicable"), a CHEST
radiograph no routing rule matches and a CT sent over STOW-RS (refused: not a radiograph) go
in. The page must show the node degraded (amber) while the dead letters wait; its state filter
must find the not-applicable study; the problems view must list the CT and the unrouted study
with their reasons; the accession number must stay masked until the token is typed in; the
study's page must show its Secondary Captures at full size and its SR as readable sections.
Screenshots are kept (``test-artifacts/status-page.png``, ``status-problems.png``,
``status-study.png``, ``status-study-captures.png``, ``status-page-after-requeue.png``; or under
``$ORTHONODE_TEST_ARTIFACTS``), and a dead letter is requeued with the page's button once the
archive listens.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import CTImageStorage, generate_uid
from pynetdicom import AE, StoragePresentationContexts

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

    def api(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(self.base + path, timeout=30) as answer:
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


def _c_store(port: int, datasets: list[pydicom.Dataset]) -> list[int]:
    ae = AE(ae_title="MODALITY")
    ae.requested_contexts = StoragePresentationContexts
    assoc = ae.associate("127.0.0.1", port, ae_title="ORTHONODE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def others(
    stack: Stack, knee: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """What else a site sends: a native knee (not applicable), a CHEST radiograph (no rule
    matches) by C-STORE, and a CT by STOW-RS (refused: not a radiograph)."""
    folder = make_set(
        tmp_path_factory.mktemp("native"), "nk", task="knee", patients=1, seed=31,
        implant="none", rows=512, cols=512,
    )  # fmt: skip
    native = [
        pydicom.dcmread(folder / r["path"])
        for r in csv.DictReader((folder / "manifest.csv").open())
    ]
    first = pydicom.dcmread(knee["folder"] / knee["rows"][0]["path"])
    chest = copy.deepcopy(first)
    chest.StudyInstanceUID, chest.SeriesInstanceUID = generate_uid(), generate_uid()
    chest.SOPInstanceUID = chest.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    chest.BodyPartExamined = "CHEST"
    assert _c_store(stack.node.port, [*native, chest]) == [0] * (len(native) + 1)
    ct = copy.deepcopy(first)
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buffer = io.BytesIO()
    ct.save_as(buffer, enforce_file_format=True)
    answer = requests.post(
        stack.base + "/dicomweb/studies",
        data=b"--b\r\nContent-Type: application/dicom\r\n\r\n"
        + buffer.getvalue()
        + b"\r\n--b--\r\n",
        headers={
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=b',
            "Authorization": f"Bearer {TOKEN}",
        },
        timeout=30,
    )
    assert answer.status_code == 409, answer.text
    return {"native": native[0].StudyInstanceUID, "chest": chest, "ct": ct}


def _texts(browser: Any, css: str) -> list[str]:
    """The text of every element matching ``css``, read in one script (the live refresh may
    replace the rows between two selenium calls)."""
    return list(
        browser.execute_script(
            "return [...document.querySelectorAll(arguments[0])].map(e => e.innerText)", css
        )
    )


def test_status_page_in_chromium(
    stack: Stack, knee: dict[str, Any], others: dict[str, Any]
) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    study, native = knee["study"], others["native"]
    # The archive is not listening: after max_attempts (2) the outputs are dead letters, the
    # knee's 3 and the not-applicable study's SR.
    wait_for(
        lambda: (
            sorted(d["study_instance_uid"] for d in stack.status()["dead_letters"])
            == sorted([study] * 3 + [native])
        ),
        180,
        "4 dead letters for the archive",
    )
    wait_for(
        lambda: (
            {p["kind"] for p in stack.api("/api/problems")["problems"]}
            >= {"unrouted", "not-radiograph"}
        ),
        60,
        "the unrouted study and the refused CT recorded",
    )
    expected = knee["expected"].classes[knee["expected"].predicted_index].name
    source = pydicom.dcmread(knee["folder"] / knee["rows"][0]["path"], stop_before_pixels=True)
    with tempfile.TemporaryDirectory() as profile:
        browser = _browser(profile)
        try:
            browser.get(stack.base + "/")
            # Degraded, in amber, while dead letters wait; it still takes studies.
            header = browser.find_element(By.TAG_NAME, "h1").text
            assert "degraded" in header and "4 dead letter(s) wait" in header
            colour = browser.execute_script(
                "return getComputedStyle(document.getElementById('health-state')).backgroundColor"
            )
            assert colour == "rgb(240, 173, 31)", colour
            assert "not for clinical use" in browser.page_source
            rows = _texts(browser, "#study-rows tr")
            [row] = [r for r in rows if study[-12:] in r]
            assert expected in row and "answered" in row and "dead letter" in row
            assert str(source.AccessionNumber) not in row and "••••" in row
            browser.save_screenshot(str(_artifacts() / "status-page.png"))

            # The state filter, from the form: only the not-applicable study.
            Select(browser.find_element(By.NAME, "state")).select_by_value("not-applicable")
            browser.find_element(By.CSS_SELECTOR, "#filters button[type=submit]").click()
            wait_for(lambda: "state=not-applicable" in browser.current_url, 30, "the filter")
            rows = _texts(browser, "#study-rows tr")
            assert len(rows) == 1 and native[-12:] in rows[0], rows
            assert "not applicable" in rows[0] and "No implant detected" in rows[0]

            # The problems view: the CT and the CHEST study, each with its reason.
            browser.get(stack.base + "/problems")
            problems = _texts(browser, "table.problems tbody tr")
            [ct] = [r for r in problems if "not a radiograph" in r]
            assert "not projection radiography" in ct and "0x0122" in ct and "e2e-client" in ct
            [unrouted] = [r for r in problems if "no routing rule matched" in r]
            chest = others["chest"].StudyInstanceUID
            assert chest[-12:] in unrouted and "MODALITY" in unrouted
            browser.save_screenshot(str(_artifacts() / "status-problems.png"))

            # The study's page: the Secondary Captures at full size, the SR in sections.
            browser.get(f"{stack.base}/studies/{study}")
            images = browser.find_elements(By.CSS_SELECTOR, "img.sc")
            assert len(images) == 2
            loaded = "return arguments[0].complete && arguments[0].naturalWidth"
            sizes = wait_for(
                lambda: (
                    all(browser.execute_script(loaded, i) for i in images)
                    and [browser.execute_script(loaded, i) for i in images]
                ),
                60,
                "the full-size Secondary Captures to load",
            )
            assert sizes == [int(source.Columns)] * 2
            headings = _texts(browser, ".sr h4")
            assert any("study-level" in h for h in headings), headings
            fused = browser.find_element(By.XPATH, "//h4[contains(., 'study-level')]/..")
            assert expected in fused.text and "Certainty of Finding" in fused.text
            browser.save_screenshot(str(_artifacts() / "status-study.png"))
            browser.execute_script("document.querySelector('.captures').scrollIntoView()")
            browser.save_screenshot(str(_artifacts() / "status-study-captures.png"))

            # Requeue without a token: refused, and the page says so.
            browser.get(stack.base + "/")
            buttons = browser.find_elements(By.CSS_SELECTOR, "button.requeue")
            assert len(buttons) == 4
            buttons[0].click()
            note = browser.find_element(By.ID, "requeue-result")
            wait_for(lambda: "refused (401)" in note.text, 30, "the refusal on the page")
            assert len(stack.status()["dead_letters"]) == 4

            # With the token, the identifiers show; once the archive listens, a requeued dead
            # letter is sent.
            archive = RecordingPacs("ARCHIVE", port=stack.archive_port)
            try:
                field = browser.find_element(By.ID, "token")
                field.send_keys(TOKEN)
                browser.execute_script("saveToken()")
                wait_for(
                    lambda: any(
                        str(source.AccessionNumber) in r for r in _texts(browser, "#study-rows tr")
                    ),
                    30,
                    "the accession number, with the token",
                )
                browser.get(f"{stack.base}/studies/{study}")
                wait_for(
                    lambda: str(source.PatientID) in _texts(browser, "#identifiers")[0],
                    30,
                    "the study page's patient ID, with the token",
                )
                browser.get(stack.base + "/")
                [knee_letter] = [
                    d["id"] for d in stack.status()["dead_letters"]
                    if d["study_instance_uid"] == study and d["file"] == "knee-v1-sr.dcm"
                ]  # fmt: skip

                def requeue_it() -> bool:
                    try:
                        browser.find_element(
                            By.CSS_SELECTOR, f'button.requeue[data-id="{knee_letter}"]'
                        ).click()
                        return True
                    except StaleElementReferenceException:
                        return False

                wait_for(requeue_it, 30, "the requeue button")
                wait_for(lambda: len(stack.status()["dead_letters"]) == 3, 60, "one requeued")
                wait_for(lambda: len(archive.of_study(study)) == 1, 60, "the archive to get it")
                wait_for(
                    lambda: len(browser.find_elements(By.CSS_SELECTOR, "button.requeue")) == 3,
                    30,
                    "the page to show three dead letters",
                )
                browser.save_screenshot(str(_artifacts() / "status-page-after-requeue.png"))
            finally:
                archive.stop()
        finally:
            browser.quit()
    # What the page shows of a study without a token, it shows without patient identifiers.
    for path in ("/", f"/studies/{study}", "/problems", "/api/status"):
        with urllib.request.urlopen(stack.base + path, timeout=30) as answer:
            page = answer.read().decode()
        for identifier in (
            str(source.PatientName),
            str(source.PatientID),
            str(source.AccessionNumber),
        ):
            assert identifier and identifier not in page, path
