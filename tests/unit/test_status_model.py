"""The status page's read side over a real spool (SQLite in a temporary folder): filters and
paging of the studies, the problems recorded for each kind of refusal, the masking of the
accession number and patient ID, the health warnings, and an old spool migrated.

Instances and SRs are tiny DICOM files made here (8 x 8 pixels; an SR with one measurement
group, or one that says "not applicable"); the clock is injected.
"""

from __future__ import annotations

import datetime as dt
import io
import sqlite3
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComprehensiveSRStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from dicom_node.config import Config, HealthConfig
from dicom_node.domain import InstanceRef
from dicom_node.problems import (
    BAD_INPUT,
    BAD_PIXEL_DATA,
    LIMIT,
    NOT_RADIOGRAPH,
    STORAGE,
    UNROUTED,
)
from dicom_node.receive.ingest import Ingest, Source
from dicom_node.status import render, sr_summary
from dicom_node.status.health import DEGRADED, NOT_READY, READY, assess, store_warnings
from dicom_node.status.html import render_study
from dicom_node.status.model import MASK, ProblemQuery, QueryError, StatusModel, StudyQuery
from dicom_node.store import ProblemFilter, Spool, StudyFilter
from tests.factories import FakeClock

DAY = 86400.0
START = dt.datetime(2025, 3, 1, 9, 0, tzinfo=dt.UTC).timestamp()


# -- tiny DICOM files ---------------------------------------------------------------------------


def radiograph(
    study: str,
    *,
    body_part: str = "KNEE",
    view: str = "AP",
    accession: str = "ACC-7731",
    patient_id: str = "PID-0042",
    pixels: bool = True,
) -> Dataset:
    """An 8 x 8 DX instance with the attributes the status page reads."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view
    ds.StudyDate, ds.StudyTime = "20250301", "091500"
    ds.AccessionNumber = accession
    ds.PatientID = patient_id
    ds.PatientName = "Doe^Jane"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    if pixels:
        ds.PixelData = bytes(8 * 8 * 2)
    return ds


def encoded(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code


def _item(kind: str, name: str, **fields: Any) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = kind
    item.ConceptNameCodeSequence = [_code("X-" + name[:12], "99TEST", name)]
    for key, value in fields.items():
        setattr(item, key, value)
    return item


def _num(name: str, value: float) -> Dataset:
    measured = Dataset()
    measured.NumericValue = f"{value:g}"
    measured.MeasurementUnitsCodeSequence = [_code("%", "UCUM", "Percent")]
    return _item("NUM", name, MeasuredValueSequence=[measured])


def report(path: Path, *, applicable: bool, statement: str | None = None) -> Path:
    """A minimal TID 1500-shaped SR: one study-level group (and, given a ``statement``, the
    result statement first in its evaluations), or "Not applicable" and why."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ComprehensiveSRStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality, ds.ValueType = "SR", "CONTAINER"
    ds.ConceptNameCodeSequence = [_code("126000", "DCM", "Imaging Measurement Report")]
    if applicable:
        group = _item("CONTAINER", "Measurement Group")
        group.ContentSequence = [
            _item("TEXT", "Tracking Identifier", TextValue="knee study-level AP+LAT fused"),
            _item("CODE", "Implant model", ConceptCodeSequence=[_code("ZL", "99T", "Zimmer LPS")]),
            _item("CODE", "Finding", ConceptCodeSequence=[_code("40388003", "SCT", "Implant")]),
            _num("Certainty of Finding", 99.99),
        ]
        measurements = _item("CONTAINER", "Imaging Measurements")
        measurements.ContentSequence = [group]
        ds.ContentSequence = [measurements]
        if statement is not None:
            evaluations = _item("CONTAINER", "Qualitative Evaluations")
            evaluations.ContentSequence = [
                _item("TEXT", "Comment", TextValue=statement),
                _item("TEXT", "Comment", TextValue="AI-generated result: NOT FOR DIAGNOSTIC USE"),
            ]
            ds.ContentSequence.append(evaluations)
    else:
        evaluations = _item("CONTAINER", "Qualitative Evaluations")
        na = _code("385432009", "SCT", "Not applicable")
        reason = _code("NA-NO-IMPLANT", "99ORTHONODE", "No implant detected")
        evaluations.ContentSequence = [
            _item("CODE", "Implant model", ConceptCodeSequence=[na]),
            _item("CODE", "Reason not applicable", ConceptCodeSequence=[reason]),
            _item("TEXT", "Comment", TextValue="AP image 1 not applicable: no implant"),
        ]
        ds.ContentSequence = [evaluations]
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# -- a spool with a study in every state ---------------------------------------------------------


class Site:
    """A spool and the studies put in it, each moved to its state through the spool's own
    transitions (the way the stages move them)."""

    def __init__(self, root: Path) -> None:
        self.clock = FakeClock(START)
        self.spool = Spool(root / "spool", clock=self.clock)
        self.config = Config.model_validate({"spool": {"directory": str(root / "spool")}})
        self.model = StatusModel(self.spool, self.config, clock=self.clock)
        self.studies: dict[str, str] = {}  # name -> Study Instance UID
        self.instances: dict[str, Dataset] = {}

    def receive(self, name: str, task: str = "knee", **tags: Any) -> str:
        study = generate_uid()
        ds = radiograph(study, **tags)
        self.spool.store(
            encoded(ds),
            sop_class_uid=ds.SOPClassUID,
            sop_instance_uid=ds.SOPInstanceUID,
            study_instance_uid=study,
            series_instance_uid=ds.SeriesInstanceUID,
            calling_ae_title="MODALITY",
        )
        [ref] = [r for r in self.spool.unrouted() if r.sop_instance_uid == ds.SOPInstanceUID]
        self.spool.mark_routed(ref, task, ds.ViewPosition, "R")
        self.studies[name], self.instances[name] = study, ds
        return study

    def claim_all(self) -> dict[str, Any]:
        """Promote and claim every study received so far: their jobs by name."""
        self.spool.promote_ready({"knee": {"AP"}, "hip": {"AP"}}, quiet_since=self.clock())
        names = {uid: name for name, uid in self.studies.items()}
        return {names[j.study_instance_uid]: j for j in self.spool.claim_ready(100)}

    def complete(self, job: Any, *, applicable: bool = True) -> list[Any]:
        self.clock.now += 60  # each change at its own time: the newest is listed first
        path = self.spool.output_path(job.study_instance_uid, f"{job.task}-v1-sr.dcm")
        report(path, applicable=applicable)
        assert self.spool.complete(job, [path], ["pacs"])
        return self.spool.outbox_for(job.study_instance_uid, job.task)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    """Seven studies, one day apart: answered and sent; not applicable and sent; sending;
    dead letter; failed; processing; waiting (a hip study)."""
    s = Site(tmp_path)
    for name in ("answered", "not-applicable", "sending", "dead", "failed", "processing"):
        s.receive(name)
        s.clock.now += DAY
    jobs = s.claim_all()
    s.receive("waiting", task="hip", body_part="HIP")
    [item] = s.complete(jobs["answered"])
    s.spool.mark_sent(item.id)
    [item] = s.complete(jobs["not-applicable"], applicable=False)
    s.spool.mark_sent(item.id)
    s.complete(jobs["sending"])
    [item] = s.complete(jobs["dead"])
    s.spool.mark_failed(item.id, "association with ARCHIVE aborted or unreachable", None)
    s.clock.now += 60
    assert s.spool.fail(jobs["failed"], "cannot read the image")
    return s


def found(site: Site, **params: str) -> list[str]:
    """The names of the studies the page lists for these query parameters."""
    query = StudyQuery.from_params(params, tasks=["knee", "hip", "spine"])
    listing = site.model.studies(query)
    names = {uid: name for name, uid in site.studies.items()}
    return [names[row["study_instance_uid"]] for row in listing["studies"]]


def test_each_state_filter_finds_its_studies(site: Site) -> None:
    assert found(site, state="answered") == ["dead", "sending", "answered"]  # newest first
    assert found(site, state="not-applicable") == ["not-applicable"]
    assert found(site, state="sending") == ["sending"]
    assert found(site, state="dead-letter") == ["dead"]
    assert found(site, state="failed") == ["failed"]
    assert found(site, state="processing") == ["processing"]
    assert found(site, state="waiting") == ["waiting"]
    assert site.spool.state_counts() == {
        "waiting": 1,
        "processing": 1,
        "answered": 3,  # answered, dead (delivered elsewhere or not), sending
        "not-applicable": 1,
        "failed": 1,
        "sending": 1,
        "dead-letter": 1,
    }
    rows = {r["study_instance_uid"]: r for r in site.model.studies(StudyQuery(size=50))["studies"]}
    dead = rows[site.studies["dead"]]
    assert dead["states"] == ["answered", "dead-letter"]
    assert dead["result"] == "Implant model: Zimmer LPS (certainty >99 %)"  # the rounding rule
    na = rows[site.studies["not-applicable"]]
    assert (
        na["states"] == ["not-applicable"] and na["result"] == "not applicable: No implant detected"
    )
    assert rows[site.studies["failed"]]["result"] == "failed: cannot read the image"


def test_uid_task_and_date_filters(site: Site) -> None:
    study = site.studies["sending"]
    assert found(site, uid=study) == ["sending"]
    assert found(site, uid=study[:-6][-10:] + study[-6:]) == ["sending"]  # a substring
    # A SOP Instance UID (or a part of it) finds its study.
    assert found(site, uid=site.instances["failed"].SOPInstanceUID[-14:]) == ["failed"]
    assert found(site, task="hip") == ["waiting"]
    assert found(site, task="knee", state="waiting") == []
    # Received on 2025-03-02 and 03-03 (UTC): the second and third studies.
    assert found(site, **{"from": "2025-03-02", "to": "2025-03-03"}) == [
        "sending",
        "not-applicable",
    ]  # the newest change first
    assert found(site, **{"from": "2025-03-07"}) == ["waiting"]


def test_paging(site: Site) -> None:
    query = StudyQuery(size=3)
    pages = [site.model.studies(query.__class__(size=3, page=n)) for n in (1, 2, 3)]
    assert [p["total"] for p in pages] == [7, 7, 7]
    assert [p["pages"] for p in pages] == [3, 3, 3]
    assert [(p["first"], p["last"]) for p in pages] == [(1, 3), (4, 6), (7, 7)]
    seen = [r["study_instance_uid"] for p in pages for r in p["studies"]]
    assert sorted(seen) == sorted(site.studies.values())  # each once
    beyond = site.model.studies(StudyQuery(size=3, page=4))
    assert beyond["studies"] == [] and beyond["total"] == 7
    # The page's pager links carry the filters.
    snapshot = _snapshot(site, StudyQuery(state="answered", size=1))
    page = render(snapshot)
    assert 'href="/?state=answered&amp;size=1&amp;page=2"' in page
    assert "1–1 of 3" in page


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"state": "done"}, "state='done'"),
        ({"task": "elbow"}, "not a configured task"),
        ({"from": "03/01/2025"}, "YYYY-MM-DD"),
        ({"from": "2025-03-02", "to": "2025-03-01"}, "to is before from"),
        ({"uid": "1.2.3 OR 1=1"}, "digits and dots"),
        ({"size": "0"}, "from 1 to 500"),
        ({"page": "two"}, "whole number"),
    ],
)
def test_bad_filters_are_named(params: dict[str, str], message: str) -> None:
    with pytest.raises(QueryError, match=message):
        StudyQuery.from_params(params, tasks=["knee"])


def _snapshot(site: Site, query: StudyQuery, identified: bool = False) -> dict[str, Any]:
    listing = site.model.studies(query, identified=identified)
    return {
        "node": {"ae_title": "ORTHONODE", "dicom_port": 11112, "tls": False},
        "health": {"state": READY, "warnings": []},
        "listing": listing,
        "query_values": {**query.params(), "size": str(query.size)},
        "counts": site.model.counts(),
        "dead_letters": site.model.dead_letters(),
    }


def test_identifiers_only_with_a_token(site: Site) -> None:
    """The accession number and patient ID come from the instance's header, and only for an
    identified caller; the index never holds them."""
    ds = site.instances["answered"]
    query = StudyQuery(uid=site.studies["answered"])
    [masked] = site.model.studies(query)["studies"]
    assert masked["accession_number"] is None and masked["patient_id"] is None
    assert (masked["study_date"], masked["study_time"]) == ("2025-03-01", "09:15")
    assert (masked["modality"], masked["body_part"], masked["views"]) == ("DX", "KNEE", ["AP"])
    page = render(_snapshot(site, query))
    assert MASK in page and ds.AccessionNumber not in page and ds.PatientID not in page
    [shown] = site.model.studies(query, identified=True)["studies"]
    assert (shown["accession_number"], shown["patient_id"]) == ("ACC-7731", "PID-0042")
    page = render(_snapshot(site, query, identified=True))
    assert "ACC-7731" in page and "PID-0042" in page
    detail = site.model.study(site.studies["answered"])
    assert detail is not None and detail["patient_id"] is None
    study_page = render_study(detail, {"ae_title": "ORTHONODE"}, {"state": READY})
    assert "PID-0042" not in study_page and "Doe" not in study_page
    # Nowhere in the index.
    index = sqlite3.connect(site.spool.root / "orthonode.sqlite")
    dump = "\n".join(index.iterdump())
    index.close()
    assert "ACC-7731" not in dump and "PID-0042" not in dump and "Doe" not in dump


def test_a_study_page_has_its_report_sends_and_instances(site: Site) -> None:
    detail = site.model.study(site.studies["dead"])
    assert detail is not None
    [task] = detail["tasks"]
    assert task["states"] == ["answered", "dead-letter"]
    [group] = [s for s in task["sr"]["sections"] if s["kind"] == "group"]
    assert group["title"] == "knee study-level AP+LAT fused"
    assert {"name": "Implant model", "value": "Zimmer LPS", "depth": 0} in group["rows"]
    assert {"name": "Certainty of Finding", "value": ">99 %", "depth": 0} in group["rows"]
    [sent] = task["outbox"]
    assert (sent["destination"], sent["state"], sent["attempts"]) == ("pacs", "dead", 1)
    [instance] = detail["instances"]
    assert instance["routed"] == "knee" and instance["view"] == "AP"
    assert instance["calling_ae"] == "MODALITY"
    page = render_study(detail, {"ae_title": "ORTHONODE"}, {"state": DEGRADED, "warnings": ["x"]})
    assert "<h4>knee study-level AP+LAT fused</h4>" in page
    assert "<th>Implant model</th><td>Zimmer LPS</td>" in page
    assert "association with ARCHIVE aborted or unreachable" in page
    assert site.model.study(generate_uid()) is None
    assert site.model.study("not-a-uid") is None


# -- problems -----------------------------------------------------------------------------------

SOURCE = Source("C-STORE", "MODALITY", "10.1.2.3")


def _ingest(spool: Spool, **settings: Any) -> Ingest:
    return Ingest(spool, max_image_pixels=settings.get("max_image_pixels", 10_000))


def _accept(ingest: Ingest, ds: Dataset, **kwargs: Any) -> Any:
    data = encoded(ds)
    return ingest.accept(
        pydicom.dcmread(io.BytesIO(data)),
        lambda: data,
        syntax=ExplicitVRLittleEndian,
        source=SOURCE,
        **kwargs,
    )


def _problems(spool: Spool, **where: Any) -> list[Any]:
    return spool.problems(ProblemFilter(**where), limit=100)[0]


def test_every_kind_of_refusal_is_recorded(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    ingest = _ingest(spool)
    study = generate_uid()

    no_pixels = radiograph(study, pixels=False)
    assert _accept(ingest, no_pixels).status == 0xA900
    big = radiograph(study)
    assert _accept(_ingest(spool, max_image_pixels=10), big).status == 0xA700
    other = radiograph(generate_uid())
    assert _accept(ingest, other, expected_study=study).status == 0xA900
    broken = radiograph(study)
    broken.SOPInstanceUID = "not a uid"
    assert _accept(ingest, broken).status == 0xC210
    # What STOW-RS refuses before Ingest's own checks, through the same refuse().
    ct = generate_uid()
    ingest.refuse(
        Source("STOW-RS", "ris-client", "10.9.8.7"),
        0x0122,
        "SOP class 1.2.840.10008.5.1.4.1.1.2 is not projection radiography",
        sop_instance_uid=ct,
    )
    # The spool below its reserve.
    spool.min_free_bytes = 1 << 60
    assert _accept(ingest, radiograph(study)).status == 0xA700
    spool.min_free_bytes = 0

    rows = {p.kind: p for p in _problems(spool)}
    assert set(rows) == {BAD_PIXEL_DATA, LIMIT, BAD_INPUT, NOT_RADIOGRAPH, STORAGE}
    pixel = rows[BAD_PIXEL_DATA]
    assert (pixel.reason, pixel.status, pixel.protocol) == ("no Pixel Data", "0xA900", "C-STORE")
    assert (pixel.peer, pixel.address) == ("MODALITY", "10.1.2.3")
    assert (pixel.study_instance_uid, pixel.series_instance_uid, pixel.sop_instance_uid) == (
        study,
        no_pixels.SeriesInstanceUID,
        no_pixels.SOPInstanceUID,
    )
    assert "node.max_image_pixels" in rows[LIMIT].reason
    assert rows[NOT_RADIOGRAPH].peer == "ris-client" and rows[NOT_RADIOGRAPH].sop_instance_uid == ct
    assert rows[STORAGE].reason == "storage full"
    bad = [p for p in _problems(spool, kind=BAD_INPUT)]
    assert {p.reason for p in bad} == {
        "Study Instance UID does not match the request",
        "missing or invalid UIDs",
    }
    # A peer's invalid "UID" is free text: it is not kept.
    assert all(p.sop_instance_uid != "not a uid" for p in bad)


def test_an_unrouted_instance_is_recorded_with_its_routing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    study = generate_uid()
    ds = radiograph(study, body_part="CHEST")
    spool.store(
        encoded(ds),
        sop_class_uid=ds.SOPClassUID,
        sop_instance_uid=ds.SOPInstanceUID,
        study_instance_uid=study,
        series_instance_uid=ds.SeriesInstanceUID,
        calling_ae_title="CR-ROOM-2",
    )
    [ref] = spool.unrouted()
    assert isinstance(ref, InstanceRef)
    spool.mark_routed(ref, None, None, None)
    [problem] = _problems(spool)
    assert problem.kind == UNROUTED and problem.peer == "CR-ROOM-2"
    assert (problem.study_instance_uid, problem.sop_instance_uid) == (study, ds.SOPInstanceUID)
    assert spool.find_studies(StudyFilter(), 10) == ([], 0)  # no job: it is only a problem
    model = StatusModel(spool, Config.model_validate({}))
    detail = model.study(study)
    assert detail is not None and detail["tasks"] == []
    [instance] = detail["instances"]
    assert instance["routed"] == "no routing rule matched" and instance["body_part"] == "CHEST"
    view = model.problems(ProblemQuery(kind=UNROUTED))
    assert view["counts"][UNROUTED] == 1 and view["total"] == 1
    assert view["problems"][0]["kind_label"] == "no routing rule matched"


def test_problems_are_pruned_to_the_newest(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", problems_kept=5)
    for n in range(8):
        spool.record_problem(BAD_INPUT, f"reason {n}")
    kept, total = spool.problems(ProblemFilter(), limit=100)
    assert total == 5 and [p.reason for p in kept] == [f"reason {n}" for n in range(7, 2, -1)]


def test_a_refusal_is_answered_even_when_it_cannot_be_recorded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def record_problem(self, *args: Any, **kwargs: Any) -> None:
            raise OSError("disk gone")

    spool = Spool(tmp_path / "spool")
    ingest = Ingest(spool, max_image_pixels=10_000, problems=Broken())
    ds = radiograph(generate_uid(), pixels=False)
    assert _accept(ingest, ds).status == 0xA900
    assert "could not be recorded (OSError)" in caplog.text
    assert "PID-0042" not in caplog.text and "ACC-7731" not in caplog.text


def test_problem_filters(tmp_path: Path) -> None:
    clock = FakeClock(START)
    spool = Spool(tmp_path / "spool", clock=clock)
    study = generate_uid()
    spool.record_problem(UNROUTED, "no rule", study_instance_uid=study)
    clock.now += DAY
    spool.record_problem(BAD_PIXEL_DATA, "no Pixel Data", sop_instance_uid=generate_uid())
    model = StatusModel(spool, Config.model_validate({}), clock=clock)
    assert model.problems(ProblemQuery(uid=study[-8:]))["total"] == 1
    day = ProblemQuery.from_params({"from": "2025-03-02", "to": "2025-03-02"})
    [only] = model.problems(day)["problems"]
    assert only["kind"] == BAD_PIXEL_DATA
    assert model.problems(ProblemQuery(kind="dead-letter"))["problems"] == []
    with pytest.raises(QueryError, match="kind="):
        ProblemQuery.from_params({"kind": "everything"})


# -- health -------------------------------------------------------------------------------------


def test_health_states_and_thresholds(site: Site) -> None:
    assert assess({"spool": []}).state == READY
    assert assess({"spool": ["disk: 1 MiB free"]}, ["x"]).state == NOT_READY
    assert assess({"spool": []}, ["1 dead letter"]).state == DEGRADED
    # The site has one dead letter and one study failed within the day.
    warnings = site.model.warnings()
    assert len(warnings) == 2
    assert "1 dead letter(s)" in warnings[0] and "health.dead_letters_warning: 1" in warnings[0]
    assert "1 study job(s) failed in the last 24 h" in warnings[1]
    quiet = HealthConfig(dead_letters_warning=0, failed_studies_warning=2)
    assert store_warnings(dead_letters=15, failed=1, settings=quiet) == []
    site.clock.now += 2 * DAY  # the failure is now older than failed_window_h
    assert len(site.model.warnings()) == 1
    assessed = assess({"models": [], "spool": []}, site.model.warnings())
    assert assessed.as_json() == {
        "ready": True,
        "state": "degraded",
        "checks": {"models": "ok", "spool": "ok"},
        "warnings": site.model.warnings(),
    }
    assert assessed.level == 1


def test_summaries_follow_the_rounding_rule(tmp_path: Path) -> None:
    answered = pydicom.dcmread(report(tmp_path / "a.dcm", applicable=True))
    assert sr_summary(answered) == "Implant model: Zimmer LPS (certainty >99 %)"
    refused = pydicom.dcmread(report(tmp_path / "n.dcm", applicable=False))
    assert sr_summary(refused) == "not applicable: No implant detected"
    # The SR's own result statement, when it names the same answer, is said as it is.
    said = "Knee implant model: Zimmer LPS >99 % (study level, fused AP+LAT)"
    stated = pydicom.dcmread(report(tmp_path / "s.dcm", applicable=True, statement=said))
    assert sr_summary(stated) == said
    other = "Knee implant model: Zimmer Persona 60 %"  # not the group's answer: not used
    odd = pydicom.dcmread(report(tmp_path / "o.dcm", applicable=True, statement=other))
    assert sr_summary(odd) == "Implant model: Zimmer LPS (certainty >99 %)"


def test_an_old_spool_gets_the_problems_table_and_outcome_columns(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    root.mkdir()
    db = sqlite3.connect(root / "orthonode.sqlite")
    db.execute(
        "CREATE TABLE studies (study_instance_uid TEXT NOT NULL, task TEXT NOT NULL, "
        "state TEXT NOT NULL, version INTEGER NOT NULL DEFAULT 1, last_received_at REAL NOT NULL, "
        "updated_at REAL NOT NULL, error TEXT, claimed_at REAL, "
        "PRIMARY KEY (study_instance_uid, task))"
    )
    db.execute("INSERT INTO studies VALUES ('1.2.3', 'knee', 'done', 1, 10.0, 12.0, NULL, 11.0)")
    db.commit()
    db.close()
    spool = Spool(root)
    [state] = spool.recent_studies()
    assert state.outcome is None
    assert spool.set_outcome("1.2.3", "knee", 1, "answered", "Zimmer LPS")
    [state] = spool.find_studies(StudyFilter(state="answered"), 10)[0]
    assert (state.outcome, state.summary) == ("answered", "Zimmer LPS")
    spool.record_problem(UNROUTED, "no rule")
    assert spool.problem_counts() == {UNROUTED: 1}
    spool.close()
    Spool(root).close()  # opening it again adds nothing twice
