"""What the SR and the Secondary Capture encoders share: header, equipment, checks and wording.

Both outputs copy the source's patient and study attributes (:func:`patient_study_header`, on a
copy whose missing Type 2 attributes are present and empty), name the algorithm in the
Contributing Equipment Sequence with its Device UID (:func:`algorithm_equipment`), date
highdicom's own equipment item at the object's creation time (:func:`pin_contribution_time`),
take the side from the source (:func:`laterality_of`) and describe their series the same way
(:func:`series_description`). They check the task spec against the prediction
(:func:`check_task`), name the views of the fused result (:func:`fused_indices`,
:func:`fused_view_names`), say when a result supersedes earlier ones
(:func:`supersede_statement`) and why an image was not answered on
(:data:`NOT_APPLICABLE_REASON_CODES`, :func:`not_applicable_text`, with the score that decided
it: :func:`not_applicable_score`).

No drawing and no IOD here: :mod:`dicom_node.encode.overlay` draws, :mod:`.sc` and :mod:`.sr`
build the objects.
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.valuerep import DT

from dicom_node.domain import (
    NOT_APPLICABLE_REASONS,
    ModelInfo,
    NotApplicable,
    Prediction,
    decide,
)
from dicom_node.errors import EncodeError
from dicom_node.models.codes import PRIVATE_SCHEME
from dicom_node.tasks import Code, TaskSpec
from dicom_node.wording import percent_value, result_text

__all__ = [
    "LATERALITY",
    "NOT_APPLICABLE",
    "NOT_APPLICABLE_REASON",
    "NOT_APPLICABLE_REASON_CODES",
    "algorithm_equipment",
    "check_task",
    "check_version",
    "fused_indices",
    "fused_view_names",
    "laterality_of",
    "not_applicable_score",
    "not_applicable_text",
    "patient_study_header",
    "pin_contribution_time",
    "result_phrase",
    "saliency_method",
    "saliency_peak",
    "series_description",
    "supersede_statement",
]

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

#: The value of the task's evaluation when no image of the study is one to answer on:
#: SNOMED CT 385432009 "Not applicable" (qualifier value).
NOT_APPLICABLE = Code(value="385432009", scheme="SCT", meaning="Not applicable")

#: Concept name of the coded reason why an image is not one to answer on (no standard code:
#: private scheme).
NOT_APPLICABLE_REASON = Code(
    value="NA-REASON", scheme=PRIVATE_SCHEME, meaning="Reason not applicable"
)

#: Why an image is not one to answer on, as the SR codes it (and as the SC, the metrics and the
#: docs name it), keyed by :data:`dicom_node.domain.NOT_APPLICABLE_REASONS`. No DCM code, and
#: no SNOMED CT code of DICOM's context groups, means these reasons (the nearest, e.g. "View and
#: Laterality Marker is incorrect" or "Outside operational limits of the device", mean other
#: things), so they are in the node's private scheme.
NOT_APPLICABLE_REASON_CODES: Mapping[str, Code] = MappingProxyType(
    {
        "anatomy": Code(
            value="NA-ANATOMY", scheme=PRIVATE_SCHEME, meaning="Anatomy does not match the task"
        ),
        "view": Code(
            value="NA-VIEW", scheme=PRIVATE_SCHEME, meaning="View does not match the expected view"
        ),
        "no-implant": Code(
            value="NA-NO-IMPLANT", scheme=PRIVATE_SCHEME, meaning="No implant detected"
        ),
        "out-of-distribution": Code(
            value="NA-OOD", scheme=PRIVATE_SCHEME, meaning="Image outside the model's training data"
        ),
    }
)


#: What the score of an image not answered on measures, by reason, and whether it is a
#: probability (written in percent, as the SR writes probabilities) or a distance (as is).
_SCORES: Mapping[str, tuple[str, bool]] = MappingProxyType(
    {
        "anatomy": ("probability of the other anatomy", True),
        "view": ("probability of the other view", True),
        "no-implant": ("implant probability", True),
        "out-of-distribution": ("out-of-distribution distance", False),
    }
)


def series_description(task: str, kind: str, demo: bool, *, not_applicable: bool = False) -> str:
    """Series Description of an output (≤ 64 characters): task, kind, the warnings.

    ``not_applicable`` (no image of the study was analysed) says so after the kind, e.g.
    "AI spine SR - NOT APPLICABLE - NOT FOR DIAGNOSTIC USE - DEMO" (the demo warning is
    shorter there, to fit); a long task name is shortened rather than the kind or a warning.
    """
    if not not_applicable:
        text = f"AI {task} {kind} - NOT FOR DIAGNOSTIC USE"
        if demo:
            text += " - DEMO WEIGHTS"
        return text[:64]
    warnings = f" {kind} - NOT APPLICABLE - NOT FOR DIAGNOSTIC USE" + (" - DEMO" if demo else "")
    return f"AI {task}"[: 64 - len(warnings)].rstrip("-") + warnings


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


def not_applicable_text(item: NotApplicable, number: int) -> str:
    """What an image that was not answered on is said to be, e.g. "LAT image 2 not applicable:
    no implant detected (implant 0.02 < 0.31)"; ``number`` is the image's place in the result.

    EncodeError when the reason is not one of :data:`~dicom_node.domain.NOT_APPLICABLE_REASONS`.
    """
    code = NOT_APPLICABLE_REASON_CODES.get(item.reason)
    if code is None:
        raise EncodeError(
            f"not-applicable reason {item.reason!r} is not one of {list(NOT_APPLICABLE_REASONS)}"
        )
    text = f"{item.view.view} image {number} not applicable: {code.meaning[0].lower()}"
    text += code.meaning[1:]
    detail = " ".join(item.detail.split())
    return f"{text} ({detail})" if detail else text


def not_applicable_score(item: NotApplicable) -> str | None:
    """The score that decided an image was not answered on and its threshold, e.g. "implant
    probability 2%, threshold 31%" or "out-of-distribution distance 41.7, threshold 25";
    probabilities in percent (rounded to 0.01, as the SR writes them), the distance rounded to
    0.01. None without a score (or with an unknown reason)."""
    if item.score is None or item.reason not in _SCORES:
        return None
    name, probability = _SCORES[item.reason]

    def figure(value: float) -> str:
        if probability:
            return format(percent_value(value), ".15g") + "%"
        return format(round(float(value), 2), ".15g")

    text = f"{name} {figure(item.score)}"
    return text if item.threshold is None else f"{text}, threshold {figure(item.threshold)}"


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


def check_task(prediction: Prediction, spec: TaskSpec) -> None:
    """EncodeError unless ``spec`` is the spec of the prediction's task."""
    if spec.name != prediction.task:
        raise EncodeError(
            f"the task spec is {spec.name!r}, the prediction is for task {prediction.task!r}"
        )


def check_version(version: int) -> None:
    """EncodeError unless ``version`` is a result version (1, 2, ...)."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise EncodeError(f"the result version must be an integer of at least 1, not {version!r}")


def fused_indices(prediction: Prediction) -> tuple[int, ...]:
    """Indices into ``prediction.views`` of the images the fused result combines.

    ``prediction.fused_views`` when given (the latest image of each view), else every view.
    EncodeError when an index is out of range or repeated.
    """
    count = len(prediction.views)
    indices = prediction.fused_views or tuple(range(count))
    if len(set(indices)) != len(indices) or not all(0 <= i < count for i in indices):
        raise EncodeError(
            f"fused views {list(prediction.fused_views)} are not distinct indices into "
            f"the {count} analysed view(s)"
        )
    return tuple(sorted(indices))


def fused_view_names(prediction: Prediction) -> str:
    """The views the fused result combines, e.g. "AP+LAT"."""
    return "+".join(prediction.views[i].view.view for i in fused_indices(prediction))


def supersede_statement(version: int) -> str | None:
    """What the SR says of a result made again for a study and task; None for version 1.

    A later version is built when images arrive after the earlier result was made; the
    earlier SR and SCs stay where they were sent, and this one has new UIDs.
    """
    if version <= 1:
        return None
    return (
        f"Version {version} of this result: supersedes earlier orthonode results for this "
        "study and task (images received after they were made)"
    )


def result_phrase(prediction: Prediction, probabilities: Sequence[float]) -> str:
    """One image's or the study's result as every output words it (:mod:`dicom_node.wording`):
    "Zimmer LPS 97 %", "Undetermined — best ...", or, at an operating point, "Present —
    probability 44 % (called present at ≥ 17 %)". The outputs put the task's label before it
    ("Hip prosthesis loosening: Present — ...").
    """
    probabilities = tuple(float(p) for p in probabilities)
    best = decide(probabilities, prediction.decision_threshold)
    unsure = prediction.decision_threshold is None and probabilities[best] < prediction.threshold
    return result_text(
        [info.code_meaning for info in prediction.classes],
        probabilities,
        predicted=best,
        abstained=prediction.abstained or unsure,
        threshold=prediction.threshold,
        decision_threshold=prediction.decision_threshold,
    )


def saliency_peak(heatmap: np.ndarray) -> tuple[int, int]:
    """(row, column) of the hottest pixel of a heatmap (the first, in row order, of ties)."""
    heat = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=-np.inf)
    if heat.ndim != 2 or heat.size == 0:
        raise EncodeError(f"a heatmap is a non-empty 2-D array, not of shape {heat.shape}")
    row, column = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return int(row), int(column)


#: The side of a finding as SNOMED CT codes it (SR finding sites, the SEG's anatomic region).
LATERALITY: Mapping[str, hd.sr.CodedConcept] = MappingProxyType(
    {
        "R": hd.sr.CodedConcept("24028007", "SCT", "Right"),
        "L": hd.sr.CodedConcept("7771000", "SCT", "Left"),
    }
)


def saliency_method(method: str) -> hd.sr.CodedConcept:
    """The saliency method as DICOM codes it (the SR's peak groups, the SEG's segment type):
    Grad-CAM is "Gradient-weighted class activation" (130403, DCM); other methods are
    "Saliency" (130404, DCM)."""
    if method.lower().replace("-", "") == "gradcam":
        return hd.sr.CodedConcept.from_code(codes.DCM.GradientWeightedClassActivation)
    return hd.sr.CodedConcept.from_code(codes.DCM.Saliency)
