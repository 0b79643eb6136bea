"""The status page of a running node, over real sockets: what it shows with and without a
token, its filters and JSON API, the problems view fed by real refusals, the degraded health
and its metric, a study's page with its full-size Secondary Captures, and the destination
check.

One node (in-process, the shipped knee bundle, the image check off) serves the whole module:
a knee study comes in by C-STORE and goes out to a Storage SCP that also answers C-ECHO, and to
an archive nobody listens on (its three outputs become dead letters at the first attempt). A
CHEST radiograph (no rule), a DX without pixel data (C-STORE) and a CT (STOW-RS) are refused or
ignored. Waits are polls with deadlines.
"""

from __future__ import annotations

import copy
import http.client
import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from PIL import Image
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from dicom_node.config import Config
from dicom_node.service import Service
from dicom_node.status.model import MASK
from tests.conftest import make_set
from tests.factories import free_port, manifest_rows, wait_for
from tests.net.test_node_service import _node_config, _send, knee_only

TOKEN = "status-token-91c"


class EchoingPacs:
    """A Storage SCP on 127.0.0.1 that also answers C-ECHO (the destination the page checks)."""

    def __init__(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        self.ae_title = "PACS"
        self.received: list[pydicom.Dataset] = []
        self._lock = threading.Lock()
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        self._server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        self.port = int(self._server.server_address[1])

    def _store(self, event: Any) -> int:
        with self._lock:
            self.received.append(event.dataset)
        return 0x0000

    def stop(self) -> None:
        self._server.shutdown()


class Site:
    def __init__(self, root: Path) -> None:
        self.pacs = EchoingPacs()
        (root / "tokens").write_text(f"admin {TOKEN}\n")
        config = _node_config(root, self.pacs, knee_only())  # type: ignore[arg-type]
        config["node"]["http_port"] = free_port()
        config["http"] = {"tokens_file": str(root / "tokens")}
        config["routing"] = {"image_check": "off"}
        config["assembly"] = {"stable_after_s": 1}
        config["send"] = {"backoff_initial_s": 0.1, "max_attempts": 1}
        self.archive_port = free_port()  # nobody listens there
        config["destinations"].append(
            {
                "name": "archive",
                "ae_title": "ARCHIVE",
                "host": "127.0.0.1",
                "port": self.archive_port,
            }
        )
        self.service = Service(Config.model_validate(config), safety_net_s=1.0)
        self.service.start()
        self.base = f"http://127.0.0.1:{config['node']['http_port']}"
        self.root = root

    def get(self, path: str, token: str | None = None) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.get(self.base + path, headers=headers, timeout=30, allow_redirects=False)

    def stop(self) -> None:
        self.service.stop()
        self.pacs.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("status")
    folder = make_set(root, "knee", task="knee", patients=1, seed=43)
    rows = manifest_rows(folder)
    knee = [pydicom.dcmread(folder / r["path"]) for r in rows]
    site = Site(root)
    try:
        chest = copy.deepcopy(knee[0])
        chest.StudyInstanceUID, chest.SeriesInstanceUID = generate_uid(), generate_uid()
        chest.SOPInstanceUID = chest.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        chest.BodyPartExamined = "CHEST"
        no_pixels = copy.deepcopy(knee[0])
        no_pixels.SOPInstanceUID = no_pixels.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        del no_pixels.PixelData
        port = site.service.scp.port
        assert _send(port, knee) == [0, 0]
        assert _send(port, [chest]) == [0]
        assert _send(port, [no_pixels]) == [0xA900]
        ct = copy.deepcopy(knee[0])
        ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buffer = io.BytesIO()
        ct.save_as(buffer, enforce_file_format=True)
        answer = requests.post(
            site.base + "/dicomweb/studies",
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
        # A CT over C-STORE never reaches a handler (refused at negotiation) ...
        scanner = AE(ae_title="CTSCANNER")
        scanner.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assert not scanner.associate("127.0.0.1", port, ae_title="ORTHONODE").is_established
        # ... and a STOW-RS request of the wrong type is refused as a whole (415).
        wrong = requests.post(
            site.base + "/dicomweb/studies",
            data=buffer.getvalue(),
            headers={
                "Content-Type": "application/octet-stream",
                "Authorization": f"Bearer {TOKEN}",
            },
            timeout=30,
        )
        assert wrong.status_code == 415, wrong.text
        study = knee[0].StudyInstanceUID
        wait_for(
            lambda: len(site.service.spool.dead_letters()) == 3 and len(site.pacs.received) == 3,
            120,
            "3 outputs at the PACS and 3 dead letters for the archive",
        )
        yield {
            "site": site,
            "study": study,
            "knee": knee,
            "chest": chest,
            "no_pixels": no_pixels,
            "ct": ct,
        }
    finally:
        site.stop()


def test_identifiers_only_with_a_valid_token(
    site: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    node: Site = site["site"]
    source = site["knee"][0]
    accession, patient = str(source.AccessionNumber), str(source.PatientID)
    assert accession and patient
    for token in (None, "not-our-token"):
        page = node.get("/", token)
        assert page.status_code == 200
        assert MASK in page.text and accession not in page.text and patient not in page.text
        study = node.get(f"/studies/{site['study']}", token).text
        assert accession not in study and patient not in study and MASK in study
        [row] = node.get(f"/api/studies?uid={site['study']}", token).json()["studies"]
        assert row["accession_number"] is None and row["patient_id"] is None
    shown = node.get("/", TOKEN)
    assert accession in shown.text and patient in shown.text
    assert shown.headers["Cache-Control"] == "no-store"
    [row] = node.get(f"/api/studies?uid={site['study']}", TOKEN).json()["studies"]
    assert (row["accession_number"], row["patient_id"]) == (accession, patient)
    assert patient in node.get(f"/studies/{site['study']}", TOKEN).text
    # Never in the logs, the audit trail or the metrics.
    audit = (node.root / "spool" / "audit.jsonl").read_text()
    metrics = node.get("/metrics").text
    for text in (caplog.text, audit, metrics):
        assert accession not in text and patient not in text


def test_filters_paging_and_the_json_api(site: dict[str, Any]) -> None:
    node: Site = site["site"]
    listing = node.get("/api/studies?state=answered").json()
    [row] = listing["studies"]
    assert listing["total"] == 1 and row["study_instance_uid"] == site["study"]
    assert row["states"] == ["answered", "dead-letter"]
    assert row["sends"] == {"pacs": {"sent": 3}, "archive": {"dead": 3}}
    assert (row["modality"], row["body_part"], row["views"]) == ("DX", "KNEE", ["AP", "LAT"])
    assert node.get("/api/studies?state=dead-letter").json()["total"] == 1
    assert node.get("/api/studies?state=not-applicable").json()["total"] == 0
    # A part of one of its SOP Instance UIDs finds the study; the page keeps the filter.
    part = site["knee"][1].SOPInstanceUID[-12:]
    page = node.get(f"/?uid={part}&size=10").text
    assert f'value="{part}"' in page and site["study"] in page
    assert node.get("/api/studies?state=done").status_code == 400
    bad = node.get("/?from=yesterday")
    assert bad.status_code == 400 and "give a date as YYYY-MM-DD" in bad.text
    # The live refresh's answer: the rows and counts rendered, and the health.
    live = node.get("/api/studies?state=answered&html=1").json()
    assert site["study"][-12:] in live["html"]["rows"] and "degraded" in live["html"]["health"]
    assert live["counts"]["studies"]["dead-letter"] == 1


def test_problems_view_has_each_refusal_with_its_reason(site: dict[str, Any]) -> None:
    node: Site = site["site"]
    view = node.get("/api/problems").json()
    by_kind = {(p["kind"], p["protocol"]): p for p in view["problems"]}
    assert set(by_kind) == {
        ("unrouted", ""),  # found by the router, not at ingress
        ("bad-pixel-data", "C-STORE"),
        ("not-radiograph", "STOW-RS"),
        ("not-radiograph", "C-STORE"),
        ("bad-input", "STOW-RS"),
    }
    assert len(view["problems"]) == 5
    # The CT offered over C-STORE: the association is the record, with the class it proposed.
    scanner = by_kind["not-radiograph", "C-STORE"]
    assert (scanner["peer"], scanner["status"]) == ("CTSCANNER", "0x0122")
    assert "CT Image Storage" in scanner["reason"]
    # The STOW-RS request of the wrong type, with what its client was told.
    refused = by_kind["bad-input", "STOW-RS"]
    assert (refused["peer"], refused["status"]) == ("admin", "HTTP 415")
    assert "application/octet-stream is not supported" in refused["reason"]
    unrouted = by_kind["unrouted", ""]
    assert unrouted["study_instance_uid"] == site["chest"].StudyInstanceUID
    assert unrouted["peer"] == "MODALITY" and "no routing rule matched" in unrouted["reason"]
    pixels = by_kind["bad-pixel-data", "C-STORE"]
    assert (pixels["reason"], pixels["status"], pixels["protocol"]) == (
        "no Pixel Data",
        "0xA900",
        "C-STORE",
    )
    assert pixels["sop_instance_uid"] == site["no_pixels"].SOPInstanceUID
    assert pixels["address"] == "127.0.0.1"
    ct = by_kind["not-radiograph", "STOW-RS"]
    assert (ct["peer"], ct["protocol"], ct["status"]) == ("admin", "STOW-RS", "0x0122")
    assert ct["sop_instance_uid"] == site["ct"].SOPInstanceUID
    assert ct["study_instance_uid"] == site["ct"].StudyInstanceUID
    assert view["counts"]["dead-letter"] == 3 and view["counts"]["failed"] == 0
    page = node.get("/problems").text
    assert "no Pixel Data" in page and "not projection radiography" in page
    assert page.count('class="requeue"') == 3
    only = node.get("/api/problems?kind=unrouted").json()
    assert [p["kind"] for p in only["problems"]] == ["unrouted"] and only["dead_letters"] == []
    # The chest study's own page says why nothing was made of it.
    chest = node.get(f"/studies/{site['chest'].StudyInstanceUID}").text
    assert "no routing rule matched" in chest and "CHEST" in chest


def test_health_is_degraded_while_dead_letters_wait(site: dict[str, Any]) -> None:
    node: Site = site["site"]
    ready = node.get("/readyz")
    assert ready.status_code == 200  # degraded is not "not ready": it still takes studies
    body = ready.json()
    assert body["ready"] is True and body["state"] == "degraded"
    [warning] = body["warnings"]
    assert warning.startswith("3 dead letter(s)") and "health.dead_letters_warning" in warning
    page = node.get("/").text
    assert '<span id="health-state" class="health h-degraded">degraded</span>' in page
    # /metrics answers itself, without a redirect to /metrics/.
    connection = http.client.HTTPConnection(
        "127.0.0.1", int(node.base.rsplit(":", 1)[1]), timeout=30
    )
    connection.request("GET", "/metrics")
    answer = connection.getresponse()
    metrics = answer.read().decode()
    connection.close()
    assert answer.status == 200
    assert "orthonode_health_state 1.0" in metrics
    assert "orthonode_dead_letters_waiting 3.0" in metrics
    assert 'orthonode_problems_24h{kind="bad-pixel-data"} 1.0' in metrics
    assert node.get("/metrics/").status_code == 200


def test_a_study_page_shows_the_full_size_capture_and_the_report(site: dict[str, Any]) -> None:
    node: Site = site["site"]
    detail = node.get(f"/api/studies/{site['study']}").json()
    [task] = detail["tasks"]
    groups = [s for s in task["sr"]["sections"] if s["kind"] == "group"]
    assert groups and any("study-level" in g["title"] for g in groups)
    assert [o["state"] for o in task["outbox"]].count("dead") == 3
    assert {i["sop_instance_uid"] for i in detail["instances"]} == {
        ds.SOPInstanceUID for ds in site["knee"]
    }
    assert {e["event"] for e in detail["audit"]["events"]} >= {"instance-stored", "output-sent"}
    page = node.get(f"/studies/{site['study']}").text
    assert page.count('<img class="sc"') == 2 and "<h4>" in page
    capture = pydicom.dcmread(
        node.root / "spool" / "outputs" / site["study"] / "knee-v1-sc1.dcm", stop_before_pixels=True
    )
    [first] = [c for c in task["captures"] if c["n"] == 1]
    full = Image.open(io.BytesIO(node.get(first["full"]).content))
    assert full.size == (capture.Columns, capture.Rows)
    thumbnail = Image.open(io.BytesIO(node.get(first["thumbnail"]).content))
    assert max(thumbnail.size) <= 320
    assert node.get(f"/studies/{generate_uid()}").status_code == 404


def test_destination_checks(site: dict[str, Any]) -> None:
    node: Site = site["site"]
    url = node.base + "/api/destinations/{}/check"
    assert requests.post(url.format(0), timeout=30).status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    good = requests.post(url.format(0), headers=auth, timeout=30).json()
    assert good["ok"] is True and good["result"] == (
        f"C-ECHO PACS@127.0.0.1:{node.pacs.port}: success"
    )
    down = requests.post(url.format(1), headers=auth, timeout=30).json()
    assert down["ok"] is False
    assert down["result"].endswith(
        f"association with ARCHIVE at 127.0.0.1:{node.archive_port} failed: connection refused"
    )
    assert requests.post(url.format(7), headers=auth, timeout=30).status_code == 404
    # The page shows the last result of each.
    page = node.get("/").text
    assert "C-ECHO PACS@" in page and "failed: connection refused" in page
