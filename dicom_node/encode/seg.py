"""Segmentation: the saliency as an object viewers overlay on the radiograph (DICOM SEG).

A BINARY Segmentation (highdicom ``hd.seg.Segmentation``) of one analysed source image, in the
source's study and in a new series, with one segment, "high-saliency region": the pixels where
the heatmap is at least half of its maximum (:func:`high_saliency_mask`). Its category is
"Visual explanation" (130401, DCM) and its type the explanation's method, "Gradient-weighted
class activation" (130403, DCM) for Grad-CAM and "Saliency" (130404, DCM) otherwise; the
algorithm is AUTOMATIC, named with the model's name and version. The content creator is
"orthonode", the Contributing Equipment Sequence names the algorithm with its Device UID.

The mask is on the source's own pixel grid, whatever its size. A Secondary Capture shrinks
sources over 2048 pixels (:data:`dicom_node.encode.sc.MAX_SIDE`), but a BINARY frame costs one
bit a pixel (2 MB for 4096 × 4096), and highdicom 0.28 cannot shrink it for a radiograph
without a Frame of Reference: a frame of another size needs plane positions, which it refuses
without one.

What highdicom 0.28 does not write for such a source, and OHIF 3.13.2 needs to draw it, is
added with pydicom:

- the shared Plane Orientation (Patient) functional group, ImageOrientationPatient 1\\0\\0\\0\\1\\0:
  OHIF's ``checkOrientation`` compares it with the image's (highdicom refuses a
  ``plane_orientation`` when the source has no Frame of Reference);
- Patient Orientation, laterality and Body Part Examined, copied from the source (dciodvfy asks
  for Patient Orientation when there is no Image Orientation).

The shared Pixel Measures functional group (OHIF's SEG viewport reads it, and stops without it)
is passed to highdicom: the source's Imager Pixel Spacing, else its Pixel Spacing, else 1\\1.
OHIF matches the frame to its image through the per-frame Derivation Image Sequence, which
highdicom writes, so no Frame of Reference is needed.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, TM

from dicom_node.domain import Explanation, Prediction
from dicom_node.encode.common import (
    LATERALITY,
    algorithm_equipment,
    check_task,
    check_version,
    laterality_of,
    patient_study_header,
    pin_contribution_time,
    saliency_method,
    series_description,
)
from dicom_node.errors import EncodeError
from dicom_node.tasks import TaskSpec

__all__ = ["HIGH_SALIENCY_FRACTION", "SEGMENT_LABEL", "build_segmentation", "high_saliency_mask"]

log = logging.getLogger(__name__)

#: The segment holds the pixels whose saliency is at least this fraction of the maximum.
HIGH_SALIENCY_FRACTION = 0.5
#: The label of the one segment, as viewers list it.
SEGMENT_LABEL = "high-saliency region"
#: A warm red, so that the region stands out on a grey radiograph.
_DISPLAY_RGB = (255, 64, 0)
#: The orientation of a projection radiograph's rows and columns, as OHIF compares it.
_ORIENTATION = ("1", "0", "0", "0", "1", "0")
#: The content creator: the node (a single-component person name, hence the caret).
_CONTENT_CREATOR = "orthonode^"


def high_saliency_mask(heatmap: np.ndarray) -> np.ndarray:
    """The high-saliency region of a heatmap: True where it is at least
    :data:`HIGH_SALIENCY_FRACTION` of its maximum; nothing when the maximum is not above 0
    (a heatmap without any saliency has no region). NaN counts as no saliency.

    Raises
    ------
    EncodeError
        When the heatmap is not a non-empty 2-D array.
    """
    heat = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0, neginf=0.0)
    if heat.ndim != 2 or heat.size == 0:
        raise EncodeError(f"a heatmap is a non-empty 2-D array, not of shape {heat.shape}")
    peak = float(heat.max())
    if not peak > 0.0:
        return np.zeros(heat.shape, dtype=bool)
    return np.asarray(heat >= HIGH_SALIENCY_FRACTION * peak)


def build_segmentation(
    source: Dataset,
    explanation: Explanation,
    prediction: Prediction,
    *,
    spec: TaskSpec,
    version: int = 1,
    series_number: int = 9020,
    instance_number: int = 1,
    instance_uid: str | None = None,
    series_uid: str | None = None,
    now: dt.datetime | None = None,
) -> Dataset:
    """Build the saliency Segmentation of one analysed source image.

    Parameters
    ----------
    source : pydicom.Dataset
        The analysed radiograph; patient, study, orientation, laterality and the pixel grid
        come from it.
    explanation : Explanation
        The saliency heatmap on the source's pixel grid, and the method that made it.
    prediction : Prediction
        The study's prediction: its model names the algorithm.
    spec : TaskSpec
        The spec of the prediction's task.
    version : int
        The result's version for this study and task (1, 2, ...).
    series_number, instance_number : int
        Series Number (the SEGs of one source series share a series) and Instance Number.
    instance_uid, series_uid : str, optional
        SOP Instance UID and Series Instance UID; new UIDs when not given. Every other UID of
        the object is derived from the SOP Instance UID, so an object rebuilt with the same
        UIDs and time is the same.
    now : datetime.datetime, optional
        Creation time (content, series and instance creation dates); ``datetime.now()`` when
        not given.

    Returns
    -------
    pydicom.Dataset
        A BINARY Segmentation (highdicom ``Segmentation``) with file meta information
        (Explicit VR Little Endian), ready to ``save_as(..., enforce_file_format=True)``.

    Raises
    ------
    EncodeError
        When the spec is of another task, the version is below 1, the explanation is of
        another image, the heatmap does not match the source's grid, or highdicom rejects a
        value.
    """
    check_task(prediction, spec)
    check_version(version)
    now = now or dt.datetime.now()
    instance_uid = instance_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    if explanation.view.instance.sop_instance_uid != source.SOPInstanceUID:
        raise EncodeError(
            f"the explanation is of {explanation.view.instance.sop_instance_uid}, "
            f"the source is {source.SOPInstanceUID}"
        )
    rows, columns = int(source.Rows), int(source.Columns)
    heatmap = np.asarray(explanation.heatmap)
    if heatmap.shape != (rows, columns):
        raise EncodeError(
            f"heatmap has shape {heatmap.shape}, the source is {rows}×{columns} (Rows×Columns)"
        )
    mask = high_saliency_mask(heatmap)
    header = patient_study_header(source)
    model = prediction.model
    method = saliency_method(explanation.method)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model.name,
        family=codes.cid7162.ArtificialIntelligence,
        version=model.version,
        parameters={
            "saliency method": explanation.method,
            "region": f"saliency >= {HIGH_SALIENCY_FRACTION:g} of its maximum",
        },
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.DCM.VisualExplanation,
        segmented_property_type=method,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=_derived_uid(instance_uid, "tracking"),
        tracking_id=f"{prediction.task} saliency {source.SOPInstanceUID}"[:64],
        anatomic_regions=[hd.sr.CodedConcept(spec.site.value, spec.site.scheme, spec.site.meaning)],
        display_color=hd.color.CIELabColor.from_rgb(*_DISPLAY_RGB),
    )
    try:
        seg = hd.seg.Segmentation(
            source_images=[header],
            pixel_array=mask[np.newaxis].astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment],
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=instance_uid,
            instance_number=instance_number,
            manufacturer=model.manufacturer,
            manufacturer_model_name=model.name,
            software_versions=model.version,
            device_serial_number=model.device_uid,
            content_label="SALIENCY",
            content_description=_content_description(explanation.method, model.demo),
            content_creator_name=_CONTENT_CREATOR,
            series_description=series_description(prediction.task, "saliency SEG", model.demo),
            pixel_measures=hd.PixelMeasuresSequence(
                pixel_spacing=_pixel_spacing(source), slice_thickness=_slice_thickness(source)
            ),
            # One frame, even for a heatmap with no region: the viewer then shows that the
            # model found no salient pixels rather than nothing at all.
            omit_empty_frames=False,
            contributing_equipment=[algorithm_equipment(model, now)],
            series_date=now.date(),
            series_time=now.time(),
            content_date=now.date(),
            content_time=now.time(),
        )
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise EncodeError(f"cannot build the Segmentation: {error}") from error
    # Patient and study attributes exactly as the source has them (not through highdicom's
    # person-name checks, which reject or log some valid names), in the source's repertoire.
    seg.copy_patient_and_study_information(header)
    if "SpecificCharacterSet" in source:
        seg.SpecificCharacterSet = source.SpecificCharacterSet
    seg.InstanceCreationDate = DA(now.date())
    seg.InstanceCreationTime = TM(now.time())
    # highdicom draws this one at random: derived, so that a rebuilt object is the same.
    dimension_uid = _derived_uid(instance_uid, "dimension organization")
    seg.DimensionOrganizationSequence[0].DimensionOrganizationUID = dimension_uid
    for index in seg.DimensionIndexSequence:
        index.DimensionOrganizationUID = dimension_uid
    orientation = Dataset()
    orientation.ImageOrientationPatient = list(_ORIENTATION)
    seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence = [orientation]
    seg.PatientOrientation = _patient_orientation(source)
    laterality = laterality_of(source) or explanation.view.laterality
    if laterality is not None and laterality in LATERALITY:
        # Not as the series' Laterality: dciodvfy refuses it in a Segmentation. The segment
        # lies in the task's site on that side, as the SR's Finding Site says.
        region = seg.SegmentSequence[0].AnatomicRegionSequence[0]
        region.AnatomicRegionModifierSequence = [LATERALITY[laterality]]
    if source.get("BodyPartExamined"):
        seg.BodyPartExamined = source.BodyPartExamined
    pin_contribution_time(seg, now)
    _acquisition_time(seg, source)
    log.info(
        "segmentation built",
        extra={
            "sop_instance_uid": instance_uid,
            "study_instance_uid": str(source.StudyInstanceUID),
            "source_sop_instance_uid": str(source.SOPInstanceUID),
            "region_pixels": int(mask.sum()),
        },
    )
    return seg


def _content_description(method: str, demo: bool) -> str:
    text = f"{method} saliency >= {HIGH_SALIENCY_FRACTION:g} of max; NOT FOR DIAGNOSTIC USE"
    if demo:
        text += "; DEMO"
    return text[:64]


def _pixel_spacing(source: Dataset) -> list[float]:
    """Row and column spacing in mm: Imager Pixel Spacing (a projection radiograph's, at the
    detector), else Pixel Spacing, else 1\\1 (OHIF needs a value; the SEG is on the source's
    grid, so it is drawn where it belongs whatever the value)."""
    for keyword in ("ImagerPixelSpacing", "PixelSpacing"):
        value = _two_positive(source.get(keyword))
        if value is not None:
            return value
    return [1.0, 1.0]


def _slice_thickness(source: Dataset) -> float:
    """The source's Slice Thickness, else a nominal 1 mm: a projection has none, but
    highdicom's reader (``segread``) refuses Pixel Measures without one."""
    try:
        value = float(source.get("SliceThickness") or 0)
    except (TypeError, ValueError):
        value = 0.0
    return value if np.isfinite(value) and value > 0 else 1.0


def _two_positive(value: object) -> list[float] | None:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        return None
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return numbers if all(np.isfinite(n) and n > 0 for n in numbers) else None


def _patient_orientation(source: Dataset) -> list[str]:
    """The source's two Patient Orientation values, or none (Type 2C: present, empty)."""
    value = source.get("PatientOrientation")
    values = [] if not value else [value] if isinstance(value, str) else list(value)
    return [str(v) for v in values] if len(values) == 2 else []


def _acquisition_time(seg: Dataset, source: Dataset) -> None:
    """Date the source's acquisition equipment item at the source's acquisition.

    highdicom dates it at the wall clock unless the source has an Acquisition DateTime (or
    Acquisition Date and Time read as dates, which pydicom does not do by default): the
    source's date and time are used when it has them, else the time is left out (Type 3)
    rather than stated wrongly, which would also make a rebuilt object differ.
    """
    when = str(source.get("AcquisitionDateTime") or "")
    if not when and source.get("AcquisitionDate") and source.get("AcquisitionTime"):
        when = f"{source.AcquisitionDate}{source.AcquisitionTime}"
    for item in seg.get("ContributingEquipmentSequence", []):
        purpose = item.get("PurposeOfReferenceCodeSequence") or [Dataset()]
        if purpose[0].get("CodeValue") != "109101":
            continue
        if when:
            item.ContributionDateTime = when
        elif "ContributionDateTime" in item:
            del item.ContributionDateTime


def _derived_uid(instance_uid: str, purpose: str) -> str:
    return str(generate_uid(entropy_srcs=[instance_uid, purpose]))
