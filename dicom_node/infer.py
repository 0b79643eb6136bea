"""Inference: region of interest, per-view probabilities (temperature-scaled), AP + lateral
fusion, operating point and abstention.

One :class:`Predictor` owns the models (on CUDA when available) and runs the views of one or
more ready studies as a batch per task. For a bundle with a localiser, each view is first
located (:mod:`dicom_node.models.localiser`) and the classifier reads the square around the
implant at the source's resolution.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset

from dicom_node.domain import (
    Prediction,
    RegionOfInterest,
    RoutedView,
    StudyJob,
    ViewPrediction,
)
from dicom_node.errors import InferenceError
from dicom_node.models.bundle import Bundle, Stacker
from dicom_node.models.localiser import locate
from dicom_node.preprocess import crop_square, display_image, to_model_input

__all__ = ["Predictor", "PreparedView", "classifier_input", "fuse", "select_device"]

log = logging.getLogger(__name__)


def select_device(preference: str = "auto") -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass(frozen=True)
class PreparedView:
    """A view read, displayed and turned into the network's input."""

    view: RoutedView
    dataset: Dataset
    display: np.ndarray  # (Rows, Columns) float32 in [0, 1]
    tensor: torch.Tensor  # (C, S, S)
    region: RegionOfInterest | None = None  # the square the classifier read, if it crops


def classifier_input(
    bundle: Bundle, display: np.ndarray
) -> tuple[torch.Tensor, RegionOfInterest | None]:
    """The classifier's input for a displayed image, and the region it shows (None: whole).

    ``train/`` batches the same steps (:func:`~dicom_node.models.localiser.locate`,
    :func:`~dicom_node.preprocess.crop_square`, :func:`~dicom_node.preprocess.to_model_input`),
    so training and serving crop the same way.
    """
    card = bundle.card
    region = None
    if bundle.localiser is not None and card.roi is not None:
        whole = to_model_input(display, card.roi.input_size, 1, "standardise")
        [region] = locate(
            bundle.localiser, whole[None], [display.shape], card.roi.threshold, card.roi.margin
        )
        display = crop_square(display, region)
    tensor = to_model_input(display, card.input_size, card.channels, card.normalisation)
    return tensor, region


def fuse(per_view: dict[str, np.ndarray], stacker: Stacker | None) -> np.ndarray | None:
    """Study-level probabilities from the views' probabilities; None for a single view.

    With a logistic stacker whose views are all present: softmax(W · [log p_AP, log p_LAT] + b);
    with a "mean" stacker: softmax(log(mean of the views) / T). Otherwise (no stacker, or a view
    it needs is missing) the mean of the views' probabilities.
    """
    if len(per_view) < 2:
        return None
    if stacker is not None and all(v in per_view for v in stacker.views):
        if stacker.kind == "mean":
            mean = np.mean([per_view[v] for v in stacker.views], axis=0)
            logits = np.log(np.clip(mean, 1e-12, 1.0)) / stacker.temperature
        else:
            features = np.concatenate(
                [np.log(np.clip(per_view[v], 1e-7, 1.0)) for v in stacker.views]
            )
            logits = np.asarray(stacker.coefficients) @ features + np.asarray(stacker.intercepts)
        logits -= logits.max()
        fused = np.exp(logits)
        return fused / fused.sum()
    return np.mean(list(per_view.values()), axis=0)


class Predictor:
    """Holds one bundle per task and predicts studies."""

    def __init__(self, bundles: dict[str, Bundle], device: torch.device | None = None) -> None:
        self.bundles = bundles
        self.device = device or torch.device("cpu")
        for bundle in bundles.values():
            bundle.model.to(self.device).eval()

    def prepare(self, view: RoutedView) -> PreparedView:
        bundle = self.bundles[view.task]
        try:
            ds = pydicom.dcmread(view.instance.path)
            display = display_image(ds)
        except Exception as error:
            raise InferenceError(
                f"cannot decode instance {view.instance.sop_instance_uid}: {error}"
            ) from error
        tensor, region = classifier_input(bundle, display)
        if region is not None and not region.found:
            log.warning(
                "instance %s: no implant located; the classifier reads the whole image",
                view.instance.sop_instance_uid,
            )
        return PreparedView(view=view, dataset=ds, display=display, tensor=tensor, region=region)

    def predict(self, jobs: Sequence[StudyJob]) -> list[tuple[Prediction, list[PreparedView]]]:
        """Predict several studies; views of the same task run as one batch."""
        prepared = {
            job.study_instance_uid + job.task: [self.prepare(v) for v in job.views] for job in jobs
        }
        probabilities: dict[int, np.ndarray] = {}
        by_task: dict[str, list[PreparedView]] = {}
        for views in prepared.values():
            for view in views:
                by_task.setdefault(view.view.task, []).append(view)
        for task, views in by_task.items():
            bundle = self.bundles[task]
            batch = torch.stack([v.tensor for v in views]).to(self.device)
            with torch.no_grad():
                logits = bundle.model(batch).float() / bundle.card.temperature
            for view, p in zip(views, torch.softmax(logits, dim=1).cpu().numpy(), strict=True):
                probabilities[id(view)] = p.astype(np.float64)
        results = []
        for job in jobs:
            views = prepared[job.study_instance_uid + job.task]
            bundle = self.bundles[job.task]
            per_view = [
                ViewPrediction(
                    view=v.view,
                    probabilities=tuple(float(x) for x in probabilities[id(v)]),
                    region=v.region,
                )
                for v in views
            ]
            fused = fuse({v.view.view: probabilities[id(v)] for v in views}, bundle.card.stacker)
            prediction = Prediction(
                study_instance_uid=job.study_instance_uid,
                task=job.task,
                classes=bundle.classes,
                views=tuple(per_view),
                fused_probabilities=None if fused is None else tuple(float(x) for x in fused),
                threshold=bundle.card.threshold,
                model=bundle.model_info,
                decision_threshold=bundle.card.decision_threshold,
            )
            results.append((prediction, views))
        return results
