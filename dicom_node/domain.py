"""Plain frozen dataclasses passed between the stages of the node (no behaviour, no I/O).

ingress → spool → assemble → route → preprocess → infer → explain → encode → egress: each arrow
hands over one of these (or a file path), so each stage can be tested alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # only a type here: the domain does no tensor work
    import torch
    from pydicom.dataset import Dataset

__all__ = [
    "NOT_APPLICABLE_REASONS",
    "ClassInfo",
    "Explanation",
    "ImageCheck",
    "InstanceRef",
    "ModelInfo",
    "NotApplicable",
    "Outputs",
    "Prediction",
    "PreparedView",
    "RegionOfInterest",
    "RoutedView",
    "StudyJob",
    "ViewPrediction",
    "decide",
    "latest_indices",
]


@dataclass(frozen=True)
class InstanceRef:
    """One received, durably stored instance."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    path: Path


@dataclass(frozen=True)
class RoutedView:
    """An instance the routing rules matched to a task and a view."""

    instance: InstanceRef
    task: str  # "knee", "hip", "spine"
    view: str  # "AP" or "LAT"
    laterality: str | None = None  # "R", "L", or None when unpaired/unknown


@dataclass(frozen=True)
class StudyJob:
    """A study claimed for one task: every routed view received so far, oldest first per view.

    When a view was sent more than once, each image is analysed (and referenced by the SR);
    the study-level result fuses the most recent image of each view (:func:`latest_indices`).
    """

    study_instance_uid: str
    task: str
    views: tuple[RoutedView, ...]
    version: int = 1  # grows whenever an instance arrives after the study was claimed
    last_received_at: float = 0.0  # when its newest instance was stored (the spool's clock)


def latest_indices(views: tuple[RoutedView, ...]) -> tuple[int, ...]:
    """Indices of the most recent image of each view (views are in received order)."""
    latest: dict[str, int] = {}
    for index, view in enumerate(views):
        latest[view.view] = index
    return tuple(sorted(latest.values()))


@dataclass(frozen=True)
class RegionOfInterest:
    """A square region of a source image, in its pixels; it may reach past the image's edges.

    The classifier reads this square (outside the image: zeros) resized to its input; the
    heatmap is mapped back into it. ``found`` is False when the localiser found no implant and
    the region is a square around the whole image.
    """

    top: int
    left: int
    side: int
    found: bool = True


@dataclass(frozen=True)
class ClassInfo:
    """One output class of a model, with the code that represents it in the SR."""

    index: int
    name: str  # display name, e.g. "Zimmer Persona"
    code_value: str  # ≤ 16 characters
    coding_scheme: str  # "SCT" or a private "99..." scheme
    code_meaning: str  # ≤ 64 characters, readable


@dataclass(frozen=True)
class ModelInfo:
    """The algorithm, as the SR and the Secondary Capture name it."""

    name: str  # e.g. "orthonode knee implant classifier"
    version: str  # the bundle's version
    device_uid: str  # stable for one model version, changes when retrained
    manufacturer: str = "orthonode"
    demo: bool = True  # demo weights: not for clinical use, said in every output


@dataclass(frozen=True)
class PreparedView:
    """A view read, displayed and turned into the network's input (the infer → explain seam)."""

    view: RoutedView
    dataset: Dataset = field(repr=False)
    display: np.ndarray = field(repr=False)  # (Rows, Columns) float32 in [0, 1]
    tensor: torch.Tensor = field(repr=False)  # (C, S, S)
    region: RegionOfInterest | None = None  # the square the classifier read, if it crops


@dataclass(frozen=True)
class ImageCheck:
    """What the image check model saw in one image, whatever its tags say."""

    anatomy: str  # "knee", "hip", "spine" or "other"
    anatomy_probability: float
    view: str  # "AP" or "LAT"
    view_probability: float
    # Probability that each task's implant is in the image, by task name (tasks without an
    # implant are absent).
    implant: dict[str, float] = field(default_factory=dict)


#: Why an image is not one to answer on, in the order the applicability stage asks.
#: ``no-implant``: the task's implant is not in the image; ``anatomy``: the image shows another
#: body part than the task reads; ``view``: another projection than the one routed;
#: ``out-of-distribution``: the classifier's features lie outside what it was trained on.
NOT_APPLICABLE_REASONS: tuple[str, ...] = ("anatomy", "view", "no-implant", "out-of-distribution")


@dataclass(frozen=True)
class NotApplicable:
    """One image the node did not answer on, and why (UIDs only: no patient data)."""

    view: RoutedView
    reason: str  # one of NOT_APPLICABLE_REASONS
    detail: str  # readable: what was measured against what, e.g. "implant 0.02 < 0.31"
    check: ImageCheck | None = None
    # The score that decided it and its threshold: the probability of the other anatomy or
    # view, the implant probability, or the out-of-distribution distance.
    score: float | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class ViewPrediction:
    """The model's output for one analysed image."""

    view: RoutedView
    probabilities: tuple[float, ...]  # calibrated, one per class, summing to 1
    region: RegionOfInterest | None = None  # what the classifier read, when the bundle crops


def decide(probabilities: tuple[float, ...], decision_threshold: float | None) -> int:
    """The predicted class: the second of two when its probability reaches the decision
    threshold (an operating point chosen on validation data), otherwise the most probable."""
    if decision_threshold is not None and len(probabilities) == 2:
        return int(probabilities[1] >= decision_threshold)
    return int(np.argmax(probabilities))


@dataclass(frozen=True)
class Prediction:
    """Per-view predictions of one study and task, and the fused study-level result."""

    study_instance_uid: str
    task: str
    classes: tuple[ClassInfo, ...]
    views: tuple[ViewPrediction, ...]
    fused_probabilities: tuple[float, ...] | None  # None when only one view was analysed
    threshold: float  # below this probability of the predicted class: "undetermined"
    model: ModelInfo
    decision_threshold: float | None = None  # two-class tasks: operating point on class 2
    # Which of ``views`` the fused result combines (the latest image of each view); empty:
    # all of them.
    fused_views: tuple[int, ...] = ()
    # Images the applicability stage excluded. With ``views`` empty the whole study is not
    # applicable: no class, no probability, only the reasons.
    not_applicable: tuple[NotApplicable, ...] = ()

    @property
    def applicable(self) -> bool:
        """At least one image was analysed."""
        return bool(self.views)

    @property
    def probabilities(self) -> tuple[float, ...]:
        """The study-level result: fused when available, else the single view's."""
        if self.fused_probabilities is not None:
            return self.fused_probabilities
        if not self.views:
            raise ValueError("a study that is not applicable has no probabilities")
        return self.views[0].probabilities

    @property
    def predicted_index(self) -> int:
        return decide(self.probabilities, self.decision_threshold)

    @property
    def certainty(self) -> float:
        """The probability of the predicted class."""
        return float(self.probabilities[self.predicted_index])

    @property
    def abstained(self) -> bool:
        """Below the threshold; never with an operating point (it decides every case)."""
        return self.decision_threshold is None and self.certainty < self.threshold


@dataclass(frozen=True)
class Explanation:
    """A saliency heatmap for one analysed image, on the source image's pixel grid."""

    view: RoutedView
    heatmap: np.ndarray = field(repr=False)  # float32 (Rows, Columns) in [0, 1]
    method: str = "Grad-CAM"  # or "Integrated gradients"
    region: RegionOfInterest | None = None  # the square the classifier read (outlined on SC)


@dataclass(frozen=True)
class Outputs:
    """The DICOM objects made for one study and task, ready to send."""

    study_instance_uid: str
    task: str
    structured_report: Path
    secondary_captures: tuple[Path, ...]
    segmentations: tuple[Path, ...] = ()  # outputs.saliency: segmentation or both
