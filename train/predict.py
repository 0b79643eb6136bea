"""A bundle on a labelled set through the node's own inference.

Every study goes through :class:`dicom_node.infer.Predictor` exactly as the node runs it
(preprocessing, region of interest, temperature, AP + lateral fusion, operating threshold):
:func:`predict_views` gives each view's calibrated probabilities (for ``calibrate`` and
``ensemble``), :func:`evaluate` scores the views and the fused result with :mod:`train.metrics`
(for ``evaluate`` and ``fit``'s ``--external`` sets). :func:`select_studies` picks the split that
trained a bundle from the ``split.csv`` that :func:`write_split` put beside it.
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from dicom_node.domain import InstanceRef, RoutedView, StudyJob
from dicom_node.explain import explain
from dicom_node.infer import Predictor
from dicom_node.models.bundle import Bundle, load_bundle
from train.data import LabelledSet, Sample, read_dataset
from train.metrics import abstention, bootstrap_intervals, classification_metrics
from train.report import Section

__all__ = [
    "evaluate",
    "predict_views",
    "saliency_in_mask",
    "select_studies",
    "study_jobs",
    "write_split",
]


def study_jobs(dataset: LabelledSet) -> tuple[list[StudyJob], dict[str, list[Sample]]]:
    """One StudyJob per study of a labelled set (AP first), and its samples by study UID."""
    studies: dict[str, list[Sample]] = {}
    for sample in dataset.samples:
        studies.setdefault(sample.study_instance_uid, []).append(sample)
    jobs = [
        StudyJob(
            uid,
            dataset.task,
            tuple(
                RoutedView(
                    InstanceRef(s.sop_instance_uid, "", uid, "", s.path),
                    dataset.task,
                    s.view,
                    s.laterality,
                )
                for s in sorted(members, key=lambda s: s.view != "AP")
            ),
        )
        for uid, members in studies.items()
    ]
    return jobs, studies


def select_studies(dataset: LabelledSet, bundle_path: Path, subset: str) -> LabelledSet:
    """The studies of ``dataset`` in ``subset``: "all", or "val" / "test" of the split that
    trained the bundle (``split.csv`` beside it, written by ``python -m train fit``)."""
    if subset == "all":
        return dataset
    split_file = bundle_path / "split.csv"
    if not split_file.is_file():
        raise ValueError(f"--subset {subset} needs {split_file} (written by train fit)")
    with split_file.open(newline="") as handle:
        wanted = {r["study_instance_uid"] for r in csv.DictReader(handle) if r["split"] == subset}
    samples = tuple(s for s in dataset.samples if s.study_instance_uid in wanted)
    if not samples:
        raise ValueError(f"no study of {subset!r} in {split_file} is in this data set")
    return replace(dataset, samples=samples)


def write_split(path: Path, dataset: LabelledSet, index: dict[str, np.ndarray]) -> None:
    """study_instance_uid → split (UIDs only, no patient identifiers): the file
    :func:`select_studies` reads; ``index`` holds each split's rows of ``dataset``."""
    studies = {
        dataset.samples[i].study_instance_uid: name
        for name, members in index.items()
        for i in members
    }
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["study_instance_uid", "split"])
        writer.writerows(sorted(studies.items()))


def predict_views(
    bundle: Bundle, dataset: LabelledSet, batch: int = 32
) -> tuple[list[Sample], np.ndarray]:
    """Every view's calibrated probabilities, through the node's Predictor (one row per
    returned sample; views the bundle does not analyse are left out)."""
    jobs, studies = study_jobs(dataset)
    predictor = Predictor({dataset.task: bundle})
    samples, rows = [], []
    for start in range(0, len(jobs), batch):
        for prediction, _ in predictor.predict(jobs[start : start + batch]):
            by_sop = {s.sop_instance_uid: s for s in studies[prediction.study_instance_uid]}
            for view in prediction.views:
                samples.append(by_sop[view.view.instance.sop_instance_uid])
                rows.append(view.probabilities)
    probabilities = np.array(rows, dtype=np.float64).reshape(len(rows), -1)
    return samples, probabilities / probabilities.sum(axis=1, keepdims=True)


def saliency_in_mask(heatmap: np.ndarray, mask: np.ndarray) -> tuple[float, bool]:
    """Share of the heatmap's mass inside the mask, and whether its peak falls inside it."""
    total = float(heatmap.sum())
    share = float(heatmap[mask].sum()) / total if total > 0 else 0.0
    peak = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return share, bool(mask[peak])


def _dilated_mask(sample: Sample, millimetres: float) -> np.ndarray:
    import pydicom

    assert sample.mask_path is not None
    mask = np.asarray(Image.open(sample.mask_path)) > 0
    header = pydicom.dcmread(sample.path, stop_before_pixels=True)
    spacing = header.get("ImagerPixelSpacing") or header.get("PixelSpacing") or [1.0]
    magnification = float(header.get("EstimatedRadiographicMagnificationFactor", 1.0) or 1.0)
    pixel = float(spacing[0]) / magnification
    return ndimage.binary_dilation(mask, iterations=max(1, round(millimetres / pixel)))


def evaluate(
    bundle_path: Path,
    data: Path,
    *,
    labels: Path | None = None,
    batch: int = 32,
    saliency: str | None = None,
) -> dict[str, Any]:
    """Metrics of the bundle at ``bundle_path`` on the set in ``data``.

    With ``saliency`` ("gradcam" or "integrated-gradients"), also the localisation of the
    heatmaps on the phantom masks (dilated by 2 mm): the mean share of heatmap mass inside the
    mask and the pointing-game hit rate (the peak inside the mask).

    Returns
    -------
    dict
        ``task``, ``bundle`` (version), ``data``, ``patients``, ``sections`` (name → metrics:
        AP, LAT, fused; each with ``ci95``, the 95 % bootstrap intervals of its headline
        numbers), ``raw`` (the :data:`train.report.Section` tuples, not JSON), and
        ``saliency`` when asked.
    """
    bundle = load_bundle(bundle_path)
    dataset = read_dataset(data, labels, classes=[c.name for c in bundle.card.classes])
    if dataset.task != bundle.card.task:
        raise ValueError(f"{data} is a {dataset.task} set but the bundle is for {bundle.card.task}")
    jobs, studies = study_jobs(dataset)
    predictor = Predictor({dataset.task: bundle})
    per_view: dict[str, list[tuple[np.ndarray, int]]] = {}
    fused: list[tuple[np.ndarray, int]] = []
    shares: list[float] = []
    hits: list[bool] = []
    for start in range(0, len(jobs), batch):
        for prediction, prepared in predictor.predict(jobs[start : start + batch]):
            members = studies[prediction.study_instance_uid]
            label = members[0].label_index
            if saliency:
                by_sop = {s.sop_instance_uid: s for s in members}
                for image in prepared:
                    sample = by_sop[image.view.instance.sop_instance_uid]
                    if sample.mask_path is None:
                        continue
                    heat = explain(bundle, image, prediction.predicted_index, saliency).heatmap
                    share, hit = saliency_in_mask(heat, _dilated_mask(sample, 2.0))
                    shares.append(share)
                    hits.append(hit)
            for view in prediction.views:
                per_view.setdefault(view.view.view, []).append(
                    (np.array(view.probabilities), label)
                )
            fused.append((np.array(prediction.probabilities), label))
    names = [c.name for c in bundle.classes]
    threshold = bundle.card.decision_threshold
    raw: list[Section] = []
    parts = sorted(per_view.items(), key=lambda kv: (kv[0] != "AP", kv[0]))
    if len(per_view) >= 2:
        parts.append(("fused", fused))
    for name, pairs in parts:
        probabilities = np.stack([p for p, _ in pairs])
        truth = np.array([label for _, label in pairs])
        metrics = classification_metrics(probabilities, truth, names, threshold)
        intervals = bootstrap_intervals(probabilities, truth, threshold)
        if intervals:
            metrics["ci95"] = intervals
        if threshold is None and bundle.card.threshold > 0:
            metrics.update(abstention(probabilities, truth, bundle.card.threshold))
        raw.append((name, metrics, probabilities, truth))
    report: dict[str, Any] = {
        "task": dataset.task,
        "bundle": bundle.card.version,
        "data": str(data),
        "patients": len({s.patient_id for s in dataset.samples}),
        "studies": len(jobs),
        "sections": {name: metrics for name, metrics, _, _ in raw},
        "raw": raw,
    }
    if saliency:
        report["saliency"] = {
            "method": saliency,
            "images": len(shares),
            "mass_in_mask": round(float(np.mean(shares)), 4) if shares else None,
            "pointing_game": round(float(np.mean(hits)), 4) if hits else None,
        }
    return report
