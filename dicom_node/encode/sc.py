"""Secondary Capture: the IOD that carries the saliency overlay to every viewer.

Secondary Capture Image Storage (Modality OT), RGB 8-bit, PlanarConfiguration 0, Explicit VR
Little Endian, uncompressed, in the source's study and in a new series; ConversionType WSD,
BurnedInAnnotation YES, ImageType DERIVED\\SECONDARY\\OTHER, no window/level, rescale or VOI LUT
attributes (an RGB image with them renders black in common viewers). Patient Orientation and
laterality are the source's; the Source Image Sequence (purpose 121322, DCM) and the Referenced
Image Sequence point to it. The pixels are drawn by :mod:`dicom_node.encode.overlay`.

Very large sources: when a side exceeds 2048 pixels, the image is downscaled by the smallest
integer factor that brings both sides to 2048 or fewer (area averaging), so Rows/Columns are
the source's divided by that factor, rounded up. The factor is stated in DerivationDescription.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import logging
import math

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DA, TM

from dicom_node.domain import Explanation, ModelInfo, Prediction
from dicom_node.encode.common import (
    algorithm_equipment,
    check_task,
    check_version,
    laterality_of,
    patient_study_header,
    pin_contribution_time,
    series_description,
)
from dicom_node.encode.overlay import annotate, blend, burned_in_text, downscale, outline
from dicom_node.errors import EncodeError
from dicom_node.tasks import TaskSpec

__all__ = ["MAX_SIDE", "build_secondary_capture"]

log = logging.getLogger(__name__)

#: Longest side of a Secondary Capture; larger sources are reduced by an integer factor.
MAX_SIDE = 2048

_SOURCE_IMAGE_PURPOSE = hd.sr.CodedConcept(
    "121322", "DCM", "Source image for image processing operation"
)
_LOSSY_ATTRIBUTES = (
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
)


def build_secondary_capture(
    source: Dataset,
    display: np.ndarray,
    explanation: Explanation,
    prediction: Prediction,
    *,
    spec: TaskSpec,
    version: int = 1,
    series_number: int = 9002,
    instance_number: int = 1,
    instance_uid: str | None = None,
    series_uid: str | None = None,
    now: dt.datetime | None = None,
) -> Dataset:
    """Build the saliency overlay Secondary Capture of one analysed source image.

    Parameters
    ----------
    source : pydicom.Dataset
        The analysed radiograph; patient, study, orientation and laterality come from it.
    display : numpy.ndarray
        The source as displayed: float (Rows, Columns) in [0, 1], bright = dense, as made by
        :func:`dicom_node.preprocess.display_image`.
    explanation : Explanation
        The saliency heatmap on the source's pixel grid, and the method that made it.
    prediction : Prediction
        The study's prediction: the class, probability and model that the overlay names.
    spec : TaskSpec
        The spec of the prediction's task; its ``label`` is burned in.
    version : int
        The result's version for this study and task (1, 2, ...); from 2 on, the burned-in
        text says that it supersedes the earlier results.
    series_number, instance_number : int
        Series Number (the SCs of one study and task share a series) and Instance Number.
    instance_uid, series_uid : str, optional
        SOP Instance UID and Series Instance UID; new UIDs when not given.
    now : datetime.datetime, optional
        Creation time of the object (content, series, capture and instance creation dates);
        ``datetime.now()`` when not given.

    Returns
    -------
    pydicom.Dataset
        A Secondary Capture Image (highdicom ``SCImage``) with file meta information, ready to
        ``save_as(..., enforce_file_format=True)``.

    Raises
    ------
    EncodeError
        When the spec is of another task, the version is below 1, the explanation is of
        another image, the display or the heatmap does not match the source's grid, or
        highdicom rejects a value.
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
    heatmap = np.asarray(explanation.heatmap, dtype=np.float32)
    image = np.asarray(display, dtype=np.float32)
    if image.shape != (rows, columns):
        raise EncodeError(
            f"display has shape {image.shape}, the source is {rows}×{columns} (Rows×Columns)"
        )
    if heatmap.shape != image.shape:
        raise EncodeError(
            f"heatmap has shape {heatmap.shape}, the source is {rows}×{columns} (Rows×Columns)"
        )
    factor = max(1, math.ceil(max(rows, columns) / MAX_SIDE))
    if factor > 1:
        image, heatmap = downscale(image, factor), downscale(heatmap, factor)
    blended = blend(image, heatmap)
    if explanation.region is not None:
        outline(blended, explanation.region, factor)
    text = burned_in_text(prediction, explanation, spec.label, version=version)
    pixels = annotate(blended, text)

    header = patient_study_header(source)
    model = prediction.model
    try:
        sc = hd.sc.SCImage(
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            study_instance_uid=source.StudyInstanceUID,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=instance_uid,
            instance_number=instance_number,
            manufacturer=model.manufacturer,
            # Replaced below by the source's value: highdicom accepts single letters only.
            patient_orientation=("L", "F"),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=_contributing_equipment(header, model, now),
            series_description=series_description(prediction.task, "saliency", model.demo),
            manufacturer_model_name=model.name,
            software_versions=model.version,
            content_date=now.date(),
            content_time=now.time(),
            series_date=now.date(),
            series_time=now.time(),
            specific_character_set=source.get("SpecificCharacterSet"),
        )
    except (TypeError, ValueError) as error:
        raise EncodeError(f"cannot build the Secondary Capture: {error}") from error
    # Patient and study attributes exactly as the source has them (not through highdicom's
    # person-name checks, which reject or log some valid names).
    sc.copy_patient_and_study_information(header)
    sc.InstanceCreationDate = DA(now.date())
    sc.InstanceCreationTime = TM(now.time())
    # highdicom writes "DI" (digitised image) and leaves Burned In Annotation out.
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    sc.DateOfSecondaryCapture = DA(now.date())
    sc.TimeOfSecondaryCapture = TM(now.time())
    sc.SecondaryCaptureDeviceManufacturer = model.manufacturer
    sc.SecondaryCaptureDeviceManufacturerModelName = model.name
    sc.SecondaryCaptureDeviceSoftwareVersions = model.version
    sc.PatientOrientation = _patient_orientation(source)
    laterality = laterality_of(source)
    if laterality is not None:
        sc.Laterality = laterality
    if source.get("BodyPartExamined"):
        sc.BodyPartExamined = source.BodyPartExamined
    if source.get("LossyImageCompression") == "01":
        for keyword in _LOSSY_ATTRIBUTES:
            if keyword in source:
                sc[keyword] = copy.deepcopy(source[keyword])
    pin_contribution_time(sc, now)
    sc.DerivationDescription = _derivation_description(explanation, model, factor)
    source_item = _image_reference(source)
    source_item.PurposeOfReferenceCodeSequence = [_SOURCE_IMAGE_PURPOSE]
    sc.SourceImageSequence = [source_item]
    sc.ReferencedImageSequence = [_image_reference(source)]
    log.info(
        "secondary capture built",
        extra={
            "sop_instance_uid": instance_uid,
            "study_instance_uid": str(source.StudyInstanceUID),
            "source_sop_instance_uid": str(source.SOPInstanceUID),
        },
    )
    return sc


def _patient_orientation(source: Dataset) -> list[str]:
    """The source's two Patient Orientation values, or none (Type 2C: present, empty)."""
    value = source.get("PatientOrientation")
    values = [] if not value else [value] if isinstance(value, str) else list(value)
    return [str(v) for v in values] if len(values) == 2 else []


def _contributing_equipment(
    header: Dataset, model: ModelInfo, now: dt.datetime
) -> list[hd.ContributingEquipment]:
    equipment = []
    # Without a Manufacturer on the source there is nothing to say about its acquisition.
    with contextlib.suppress(AttributeError, ValueError, KeyError):
        equipment.append(hd.ContributingEquipment.for_image_acquisition(header))
    equipment.append(algorithm_equipment(model, now))
    return equipment


def _image_reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item


def _derivation_description(explanation: Explanation, model: ModelInfo, factor: int) -> str:
    text = (
        f"{explanation.method} saliency of {model.name} {model.version} blended over the "
        "displayed source image; result and warnings burned in"
    )
    if explanation.region is not None:
        text += "; the region the model analysed is outlined"
    if factor > 1:
        text += f"; downscaled by {factor} (area average)"
    return text
