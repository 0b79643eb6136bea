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
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from dicom_node.applicability import load_image_checker
from dicom_node.domain import InstanceRef, RoutedView, StudyJob
from dicom_node.explain import explain
from dicom_node.infer import Predictor
from dicom_node.models.bundle import Bundle, load_bundle
from dicom_node.tasks import TaskSpec
from train.data import LabelledSet, Sample, read_dataset
from train.metrics import abstention, bootstrap_intervals, classification_metrics
from train.report import Section

__all__ = [
    "evaluate",
    "evaluate_applicability",
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
    image_check: Path | None = None,
    ood: bool = True,
) -> dict[str, Any]:
    """Metrics of the bundle at ``bundle_path`` on the set in ``data``.

    The applicability stage runs as in the node: the bundle's out-of-distribution score (unless
    ``ood`` is False) and, with ``image_check``, that bundle's anatomy / view / implant check.
    Every image of the set shows the implant, so a study it refuses is *wrongly* not
    applicable: ``not_applicable`` counts them (by reason), and the metrics are over the
    studies answered.

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
    checker = load_image_checker(image_check) if image_check is not None else None
    predictor = Predictor({dataset.task: bundle}, image_checker=checker, out_of_distribution=ood)
    refused: Counter[str] = Counter()
    refused_views: Counter[str] = Counter()
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
            for excluded in prediction.not_applicable:
                refused_views[excluded.reason] += 1
            if not prediction.applicable:
                refused.update({n.reason for n in prediction.not_applicable})
                continue
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
        "applicability": {
            "image_check": str(image_check) if image_check else None,
            "out_of_distribution": bool(ood and bundle.card.ood is not None),
        },
        "not_applicable": {
            "studies": len(jobs) - len(fused),
            "rate": round((len(jobs) - len(fused)) / max(1, len(jobs)), 4),
            "by_reason": dict(sorted(refused.items())),
            "views_by_reason": dict(sorted(refused_views.items())),
        },
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


def evaluate_applicability(
    bundle_path: Path,
    data: Path,
    *,
    image_check: Path | None,
    ood: bool = True,
    batch: int = 32,
) -> dict[str, Any]:
    """How often the bundle's task refuses the studies of ``data``, routed to it whatever they
    show: sets that must not be answered (native anatomy, other metal, implants cut off,
    another task's phantoms, other anatomy), or any set to count refusals.

    Each study of the manifest (every image, whatever its ``implant``) goes through the node's
    Predictor as a study of the bundle's task. With ``image_check`` the report also says how
    often the image alone routes each study to its true task and view
    (``routing.image_check: fallback`` when the tags are missing: ``routed_right``).
    """
    bundle = load_bundle(bundle_path)
    task = bundle.card.task
    with (data / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{data / 'manifest.csv'} lists no images")
    studies: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        studies.setdefault(row["study_instance_uid"], []).append(row)
    jobs = [
        StudyJob(
            uid,
            task,
            tuple(
                RoutedView(
                    InstanceRef(r["sop_instance_uid"], "", uid, "", data / r["path"]),
                    task,
                    r["view"],
                )
                for r in sorted(members, key=lambda r: r["view"] != "AP")
                if r["view"] in bundle.card.views
            ),
        )
        for uid, members in studies.items()
    ]
    jobs = [j for j in jobs if j.views]
    checker = load_image_checker(image_check) if image_check is not None else None
    predictor = Predictor({task: bundle}, image_checker=checker, out_of_distribution=ood)
    truth = {r["sop_instance_uid"]: r for r in rows}
    answered: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    partly = 0
    routed_right = routed_studies = 0
    names = [c.name for c in bundle.classes]
    specs = predictor.specs
    for start in range(0, len(jobs), batch):
        results = predictor.predict(jobs[start : start + batch])
        for prediction, prepared in results:
            if prediction.applicable:
                answered[
                    "undetermined" if prediction.abstained else names[prediction.predicted_index]
                ] += 1
                partly += bool(prediction.not_applicable)
            else:
                reasons.update({n.reason for n in prediction.not_applicable})
            if checker is not None:
                checks = checker.check([p.display for p in prepared])
                tasks = [t for t, s in specs.items() if s.anatomy is not None]
                right = all(
                    checker.route(c, specs, tasks)
                    == _true_route(truth[p.view.instance.sop_instance_uid], specs)
                    for c, p in zip(checks, prepared, strict=True)
                )
                routed_right += right
                routed_studies += 1
    total = len(jobs)
    refused = total - sum(answered.values())
    kinds = Counter(r.get("implant") or "present" for r in rows)
    report: dict[str, Any] = {
        "task": task,
        "bundle": bundle.card.version,
        "data": str(data),
        "set": {
            "tasks": sorted({r["task"] for r in rows}),
            "implant": dict(sorted(kinds.items())),
            "patients": len({r["patient_id"] for r in rows}),
        },
        "studies": total,
        "not_applicable": {
            "studies": refused,
            "rate": round(refused / max(1, total), 4),
            "by_reason": dict(sorted(reasons.items())),
        },
        "answered": {
            "studies": sum(answered.values()),
            "partly_not_applicable": partly,
            "by_class": dict(sorted(answered.items())),
        },
    }
    if checker is not None:
        report["routed_by_image"] = {
            "studies": routed_studies,
            "routed_right": round(routed_right / max(1, routed_studies), 4),
        }
    return report


def _true_route(row: dict[str, str], specs: Mapping[str, TaskSpec]) -> tuple[str, str] | None:
    """Where the image should go: the task reading its anatomy (None: no task does)."""
    anatomy = row.get("anatomy") or row["task"]
    if not any(s.anatomy == anatomy for s in specs.values()):
        return None
    return anatomy, row["view"]
