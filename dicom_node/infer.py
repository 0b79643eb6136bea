"""Inference: read and prepare each view, per-view probabilities (temperature-scaled), AP +
lateral fusion, operating point and abstention — and the saliency explanation.

One :class:`Predictor` owns the models (on CUDA when available): it runs the views of one or
more claimed studies as one batch per task, and explains a view for the predicted class
(:meth:`Predictor.explain`, captum in :mod:`dicom_node.explain`). For a bundle with a
localiser, each view is first located and the classifier reads the square around the implant
at the source's resolution (:func:`dicom_node.preprocess.classifier_input`, shared with
``train/``). Every stage's time goes to an injected ``observe(stage, seconds)``.

Before a view's result counts, the applicability stage (:mod:`dicom_node.applicability`) asks
whether the node may answer on it: the image check (anatomy, view, implant present) when one
is given, and the bundle's out-of-distribution score when its card has one. Excluded views
are listed in ``Prediction.not_applicable``; the study's result uses only the others, and a
study with none left is not applicable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pydicom
import torch

from dicom_node.applicability import ImageChecker, assess, study_implant
from dicom_node.domain import (
    Explanation,
    ImageCheck,
    NotApplicable,
    Prediction,
    PreparedView,
    RoutedView,
    StudyJob,
    ViewPrediction,
    latest_indices,
)
from dicom_node.errors import InferenceError
from dicom_node.explain import explain
from dicom_node.models.bundle import Bundle, Stacker
from dicom_node.models.ood import pooled_features
from dicom_node.preprocess import classifier_input, display_image
from dicom_node.tasks import TaskSpec, builtin_tasks

__all__ = ["Observe", "Predictor", "fuse", "select_device"]

log = logging.getLogger(__name__)

#: ``observe(stage, seconds)``: where stage timings go (the node's stage histogram).
Observe = Callable[[str, float], None]


def _ignore(stage: str, seconds: float) -> None:
    return None


def select_device(preference: str = "auto") -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


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
    """Holds one bundle per task; predicts studies and explains their views."""

    def __init__(
        self,
        bundles: dict[str, Bundle],
        device: torch.device | None = None,
        *,
        saliency: str = "gradcam",
        observe: Observe = _ignore,
        image_checker: ImageChecker | None = None,
        specs: Mapping[str, TaskSpec] | None = None,
        out_of_distribution: bool = True,
    ) -> None:
        self.bundles = bundles
        self.device = device or torch.device("cpu")
        self.saliency = saliency
        self.observe = observe
        self.image_checker = image_checker
        # The specs say which anatomy each task reads (site tasks: from conf.yaml).
        self.specs: dict[str, TaskSpec] = {**builtin_tasks(), **(specs or {})}
        self.out_of_distribution = out_of_distribution
        for bundle in bundles.values():
            bundle.model.to(self.device).eval()

    def prepare(self, view: RoutedView) -> PreparedView:
        """Read and decode one view, display it and make the classifier's input."""
        bundle = self.bundles[view.task]
        started = time.perf_counter()
        try:
            ds = pydicom.dcmread(view.instance.path)
            display = display_image(ds)
        except Exception as error:
            raise InferenceError(
                f"cannot decode instance {view.instance.sop_instance_uid}: {error}"
            ) from error
        located = time.perf_counter()
        self.observe("read", located - started)
        tensor, region = classifier_input(bundle, display)
        self.observe("locate", time.perf_counter() - located)
        if region is not None and not region.found:
            log.warning(
                "instance %s: no implant located; the classifier reads the whole image",
                view.instance.sop_instance_uid,
            )
        return PreparedView(view=view, dataset=ds, display=display, tensor=tensor, region=region)

    def predict(self, jobs: Sequence[StudyJob]) -> list[tuple[Prediction, list[PreparedView]]]:
        """Predict several studies; views of the same task run as one batch.

        Returns per job its prediction and its prepared views: first the analysed ones (in the
        order of ``prediction.views``), then the excluded ones (``prediction.not_applicable``).
        """
        prepared = [[self.prepare(v) for v in job.views] for job in jobs]
        checks = self._check([v for views in prepared for v in views])
        started = time.perf_counter()
        probabilities: dict[int, np.ndarray] = {}
        scores: dict[int, float] = {}
        by_task: dict[str, list[PreparedView]] = {}
        for views in prepared:
            for view in views:
                by_task.setdefault(view.view.task, []).append(view)
        for task, views in by_task.items():
            bundle = self.bundles[task]
            batch = torch.stack([v.tensor for v in views]).to(self.device)
            ood = bundle.ood if self.out_of_distribution else None
            with torch.no_grad():
                if ood is not None:
                    raw, features = pooled_features(bundle.model, batch)
                    for view, score in zip(views, ood.score(features), strict=True):
                        scores[id(view)] = float(score)
                else:
                    raw = bundle.model(batch)
                logits = raw.float() / bundle.card.temperature
            for view, p in zip(views, torch.softmax(logits, dim=1).cpu().numpy(), strict=True):
                probabilities[id(view)] = p.astype(np.float64)
        results = []
        for job, views in zip(jobs, prepared, strict=True):
            bundle = self.bundles[job.task]
            analysed: list[PreparedView] = []
            excluded: list[tuple[PreparedView, NotApplicable]] = []
            spec = self.specs.get(job.task)
            study = (
                study_implant([checks[id(v)] for v in views if id(v) in checks], spec)
                if spec is not None
                else None
            )
            for v in views:
                verdict = self._assess(v, checks.get(id(v)), scores.get(id(v)), study)
                if verdict is None:
                    analysed.append(v)
                else:
                    excluded.append((v, verdict))
                    log.info(
                        "instance %s of study %s: not applicable to %s (%s: %s)",
                        v.view.instance.sop_instance_uid,
                        job.study_instance_uid,
                        job.task,
                        verdict.reason,
                        verdict.detail,
                    )
            per_view = [
                ViewPrediction(
                    view=v.view,
                    probabilities=tuple(float(x) for x in probabilities[id(v)]),
                    region=v.region,
                )
                for v in analysed
            ]
            latest = latest_indices(tuple(v.view for v in analysed))
            fused = fuse(
                {analysed[i].view.view: probabilities[id(analysed[i])] for i in latest},
                bundle.card.stacker,
            )
            prediction = Prediction(
                study_instance_uid=job.study_instance_uid,
                task=job.task,
                classes=bundle.classes,
                views=tuple(per_view),
                fused_probabilities=None if fused is None else tuple(float(x) for x in fused),
                threshold=bundle.card.threshold,
                model=bundle.model_info,
                decision_threshold=bundle.card.decision_threshold,
                fused_views=latest if fused is not None else (),
                not_applicable=tuple(na for _, na in excluded),
            )
            results.append((prediction, analysed + [v for v, _ in excluded]))
        views_done = sum(len(v) for v in prepared)
        for _ in range(views_done):  # per view, like the other stages: the batch's mean
            self.observe("classify", (time.perf_counter() - started) / views_done)
        return results

    def _check(self, views: Sequence[PreparedView]) -> dict[int, ImageCheck]:
        """The image check of every view (one batch), when the predictor has one."""
        if self.image_checker is None or not views:
            return {}
        started = time.perf_counter()
        checks = self.image_checker.check([v.display for v in views])
        for _ in views:
            self.observe("check", (time.perf_counter() - started) / len(views))
        return {id(v): c for v, c in zip(views, checks, strict=True)}

    def _assess(
        self,
        view: PreparedView,
        check: ImageCheck | None,
        score: float | None,
        study: float | None = None,
    ) -> NotApplicable | None:
        spec = self.specs.get(view.view.task)
        if spec is None:
            return None
        card = self.image_checker.card if self.image_checker is not None else None
        ood = self.bundles[view.view.task].card.ood if self.out_of_distribution else None
        return assess(view.view, spec, check, card, score, ood, study=study)

    def explain(self, view: PreparedView, target: int) -> Explanation:
        """The saliency heatmap of ``view`` for class ``target``, on the source's grid."""
        started = time.perf_counter()
        explanation = explain(
            self.bundles[view.view.task], view, target, self.saliency, self.device
        )
        self.observe("explain", time.perf_counter() - started)
        return explanation
