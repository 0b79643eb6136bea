"""DICOM encoding of phantom radiographs, as a DX or CR modality would send them.

Every value is derived from the generator's seed (UIDs, dates, names), so the same command
writes byte-identical files.
"""

from __future__ import annotations

import datetime as _dt
import uuid
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
)

from train import __version__

__all__ = [
    "ANATOMY",
    "CR_IMAGE_STORAGE",
    "DX_PRESENTATION_STORAGE",
    "ImageHeader",
    "PatientHeader",
    "build_dataset",
    "derive_uid",
]

DX_PRESENTATION_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")
CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
MANUFACTURER = "orthonode phantom generator"
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/orthonode/phantoms")

#: Body part per task, and per region of the "other" task: (BodyPartExamined, SNOMED CT code,
#: code meaning; CID 4031).
ANATOMY: dict[str, tuple[str, str, str]] = {
    "knee": ("KNEE", "72696002", "Knee"),
    "hip": ("HIP", "24136001", "Hip joint"),
    "spine": ("LSPINE", "122496007", "Lumbar spine"),
    "chest": ("CHEST", "816094009", "Chest"),
    "ankle": ("ANKLE", "70258002", "Ankle joint"),
}
#: CID 4010 (DX View) codes for the ViewPosition values the generator writes.
_VIEW_CODES: dict[str, tuple[str, str, str]] = {
    "AP": ("399348003", "SCT", "antero-posterior"),
    "PA": ("272479007", "SCT", "postero-anterior"),
    "LL": ("399173006", "SCT", "left lateral"),
    "LAT": ("399067008", "SCT", "lateral"),
}


def derive_uid(*parts: object) -> UID:
    """A deterministic UID in the 2.25 (UUID) form, derived from the given parts.

    pydicom's ``generate_uid(prefix=None)`` ignores its entropy sources, so the UUID is a
    name-based one (RFC 4122 version 5) of the parts, in orthonode's own namespace.
    """
    value = uuid.uuid5(_UID_NAMESPACE, "\x1f".join(str(p) for p in parts))
    return UID(f"2.25.{value.int}")


@dataclass(frozen=True)
class PatientHeader:
    """Synthetic identity and study of one phantom patient."""

    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    study_instance_uid: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str


@dataclass(frozen=True)
class ImageHeader:
    """Per-image acquisition attributes."""

    task: str
    view: str  # AP or LAT
    view_position: str  # as the modality writes it: AP, LL, LAT
    laterality: str  # R, L or U (unpaired)
    patient_orientation: tuple[str, str]
    series_instance_uid: str
    sop_instance_uid: str
    series_number: int
    imager_pixel_spacing_mm: float
    magnification: float
    bits_stored: int
    photometric: str  # MONOCHROME2 or MONOCHROME1
    modality: str  # DX or CR
    transfer_syntax: str  # explicit or jpeg2000
    kvp: float
    exposure_mas: float
    body_part_key: str = ""  # the ANATOMY key of the tags written ("": the task's)
    anatomy_tags: bool = True  # False: no tag that names the body part or the view


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _window(pixels: np.ndarray, top: int) -> tuple[float, float]:
    """Window centre/width spanning the exposed anatomy (robust low end) up to full white."""
    sample = pixels[::4, ::4]
    inside = sample[sample > 0.02 * top]
    low = float(np.percentile(inside, 0.5)) if inside.size >= 16 else 0.0
    width = max(float(top) - low, 16.0)
    return round(low + width / 2.0, 1), round(width, 1)


def build_dataset(patient: PatientHeader, image: ImageHeader, pixels: np.ndarray) -> Dataset:
    """Build the DICOM data set for one rendered view.

    ``pixels`` is the MONOCHROME2 "for presentation" image; it is inverted here when the image
    is to be written as MONOCHROME1.
    """
    top = (1 << image.bits_stored) - 1
    center, width = _window(pixels, top)
    if image.photometric == "MONOCHROME1":
        pixels = (top - pixels).astype(np.uint16)
        center = top - center
    sop_class = DX_PRESENTATION_STORAGE if image.modality == "DX" else CR_IMAGE_STORAGE
    ts = JPEG2000Lossless if image.transfer_syntax == "jpeg2000" else ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = UID(image.sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.InstanceCreationDate = patient.study_date
    ds.InstanceCreationTime = patient.study_time
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = image.sop_instance_uid
    ds.StudyDate = patient.study_date
    ds.SeriesDate = patient.study_date
    ds.ContentDate = patient.study_date
    ds.AcquisitionDateTime = patient.study_date + patient.study_time
    ds.StudyTime = patient.study_time
    ds.SeriesTime = patient.study_time
    ds.ContentTime = patient.study_time
    ds.AccessionNumber = patient.accession_number
    ds.Modality = image.modality
    if image.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = "orthonode synthetic hospital"
    ds.ReferringPhysicianName = ""
    body_part, region_code, region_meaning = ANATOMY[image.body_part_key or image.task]
    tags = image.anatomy_tags
    if tags:
        ds.StudyDescription = f"{body_part} RADIOGRAPHS (SYNTHETIC PHANTOM)"
        ds.SeriesDescription = f"{body_part} {image.view_position}"
    else:
        ds.StudyDescription = "RADIOGRAPHS (SYNTHETIC PHANTOM)"
    ds.ManufacturerModelName = "orthonode-synth"
    ds.PatientName = patient.patient_name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.PatientIdentityRemoved = "NO"
    if tags:
        ds.BodyPartExamined = body_part
    ds.KVP = f"{image.kvp:.0f}"
    ds.DeviceSerialNumber = "PHANTOM-0001"
    ds.SoftwareVersions = f"orthonode-synth {__version__}"
    source_to_patient = round(1150.0 / image.magnification, 1)
    ds.DistanceSourceToDetector = "1150"
    ds.DistanceSourceToPatient = f"{source_to_patient:.1f}"
    ds.Exposure = f"{image.exposure_mas:.0f}"
    ds.ImagerPixelSpacing = [f"{image.imager_pixel_spacing_mm:.4f}"] * 2
    if tags:
        ds.ViewPosition = image.view_position
    ds.ImageComments = "SYNTHETIC PHANTOM - NOT A REAL PATIENT"
    ds.StudyInstanceUID = patient.study_instance_uid
    ds.SeriesInstanceUID = image.series_instance_uid
    ds.StudyID = patient.study_id
    ds.SeriesNumber = image.series_number
    ds.InstanceNumber = 1
    ds.PatientOrientation = list(image.patient_orientation)
    ds.ImageLaterality = image.laterality
    # Type 2: present, and empty when the body part is not to be told.
    codes = [_code(region_code, "SCT", region_meaning)] if tags else []
    ds.AnatomicRegionSequence = Sequence(codes)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = image.photometric
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.BitsAllocated = 16
    ds.BitsStored = image.bits_stored
    ds.HighBit = image.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    ds.WindowCenter = f"{center:.1f}"
    ds.WindowWidth = f"{width:.1f}"
    ds.WindowCenterWidthExplanation = "PHANTOM DEFAULT"
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.LossyImageCompression = "00"
    ds.RescaleType = "US"
    if image.modality == "DX":
        ds.DetectorType = "SCINTILLATOR"
        ds.PixelIntensityRelationship = "LOG"
        # -1: higher values mean less beam (dense is bright) — true of MONOCHROME2 here.
        ds.PixelIntensityRelationshipSign = -1 if image.photometric == "MONOCHROME2" else 1
        ds.PresentationLUTShape = "IDENTITY" if image.photometric == "MONOCHROME2" else "INVERSE"
        ds.EstimatedRadiographicMagnificationFactor = f"{1150.0 / source_to_patient:.6f}"
        if tags:
            ds.ViewCodeSequence = Sequence([_code(*_VIEW_CODES[image.view_position])])
        ds.AcquisitionContextSequence = Sequence()
        ds.PositionerType = "NONE"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    if ts == JPEG2000Lossless:
        # Keep the derived SOPInstanceUID (pydicom would draw a random one).
        ds.compress(
            JPEG2000Lossless,
            np.ascontiguousarray(pixels),
            encoding_plugin="pylibjpeg",
            generate_instance_uid=False,
        )
    return ds


def study_date(rng: np.random.Generator) -> tuple[str, str]:
    """A deterministic study date and time within 2024–2026."""
    start = _dt.date(2024, 1, 1)
    day = start + _dt.timedelta(days=int(rng.integers(0, 1000)))
    seconds = int(rng.integers(7 * 3600, 19 * 3600))
    clock = f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"
    return day.strftime("%Y%m%d"), clock
