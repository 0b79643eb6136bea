"""Secondary Capture overlay: the saliency heatmap and the result burned into an RGB image.

The Secondary Capture is what every viewer can show. It is Secondary Capture Image Storage
(Modality OT), RGB 8-bit, PlanarConfiguration 0, Explicit VR Little Endian, uncompressed, in the
source's study and in a new series; ConversionType WSD, BurnedInAnnotation YES, no window/level,
rescale or VOI LUT attributes (an RGB image with them renders black in common viewers).

The pixels are the displayed radiograph (modality/VOI LUT applied, MONOCHROME1 inverted: the
``display`` argument) in grey, with the heatmap blended over it in a jet-like colour map whose
opacity grows with the heat (low saliency stays plain grey, so the anatomy remains readable).
Burned in: a banner "AI-GENERATED — NOT FOR DIAGNOSTIC USE" (and "DEMO WEIGHTS" for demo
bundles), the task, the predicted class and its probability (or "undetermined"), the model's
name and version, the saliency method and a colour bar. No patient identifier is ever drawn:
:func:`burned_in_text` builds every string from the prediction and the explanation alone.

Very large sources: when a side exceeds 2048 pixels, the image is downscaled by the smallest
integer factor that brings both sides to 2048 or fewer (area averaging), so Rows/Columns are
the source's divided by that factor, rounded up. The factor is stated in DerivationDescription.

The patient/study attributes are copied from the source (on a copy whose missing Type 2
attributes are filled with empty values); helpers shared with the SR encoder live here.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import logging
import math
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DA, DT, TM

from dicom_node.domain import Explanation, ModelInfo, Prediction, RegionOfInterest
from dicom_node.errors import EncodeError

__all__ = [
    "MAX_SIDE",
    "BurnedInText",
    "algorithm_equipment",
    "build_secondary_capture",
    "burned_in_text",
    "laterality_of",
    "patient_study_header",
    "pin_contribution_time",
    "series_description",
]

log = logging.getLogger(__name__)

#: Longest side of a Secondary Capture; larger sources are reduced by an integer factor.
MAX_SIDE = 2048

BANNER = "AI-GENERATED — NOT FOR DIAGNOSTIC USE"
DEMO_BANNER = "DEMO WEIGHTS — NOT FOR CLINICAL USE"

#: What each task reports, as shown to a reader.
TASK_LABELS = {
    "knee": "Knee implant model",
    "hip": "Hip prosthesis loosening",
    "spine": "Spinal screw brand",
}

# Type 2 attributes that highdicom reads straight from the source (AttributeError when absent).
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
)
_SOURCE_IMAGE_PURPOSE = hd.sr.CodedConcept(
    "121322", "DCM", "Source image for image processing operation"
)
_LOSSY_ATTRIBUTES = (
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
)
# Below this heat the overlay is fully transparent; above it opacity grows to _MAX_ALPHA.
_HEAT_FLOOR = 0.15
_MAX_ALPHA = 0.6


@dataclass(frozen=True)
class BurnedInText:
    """The strings drawn into the Secondary Capture (never a patient identifier)."""

    banner: tuple[str, ...]  # top: the warnings
    details: tuple[str, ...]  # bottom: result, method, model


def build_secondary_capture(
    source: Dataset,
    display: np.ndarray,
    explanation: Explanation,
    prediction: Prediction,
    *,
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
        When the explanation is of another image, the display or the heatmap does not match
        the source's grid, or highdicom rejects a value.
    """
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
        image, heatmap = _reduce(image, factor), _reduce(heatmap, factor)
    blended = _blend(image, heatmap)
    if explanation.region is not None:
        _outline(blended, explanation.region, factor)
    pixels = _annotate(blended, burned_in_text(prediction, explanation))

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


def burned_in_text(prediction: Prediction, explanation: Explanation) -> BurnedInText:
    """The strings burned into the Secondary Capture of ``explanation``'s view.

    Built from the prediction and the explanation only, never from a data set, so no patient
    identifier can reach the pixels.

    Parameters
    ----------
    prediction : Prediction
        The study-level result (fused when available) is the one shown.
    explanation : Explanation
        Its view and saliency method are named.

    Returns
    -------
    BurnedInText
        The banner lines (top) and the detail lines (bottom).
    """
    model = prediction.model
    banner = (BANNER, DEMO_BANNER) if model.demo else (BANNER,)
    task = TASK_LABELS.get(prediction.task, prediction.task)
    top = prediction.classes[prediction.predicted_index]
    percent = f"{100 * prediction.certainty:.0f}%"
    scope = " (fused AP+LAT)" if prediction.fused_probabilities is not None else ""
    if prediction.abstained:
        result = (
            f"{task}: undetermined (best {top.name} {percent}, "
            f"below {100 * prediction.threshold:.0f}% threshold){scope}"
        )
    elif prediction.decision_threshold is not None:
        positive = prediction.classes[1].name
        result = (
            f"{task}: {top.name} (P({positive}) {100 * prediction.probabilities[1]:.0f}%, "
            f"operating point {100 * prediction.decision_threshold:.0f}%){scope}"
        )
    else:
        result = f"{task}: {top.name} {percent}{scope}"
    view = explanation.view
    side = {"R": ", right", "L": ", left"}.get(view.laterality or "", "")
    region = "; dashed box: region analysed" if explanation.region is not None else ""
    details = (
        result,
        f"{explanation.method} heatmap for {top.name} — {view.view} view{side}{region}",
        f"Model: {model.name}, version {model.version}",
    )
    return BurnedInText(banner=banner, details=details)


def series_description(task: str, kind: str, demo: bool) -> str:
    """Series Description of an output (≤ 64 characters): task, kind, the warnings."""
    text = f"AI {task} {kind} - NOT FOR DIAGNOSTIC USE"
    if demo:
        text += " - DEMO WEIGHTS"
    return text[:64]


def patient_study_header(source: Dataset) -> Dataset:
    """A copy of ``source`` without pixel data, its missing Type 2 patient/study attributes
    (PatientID, StudyID, AccessionNumber, StudyDate...) present and empty."""
    header = Dataset()
    for element in source:
        if element.tag.group != 0x7FE0:
            header.add(copy.deepcopy(element))
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def algorithm_equipment(model: ModelInfo, now: dt.datetime) -> hd.ContributingEquipment:
    """Contributing Equipment item naming the algorithm, with its Device UID.

    highdicom's ContributingEquipment cannot carry a Device UID: it is added with pydicom.
    """
    description = "orthonode AI inference"
    if model.demo:
        description += " with DEMO WEIGHTS, not for clinical use"
    item = hd.ContributingEquipment(
        manufacturer=model.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        contribution_datetime=now,
        contribution_description=description,
    )
    item.DeviceUID = model.device_uid
    return item


def pin_contribution_time(dataset: Dataset, now: dt.datetime) -> None:
    """Date highdicom's own Contributing Equipment item ``now`` rather than at the wall clock,
    so that an object rebuilt with the same UIDs and time is byte-identical."""
    for item in dataset.get("ContributingEquipmentSequence", []):
        if item.get("ManufacturerModelName") == "highdicom":
            item.ContributionDateTime = DT(now)


def laterality_of(source: Dataset) -> str | None:
    """Side of ``source``: "R" or "L" from Image Laterality (else Laterality), or None."""
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(source.get(keyword) or "").upper()
        if value in ("R", "L"):
            return value
    return None


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


def _reduce(image: np.ndarray, factor: int) -> np.ndarray:
    """Area-average by an integer ``factor``; edge rows/columns are padded by repetition."""
    rows, columns = image.shape
    out_rows, out_columns = math.ceil(rows / factor), math.ceil(columns / factor)
    padded = np.pad(
        image, ((0, out_rows * factor - rows), (0, out_columns * factor - columns)), mode="edge"
    )
    blocks = padded.reshape(out_rows, factor, out_columns, factor)
    return blocks.mean(axis=(1, 3)).astype(np.float32)


def _outline(rgb: np.ndarray, region: RegionOfInterest, factor: int) -> None:
    """Draw the analysed region's edges (dashed, light grey) where they lie inside the image."""
    rows, columns = rgb.shape[:2]
    width = max(1, round(max(rows, columns) / 512))
    top, left = region.top // factor, region.left // factor
    bottom, right = (region.top + region.side) // factor, (region.left + region.side) // factor
    dashes = (np.arange(max(rows, columns)) // (6 * width)) % 2 == 0
    colour = np.array([220, 220, 220], dtype=np.uint8)
    for edge in (top, bottom - width):
        if edge >= 0 and edge + width <= rows:
            span = slice(max(left, 0), min(right, columns))
            on = dashes[span]
            rgb[edge : edge + width, span][:, on] = colour
    for edge in (left, right - width):
        if edge >= 0 and edge + width <= columns:
            span = slice(max(top, 0), min(bottom, rows))
            on = dashes[span]
            rgb[span, edge : edge + width][on] = colour


def _colour_map(values: np.ndarray) -> np.ndarray:
    """Jet-like colour map: 0 → dark blue, 0.5 → green, 1 → dark red; float RGB in [0, 1]."""
    x = np.clip(values, 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25], dtype=np.float32)  # red, green, blue
    return np.clip(1.5 - np.abs(4.0 * (x - centres)), 0.0, 1.0)


def _blend(display: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """Grey display with the coloured heatmap over it, uint8 RGB (Rows, Columns, 3)."""
    grey = np.clip(np.nan_to_num(display), 0.0, 1.0)
    heat = np.clip(np.nan_to_num(heatmap), 0.0, 1.0)
    alpha = _MAX_ALPHA * np.clip((heat - _HEAT_FLOOR) / (1.0 - _HEAT_FLOOR), 0.0, 1.0)
    alpha = alpha[..., None]
    rgb = grey[..., None] * (1.0 - alpha) + _colour_map(heat) * alpha
    return np.rint(rgb * 255.0).astype(np.uint8)


_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def _font(size: int) -> _Font:
    return ImageFont.load_default(size=size)


def _font_size(font: _Font) -> float:
    return float(getattr(font, "size", 10))


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: _Font) -> float:
    # The default font has no em dash glyph: _draw_text draws it as a line one em wide.
    parts = text.split("—")
    dashes = _font_size(font) * (len(parts) - 1)
    return sum(draw.textlength(part, font=font) for part in parts) + dashes


def _fitted_font(draw: ImageDraw.ImageDraw, lines: tuple[str, ...], size: int, width: int) -> _Font:
    """The default font at ``size``, or smaller until every line fits ``width`` (min 6 px)."""
    font = _font(size)
    while size > 6 and max(_text_width(draw, line, font) for line in lines) > width:
        size -= 1
        font = _font(size)
    return font


def _draw_text(
    draw: ImageDraw.ImageDraw,
    xy: tuple[float, float],
    text: str,
    font: _Font,
    fill: tuple[int, int, int],
) -> None:
    x, y = xy
    size = _font_size(font)
    for index, part in enumerate(text.split("—")):
        if index > 0:
            middle = round(y + 0.55 * size)
            draw.line(
                (x + 0.15 * size, middle, x + 0.85 * size, middle),
                fill=fill,
                width=max(1, round(size / 12)),
            )
            x += size
        draw.text((x, y), part, font=font, fill=fill)
        x += draw.textlength(part, font=font)


def _annotate(rgb: np.ndarray, text: BurnedInText) -> np.ndarray:
    """Draw the banner (top), the details and the colour bar (bottom) over ``rgb``."""
    rows, columns = rgb.shape[:2]
    size = int(np.clip(round(min(rows, columns) / 30), 9, 56))
    line_height = round(size * 1.3)
    margin = max(2, size // 3)
    image = Image.fromarray(rgb, mode="RGB")
    panels = Image.new("L", image.size, 0)
    panel_draw = ImageDraw.Draw(panels)
    top_height = margin * 2 + line_height * len(text.banner)
    bar_height = max(4, size // 2)
    bottom_height = margin * 3 + line_height * len(text.details) + bar_height + line_height // 2
    panel_draw.rectangle((0, 0, columns, top_height), fill=200)
    panel_draw.rectangle((0, rows - bottom_height, columns, rows), fill=170)
    # Darken behind the text so it reads on any anatomy.
    image.paste((0, 0, 0), mask=panels)
    draw = ImageDraw.Draw(image)
    width = columns - 2 * margin
    y = float(margin)
    font = _fitted_font(draw, text.banner, size, width)
    for line in text.banner:
        _draw_text(draw, (margin, y), line, font, (255, 215, 0))
        y += line_height
    y = float(rows - bottom_height + margin)
    font = _fitted_font(draw, text.details, size, width)
    for line in text.details:
        _draw_text(draw, (margin, y), line, font, (255, 255, 255))
        y += line_height
    _draw_colour_bar(draw, margin, round(y + margin), columns, size, bar_height)
    return np.asarray(image, dtype=np.uint8).copy()


def _draw_colour_bar(
    draw: ImageDraw.ImageDraw, left: int, top: int, columns: int, size: int, height: int
) -> None:
    font = _font(size)
    low, high = "saliency low", "high"
    x = left + draw.textlength(low, font=font) + size // 2
    bar_width = max(16, round(columns * 0.35))
    colours = np.rint(_colour_map(np.linspace(0.0, 1.0, bar_width)) * 255).astype(int)
    text_y = top + height / 2 - size * 0.6
    draw.text((left, text_y), low, font=font, fill=(255, 255, 255))
    for offset, (red, green, blue) in enumerate(colours):
        draw.line(
            (x + offset, top, x + offset, top + height - 1), fill=(int(red), int(green), int(blue))
        )
    draw.text((x + bar_width + size // 2, text_y), high, font=font, fill=(255, 255, 255))
