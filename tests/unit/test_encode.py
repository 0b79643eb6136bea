"""Unit tests of the encoders: the TID 1500 SR and the saliency Secondary Capture.

Every object is written to bytes and read back with pydicom's strict reading mode; the SR is
read back with highdicom and each measurement group checked against the prediction.
"""

from __future__ import annotations

import copy
import csv
import datetime as dt
import io
import os
import re
import subprocess
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_node.domain import (
    NOT_APPLICABLE_REASONS,
    ClassInfo,
    Explanation,
    InstanceRef,
    ModelInfo,
    NotApplicable,
    Prediction,
    RegionOfInterest,
    RoutedView,
    ViewPrediction,
)
from dicom_node.encode import build_secondary_capture, build_structured_report
from dicom_node.encode.common import (
    NOT_APPLICABLE,
    NOT_APPLICABLE_REASON,
    NOT_APPLICABLE_REASON_CODES,
    not_applicable_score,
    not_applicable_text,
    series_description,
)
from dicom_node.encode.overlay import (
    BANNER,
    DEMO_BANNER,
    BurnedInText,
    band_layout,
    burned_in_text,
)
from dicom_node.errors import EncodeError
from dicom_node.models.codes import PRIVATE_SCHEME, classes_for
from dicom_node.preprocess import display_image
from dicom_node.tasks import TaskSpec, builtin_task, parse_spec
from dicom_node.wording import percent_text
from tests.conftest import make_set, require_tool
from tests.factories import KNEE_OA_SPEC, PIXELMED_SR_VALIDATOR

NOW = dt.datetime(2025, 3, 4, 5, 6, 7)
WARNING_STATEMENT = "AI-generated result by orthonode: NOT FOR DIAGNOSTIC USE"
DEVICE_UID = "1.2.826.0.1.3680043.8.498.424242"
UNDETERMINED = "373068000"


@dataclass
class Case:
    """Sources, prediction and the objects built from them."""

    sources: list[Dataset]
    paths: list[Path]
    prediction: Prediction
    displays: list[np.ndarray]
    heatmaps: list[np.ndarray]
    secondary_captures: list[Dataset]
    report: Dataset
    explanations: list[Explanation]


# -- building cases --------------------------------------------------------------------------
def read_sources(folder: Path) -> tuple[list[Dataset], list[Path], list[dict[str, str]]]:
    """The phantom set's files, in manifest order (AP before LAT)."""
    with (folder / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    paths = [folder / row["path"] for row in rows]
    return [pydicom.dcmread(path) for path in paths], paths, rows


def peaked(n_classes: int, index: int, top: float) -> tuple[float, ...]:
    """Probabilities with ``top`` on ``index`` and the rest shared equally."""
    rest = (1.0 - top) / (n_classes - 1)
    return tuple(top if i == index else rest for i in range(n_classes))


def make_prediction(
    task: str,
    sources: Sequence[Dataset],
    paths: Sequence[Path],
    views: Sequence[str],
    probabilities: Sequence[tuple[float, ...]],
    fused: tuple[float, ...] | None,
    *,
    threshold: float = 0.5,
    demo: bool = True,
    classes: tuple[ClassInfo, ...] | None = None,
) -> Prediction:
    view_predictions = []
    for ds, path, view, probs in zip(sources, paths, views, probabilities, strict=True):
        instance = InstanceRef(
            sop_instance_uid=ds.SOPInstanceUID,
            sop_class_uid=ds.SOPClassUID,
            study_instance_uid=ds.StudyInstanceUID,
            series_instance_uid=ds.SeriesInstanceUID,
            path=path,
        )
        side = ds.get("ImageLaterality")
        routed = RoutedView(instance, task, view, side if side in ("R", "L") else None)
        view_predictions.append(ViewPrediction(routed, probs))
    model = ModelInfo(
        name=f"orthonode {task} classifier",
        version="0.3.1",
        device_uid=DEVICE_UID,
        demo=demo,
    )
    return Prediction(
        study_instance_uid=sources[0].StudyInstanceUID,
        task=task,
        classes=classes or classes_for(task),
        views=tuple(view_predictions),
        fused_probabilities=fused,
        threshold=threshold,
        model=model,
    )


def blob(rows: int, columns: int, centre: tuple[float, float], sigma: float) -> np.ndarray:
    """A gaussian heatmap peaking at 1 on ``centre`` (row, column)."""
    yy, xx = np.mgrid[:rows, :columns].astype(np.float32)
    heat = np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * sigma**2))
    return heat.astype(np.float32)


def build_case(
    sources: list[Dataset],
    paths: list[Path],
    prediction: Prediction,
    *,
    method: str = "Grad-CAM",
    spec: TaskSpec | None = None,
    version: int = 1,
) -> Case:
    """SCs of every view and the SR, for ``spec`` (default: the built-in spec of the task)."""
    spec = spec or builtin_task(prediction.task)
    displays, heatmaps, captures = [], [], []
    explanations: list[Explanation] = []
    series_uid = pydicom.uid.generate_uid()
    for number, (ds, view) in enumerate(zip(sources, prediction.views, strict=True), start=1):
        display = display_image(ds)
        heat = blob(ds.Rows, ds.Columns, (ds.Rows / 2, ds.Columns / 2), ds.Rows / 12)
        # The localiser's square, past the image's left edge as it may be.
        region = RegionOfInterest(top=ds.Rows // 8, left=-ds.Columns // 16, side=3 * ds.Rows // 4)
        explanation = Explanation(view=view.view, heatmap=heat, method=method, region=region)
        explanations.append(explanation)
        captures.append(
            build_secondary_capture(
                ds,
                display,
                explanation,
                prediction,
                spec=spec,
                version=version,
                instance_number=number,
                series_uid=series_uid,
                now=NOW,
            )
        )
        displays.append(display)
        heatmaps.append(heat)
    report = build_structured_report(
        prediction,
        sources,
        captures,
        spec=spec,
        version=version,
        explanations=explanations,
        now=NOW,
    )
    return Case(sources, paths, prediction, displays, heatmaps, captures, report, explanations)


def standard_case(
    folder: Path, task: str, *, abstain: bool = False, fuse: bool = True, version: int = 1
) -> Case:
    """Knee/spine: AP + LAT (+ fused); hip: one AP view, positive (loose) or abstained."""
    sources, paths, rows = read_sources(folder)
    views = [row["view"] for row in rows]
    n = len(classes_for(task))
    if abstain:
        probabilities = [peaked(n, 1, 0.4 if n > 2 else 0.55) for _ in sources]
    else:
        probabilities = [peaked(n, 1, 0.8 + 0.05 * i) for i in range(len(sources))]
    fused = None
    if fuse and len(sources) > 1:
        fused = peaked(n, 1, 0.4) if abstain else peaked(n, 1, 0.9)
    prediction = make_prediction(task, sources, paths, views, probabilities, fused, threshold=0.6)
    return build_case(sources, paths, prediction, version=version)


def knee_oa_spec() -> TaskSpec:
    """A site's fourth task: Kellgren–Lawrence grades 0–4 in its own private scheme 99MYSITE."""
    return parse_spec("knee-oa", KNEE_OA_SPEC)


def second_lateral(source: Dataset) -> Dataset:
    """The lateral view sent again: a new image in a new series, otherwise the same."""
    again = copy.deepcopy(source)
    again.SOPInstanceUID = pydicom.uid.generate_uid()
    again.SeriesInstanceUID = pydicom.uid.generate_uid()
    again.SeriesNumber = int(source.get("SeriesNumber") or 1) + 1
    return again


def relateral_case(folder: Path, spec: TaskSpec, *, version: int = 1) -> Case:
    """AP, LAT, LAT (the lateral sent twice) of a knee set for ``spec``; the fused result
    combines the AP and the second LAT (``fused_views`` = (0, 2))."""
    sources, paths, rows = read_sources(folder)
    assert [row["view"] for row in rows] == ["AP", "LAT"]
    sources = [*sources, second_lateral(sources[1])]
    paths = [*paths, paths[1]]
    classes = spec.class_infos()
    n = len(classes)
    prediction = make_prediction(
        spec.name,
        sources,
        paths,
        ["AP", "LAT", "LAT"],
        [peaked(n, 2, 0.7), peaked(n, 2, 0.8), peaked(n, 3, 0.75)],
        peaked(n, 2, 0.85),
        threshold=0.6,
        classes=classes,
    )
    prediction = replace(prediction, fused_views=(0, 2))
    return build_case(sources, paths, prediction, spec=spec, version=version)


# -- helpers ---------------------------------------------------------------------------------
@pytest.fixture
def strict_reading() -> Iterator[None]:
    """pydicom's strict reading mode, restored afterwards."""
    previous = pydicom.config.settings.reading_validation_mode
    pydicom.config.settings.reading_validation_mode = pydicom.config.RAISE
    try:
        yield
    finally:
        pydicom.config.settings.reading_validation_mode = previous


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def roundtrip(ds: Dataset) -> Dataset:
    """Write and read back (call under the strict_reading fixture)."""
    read = pydicom.dcmread(io.BytesIO(to_bytes(ds)))
    for element in read.iterall():  # strict mode validates values as they are accessed
        _ = element.value
    return read


def walk(ds: Dataset) -> Iterator[Dataset]:
    yield ds
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                yield from walk(item)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encode-phantoms")
    return {task: make_set(root, task, task=task, patients=1, seed=1) for task in TASKS}


TASKS = ("knee", "hip", "spine")
KNEE, HIP = builtin_task("knee"), builtin_task("hip")
FINDINGS = {"knee": "40388003", "hip": "53350007", "spine": "68183006"}
SITES = {"knee": "49076000", "hip": "24136001", "spine": "122496007"}


def expected_group(prediction: Prediction, probabilities: Sequence[float]) -> tuple[str, float]:
    best = int(np.argmax(probabilities))
    certainty = float(max(probabilities))
    undetermined = prediction.abstained or certainty < prediction.threshold
    code = UNDETERMINED if undetermined else prediction.classes[best].code_value
    return code, round(100 * certainty, 2)


def read_report(ds: Dataset) -> hd.sr.MeasurementReport:
    """The SR's content as highdicom reads it back from bytes."""
    report = hd.sr.srread(io.BytesIO(to_bytes(ds)))
    assert isinstance(report, hd.sr.Comprehensive3DSR)
    content = report.content
    assert isinstance(content, hd.sr.MeasurementReport)
    return content


Group = (
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
)


def measurement_groups(ds: Dataset) -> list[Group]:
    """The result groups: one per analysed image (TID 1410, on its region), then the
    study-level fused group (TID 1501); the saliency-peak groups are left out."""
    report = read_report(ds)
    planar = [g for g in report.get_planar_roi_measurement_groups() if not is_peak(g)]
    return [*planar, *report.get_image_measurement_groups()]


def peak_groups(ds: Dataset) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    return [g for g in read_report(ds).get_planar_roi_measurement_groups() if is_peak(g)]


def is_peak(group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations) -> bool:
    roi = group.roi
    return roi is not None and roi.graphic_type == hd.sr.GraphicTypeValues.POINT


def group_images(group: Group) -> list[str]:
    """SOP Instance UIDs of the images a group is about (its region's, or its sources)."""
    if isinstance(group, hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations):
        roi = group.roi
        assert roi is not None
        return [str(roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)]
    return [image.referenced_sop_instance_uid for image in group.source_images]


def evaluation(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> hd.sr.CodedConcept:
    """The value of the group's one qualitative evaluation."""
    (item,) = group.get_qualitative_evaluations()
    value = item[0].value
    assert isinstance(value, hd.sr.CodedConcept)
    return value


# -- SR ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_sr_groups_carry_the_predicted_class_and_certainty(
    phantoms: dict[str, Path], task: str, strict_reading: None
) -> None:
    case = standard_case(phantoms[task], task)
    roundtrip(case.report)
    groups = measurement_groups(case.report)
    prediction = case.prediction
    expected = [expected_group(prediction, v.probabilities) for v in prediction.views]
    if prediction.fused_probabilities is not None:
        expected.append(expected_group(prediction, prediction.fused_probabilities))
    assert len(groups) == len(expected)
    tracking_uids = set()
    for index, (group, (code, certainty)) in enumerate(zip(groups, expected, strict=True)):
        assert evaluation(group).value == code
        assert code != UNDETERMINED  # the positive case must name a class
        certainties = group.get_measurements(name=codes.DCM.CertaintyOfFinding)
        assert len(certainties) == 1
        assert certainties[0].value == pytest.approx(certainty, abs=0.01)
        assert certainties[0].unit.value == "%" and certainties[0].unit.scheme_designator == "UCUM"
        probabilities = (
            prediction.views[index].probabilities
            if index < len(prediction.views)
            else prediction.fused_probabilities
        )
        assert probabilities is not None
        for info, probability in zip(prediction.classes, probabilities, strict=True):
            name = hd.sr.CodedConcept(info.code_value, info.coding_scheme, info.code_meaning)
            (measurement,) = group.get_measurements(name=name)
            assert measurement.value == pytest.approx(100 * probability, abs=0.01)
            assert 0 <= measurement.value <= 100
        assert group.finding_type is not None and group.finding_type.value == FINDINGS[task]
        (site,) = group.finding_sites
        assert site.value.value == SITES[task]
        assert group.tracking_identifier and group.tracking_uid
        tracking_uids.add(group.tracking_uid)
        if index < len(case.sources):
            assert group_images(group) == [case.sources[index].SOPInstanceUID]
        else:
            assert set(group_images(group)) == {ds.SOPInstanceUID for ds in case.sources}
    assert len(tracking_uids) == len(groups)


@pytest.mark.parametrize("task", TASKS)
def test_sr_laterality_follows_the_source(phantoms: dict[str, Path], task: str) -> None:
    case = standard_case(phantoms[task], task)
    for group, source in zip(measurement_groups(case.report), case.sources, strict=False):
        (site,) = group.finding_sites
        expected = {"R": "24028007", "L": "7771000"}.get(source.get("ImageLaterality", ""))
        laterality = site.laterality.value if site.laterality is not None else None
        assert laterality == expected


def test_fused_group_present_iff_fused_probabilities(phantoms: dict[str, Path]) -> None:
    fused = standard_case(phantoms["knee"], "knee", fuse=True)
    unfused = standard_case(phantoms["knee"], "knee", fuse=False)
    assert len(measurement_groups(fused.report)) == 3
    assert len(measurement_groups(unfused.report)) == 2
    study_group = measurement_groups(fused.report)[-1]
    assert "fused" in (study_group.tracking_identifier or "")


@pytest.mark.parametrize("task", TASKS)
def test_abstained_prediction_is_undetermined(phantoms: dict[str, Path], task: str) -> None:
    case = standard_case(phantoms[task], task, abstain=True)
    assert case.prediction.abstained
    for group in measurement_groups(case.report):
        assert evaluation(group).value == UNDETERMINED
        assert evaluation(group).scheme_designator == "SCT"
        (certainty,) = group.get_measurements(name=codes.DCM.CertaintyOfFinding)
        assert 0 < certainty.value < 100 * case.prediction.threshold


def test_confident_study_with_an_unsure_view(phantoms: dict[str, Path]) -> None:
    """Only the group below the threshold is undetermined when the study is confident."""
    sources, paths, rows = read_sources(phantoms["knee"])
    n = len(classes_for("knee"))
    prediction = make_prediction(
        "knee",
        sources,
        paths,
        [row["view"] for row in rows],
        [peaked(n, 2, 0.9), peaked(n, 2, 0.3)],
        peaked(n, 2, 0.8),
        threshold=0.6,
    )
    report = build_structured_report(prediction, sources, [], spec=KNEE, now=NOW)
    values = [evaluation(group).value for group in measurement_groups(report)]
    code = prediction.classes[2].code_value
    assert values == [code, UNDETERMINED, code]


@pytest.mark.parametrize("demo", [True, False])
def test_sr_document_attributes(
    phantoms: dict[str, Path], demo: bool, strict_reading: None
) -> None:
    sources, paths, rows = read_sources(phantoms["knee"])
    n = len(classes_for("knee"))
    prediction = make_prediction(
        "knee",
        sources,
        paths,
        [row["view"] for row in rows],
        [peaked(n, 0, 0.7), peaked(n, 0, 0.8)],
        peaked(n, 0, 0.75),
        demo=demo,
    )
    case = build_case(sources, paths, prediction)
    sr = roundtrip(case.report)
    source = sources[0]
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert sr.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert sr.Modality == "SR"
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in sources}
    assert sr.SeriesInstanceUID != case.secondary_captures[0].SeriesInstanceUID
    assert sr.SeriesNumber == 9001
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID"):
        assert sr[keyword].value == source[keyword].value, keyword
    assert sr.AccessionNumber == source.AccessionNumber
    assert "knee" in sr.SeriesDescription and "NOT FOR DIAGNOSTIC USE" in sr.SeriesDescription
    assert ("DEMO WEIGHTS" in sr.SeriesDescription) is demo
    assert len(sr.SeriesDescription) <= 64
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == (
        "COMPLETE",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    assert sr.ContentDate == "20250304" and sr.ContentTime.startswith("050607")
    assert sr.InstanceCreationDate == "20250304"
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    schemes = {item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence}
    assert PRIVATE_SCHEME in schemes
    (algorithm,) = [item for item in sr.ContributingEquipmentSequence if "DeviceUID" in item]
    assert algorithm.DeviceUID == DEVICE_UID
    assert algorithm.ManufacturerModelName == prediction.model.name
    assert algorithm.SoftwareVersions == prediction.model.version
    assert algorithm.Manufacturer == prediction.model.manufacturer


def test_sr_observer_procedure_and_algorithm(phantoms: dict[str, Path]) -> None:
    case = standard_case(phantoms["knee"], "knee")
    (observer,) = read_report(case.report).get_observer_contexts()
    attributes = observer.observer_identifying_attributes
    assert observer.observer_type.value == codes.DCM.Device.value
    assert isinstance(attributes, hd.sr.DeviceObserverIdentifyingAttributes)
    assert attributes.uid == DEVICE_UID
    assert attributes.name == case.prediction.model.name
    assert attributes.manufacturer_name == case.prediction.model.manufacturer
    assert attributes.model_name == case.prediction.model.name
    root = case.report.ContentSequence
    procedure = [item for item in root if item.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert procedure[0].ConceptCodeSequence[0].CodeValue == "363679005"
    library = [item for item in root if item.ConceptNameCodeSequence[0].CodeValue == "111028"]
    listed = {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for entry in library
        for item in walk(entry)
        if "ReferencedSOPSequence" in item
    }
    assert listed == {ds.SOPInstanceUID for ds in case.sources}
    texts = {
        item.ConceptNameCodeSequence[0].CodeValue: item.TextValue
        for item in walk(case.report)
        if item.get("ValueType") == "TEXT"
    }
    assert texts["111001"] == case.prediction.model.name
    assert texts["111003"] == case.prediction.model.version


@pytest.mark.parametrize("task", TASKS)
def test_no_long_code_value_anywhere(phantoms: dict[str, Path], task: str) -> None:
    case = standard_case(phantoms[task], task)
    for ds in [case.report, *case.secondary_captures]:
        for item in walk(ds):
            assert "LongCodeValue" not in item
            if "CodeValue" in item:
                assert 0 < len(item.CodeValue) <= 16
            if "CodeMeaning" in item:
                assert len(item.CodeMeaning) <= 64


def test_evidence_lists_sources_and_secondary_captures(phantoms: dict[str, Path]) -> None:
    case = standard_case(phantoms["spine"], "spine")
    report = hd.sr.srread(io.BytesIO(to_bytes(case.report)))
    evidence = {
        (str(sop_instance), str(sop_class))
        for _, _, sop_instance, sop_class in report.get_evidence(current_procedure_only=True)
    }
    expected = {
        (ds.SOPInstanceUID, ds.SOPClassUID) for ds in [*case.sources, *case.secondary_captures]
    }
    assert evidence == expected
    assert "PertinentOtherEvidenceSequence" not in case.report


def test_sr_rejects_a_long_code_value(phantoms: dict[str, Path]) -> None:
    sources, paths, _ = read_sources(phantoms["hip"])
    classes = (
        ClassInfo(0, "well-fixed", "272519000", "SCT", "Absent"),
        ClassInfo(1, "loose", "THIS-CODE-IS-17CH", PRIVATE_SCHEME, "Loose"),
    )
    prediction = make_prediction("hip", sources, paths, ["AP"], [(0.2, 0.8)], None, classes=classes)
    with pytest.raises(EncodeError, match="THIS-CODE-IS-17CH"):
        build_structured_report(prediction, sources, [], spec=builtin_task("hip"), now=NOW)


def test_sr_rejects_sources_that_do_not_match_the_views(phantoms: dict[str, Path]) -> None:
    sources, paths, rows = read_sources(phantoms["knee"])
    n = len(classes_for("knee"))
    prediction = make_prediction(
        "knee",
        sources,
        paths,
        [row["view"] for row in rows],
        [peaked(n, 0, 0.9)] * 2,
        None,
    )
    with pytest.raises(EncodeError, match="source 0"):
        build_structured_report(prediction, list(reversed(sources)), [], spec=KNEE, now=NOW)
    with pytest.raises(EncodeError, match="1 source"):
        build_structured_report(prediction, sources[:1], [], spec=KNEE, now=NOW)


def test_outputs_are_deterministic_for_the_same_uids_and_time(phantoms: dict[str, Path]) -> None:
    sources, paths, _ = read_sources(phantoms["hip"])
    prediction = make_prediction("hip", sources, paths, ["AP"], [(0.3, 0.7)], None)
    heat = blob(sources[0].Rows, sources[0].Columns, (100, 100), 20)
    explanation = Explanation(prediction.views[0].view, heat)

    def build() -> tuple[bytes, bytes]:
        sc = build_secondary_capture(
            sources[0],
            display_image(sources[0]),
            explanation,
            prediction,
            spec=HIP,
            instance_uid="2.25.1",
            series_uid="2.25.2",
            now=NOW,
        )
        sr = build_structured_report(
            prediction,
            sources,
            [sc],
            spec=HIP,
            instance_uid="2.25.3",
            series_uid="2.25.4",
            now=NOW,
        )
        return to_bytes(sc), to_bytes(sr)

    assert build() == build()


def sparse(source: Dataset) -> Dataset:
    ds = copy.deepcopy(source)
    for keyword in ("PatientID", "StudyID", "AccessionNumber", "StudyDate", "StudyTime"):
        delattr(ds, keyword)
    del ds.ReferringPhysicianName
    return ds


def test_sparse_source_is_filled_on_a_copy(phantoms: dict[str, Path], strict_reading: None) -> None:
    sources, paths, _ = read_sources(phantoms["hip"])
    thin = [sparse(sources[0])]
    before = to_bytes(thin[0])
    prediction = make_prediction("hip", thin, paths, ["AP"], [(0.1, 0.9)], None)
    case = build_case(thin, paths, prediction)
    assert to_bytes(thin[0]) == before  # the caller's data set is untouched
    for ds in [case.report, *case.secondary_captures]:
        read = roundtrip(ds)
        for keyword in ("PatientID", "StudyID", "AccessionNumber", "StudyDate"):
            assert keyword in read and not read[keyword].value, keyword
        assert read.PatientName == sources[0].PatientName
        assert read.StudyInstanceUID == sources[0].StudyInstanceUID


def test_source_without_orientation_or_spacing_still_builds(phantoms: dict[str, Path]) -> None:
    sources, paths, _ = read_sources(phantoms["hip"])
    ds = copy.deepcopy(sources[0])
    del ds.PatientOrientation, ds.ImagerPixelSpacing
    prediction = make_prediction("hip", [ds], paths, ["AP"], [(0.1, 0.9)], None)
    case = build_case([ds], paths, prediction)
    assert measurement_groups(case.report)
    assert case.secondary_captures[0].PatientOrientation == []


def test_sr_and_sc_do_not_log_patient_identifiers(
    phantoms: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    sources, paths, _ = read_sources(phantoms["hip"])
    ds = copy.deepcopy(sources[0])
    ds.PatientName = "NOCARETNAME"  # highdicom warns about (and prints) such names
    prediction = make_prediction("hip", [ds], paths, ["AP"], [(0.1, 0.9)], None)
    with caplog.at_level("DEBUG"):
        case = build_case([ds], paths, prediction)
    assert case.report.PatientName == "NOCARETNAME"
    for record in caplog.records:
        message = record.getMessage()
        assert "NOCARETNAME" not in message and ds.PatientID not in message


def declared_schemes(sr: Dataset) -> set[str]:
    return {str(item.CodingSchemeDesignator) for item in sr.CodingSchemeIdentificationSequence}


def undeclared_private_schemes(sr: Dataset) -> set[str]:
    """The "99..." schemes a code of the SR uses that its declarations do not name."""
    return {
        str(item.CodingSchemeDesignator)
        for item in walk(sr)
        if str(item.get("CodingSchemeDesignator", "")).startswith("99")
    } - declared_schemes(sr)  # walk() also visits the declarations themselves


def supersede_texts(sr: Dataset) -> list[str]:
    """TEXT values of the root's Qualitative Evaluations container (C0034375, UMLS), less the
    statements of the result and the warning."""
    return [
        text
        for text in _container_texts(sr)
        if not text.startswith(("AI-generated result by orthonode", "Knee implant model: "))
        and not any(text.startswith(f"{builtin_task(t).label}: ") for t in TASKS)
        and not text.startswith(f"{knee_oa_spec().label}: ")
    ]


def _container_texts(sr: Dataset) -> list[str]:
    return [
        str(text.TextValue)
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "C0034375"
        and item.ConceptNameCodeSequence[0].CodingSchemeDesignator == "UMLS"
        and item.ValueType == "CONTAINER"
        for text in item.ContentSequence
        if text.ValueType == "TEXT" and text.ConceptNameCodeSequence[0].CodeValue == "121106"
    ]


def test_sr_codes_come_from_a_custom_spec(phantoms: dict[str, Path], strict_reading: None) -> None:
    spec = knee_oa_spec()
    case = relateral_case(phantoms["knee"], spec)
    sr = roundtrip(case.report)
    groups = measurement_groups(case.report)
    assert len(groups) == 4
    for group in groups:
        assert group.finding_type is not None
        assert (group.finding_type.value, group.finding_type.scheme_designator) == (
            "396275006",
            "SCT",
        )
        (site,) = group.finding_sites
        assert (site.value.value, site.value.scheme_designator) == ("TF-JOINT", "99MYSITE")
        (item,) = group.get_qualitative_evaluations()
        assert (item[0].name.value, item[0].name.scheme_designator) == ("KL-GRADE", "99MYSITE")
        assert item[0].value.scheme_designator == "99MYSITE"
        assert item[0].value.value.startswith("KL-")
    # Per image KL 2, KL 2, KL 3 (the second lateral), fused KL 2.
    assert [evaluation(group).value for group in groups] == ["KL-2", "KL-2", "KL-3", "KL-2"]
    # The site's scheme is declared; ours is not used anywhere, so it is not declared.
    assert declared_schemes(sr) == {"99MYSITE"}
    assert undeclared_private_schemes(sr) == set()
    assert "knee-oa" in sr.SeriesDescription
    text = burned_in_text(
        case.prediction, Explanation(case.prediction.views[0].view, case.heatmaps[0]), spec.label
    )
    # The class as the SR codes it (its code meaning), in the one rounding rule.
    assert text.details[0].startswith("Knee osteoarthritis grade: Kellgren-Lawrence grade 2 85 %")


@pytest.mark.parametrize("task", TASKS)
def test_every_private_scheme_used_is_declared(phantoms: dict[str, Path], task: str) -> None:
    case = standard_case(phantoms[task], task, version=2)
    assert declared_schemes(case.report) == {PRIVATE_SCHEME}
    assert undeclared_private_schemes(case.report) == set()
    (ours,) = case.report.CodingSchemeIdentificationSequence
    assert ours.CodingSchemeName == "orthonode private codes"


def test_a_view_sent_twice_has_its_own_group_and_the_fused_one_uses_the_latest(
    phantoms: dict[str, Path],
) -> None:
    case = relateral_case(phantoms["knee"], KNEE)
    ap, lat1, lat2 = case.sources
    # The first lateral is of the other side: the fused group (AP + second LAT) still has one.
    lat1.ImageLaterality = "L"
    report = build_structured_report(case.prediction, case.sources, [], spec=KNEE, now=NOW)
    groups = measurement_groups(report)
    assert len(groups) == 4
    per_image, fused = groups[:3], groups[3]
    for group, source in zip(per_image, case.sources, strict=True):
        assert group_images(group) == [source.SOPInstanceUID]
    assert [g.tracking_identifier for g in per_image] == [
        "knee AP image 1",
        "knee LAT image 2",
        "knee LAT image 3",
    ]
    assert fused.tracking_identifier == "knee study-level AP+LAT fused"
    referenced = [image.referenced_sop_instance_uid for image in fused.source_images]
    assert referenced == [ap.SOPInstanceUID, lat2.SOPInstanceUID]
    sides = []
    for group in groups:
        (site,) = group.finding_sites
        sides.append(site.laterality.value if site.laterality is not None else None)
    assert sides == ["24028007", "7771000", "24028007", "24028007"]
    assert len({group.tracking_uid for group in groups}) == 4
    # Every analysed image is still in the Image Library.
    library = [
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for entry in report.ContentSequence
        if entry.ConceptNameCodeSequence[0].CodeValue == "111028"
        for item in walk(entry)
        if "ReferencedSOPSequence" in item
    ]
    assert sorted(library) == sorted(ds.SOPInstanceUID for ds in case.sources)
    # Each image has its SC; each names the fused views once.
    assert len(case.secondary_captures) == 3
    text = burned_in_text(
        case.prediction, Explanation(case.prediction.views[2].view, case.heatmaps[2]), KNEE.label
    )
    assert text.details[0].endswith("(fused AP+LAT)")
    assert "LAT view" in text.details[1]


def test_fused_group_without_fused_views_combines_every_image(phantoms: dict[str, Path]) -> None:
    case = relateral_case(phantoms["knee"], KNEE)
    prediction = replace(case.prediction, fused_views=())
    report = build_structured_report(prediction, case.sources, [], spec=KNEE, now=NOW)
    fused = measurement_groups(report)[-1]
    assert fused.tracking_identifier == "knee study-level AP+LAT+LAT fused"
    referenced = [image.referenced_sop_instance_uid for image in fused.source_images]
    assert referenced == [ds.SOPInstanceUID for ds in case.sources]


@pytest.mark.parametrize("fused_views", [(0, 3), (2, 2), (-1, 0)])
def test_fused_views_must_index_the_views(
    phantoms: dict[str, Path], fused_views: tuple[int, ...]
) -> None:
    case = relateral_case(phantoms["knee"], KNEE)
    prediction = replace(case.prediction, fused_views=fused_views)
    with pytest.raises(EncodeError, match="fused views"):
        build_structured_report(prediction, case.sources, [], spec=KNEE, now=NOW)


def test_version_2_says_it_supersedes_the_earlier_results(
    phantoms: dict[str, Path], strict_reading: None
) -> None:
    first = standard_case(phantoms["knee"], "knee")
    second = standard_case(phantoms["knee"], "knee", version=2)
    assert supersede_texts(first.report) == []
    assert not any(
        "supersede" in str(item.get("TextValue", "")).lower() for item in walk(first.report)
    )
    (statement,) = supersede_texts(roundtrip(second.report))
    assert statement.startswith("Version 2 of this result: supersedes earlier orthonode results")
    assert "for this study and task" in statement
    # After the groups (TID 1500 row 10 follows the Imaging Measurements container).
    names = [item.ConceptNameCodeSequence[0].CodeValue for item in second.report.ContentSequence]
    assert names.index("C0034375") == len(names) - 1 and "126010" in names
    # highdicom still reads the groups back, the same as version 1's.
    assert [evaluation(g).value for g in measurement_groups(second.report)] == [
        evaluation(g).value for g in measurement_groups(first.report)
    ]
    third = standard_case(phantoms["hip"], "hip", version=3)
    assert supersede_texts(third.report)[0].startswith("Version 3 of this result")


def test_version_below_1_is_rejected(phantoms: dict[str, Path]) -> None:
    sources, paths, _ = read_sources(phantoms["hip"])
    prediction = make_prediction("hip", sources, paths, ["AP"], [(0.2, 0.8)], None)
    with pytest.raises(EncodeError, match="version"):
        build_structured_report(prediction, sources, [], spec=HIP, version=0, now=NOW)
    display = display_image(sources[0])
    explanation = Explanation(prediction.views[0].view, np.zeros_like(display))
    with pytest.raises(EncodeError, match="version"):
        build_secondary_capture(sources[0], display, explanation, prediction, spec=HIP, version=0)


def test_a_spec_of_another_task_is_rejected(phantoms: dict[str, Path]) -> None:
    sources, paths, _ = read_sources(phantoms["hip"])
    prediction = make_prediction("hip", sources, paths, ["AP"], [(0.2, 0.8)], None)
    display = display_image(sources[0])
    explanation = Explanation(prediction.views[0].view, np.zeros_like(display))
    with pytest.raises(EncodeError, match=r"'knee'.*'hip'"):
        build_structured_report(prediction, sources, [], spec=KNEE, now=NOW)
    with pytest.raises(EncodeError, match=r"'knee'.*'hip'"):
        build_secondary_capture(sources[0], display, explanation, prediction, spec=KNEE)
    # Same codes, other name: still another task.
    renamed = HIP.model_copy(update={"name": "hip-2"})
    with pytest.raises(EncodeError, match="hip-2"):
        build_structured_report(prediction, sources, [], spec=renamed, now=NOW)


# -- not applicable ----------------------------------------------------------------------------
NOT_APPLICABLE_CODE = ("385432009", "SCT")
LOOSENING_CALLS = {"52101004", "272519000"}  # present / absent (SCT)
DETAILS = {
    "anatomy": "anatomy other 0.93, hip 0.04",
    "view": "view AP 0.97, routed as LAT",
    "no-implant": "implant 0.02 < 0.31",
    "out-of-distribution": "OOD score 41.7 > 25.0",
}
# The score that decided and its threshold, and how the Comment writes them.
SCORES = {
    "anatomy": (0.93, 0.9),
    "view": (0.97, 0.9),
    "no-implant": (0.02, 0.31),
    "out-of-distribution": (41.7, 25.0),
}
SCORE_TEXTS = {
    "anatomy": "probability of the other anatomy 93%, threshold 90%",
    "view": "probability of the other view 97%, threshold 90%",
    "no-implant": "implant probability 2%, threshold 31%",
    "out-of-distribution": "out-of-distribution distance 41.7, threshold 25",
}
NA_DESCRIPTION = "NOT APPLICABLE"


@dataclass
class NotApplicableCase:
    """An SR of a study some (or all) of whose images the applicability stage excluded."""

    spec: TaskSpec
    sources: list[Dataset]  # analysed
    excluded: list[Dataset]  # not applicable, in the order of prediction.not_applicable
    prediction: Prediction
    report: Dataset


def not_applicable_case(
    folder: Path,
    task: str,
    reasons: Sequence[str],
    *,
    analysed: int = 0,
    version: int = 1,
    scored: bool = True,
) -> NotApplicableCase:
    """The set's images (and copies, as many as needed), the first ``analysed`` of them analysed
    as in :func:`standard_case` and the next ones excluded for ``reasons``, in that order (with
    :data:`SCORES` unless not ``scored``)."""
    sources, paths, rows = read_sources(folder)
    views = [row["view"] for row in rows]
    while len(sources) < analysed + len(reasons):  # the last view sent again
        sources.append(second_lateral(sources[-1]))
        paths.append(paths[-1])
        views.append(views[-1])
    sources, paths, views = (x[: analysed + len(reasons)] for x in (sources, paths, views))
    n = len(classes_for(task))
    probabilities = [peaked(n, 1, 0.8 + 0.05 * i) for i in range(len(sources))]
    every = make_prediction(task, sources, paths, views, probabilities, None, threshold=0.6)
    excluded = tuple(
        NotApplicable(view.view, reason, DETAILS[reason], None, *SCORES[reason])
        if scored
        else NotApplicable(view.view, reason, DETAILS[reason])
        for view, reason in zip(every.views[analysed:], reasons, strict=True)
    )
    prediction = replace(
        every,
        views=every.views[:analysed],
        fused_probabilities=peaked(n, 1, 0.9) if analysed > 1 else None,
        not_applicable=excluded,
    )
    spec = builtin_task(task)
    report = build_structured_report(
        prediction,
        sources[:analysed],
        [],
        spec=spec,
        version=version,
        excluded_sources=sources[analysed:],
        now=NOW,
    )
    return NotApplicableCase(spec, sources[:analysed], sources[analysed:], prediction, report)


def qualitative_evaluations(sr: Dataset) -> list[Dataset]:
    """The items of the root's Qualitative Evaluations container (C0034375, UMLS), if any."""
    (container,) = [
        item
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "C0034375"
        and item.ConceptNameCodeSequence[0].CodingSchemeDesignator == "UMLS"
    ] or [Dataset()]
    return list(container.get("ContentSequence", []))


def code_of(item: Dataset, keyword: str) -> tuple[str, str, str]:
    code = item[keyword].value[0]
    return str(code.CodeValue), str(code.CodingSchemeDesignator), str(code.CodeMeaning)


def code_values(sr: Dataset) -> set[str]:
    """Every CodeValue in the SR (concept names, values, units, declarations)."""
    return {str(item.CodeValue) for item in walk(sr) if "CodeValue" in item}


def library_uids(sr: Dataset) -> list[str]:
    return [
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for entry in sr.ContentSequence
        if entry.ConceptNameCodeSequence[0].CodeValue == "111028"
        for item in walk(entry)
        if "ReferencedSOPSequence" in item
    ]


def evidence_uids(sr: Dataset) -> set[str]:
    report = hd.sr.srread(io.BytesIO(to_bytes(sr)))
    return {str(uid) for _, _, uid, _ in report.get_evidence(current_procedure_only=True)}


def reason_items(sr: Dataset) -> list[tuple[str, str, str]]:
    return [
        code_of(item, "ConceptCodeSequence")
        for item in qualitative_evaluations(sr)
        if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeValue == "NA-REASON"
    ]


def all_comments(sr: Dataset) -> list[str]:
    return [
        str(item.TextValue)
        for item in qualitative_evaluations(sr)
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "121106"
    ]


def is_statement(text: str) -> bool:
    """The study's result or the warning, which every SR states before its other comments."""
    return text.startswith(WARNING_STATEMENT) or any(
        text.startswith(f"{spec.label}: ") for spec in (*map(builtin_task, TASKS), knee_oa_spec())
    )


def comments(sr: Dataset) -> list[str]:
    """The comments on the images not answered on (and supersede notes): no statements."""
    return [text for text in all_comments(sr) if not is_statement(text)]


def assert_no_result(case: NotApplicableCase) -> None:
    """No class, probability, certainty, undetermined or loosening call anywhere."""
    values = code_values(case.report)
    assert values.isdisjoint(info.code_value for info in case.prediction.classes)
    assert values.isdisjoint({UNDETERMINED, *LOOSENING_CALLS})
    assert "111012" not in values  # Certainty of Finding
    assert "126010" not in values  # no Imaging Measurements container at all
    for item in walk(case.report):
        if item.get("ValueType") == "NUM":  # only the Image Library's pixel counts and spacing
            assert item.ConceptNameCodeSequence[0].CodeValue in {
                "110910",
                "110911",
                "111026",
                "111066",
            }
            unit = item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
            assert unit.CodeValue != "%"


def test_every_reason_has_a_short_readable_code() -> None:
    assert tuple(NOT_APPLICABLE_REASON_CODES) == NOT_APPLICABLE_REASONS
    values = [code.value for code in NOT_APPLICABLE_REASON_CODES.values()]
    assert len(set(values)) == len(values)
    for code in [*NOT_APPLICABLE_REASON_CODES.values(), NOT_APPLICABLE_REASON]:
        assert code.scheme == PRIVATE_SCHEME
        assert 0 < len(code.value) <= 16 and 0 < len(code.meaning) <= 64
    assert (NOT_APPLICABLE.value, NOT_APPLICABLE.scheme) == NOT_APPLICABLE_CODE
    assert NOT_APPLICABLE.meaning == "Not applicable"


def test_not_applicable_text_names_the_image_and_what_was_measured(
    phantoms: dict[str, Path],
) -> None:
    case = not_applicable_case(phantoms["knee"], "knee", ["no-implant"], analysed=1)
    (item,) = case.prediction.not_applicable
    assert not_applicable_text(item, 2) == (
        "LAT image 2 not applicable: no implant detected (implant 0.02 < 0.31)"
    )
    assert not_applicable_text(replace(item, detail=" "), 2) == (
        "LAT image 2 not applicable: no implant detected"
    )
    with pytest.raises(EncodeError, match="'blurred'"):
        not_applicable_text(replace(item, reason="blurred"), 2)


def test_not_applicable_score_is_written_as_the_sr_writes_it(phantoms: dict[str, Path]) -> None:
    """Probabilities in percent (rounded to 0.01), the distance as is; each with its threshold."""
    case = not_applicable_case(phantoms["knee"], "knee", ["no-implant"], analysed=1)
    (item,) = case.prediction.not_applicable
    for reason in NOT_APPLICABLE_REASONS:
        scored = replace(item, reason=reason, score=SCORES[reason][0], threshold=SCORES[reason][1])
        assert not_applicable_score(scored) == SCORE_TEXTS[reason]
    assert not_applicable_score(replace(item, score=0.123456, threshold=None)) == (
        "implant probability 12.35%"
    )
    assert not_applicable_score(replace(item, score=np.float32(0.5), threshold=0.25)) == (
        "implant probability 50%, threshold 25%"
    )
    ood = replace(item, reason="out-of-distribution", score=123.456, threshold=1e7)
    assert not_applicable_score(ood) == "out-of-distribution distance 123.46, threshold 10000000"
    assert not_applicable_score(replace(item, score=None, threshold=0.31)) is None
    assert not_applicable_score(replace(item, reason="blurred")) is None


def test_not_applicable_series_description_says_so_and_fits() -> None:
    assert series_description("spine", "SR", demo=True, not_applicable=True) == (
        "AI spine SR - NOT APPLICABLE - NOT FOR DIAGNOSTIC USE - DEMO"
    )
    assert series_description("knee", "SR", demo=False, not_applicable=True) == (
        "AI knee SR - NOT APPLICABLE - NOT FOR DIAGNOSTIC USE"
    )
    # Unchanged for a study with a result.
    assert series_description("spine", "SR", demo=True) == (
        "AI spine SR - NOT FOR DIAGNOSTIC USE - DEMO WEIGHTS"
    )
    longest = "a" + "-b" * 15 + "c"  # 32 characters, the longest task name
    for task in (*TASKS, "knee-oa", longest):
        for demo in (True, False):
            text = series_description(task, "SR", demo, not_applicable=True)
            assert len(text) <= 64 and "  " not in text, text
            assert " SR - NOT APPLICABLE - NOT FOR DIAGNOSTIC USE" in text, text
            assert text.endswith(" - DEMO") is demo, text
            assert "\\" not in text and text.isprintable()  # a valid LO
    assert series_description(longest, "SR", True, not_applicable=True) == (
        "AI a-b-b-b-b SR - NOT APPLICABLE - NOT FOR DIAGNOSTIC USE - DEMO"
    )


def test_not_applicable_image_without_a_score_has_the_comment_alone(
    phantoms: dict[str, Path],
) -> None:
    case = not_applicable_case(phantoms["knee"], "knee", ["no-implant", "view"], scored=False)
    assert comments(case.report) == [
        "AP image 1 not applicable: no implant detected (implant 0.02 < 0.31)",
        "LAT image 2 not applicable: view does not match the expected view "
        "(view AP 0.97, routed as LAT)",
    ]
    # A threshold without its score says nothing either; a score without a threshold, itself.
    first, second = case.prediction.not_applicable
    partial = (replace(first, threshold=0.31), replace(second, score=0.97))
    report = build_structured_report(
        replace(case.prediction, not_applicable=partial),
        [],
        [],
        spec=KNEE,
        excluded_sources=case.excluded,
        now=NOW,
    )
    assert [text.split("; ", 1)[1:] for text in comments(report)] == [
        [],
        ["probability of the other view 97%"],
    ]


@pytest.mark.parametrize("reason", NOT_APPLICABLE_REASONS)
@pytest.mark.parametrize("task", TASKS)
def test_not_applicable_sr_says_why_and_gives_no_result(
    phantoms: dict[str, Path], task: str, reason: str, strict_reading: None
) -> None:
    """Every image excluded for ``reason`` (knee, spine: AP and LAT; hip: its AP)."""
    count = 1 if task == "hip" else 2
    case = not_applicable_case(phantoms[task], task, [reason] * count)
    assert not case.prediction.applicable
    sr = roundtrip(case.report)
    assert_no_result(case)
    # highdicom reads it back: a TID 1500 report without measurement groups.
    assert read_report(sr).get_image_measurement_groups() == []
    dataset = hd.sr.Comprehensive3DSR.from_dataset(sr)
    report = hd.sr.MeasurementReport.from_sequence([dataset])
    assert report.get_image_measurement_groups() == []
    (observer,) = report.get_observer_contexts()
    assert observer.observer_identifying_attributes.uid == DEVICE_UID
    # The task's evaluation is Not applicable, then the reason (once), then each image's detail.
    items = qualitative_evaluations(sr)
    evaluation = case.spec.evaluation
    assert items[0].ValueType == "CODE"
    assert code_of(items[0], "ConceptNameCodeSequence") == (
        evaluation.value,
        evaluation.scheme,
        evaluation.meaning,
    )
    assert code_of(items[0], "ConceptCodeSequence") == ("385432009", "SCT", "Not applicable")
    code = NOT_APPLICABLE_REASON_CODES[reason]
    assert reason_items(sr) == [(code.value, code.scheme, code.meaning)]
    views = [item.view.view for item in case.prediction.not_applicable]
    assert comments(sr) == [
        f"{view} image {number} not applicable: {code.meaning[0].lower()}{code.meaning[1:]} "
        f"({DETAILS[reason]}); {SCORE_TEXTS[reason]}"
        for number, view in enumerate(views, start=1)
    ]
    # ... and, second, what the content says of its use (demo weights here).
    assert items[1].ValueType == "TEXT"
    assert str(items[1].TextValue) == (
        f"{WARNING_STATEMENT}; DEMO WEIGHTS trained on synthetic phantoms, not for clinical use"
    )
    assert len(items) == 3 + count  # nothing else: no supersede comment in version 1
    # The excluded images are still in the Image Library and the evidence.
    excluded = [ds.SOPInstanceUID for ds in case.excluded]
    assert library_uids(sr) == excluded
    assert evidence_uids(sr) == set(excluded)
    # The same document otherwise: header from the first excluded image, same series wording.
    source = case.excluded[0]
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyID", "AccessionNumber"):
        assert sr[keyword].value == source[keyword].value, keyword
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesDescription == series_description(task, "SR", demo=True, not_applicable=True)
    assert NA_DESCRIPTION in sr.SeriesDescription and len(sr.SeriesDescription) <= 64
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert PRIVATE_SCHEME in declared_schemes(sr)
    assert undeclared_private_schemes(sr) == set()


def test_two_images_not_applicable_for_different_reasons(phantoms: dict[str, Path]) -> None:
    case = not_applicable_case(phantoms["knee"], "knee", ["no-implant", "view"])
    assert_no_result(case)
    no_implant, view = (NOT_APPLICABLE_REASON_CODES[r] for r in ("no-implant", "view"))
    # One code per distinct reason, in the order the applicability stage asks.
    assert [value for value, _, _ in reason_items(case.report)] == [view.value, no_implant.value]
    assert comments(case.report) == [
        "AP image 1 not applicable: no implant detected (implant 0.02 < 0.31); "
        "implant probability 2%, threshold 31%",
        "LAT image 2 not applicable: view does not match the expected view "
        "(view AP 0.97, routed as LAT); probability of the other view 97%, threshold 90%",
    ]
    assert library_uids(case.report) == [ds.SOPInstanceUID for ds in case.excluded]


def test_hip_not_applicable_never_calls_loosening(phantoms: dict[str, Path]) -> None:
    for reasons in (["no-implant"], ["anatomy", "out-of-distribution"]):
        case = not_applicable_case(phantoms["hip"], "hip", reasons)
        assert_no_result(case)
        assert code_values(case.report).isdisjoint(LOOSENING_CALLS)
        (statement, *_) = qualitative_evaluations(case.report)
        assert code_of(statement, "ConceptNameCodeSequence")[0] == "LOOSENING"
        assert code_of(statement, "ConceptCodeSequence")[0] == "385432009"


def test_partly_not_applicable_reports_the_analysed_and_lists_the_excluded(
    phantoms: dict[str, Path], strict_reading: None
) -> None:
    """Knee AP analysed, LAT excluded; and AP + LAT analysed (fused), a second LAT excluded."""
    one = not_applicable_case(phantoms["knee"], "knee", ["no-implant"], analysed=1)
    sr = roundtrip(one.report)
    (group,) = measurement_groups(sr)
    assert group.tracking_identifier == "knee AP image 1"
    assert evaluation(group).value == one.prediction.classes[1].code_value
    assert group_images(group) == [one.sources[0].SOPInstanceUID]
    code = NOT_APPLICABLE_REASON_CODES["no-implant"]
    assert reason_items(sr) == [(code.value, code.scheme, code.meaning)]
    assert comments(sr) == [
        "LAT image 2 not applicable: no implant detected (implant 0.02 < 0.31); "
        "implant probability 2%, threshold 31%"
    ]
    # The study has a result: its Series Description is that of any other SR.
    assert sr.SeriesDescription == series_description("knee", "SR", demo=True)
    assert NA_DESCRIPTION not in sr.SeriesDescription
    assert NOT_APPLICABLE_CODE[0] not in code_values(sr)  # the study has a result
    every = [one.sources[0].SOPInstanceUID, one.excluded[0].SOPInstanceUID]
    assert library_uids(sr) == every
    assert evidence_uids(sr) == set(every)
    # The groups of the analysed images are those of a study without the excluded one.
    alone = build_structured_report(
        replace(one.prediction, not_applicable=()), one.sources, [], spec=KNEE, now=NOW
    )
    assert [evaluation(g).value for g in measurement_groups(alone)] == [evaluation(group).value]

    two = not_applicable_case(phantoms["knee"], "knee", ["out-of-distribution"], analysed=2)
    groups = measurement_groups(two.report)
    assert [g.tracking_identifier for g in groups] == [
        "knee AP image 1",
        "knee LAT image 2",
        "knee study-level AP+LAT fused",
    ]
    fused = {image.referenced_sop_instance_uid for image in groups[-1].source_images}
    assert fused == {ds.SOPInstanceUID for ds in two.sources}
    assert comments(two.report) == [
        "LAT image 3 not applicable: image outside the model's training data "
        "(OOD score 41.7 > 25.0); out-of-distribution distance 41.7, threshold 25"
    ]
    assert library_uids(two.report)[-1] == two.excluded[0].SOPInstanceUID


@pytest.mark.parametrize("analysed", [0, 1])
def test_not_applicable_sr_of_a_later_version_still_supersedes(
    phantoms: dict[str, Path], analysed: int
) -> None:
    case = not_applicable_case(
        phantoms["knee"], "knee", ["anatomy"] * (2 - analysed), analysed=analysed, version=2
    )
    texts = comments(case.report)
    assert texts[-1].startswith("Version 2 of this result: supersedes earlier orthonode results")
    assert [t for t in texts if "not applicable" in t] == texts[:-1] and len(texts) == 3 - analysed
    assert supersede_texts(case.report)[-1] == texts[-1]
    assert len(reason_items(case.report)) == 1
    # One Qualitative Evaluations container, the last item of the root.
    names = [item.ConceptNameCodeSequence[0].CodeValue for item in case.report.ContentSequence]
    assert names.count("C0034375") == 1 and names[-1] == "C0034375"


def test_not_applicable_sr_is_deterministic(phantoms: dict[str, Path]) -> None:
    case = not_applicable_case(phantoms["hip"], "hip", ["no-implant"])

    def build() -> bytes:
        report = build_structured_report(
            case.prediction,
            [],
            [],
            spec=HIP,
            excluded_sources=case.excluded,
            instance_uid="2.25.5",
            series_uid="2.25.6",
            now=NOW,
        )
        return to_bytes(report)

    assert build() == build()


def test_excluded_sources_must_match_the_not_applicable_images(phantoms: dict[str, Path]) -> None:
    case = not_applicable_case(phantoms["knee"], "knee", ["no-implant", "view"])
    prediction, excluded = case.prediction, case.excluded

    def build(p: Prediction, sources: Sequence[Dataset], others: Sequence[Dataset]) -> Dataset:
        return build_structured_report(p, sources, [], spec=KNEE, excluded_sources=others)

    with pytest.raises(EncodeError, match="1 excluded source"):
        build(prediction, [], excluded[:1])
    with pytest.raises(EncodeError, match="excluded source 0"):
        build(prediction, [], list(reversed(excluded)))
    with pytest.raises(EncodeError, match="no source image"):
        build(replace(prediction, not_applicable=()), [], [])
    unknown = (
        replace(prediction.not_applicable[0], reason="blurred"),
        prediction.not_applicable[1],
    )
    with pytest.raises(EncodeError, match="'blurred'"):
        build(replace(prediction, not_applicable=unknown), [], excluded)
    with pytest.raises(EncodeError, match="fused"):
        build(replace(prediction, fused_probabilities=(1.0,)), [], excluded)
    # An applicable prediction still needs its analysed sources, and an image is one or other.
    partly = not_applicable_case(phantoms["knee"], "knee", ["view"], analysed=1)
    with pytest.raises(EncodeError, match="0 source"):
        build(partly.prediction, [], partly.excluded)
    ap = partly.prediction.views[0].view
    twice = replace(partly.prediction, not_applicable=(NotApplicable(ap, "view", ""),))
    with pytest.raises(EncodeError, match="both analysed and excluded"):
        build(twice, partly.sources, partly.sources)


@pytest.fixture(scope="module")
def not_applicable_files(
    phantoms: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Not-applicable SRs on disk (every task and reason, two reasons, partly, version 2), and a
    normal SR per task to compare the validators' warnings with."""
    folder = tmp_path_factory.mktemp("not-applicable")
    reports: dict[str, Dataset] = {}
    for task in TASKS:
        reports[f"{task}-normal"] = standard_case(phantoms[task], task).report
        for reason in NOT_APPLICABLE_REASONS:
            reasons = [reason] * (1 if task == "hip" else 2)
            reports[f"{task}-{reason}"] = not_applicable_case(phantoms[task], task, reasons).report
    for name, task, reasons, analysed, version in [
        ("knee-two-reasons-v2", "knee", ["no-implant", "view"], 0, 2),
        ("hip-two-reasons", "hip", ["anatomy", "out-of-distribution"], 0, 1),
        ("knee-partly-v2", "knee", ["no-implant"], 1, 2),
        ("spine-partly", "spine", ["view"], 2, 1),
    ]:
        case = not_applicable_case(
            phantoms[task], task, reasons, analysed=analysed, version=version
        )
        reports[name] = case.report
    paths = {}
    for name, report in reports.items():
        paths[name] = folder / f"{name}.dcm"
        report.save_as(paths[name], enforce_file_format=True)
    return paths


def validator_output(command: list[str]) -> list[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    return (result.stdout + result.stderr).splitlines()


def problems(output: list[str]) -> set[str]:
    """The Error and Warning lines of a validator, without item positions ("1.9.2.14")."""
    return {
        re.sub(r"^(Warning|Error): [0-9.]+: ", r"\1: ", line.strip())
        for line in output
        if line.startswith(("Error", "Warning"))
    }


def not_applicable_names(files: dict[str, Path]) -> list[str]:
    return [name for name in files if not name.endswith("-normal")]


def test_not_applicable_srs_pass_dciodvfy_and_dsrdump(
    not_applicable_files: dict[str, Path],
) -> None:
    dciodvfy, dsrdump = require_tool("dciodvfy"), require_tool("dsrdump")
    normal = {
        task: problems(validator_output([dciodvfy, str(not_applicable_files[f"{task}-normal"])]))
        for task in TASKS
    }
    assert not any(line.startswith("Error") for lines in normal.values() for line in lines)
    for name in not_applicable_names(not_applicable_files):
        path = str(not_applicable_files[name])
        task = name.split("-")[0]
        assert problems(validator_output([dciodvfy, path])) <= normal[task], name  # none new
        result = subprocess.run([dsrdump, "-q", path], capture_output=True, text=True)
        assert result.returncode == 0 and not result.stderr.strip(), (name, result.stderr)
        full = subprocess.run(
            [dsrdump, "-q", "+Pl", "+Pc", path], capture_output=True, text=True
        ).stdout
        assert "Imaging Measurement Report" in full
        assert '(C0034375,UMLS,"Qualitative Evaluations")' in full
        assert ('(385432009,SCT,"Not applicable")' in full) is ("partly" not in name), name
        assert '(NA-REASON,99ORTHONODE,"Reason not applicable")' in full
        assert "not applicable: " in full and ", threshold " in full, name  # score, threshold


@pytest.mark.slow
def test_not_applicable_srs_pass_pixelmeds_validator(not_applicable_files: dict[str, Path]) -> None:
    """Fully not applicable for the four reasons (two SRs with two each, one with a supersede
    comment) and partly not applicable: no error; the fully not-applicable SRs not even a
    warning, the partly one only the warning a normal SR has on each group's evaluation."""
    require_tool("java")
    if not Path(PIXELMED_SR_VALIDATOR[-2]).exists():
        pytest.skip("pixelmed.jar not installed")
    names = ["knee-two-reasons-v2", "hip-two-reasons", "knee-partly-v2"]
    commands = [[*PIXELMED_SR_VALIDATOR, str(not_applicable_files[name])] for name in names]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        outputs = dict(zip(names, pool.map(validator_output, commands), strict=True))
    for name, output in outputs.items():
        assert "Found Root Template TID_1500 (MeasurementReport)" in output, name  # it validated
        found = problems(output)
        assert not any(line.startswith("Error") for line in found), (name, found)
        if "partly" in name:
            for line in found:  # the evaluation item of the analysed group (a normal SR has it)
                assert '(125007,DCM,"Measurement Group")/CODE (IMPLANT-MODEL' in line, line
                assert line.endswith("Content Item not in template"), line
        else:
            assert found == set(), (name, found)


# -- Secondary Capture -------------------------------------------------------------------------
def radiograph(rgb: np.ndarray, rows: int, columns: int, *, demo: bool = True) -> np.ndarray:
    """The radiograph's part of an SC canvas: below the banner band, above the details."""
    banner = (BANNER, DEMO_BANNER) if demo else (BANNER,)
    top = band_layout(rows, columns, BurnedInText(banner=banner, details=())).top
    assert rgb.shape[0] > top + rows  # the details band lies below the image
    return rgb[top : top + rows]


@pytest.mark.parametrize("task", TASKS)
def test_sc_attributes(phantoms: dict[str, Path], task: str, strict_reading: None) -> None:
    case = standard_case(phantoms[task], task)
    series = {sc.SeriesInstanceUID for sc in case.secondary_captures}
    assert len(series) == 1 and series.isdisjoint({ds.SeriesInstanceUID for ds in case.sources})
    for number, (sc, source) in enumerate(
        zip(case.secondary_captures, case.sources, strict=True), start=1
    ):
        read = roundtrip(sc)
        assert read.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert read.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert read.Modality == "OT"
        assert (read.PhotometricInterpretation, read.SamplesPerPixel) == ("RGB", 3)
        assert read.PlanarConfiguration == 0
        assert (read.BitsAllocated, read.BitsStored, read.HighBit) == (8, 8, 7)
        # The radiograph whole, on a canvas extended above and below for the text.
        assert read.Columns == source.Columns and read.Rows > source.Rows
        assert read.pixel_array.shape == (read.Rows, source.Columns, 3)
        assert read.ConversionType == "WSD"
        assert read.BurnedInAnnotation == "YES"
        assert list(read.ImageType) == ["DERIVED", "SECONDARY", "OTHER"]
        assert list(read.PatientOrientation) == list(source.PatientOrientation)
        if source.ImageLaterality in ("R", "L"):
            assert read.Laterality == source.ImageLaterality
        else:
            assert "Laterality" not in read
        for keyword in (
            "WindowCenter",
            "WindowWidth",
            "RescaleSlope",
            "RescaleIntercept",
            "RescaleType",
            "VOILUTSequence",
            "ModalityLUTSequence",
            "VOILUTFunction",
            "PresentationLUTShape",
        ):
            assert keyword not in read, keyword
        assert read.StudyInstanceUID == source.StudyInstanceUID
        assert read.SOPInstanceUID != source.SOPInstanceUID
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
            assert read[keyword].value == source[keyword].value
        for keyword in ("StudyID", "AccessionNumber", "StudyDate", "StudyTime"):
            assert read[keyword].value == source[keyword].value
        assert (read.SeriesNumber, read.InstanceNumber) == (9002, number)
        assert "NOT FOR DIAGNOSTIC USE" in read.SeriesDescription
        (reference,) = read.SourceImageSequence
        assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert reference.ReferencedSOPClassUID == source.SOPClassUID
        assert reference.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        assert reference.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "DCM"
        (image,) = read.ReferencedImageSequence
        assert image.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert read.ContentDate == "20250304" and read.DateOfSecondaryCapture == "20250304"
        (algorithm,) = [item for item in read.ContributingEquipmentSequence if "DeviceUID" in item]
        assert algorithm.DeviceUID == DEVICE_UID


def test_sc_pixels_show_banner_heatmap_and_colour_bar(phantoms: dict[str, Path]) -> None:
    case = standard_case(phantoms["knee"], "knee")
    sc = case.secondary_captures[0]
    canvas = sc.pixel_array.astype(int)
    grey = np.rint(case.displays[0] * 255).astype(int)
    rows, columns = grey.shape
    rgb = radiograph(canvas, rows, columns)
    # Banner: a band above the image, written on in yellow.
    top = canvas[: canvas.shape[0] - rows][: rows // 8]
    yellow = (top[..., 0] > 150) & (top[..., 1] > 150) & (top[..., 2] < 100)
    assert yellow.sum() > 20  # the banner text
    # No pixel of the radiograph is hidden: wherever there is no heat (and not on the dashed
    # outline of the analysed region), it is the display.
    cold = (case.heatmaps[0] < 0.15) & ~(rgb == 220).all(axis=-1)
    assert cold.mean() > 0.5
    assert (rgb[cold] == grey[cold][:, None]).all()
    # Heatmap: coloured at the blob's centre ...
    centre = rgb[rows // 2 - 5 : rows // 2 + 5, columns // 2 - 5 : columns // 2 + 5]
    assert (np.ptp(centre, axis=2) > 30).all()
    # ... and plain grey far from it (left edge, mid-height: no panel, no heat).
    assert case.heatmaps[0][rows // 2, 0] < 1e-3
    far = rgb[rows // 3 : 2 * rows // 3, :8]
    assert (far[..., 0] == far[..., 1]).all() and (far[..., 1] == far[..., 2]).all()
    assert (far[..., 0] == grey[rows // 3 : 2 * rows // 3, :8]).all()
    # Colour bar: both ends of the colour map are drawn in the band below the image.
    bottom = canvas[-rows // 8 :]
    red = (bottom[..., 0] > 150) & (bottom[..., 1] < 60) & (bottom[..., 2] < 60)
    blue = (bottom[..., 2] > 150) & (bottom[..., 0] < 60) & (bottom[..., 1] < 60)
    assert red.sum() > 5 and blue.sum() > 5


def test_sc_of_monochrome1_source_uses_the_displayed_image(tmp_path: Path) -> None:
    folder = make_set(tmp_path, "m1", task="hip", patients=1, seed=2, photometric="MONOCHROME1")
    sources, paths, _ = read_sources(folder)
    assert sources[0].PhotometricInterpretation == "MONOCHROME1"
    prediction = make_prediction("hip", sources, paths, ["AP"], [(0.2, 0.8)], None)
    case = build_case(sources, paths, prediction)
    rows, columns = case.displays[0].shape
    rgb = radiograph(case.secondary_captures[0].pixel_array, rows, columns)
    far = rgb[rows // 3 : 2 * rows // 3, :8, 0].astype(int)
    expected = np.rint(case.displays[0][rows // 3 : 2 * rows // 3, :8] * 255)
    assert (far == expected).all()  # bright = dense, as displayed, not the stored values


def test_burned_in_text_names_everything_but_the_patient(phantoms: dict[str, Path]) -> None:
    for task in TASKS:
        case = standard_case(phantoms[task], task)
        prediction = case.prediction
        for source, view in zip(case.sources, prediction.views, strict=True):
            label = builtin_task(task).label
            text = burned_in_text(prediction, Explanation(view.view, case.heatmaps[0]), label)
            lines = [*text.banner, *text.details]
            joined = "\n".join(lines)
            assert text.banner[0] == BANNER == "AI-GENERATED — NOT FOR DIAGNOSTIC USE"
            assert DEMO_BANNER in text.banner and "DEMO WEIGHTS" in DEMO_BANNER
            top = prediction.classes[prediction.predicted_index]
            assert top.code_meaning in joined
            # One rounding rule with the SR: whole percent, a space before the sign.
            assert f"{top.code_meaning} {percent_text(prediction.certainty)}" in joined
            assert prediction.model.name in joined and prediction.model.version in joined
            assert "Grad-CAM" in joined
            identifiers = [
                str(source.PatientName),
                *str(source.PatientName).split("^"),
                source.PatientID,
                source.PatientBirthDate,
                source.AccessionNumber,
            ]
            for identifier in identifiers:
                assert identifier and identifier not in joined, identifier


def test_burned_in_text_undetermined_and_not_demo(phantoms: dict[str, Path]) -> None:
    case = standard_case(phantoms["hip"], "hip", abstain=True)
    prediction = replace(case.prediction, model=replace(case.prediction.model, demo=False))
    explanation = Explanation(prediction.views[0].view, case.heatmaps[0], "Integrated gradients")
    text = burned_in_text(prediction, explanation, HIP.label)
    joined = "\n".join([*text.banner, *text.details])
    assert text.details[0] == (
        "Hip prosthesis loosening: Undetermined — best Present 55 %, below the 60 % threshold"
    )
    assert "Integrated gradients" in joined
    assert "DEMO" not in joined and text.banner == (BANNER,)


def test_sc_downscales_very_large_sources(phantoms: dict[str, Path]) -> None:
    sources, paths, _ = read_sources(phantoms["hip"])
    big = copy.deepcopy(sources[0])
    del big.PixelData  # only the geometry is read; the display is passed in
    big.Rows, big.Columns = 4100, 1000
    prediction = make_prediction("hip", [big], paths, ["AP"], [(0.2, 0.8)], None)
    display = np.linspace(0, 1, 4100 * 1000, dtype=np.float32).reshape(4100, 1000)
    heat = blob(4100, 1000, (2050, 500), 200)
    sc = build_secondary_capture(
        big, display, Explanation(prediction.views[0].view, heat), prediction, spec=HIP, now=NOW
    )
    # Factor 3, rounded up: the radiograph is 1367 x 334, with the bands above and below it.
    assert sc.Columns == 334
    assert radiograph(sc.pixel_array, 1367, 334).shape == (1367, 334, 3)
    assert "downscaled by 3" in sc.DerivationDescription


def test_sc_rejects_a_heatmap_off_the_grid_or_of_another_image(phantoms: dict[str, Path]) -> None:
    sources, paths, _ = read_sources(phantoms["hip"])
    prediction = make_prediction("hip", sources, paths, ["AP"], [(0.2, 0.8)], None)
    display = display_image(sources[0])
    wrong = Explanation(prediction.views[0].view, np.zeros((10, 10), dtype=np.float32))
    with pytest.raises(EncodeError, match="heatmap"):
        build_secondary_capture(sources[0], display, wrong, prediction, spec=HIP)
    right = Explanation(prediction.views[0].view, np.zeros_like(display))
    with pytest.raises(EncodeError, match="display"):
        build_secondary_capture(sources[0], display[:-1], right, prediction, spec=HIP)
    other = copy.deepcopy(sources[0])
    other.SOPInstanceUID = pydicom.uid.generate_uid()
    with pytest.raises(EncodeError, match="explanation is of"):
        build_secondary_capture(other, display, right, prediction, spec=HIP)


def test_sc_outlines_the_analysed_region_and_names_the_operating_point(
    phantoms: dict[str, Path],
) -> None:
    sources, paths, _ = read_sources(phantoms["hip"])
    prediction = replace(
        make_prediction("hip", sources, paths, ["AP"], [(0.7, 0.3)], None, threshold=0.0),
        decision_threshold=0.25,
    )
    display = display_image(sources[0])
    rows = display.shape[0]
    region = RegionOfInterest(top=rows // 4, left=-10, side=rows // 2)  # past the left edge
    heat = np.zeros_like(display)
    explanation = Explanation(prediction.views[0].view, heat, region=region)
    sc = build_secondary_capture(sources[0], display, explanation, prediction, spec=HIP, now=NOW)
    rgb = radiograph(sc.pixel_array, *display.shape).astype(int)
    grey = np.rint(display * 255).astype(int)
    top_edge = rgb[rows // 4, : rows // 2 - 10]
    # Dashed light-grey edge: about half of its pixels changed to (220, 220, 220).
    drawn = (top_edge == 220).all(axis=1)
    assert 0.3 < drawn.mean() < 0.7
    # The left edge lies outside the image: nothing drawn at column 0 away from the top edge.
    assert (rgb[rows // 2, 0] == grey[rows // 2, 0]).all()
    assert "outlined" in sc.DerivationDescription
    text = burned_in_text(prediction, explanation, HIP.label)
    # P(loose) 30 % reaches the 25 % operating point: a decision, with both numbers shown.
    assert text.details[0] == (
        "Hip prosthesis loosening: Present — probability 30 % (called present at ≥ 25 %)"
    )
    assert "dashed box" in text.details[1]


def test_sc_of_a_later_version_says_it_supersedes(phantoms: dict[str, Path]) -> None:
    first = standard_case(phantoms["hip"], "hip")
    second = standard_case(phantoms["hip"], "hip", version=2)
    prediction = first.prediction
    explanation = Explanation(prediction.views[0].view, first.heatmaps[0])
    one = burned_in_text(prediction, explanation, HIP.label)
    two = burned_in_text(prediction, explanation, HIP.label, version=2)
    assert two.details[: len(one.details)] == one.details
    assert two.details[len(one.details) :] == ("Result version 2 — supersedes earlier results",)
    assert not any("supersede" in line for line in [*one.banner, *one.details])
    # The extra line is drawn: the band below the image grew; the image and the banner are
    # the same pixels.
    a = first.secondary_captures[0].pixel_array.astype(int)
    b = second.secondary_captures[0].pixel_array.astype(int)
    rows, columns = first.displays[0].shape
    assert b.shape[0] > a.shape[0]
    top = band_layout(rows, columns, one).top
    assert np.array_equal(a[: top + rows], b[: top + rows])
    assert not np.array_equal(a[-a.shape[0] // 8 :], b[-a.shape[0] // 8 :])
    assert first.secondary_captures[0].SeriesDescription == (
        second.secondary_captures[0].SeriesDescription
    )


def test_sc_burns_in_the_label_of_the_spec(phantoms: dict[str, Path]) -> None:
    sources, paths, _ = read_sources(phantoms["hip"])
    prediction = make_prediction("hip", sources, paths, ["AP"], [(0.2, 0.8)], None)
    relabelled = HIP.model_copy(update={"label": "Cup and stem fixation"})
    explanation = Explanation(prediction.views[0].view, np.zeros((4, 4), dtype=np.float32))
    text = burned_in_text(prediction, explanation, relabelled.label)
    assert text.details[0] == "Cup and stem fixation: Present 80 %"
    display = display_image(sources[0])
    explanation = Explanation(prediction.views[0].view, np.zeros_like(display))
    default = build_secondary_capture(sources[0], display, explanation, prediction, spec=HIP)
    other = build_secondary_capture(sources[0], display, explanation, prediction, spec=relabelled)
    assert not np.array_equal(default.pixel_array, other.pixel_array)


# -- what a viewer draws and shows -------------------------------------------------------------
def region_points(group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations) -> np.ndarray:
    roi = group.roi
    assert roi is not None
    return np.asarray(roi.value, dtype=float)


def first_measurement(group: Group) -> tuple[str, float]:
    """The first NUM of a group: what OHIF's SR display writes first on the drawn region."""
    container = group[0]
    (first, *_) = [item for item in container.ContentSequence if item.ValueType == "NUM"]
    meaning = str(first.ConceptNameCodeSequence[0].CodeMeaning)
    return meaning, float(first.MeasuredValueSequence[0].NumericValue)


@pytest.mark.parametrize("task", TASKS)
def test_each_image_group_draws_the_region_the_classifier_read(
    phantoms: dict[str, Path], task: str, strict_reading: None
) -> None:
    case = standard_case(phantoms[task], task)
    roundtrip(case.report)
    groups = measurement_groups(case.report)
    per_image = groups[: len(case.sources)]
    assert len(per_image) == len(case.sources)
    for group, source, explanation in zip(per_image, case.sources, case.explanations, strict=True):
        assert isinstance(group, hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations)
        assert group.roi is not None and group.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        assert group_images(group) == [source.SOPInstanceUID]
        points = region_points(group)
        region = explanation.region
        assert region is not None and region.left < 0
        # A closed box, clipped to the image (the square starts past the left edge).
        assert points.shape == (5, 2) and (points[0] == points[-1]).all()
        columns, rows = points[:, 0], points[:, 1]
        assert (columns.min(), columns.max()) == (0.0, float(region.left + region.side))
        assert (rows.min(), rows.max()) == (float(region.top), float(region.top + region.side))
        assert columns.max() <= source.Columns and rows.max() <= source.Rows


@pytest.mark.parametrize("task", TASKS)
def test_each_image_has_a_saliency_peak_labelled_with_the_finding(
    phantoms: dict[str, Path], task: str
) -> None:
    case = standard_case(phantoms[task], task)
    peaks = peak_groups(case.report)
    assert len(peaks) == len(case.sources)
    for group, source, heat, view in zip(
        peaks, case.sources, case.heatmaps, case.prediction.views, strict=True
    ):
        assert group_images(group) == [source.SOPInstanceUID]
        row, column = np.unravel_index(int(np.argmax(heat)), heat.shape)
        assert region_points(group).tolist() == [[column + 0.5, row + 0.5]]
        assert group.method is not None and group.method.value == "130403"  # Grad-CAM
        assert str(group.tracking_identifier).endswith("saliency peak")
        assert group.get_qualitative_evaluations() == []  # the box's group makes the call
        assert group.finding_sites == []  # OHIF would print "363698007: ..." beside it
        best = int(np.argmax(view.probabilities))
        meaning, value = first_measurement(group)
        assert meaning == case.prediction.classes[best].code_meaning
        assert value == pytest.approx(100 * view.probabilities[best], abs=0.01)


def test_the_first_number_of_each_group_is_the_result(phantoms: dict[str, Path]) -> None:
    case = standard_case(phantoms["knee"], "knee")
    prediction = case.prediction
    probabilities = [v.probabilities for v in prediction.views]
    assert prediction.fused_probabilities is not None
    for group, probs in zip(
        measurement_groups(case.report),
        [*probabilities, prediction.fused_probabilities],
        strict=True,
    ):
        best = int(np.argmax(probs))
        assert first_measurement(group) == (
            prediction.classes[best].code_meaning,
            pytest.approx(round(100 * probs[best], 2)),
        )
        # Every class's probability is still there, most probable first after the call.
        names = [
            str(item.ConceptNameCodeSequence[0].CodeMeaning)
            for item in group[0].ContentSequence
            if item.ValueType == "NUM"
        ]
        assert sorted(names[:-1]) == sorted(info.code_meaning for info in prediction.classes)
        assert names[-1] == "Certainty of Finding"


def test_an_operating_point_is_stated_beside_the_probability(phantoms: dict[str, Path]) -> None:
    sources, paths, _ = read_sources(phantoms["hip"])
    prediction = replace(
        make_prediction("hip", sources, paths, ["AP"], [(0.56, 0.44)], None, threshold=0.0),
        decision_threshold=0.17,
    )
    case = build_case(sources, paths, prediction)
    (group,) = measurement_groups(case.report)
    numbers = [
        (str(item.ConceptNameCodeSequence[0].CodeMeaning), item.ConceptNameCodeSequence[0])
        for item in group[0].ContentSequence
        if item.ValueType == "NUM"
    ]
    assert [name for name, _ in numbers[:2]] == ["Present", "Called present at or above"]
    assert numbers[1][1].CodingSchemeDesignator == PRIVATE_SCHEME
    assert evaluation(group).meaning == "Present"  # 44 % ≥ 17 %: called present
    (text,) = [t for t in all_comments(case.report) if t.startswith("Hip prosthesis")]
    assert text == "Hip prosthesis loosening: Present — probability 44 % (called present at ≥ 17 %)"
    assert undeclared_private_schemes(case.report) == set()


@pytest.mark.parametrize("demo", [True, False])
def test_the_content_states_the_result_and_its_use_first(
    phantoms: dict[str, Path], demo: bool, strict_reading: None
) -> None:
    case = standard_case(phantoms["knee"], "knee")
    prediction = replace(case.prediction, model=replace(case.prediction.model, demo=demo))
    sr = roundtrip(build_structured_report(prediction, case.sources, [], spec=KNEE, now=NOW))
    assert sr.SpecificCharacterSet == "ISO_IR 192"  # "—" and "≥" survive the round trip
    first, second, *_ = all_comments(sr)
    best = prediction.classes[prediction.predicted_index]
    assert first == (
        f"Knee implant model: {best.code_meaning} {percent_text(prediction.certainty)} "
        "(study level, fused AP+LAT)"
    )
    assert second.startswith(WARNING_STATEMENT)
    assert ("DEMO WEIGHTS" in second) is demo


def test_sr_without_explanations_still_draws_the_whole_image(phantoms: dict[str, Path]) -> None:
    sources, paths, rows = read_sources(phantoms["knee"])
    n = len(classes_for("knee"))
    prediction = make_prediction(
        "knee", sources, paths, [r["view"] for r in rows], [peaked(n, 2, 0.9)] * 2, None
    )
    report = build_structured_report(prediction, sources, [], spec=KNEE, now=NOW)
    assert peak_groups(report) == []
    for group, source in zip(measurement_groups(report), sources, strict=True):
        assert isinstance(group, hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations)
        points = region_points(group)
        assert (points[:, 0].min(), points[:, 0].max()) == (0.0, float(source.Columns))
        assert (points[:, 1].min(), points[:, 1].max()) == (0.0, float(source.Rows))


def test_sr_rejects_explanations_of_other_images(phantoms: dict[str, Path]) -> None:
    case = standard_case(phantoms["knee"], "knee")
    with pytest.raises(EncodeError, match="explanation"):
        build_structured_report(
            case.prediction,
            case.sources,
            [],
            spec=KNEE,
            explanations=list(reversed(case.explanations)),
        )
    with pytest.raises(EncodeError, match="explanation"):
        build_structured_report(
            case.prediction, case.sources, [], spec=KNEE, explanations=case.explanations[:1]
        )


def test_the_fused_group_is_placed_on_the_frame_of_its_first_image(
    phantoms: dict[str, Path],
) -> None:
    """OHIF stops loading an SR at a group it cannot place on an image (a black viewport):
    the study-level result is inferred from the whole of the first image it combines."""
    case = standard_case(phantoms["knee"], "knee")
    fused = measurement_groups(case.report)[-1]
    assert isinstance(fused, hd.sr.MeasurementsAndQualitativeEvaluations)
    first, *rest = [item for item in fused[0].ContentSequence if item.ValueType == "NUM"]
    (scoord,) = first.ContentSequence
    assert (scoord.ValueType, scoord.RelationshipType, scoord.GraphicType) == (
        "SCOORD",
        "INFERRED FROM",
        "POLYLINE",
    )
    source = case.sources[0]
    corners = np.asarray(scoord.GraphicData, dtype=float).reshape(-1, 2)
    assert (corners.min(axis=0) == 0).all()
    assert corners.max(axis=0).tolist() == [float(source.Columns), float(source.Rows)]
    image = scoord.ContentSequence[0].ReferencedSOPSequence[0]
    assert image.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert all("ContentSequence" not in item for item in rest)  # one placement is enough
