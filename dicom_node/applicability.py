"""Applicability: is this an image the task's model may answer on?

Routing trusts the tags; the tags are typed or defaulted at the modality and are often missing
or wrong, and most knee and hip radiographs show no arthroplasty. Before a classifier answers,
three questions are asked of each image, in this order:

1. **Anatomy and view** — the *image check*, one small network shared by all tasks
   (:class:`ImageChecker`, bundle ``weights/image-check``), reads the whole image and says
   which body part (knee, hip, spine or other) and which projection (AP or lateral) it shows.
   ``routing.image_check: confirm`` answers "not applicable" when it confidently contradicts
   the route; ``fallback`` also routes by it when the tags are missing or wrong
   (:meth:`ImageChecker.route`).
2. **Implant present** — the same network's implant head: the probability that the task's
   implant is in the image, against a threshold chosen on validation phantoms (card). A
   patient either has the implant or not, so in a study with several views of the task's
   anatomy the views' evidence is also pooled (:func:`study_implant`, the mean log-odds):
   a view is answered only when both it and the study pass the threshold. An anterior plate
   that looks a little like pedicle screws on the lateral view is then refused on the
   strength of the AP view that shows no screw at all; a view with the implant cut off by
   the collimator does not take the study's other views down with it.
3. **Out of distribution** — the Mahalanobis distance of the classifier's pooled features to
   the nearest class mean (one shared covariance, Lee et al. 2018), against a threshold chosen
   on in-distribution validation images (the task bundle's ``ood.pt`` and ``card.ood``).

Each answer is a :class:`~dicom_node.domain.NotApplicable` with a coded reason, or None. The
thresholds and their validation figures are in the cards, written by ``python -m train
image-check`` and ``python -m train ood``; :func:`split_logits`, :func:`pooled_features` and
:class:`Mahalanobis` are shared with ``train/`` so training and serving cannot drift apart.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from dicom_node.domain import ImageCheck, NotApplicable, RoutedView
from dicom_node.errors import BundleError
from dicom_node.models.backbones import build_backbone
from dicom_node.models.bundle import sha256_file
from dicom_node.models.ood import Mahalanobis, OodSpec, pooled_features
from dicom_node.preprocess import Preprocessing, build_preprocessing
from dicom_node.tasks import TaskSpec

__all__ = [
    "IMAGE_CHECK_FILE",
    "ImageCheckCard",
    "ImageChecker",
    "Mahalanobis",
    "OodSpec",
    "assess",
    "load_image_checker",
    "pooled_features",
    "split_logits",
    "study_implant",
]

IMAGE_CHECK_FILE = "model.pt"


class ImageCheckCard(BaseModel):
    """card.json of the image check bundle."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = 1
    task: Literal["image-check"] = "image-check"
    name: str = "orthonode image check"
    version: str
    demo: bool = True
    backbone: str = "orthonode_cnn"
    input_size: int = Field(default=192, ge=64, le=1024)
    anatomies: list[str] = Field(min_length=2, description="softmax head 1, e.g. knee ... other")
    views: list[str] = Field(min_length=2, description="softmax head 2: AP, LAT")
    implants: list[str] = Field(description="sigmoid head 3: one per task whose implant it sees")
    implant_thresholds: dict[str, float] = Field(
        default_factory=dict, description="per task: below it, no implant"
    )
    anatomy_threshold: float = Field(
        default=0.5, description="another anatomy at or above this probability contradicts"
    )
    view_threshold: float = Field(
        default=0.5, description="another view at or above this probability contradicts"
    )
    metrics: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    model_sha256: str

    @property
    def outputs(self) -> int:
        return len(self.anatomies) + len(self.views) + len(self.implants)


def split_logits(
    logits: torch.Tensor, card: ImageCheckCard
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(anatomy, view, implant) logits of the image check's one linear head."""
    a, v = len(card.anatomies), len(card.views)
    return logits[:, :a], logits[:, a : a + v], logits[:, a + v :]


def image_check_preprocessing(card: ImageCheckCard) -> Preprocessing:
    """The whole image, longest side resized, padded square, standardised."""
    return build_preprocessing(card.input_size, 1, "standardise", None)


@dataclass
class ImageChecker:
    """The image check network and its card, on a device."""

    card: ImageCheckCard
    model: nn.Module
    device: torch.device
    path: Path

    def __post_init__(self) -> None:
        self.model.to(self.device).eval()
        self._preprocessing = image_check_preprocessing(self.card)

    def inputs(self, display: np.ndarray) -> torch.Tensor:
        tensor, _ = self._preprocessing(display)
        return tensor

    def check(self, displays: Sequence[np.ndarray]) -> list[ImageCheck]:
        """What each displayed image shows (anatomy, view, each task's implant)."""
        if not displays:
            return []
        batch = torch.stack([self.inputs(d) for d in displays]).to(self.device)
        with torch.no_grad():
            anatomy, view, implant = split_logits(self.model(batch).float(), self.card)
        pa = torch.softmax(anatomy, dim=1).cpu().numpy()
        pv = torch.softmax(view, dim=1).cpu().numpy()
        pi = torch.sigmoid(implant).cpu().numpy()
        results = []
        for a, v, i in zip(pa, pv, pi, strict=True):
            ai, vi = int(np.argmax(a)), int(np.argmax(v))
            results.append(
                ImageCheck(
                    anatomy=self.card.anatomies[ai],
                    anatomy_probability=float(a[ai]),
                    view=self.card.views[vi],
                    view_probability=float(v[vi]),
                    implant={t: float(p) for t, p in zip(self.card.implants, i, strict=True)},
                )
            )
        return results

    def route(
        self, check: ImageCheck, specs: Mapping[str, TaskSpec], enabled: Sequence[str]
    ) -> tuple[str, str] | None:
        """(task, view) of an image by what it shows: the enabled task whose anatomy the image
        shows (with an implant head: the one whose implant it sees most), or None."""
        if check.anatomy_probability < self.card.anatomy_threshold:
            return None
        candidates = [t for t in enabled if specs[t].anatomy == check.anatomy]
        if not candidates:
            return None
        best = max(candidates, key=lambda t: check.implant.get(t, -1.0))
        return best, check.view


def load_image_checker(path: Path, device: torch.device | str = "cpu") -> ImageChecker:
    """Load and verify an image check bundle (card.json + model.pt with its sha256)."""
    card_path = path / "card.json"
    try:
        card = ImageCheckCard.model_validate(json.loads(card_path.read_text()))
    except OSError as error:
        raise BundleError(
            f"image check bundle {path}: cannot read card.json ({error.strerror}); point "
            "routing.image_check_bundle at the shipped weights/image-check (relative paths are "
            "read from conf.yaml's folder), make one with `python -m train image-check`, or set "
            "routing.image_check: off"
        ) from error
    except ValueError as error:
        raise BundleError(f"image check bundle {path}: invalid card.json: {error}") from error
    weights = path / IMAGE_CHECK_FILE
    if not weights.is_file() or sha256_file(weights) != card.model_sha256:
        raise BundleError(
            f"image check bundle {path}: {IMAGE_CHECK_FILE} is missing or does not match the "
            "card's sha256 (re-export it with `python -m train image-check`)"
        )
    model = build_backbone(card.backbone, card.outputs)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise BundleError(f"image check bundle {path}: weights do not fit: {error}") from error
    return ImageChecker(card=card, model=model, device=torch.device(device), path=path)


# -- the decision -------------------------------------------------------------------------------


def study_implant(checks: Sequence[ImageCheck], spec: TaskSpec) -> float | None:
    """The study's probability of the task's implant from all its views of the task's anatomy:
    the sigmoid of the mean log-odds (each view's evidence counts once). None with fewer than
    two such views, where the view's own probability is all there is."""
    probabilities = [
        c.implant[spec.name]
        for c in checks
        if spec.name in c.implant and (spec.anatomy is None or c.anatomy == spec.anatomy)
    ]
    if len(probabilities) < 2:
        return None
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-6, 1 - 1e-6)
    return float(1.0 / (1.0 + np.exp(-np.mean(np.log(p / (1 - p))))))


def assess(
    view: RoutedView,
    spec: TaskSpec,
    check: ImageCheck | None,
    card: ImageCheckCard | None,
    ood_score: float | None,
    ood: OodSpec | None,
    fmt: Callable[[float], str] = lambda x: f"{x:.2f}",
    study: float | None = None,
) -> NotApplicable | None:
    """Why the node must not answer on this routed image, or None when it may.

    Asked in order: anatomy, view (the image check confidently shows another one), implant
    (the task's implant probability below its threshold, for the image and then for the
    study's views together, ``study`` from :func:`study_implant`), out of distribution (the
    score above the bundle's threshold). A missing check or score skips its question.
    """
    if check is not None and card is not None:
        if (
            spec.anatomy is not None
            and check.anatomy != spec.anatomy
            and check.anatomy_probability >= card.anatomy_threshold
        ):
            return NotApplicable(
                view,
                "anatomy",
                f"the image shows {check.anatomy} ({fmt(check.anatomy_probability)}), "
                f"the task reads {spec.anatomy}",
                check,
                check.anatomy_probability,
                card.anatomy_threshold,
            )
        if check.view != view.view and check.view_probability >= card.view_threshold:
            return NotApplicable(
                view,
                "view",
                f"routed as {view.view}, the image shows {check.view} "
                f"({fmt(check.view_probability)})",
                check,
                check.view_probability,
                card.view_threshold,
            )
        threshold = card.implant_thresholds.get(spec.name)
        probability = check.implant.get(spec.name)
        if threshold is not None and probability is not None and probability < threshold:
            return NotApplicable(
                view,
                "no-implant",
                f"implant probability {fmt(probability)} < {fmt(threshold)}",
                check,
                probability,
                threshold,
            )
        if threshold is not None and study is not None and study < threshold:
            return NotApplicable(
                view,
                "no-implant",
                f"implant probability of the study's views together {fmt(study)} < "
                f"{fmt(threshold)} (this view {fmt(probability or 0.0)})",
                check,
                study,
                threshold,
            )
    if ood is not None and ood_score is not None and ood_score > ood.threshold:
        return NotApplicable(
            view,
            "out-of-distribution",
            f"feature distance {ood_score:.1f} > {ood.threshold:.1f}",
            check,
            ood_score,
            ood.threshold,
        )
    return None
