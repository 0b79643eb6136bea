"""Unit tests of the saliency Segmentation (DICOM SEG) and of ``outputs.saliency``.

Every SEG is written to bytes and read back with pydicom's strict reading mode and with
highdicom's ``segread``: its one segment is the heatmap's high-saliency region on the source's
grid, it references its source as OHIF matches it (per-frame Source Image Sequence, Referenced
Series Sequence), it carries what OHIF's SEG viewport reads (shared Pixel Measures and Plane
Orientation) and the source's patient and study. The pipeline sends it beside or instead of the
Secondary Capture, and the SR lists it as evidence.
"""

from __future__ import annotations

import copy
import datetime as dt
import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.config import load_config
from dicom_node.domain import Explanation
from dicom_node.encode import build_segmentation, build_structured_report
from dicom_node.encode.seg import HIGH_SALIENCY_FRACTION, SEGMENT_LABEL, high_saliency_mask
from dicom_node.errors import ConfigError, EncodeError
from dicom_node.tasks import TaskSpec, builtin_task
from tests.conftest import make_set
from tests.unit.test_encode import NOW, Case, standard_case

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
DEMO_DESCRIPTION = "AI knee saliency SEG - NOT FOR DIAGNOSTIC USE - DEMO WEIGHTS"


def segment_case(
    case: Case, *, spec: TaskSpec | None = None, first_series_number: int = 9020
) -> list[Dataset]:
    """One SEG per source of ``case`` (its explanations), the pipeline's way: a series per
    source series, Series Number 9020 + k; ``spec`` defaults to the task's built-in one."""
    spec = spec or builtin_task(case.prediction.task)
    series = list(dict.fromkeys(ds.SeriesInstanceUID for ds in case.sources))
    segmentations = []
    for number, (source, explanation) in enumerate(
        zip(case.sources, case.explanations, strict=True), start=1
    ):
        segmentations.append(
            build_segmentation(
                source,
                explanation,
                case.prediction,
                spec=spec,
                series_number=first_series_number + series.index(source.SeriesInstanceUID),
                instance_number=number,
                instance_uid=pydicom.uid.generate_uid(entropy_srcs=[source.SOPInstanceUID]),
                series_uid=pydicom.uid.generate_uid(entropy_srcs=[source.SeriesInstanceUID]),
                now=NOW,
            )
        )
    return segmentations


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def strict_roundtrip(ds: Dataset) -> Dataset:
    """Write and read back with pydicom's strict validation, touching every value."""
    with pydicom.config.strict_reading():
        read = pydicom.dcmread(io.BytesIO(to_bytes(ds)))
        for element in read.iterall():
            _ = element.value
    return read


@pytest.fixture(scope="module")
def knee(tmp_path_factory: pytest.TempPathFactory) -> Case:
    folder = make_set(tmp_path_factory.mktemp("seg"), "knee", task="knee", patients=1, seed=1)
    return standard_case(folder, "knee")


# -- the object ------------------------------------------------------------------------------
def test_segmentation_round_trip_is_the_high_saliency_region(knee: Case) -> None:
    segmentations = segment_case(knee)
    assert len(segmentations) == len(knee.sources) == 2
    for seg, source, heatmap in zip(segmentations, knee.sources, knee.heatmaps, strict=True):
        read = strict_roundtrip(seg)
        assert read.SOPClassUID == SEG_CLASS and read.Modality == "SEG"
        assert read.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert (read.Rows, read.Columns, read.NumberOfFrames) == (source.Rows, source.Columns, 1)
        parsed = hd.seg.segread(io.BytesIO(to_bytes(seg)))
        assert parsed.segmentation_type == hd.seg.SegmentationTypeValues.BINARY
        assert parsed.get_segment_numbers() == [1]
        mask = parsed.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1])
        assert mask.shape == (1, source.Rows, source.Columns, 1)
        expected = heatmap >= HIGH_SALIENCY_FRACTION * heatmap.max()
        assert 0 < expected.sum() < expected.size  # a region, not nothing or everything
        assert np.array_equal(mask[0, :, :, 0].astype(bool), expected)
        # The region is around the blob's centre, where the heatmap peaks.
        rows, columns = np.nonzero(mask[0, :, :, 0])
        assert (
            abs(rows.mean() - source.Rows / 2) < 2 and abs(columns.mean() - source.Columns / 2) < 2
        )


def test_segment_codes_algorithm_and_labels(knee: Case) -> None:
    read = strict_roundtrip(segment_case(knee)[0])
    [segment] = read.SegmentSequence
    assert segment.SegmentNumber == 1 and segment.SegmentLabel == SEGMENT_LABEL
    [category] = segment.SegmentedPropertyCategoryCodeSequence
    assert (category.CodeValue, category.CodingSchemeDesignator) == ("130401", "DCM")
    [kind] = segment.SegmentedPropertyTypeCodeSequence
    assert (kind.CodeValue, kind.CodeMeaning) == ("130403", "Gradient-weighted class activation")
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    model = knee.prediction.model
    assert segment.SegmentAlgorithmName == model.name
    [algorithm] = segment.SegmentationAlgorithmIdentificationSequence
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (model.name, model.version)
    # The segment lies in the task's site, on the source's side.
    [region] = segment.AnatomicRegionSequence
    assert region.CodeValue == builtin_task("knee").site.value
    side = {"R": "24028007", "L": "7771000"}[knee.sources[0].ImageLaterality]
    assert region.AnatomicRegionModifierSequence[0].CodeValue == side
    assert "Laterality" not in read  # dciodvfy refuses the series' Laterality in a SEG
    assert read.SegmentationType == "BINARY"
    assert read.ContentLabel == "SALIENCY"
    assert str(read.ContentCreatorName) == "orthonode^"
    assert "NOT FOR DIAGNOSTIC USE" in read.ContentDescription
    assert read.SeriesDescription == DEMO_DESCRIPTION and len(read.SeriesDescription) <= 64
    assert read.SeriesNumber == 9020
    assert read.ImageType == ["DERIVED", "PRIMARY"]


@pytest.mark.parametrize(
    ("method", "code"),
    [("Grad-CAM", "130403"), ("Integrated gradients", "130404")],
)
def test_segment_type_is_the_explanation_method(knee: Case, method: str, code: str) -> None:
    explanation = replace(knee.explanations[0], method=method)
    seg = build_segmentation(
        knee.sources[0], explanation, knee.prediction, spec=builtin_task("knee"), now=NOW
    )
    [kind] = seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence
    assert kind.CodeValue == code
    assert method in seg.ContentDescription


def test_references_are_those_ohif_matches_on(knee: Case) -> None:
    for seg, source in zip(segment_case(knee), knee.sources, strict=True):
        read = strict_roundtrip(seg)
        [frame] = read.PerFrameFunctionalGroupsSequence
        [derivation] = frame.DerivationImageSequence
        [referenced] = derivation.SourceImageSequence
        assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert referenced.ReferencedSOPClassUID == source.SOPClassUID
        [series] = read.ReferencedSeriesSequence
        assert series.SeriesInstanceUID == source.SeriesInstanceUID
        assert [i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence] == [
            source.SOPInstanceUID
        ]
        shared = read.SharedFunctionalGroupsSequence[0]
        [measures] = shared.PixelMeasuresSequence
        assert [float(v) for v in measures.PixelSpacing] == [
            float(v) for v in source.ImagerPixelSpacing
        ]
        assert float(measures.SliceThickness) > 0
        [orientation] = shared.PlaneOrientationSequence
        assert [float(v) for v in orientation.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert read.PatientOrientation == source.PatientOrientation
        assert "FrameOfReferenceUID" not in read  # the DX has none; OHIF needs none


def test_patient_study_and_equipment_are_the_sources(knee: Case) -> None:
    source = knee.sources[0]
    read = strict_roundtrip(segment_case(knee)[0])
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
    ):
        assert read.get(keyword) == source.get(keyword), keyword
    assert read.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in knee.sources}
    assert read.SeriesInstanceUID != knee.secondary_captures[0].SeriesInstanceUID
    assert read.BodyPartExamined == source.BodyPartExamined
    model = knee.prediction.model
    [algorithm] = [
        item
        for item in read.ContributingEquipmentSequence
        if item.get("ManufacturerModelName") == model.name
    ]
    assert algorithm.DeviceUID == model.device_uid
    assert algorithm.SoftwareVersions == model.version
    assert algorithm.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert read.DeviceSerialNumber == model.device_uid
    assert read.ContentDate == NOW.strftime("%Y%m%d")
    assert read.InstanceCreationDate == NOW.strftime("%Y%m%d")


def test_a_rebuilt_segmentation_is_byte_identical(knee: Case) -> None:
    """Same UIDs and time, same bytes: no UID or time drawn inside (a job re-run after a crash
    sends the same object)."""
    first, second = segment_case(knee)[0], segment_case(knee)[0]
    assert to_bytes(first) == to_bytes(second)


def _acquisition_item(seg: Dataset) -> Dataset:
    [item] = [
        item
        for item in seg.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == "109101"
    ]
    return item


def test_the_acquisition_equipment_is_dated_by_the_source_or_not_at_all(knee: Case) -> None:
    spec = builtin_task("knee")
    source = knee.sources[0]
    seg = build_segmentation(source, knee.explanations[0], knee.prediction, spec=spec)
    assert _acquisition_item(seg).ContributionDateTime == source.AcquisitionDateTime
    dated = copy.deepcopy(source)
    del dated.AcquisitionDateTime
    dated.AcquisitionDate, dated.AcquisitionTime = "20240102", "030405"
    seg = build_segmentation(dated, knee.explanations[0], knee.prediction, spec=spec)
    assert _acquisition_item(seg).ContributionDateTime == "20240102030405"
    del dated.AcquisitionDate, dated.AcquisitionTime
    seg = build_segmentation(dated, knee.explanations[0], knee.prediction, spec=spec)
    # highdicom would date it at the wall clock: left out instead.
    assert "ContributionDateTime" not in _acquisition_item(seg)


def test_high_saliency_mask_threshold_and_degenerate_heatmaps() -> None:
    heat = np.array([[0.0, 0.39, 0.4], [0.79, 0.8, np.nan]], dtype=np.float32)
    assert high_saliency_mask(heat).tolist() == [[False, False, True], [True, True, False]]
    assert not high_saliency_mask(np.zeros((4, 5))).any()  # no saliency, no region
    assert not high_saliency_mask(np.full((3, 3), np.nan)).any()
    with pytest.raises(EncodeError, match="2-D"):
        high_saliency_mask(np.zeros((2, 2, 2)))


def test_a_heatmap_without_saliency_gives_one_empty_frame(knee: Case) -> None:
    explanation = replace(knee.explanations[0], heatmap=np.zeros_like(knee.heatmaps[0]))
    seg = build_segmentation(
        knee.sources[0], explanation, knee.prediction, spec=builtin_task("knee"), now=NOW
    )
    read = strict_roundtrip(seg)
    assert read.NumberOfFrames == 1
    assert not read.pixel_array.any()


def test_a_large_source_keeps_its_grid(knee: Case) -> None:
    """Over 2048 px the SC is shrunk; the SEG (one bit a pixel) stays on the source's grid."""
    source = copy.deepcopy(knee.sources[0])
    source.Rows, source.Columns = 2304, 160
    del source.PixelData
    heat = np.zeros((2304, 160), np.float32)
    heat[2000:2100, 40:60] = 1.0
    explanation = Explanation(view=knee.explanations[0].view, heatmap=heat)
    seg = build_segmentation(source, explanation, knee.prediction, spec=builtin_task("knee"))
    assert (seg.Rows, seg.Columns) == (2304, 160)
    assert np.array_equal(seg.pixel_array.astype(bool), heat >= 0.5)


def test_pixel_spacing_falls_back_to_pixel_spacing_then_one(knee: Case) -> None:
    spec = builtin_task("knee")
    source = copy.deepcopy(knee.sources[0])
    del source.ImagerPixelSpacing
    source.PixelSpacing = [0.25, 0.5]
    seg = build_segmentation(source, knee.explanations[0], knee.prediction, spec=spec)
    spacing = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in spacing] == [0.25, 0.5]
    del source.PixelSpacing
    seg = build_segmentation(source, knee.explanations[0], knee.prediction, spec=spec)
    spacing = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in spacing] == [1.0, 1.0]


def test_segmentation_refuses_mismatched_inputs(knee: Case) -> None:
    spec = builtin_task("knee")
    with pytest.raises(EncodeError, match="the explanation is of"):
        build_segmentation(knee.sources[1], knee.explanations[0], knee.prediction, spec=spec)
    small = replace(knee.explanations[0], heatmap=np.ones((8, 8), np.float32))
    with pytest.raises(EncodeError, match="heatmap has shape"):
        build_segmentation(knee.sources[0], small, knee.prediction, spec=spec)
    with pytest.raises(EncodeError, match="task spec"):
        build_segmentation(
            knee.sources[0], knee.explanations[0], knee.prediction, spec=builtin_task("hip")
        )
    with pytest.raises(EncodeError, match="version"):
        build_segmentation(
            knee.sources[0], knee.explanations[0], knee.prediction, spec=spec, version=0
        )


def test_sr_evidence_lists_the_segmentations(knee: Case) -> None:
    segmentations = segment_case(knee)
    report = build_structured_report(
        knee.prediction,
        knee.sources,
        [*knee.secondary_captures, *segmentations],
        spec=builtin_task("knee"),
        explanations=knee.explanations,
        now=NOW,
    )
    parsed = hd.sr.srread(io.BytesIO(to_bytes(report)))
    evidence = {
        (str(instance), str(sop_class))
        for _, _, instance, sop_class in parsed.get_evidence(current_procedure_only=True)
    }
    derived = [*knee.secondary_captures, *segmentations]
    assert evidence == {(ds.SOPInstanceUID, ds.SOPClassUID) for ds in [*knee.sources, *derived]}
    assert sum(sop_class == SEG_CLASS for _, sop_class in evidence) == 2


# -- outputs.saliency ------------------------------------------------------------------------
def test_outputs_saliency_defaults_to_sc_and_accepts_segmentation_and_both(
    tmp_path: Path,
) -> None:
    assert load_config(None).outputs.saliency == "sc"
    for value in ("segmentation", "both", "sc"):
        path = tmp_path / f"{value}.yaml"
        path.write_text(f"outputs:\n  saliency: {value}\n")
        assert load_config(path).outputs.saliency == value


@pytest.mark.parametrize("value", ["parametric-map", "Parametric_Map"])
def test_outputs_saliency_refuses_a_parametric_map_with_the_reason(
    tmp_path: Path, value: str
) -> None:
    path = tmp_path / "conf.yaml"
    path.write_text(f"outputs:\n  saliency: {value}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert "outputs.saliency" in message
    assert "OHIF 3.13.2" in message and "stack viewport PMAP is not supported" in message
    assert "highdicom 0.28" in message and "Frame of Reference" in message


def test_outputs_saliency_refuses_an_unknown_value(tmp_path: Path) -> None:
    path = tmp_path / "conf.yaml"
    path.write_text("outputs:\n  saliency: heatmap\n")
    with pytest.raises(ConfigError, match=r"outputs\.saliency.*'sc', 'segmentation' or 'both'"):
        load_config(path)


# -- the pipeline ----------------------------------------------------------------------------
def _run_pipeline(tmp_path: Path, saliency: str) -> tuple[list[Path], list[Path], Dataset]:
    """One hip study through a Pipeline with a tiny random bundle and the real encoders:
    (the queued paths in order, the Outputs' SCs, the SR)."""
    from dicom_node.assemble import Assembler
    from dicom_node.encode import build_secondary_capture
    from dicom_node.infer import Predictor
    from dicom_node.pipeline import Pipeline
    from dicom_node.store import Spool
    from tests.factories import FakeClock, instance_bytes, store_file, tiny_bundle

    clock = FakeClock()
    spool = Spool(tmp_path / "spool", clock=clock)
    folder = make_set(tmp_path, "hip", task="hip", patients=1, seed=8)
    for data, ds in instance_bytes(folder):
        store_file(spool, data, ds)
    assembler = Assembler(spool, load_config(None).routing.rules, {"hip": ("AP",)}, 10.0, clock)
    assembler.route_new()
    assert assembler.promote() == 1
    bundle = tiny_bundle(tmp_path / "bundle", "hip", seed=1)
    pipeline = Pipeline(
        predictor=Predictor({"hip": bundle}),
        spool=spool,
        specs={"hip": builtin_task("hip")},
        destinations=["pacs"],
        build_structured_report=build_structured_report,
        build_secondary_capture=build_secondary_capture,
        build_segmentation=build_segmentation,
        saliency=saliency,  # type: ignore[arg-type]
        clock=lambda: dt.datetime(2025, 3, 4, 5, 6, 7),
    )
    [outputs] = pipeline.process(spool.claim_ready(8))
    queued = [Path(item.path) for item in spool.outbox_for(outputs.study_instance_uid, "hip")]
    return queued, list(outputs.secondary_captures), pydicom.dcmread(outputs.structured_report)


@pytest.mark.parametrize(
    ("saliency", "kinds"),
    [("both", ["SR", "OT", "SEG"]), ("segmentation", ["SR", "SEG"]), ("sc", ["SR", "OT"])],
)
def test_pipeline_sends_the_saliency_as_configured(
    tmp_path: Path, saliency: str, kinds: list[str]
) -> None:
    queued, captures, report = _run_pipeline(tmp_path, saliency)
    read = [pydicom.dcmread(path) for path in queued]
    assert [ds.Modality for ds in read] == kinds  # the SR first
    assert captures == [p for p, ds in zip(queued, read, strict=True) if ds.Modality == "OT"]
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in report.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    derived = [ds for ds in read if ds.Modality in ("OT", "SEG")]
    assert {ds.SOPInstanceUID for ds in derived} <= evidence
    for ds in read:
        if ds.Modality == "SEG":
            assert ds.SeriesNumber == 9020
            assert queued[read.index(ds)].name == "hip-v1-seg1.dcm"
            assert ds.StudyInstanceUID == report.StudyInstanceUID
            assert ds.SeriesDescription.startswith("AI hip saliency SEG - NOT FOR DIAGNOSTIC USE")


def test_pipeline_needs_a_segmentation_builder_for_segmentation() -> None:
    from dicom_node.pipeline import Pipeline

    common: dict[str, Any] = {
        "predictor": None,
        "spool": None,
        "specs": {},
        "destinations": [],
        "build_structured_report": build_structured_report,
        "build_secondary_capture": build_structured_report,
    }
    with pytest.raises(ValueError, match="needs build_segmentation"):
        Pipeline(saliency="both", **common)
    with pytest.raises(ValueError, match="saliency is one of"):
        Pipeline(saliency="parametric-map", **common)  # type: ignore[arg-type]
    assert Pipeline(**common).saliency == "sc"
