"""``python -m train ood``: fit a bundle's out-of-distribution score and choose its threshold.

The score (:class:`dicom_node.models.ood.Mahalanobis`) is the Mahalanobis distance of the
classifier's pooled features to the nearest class mean under one shared covariance. Features
are read through the node's own :class:`~dicom_node.infer.Predictor` preparation (display,
region of interest, normalisation), so what is fitted is what the node scores.

``--data`` is one or more labelled, in-distribution sets the classifier was NOT trained on
(fresh phantom sets, or the validation patients of a site's data), covering every acquisition
the bundle is meant to read: a threshold fitted on one acquisition refuses the others. Their
patients are split in two: the means and covariance are fitted on one half, and the threshold
is the ``--quantile`` of the other half's scores, so that about 1 − quantile of
in-distribution images are refused.
``--negatives`` sets (other metal, native anatomy, other anatomy) are only measured: the share
above the threshold is reported, never used to choose it. The bundle gets ``ood.pt`` and
``card.ood`` (threshold and these validation figures).
"""

from __future__ import annotations

import argparse
import csv
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicom_node.domain import InstanceRef, RoutedView
from dicom_node.infer import Predictor
from dicom_node.models.bundle import Bundle, load_bundle, sha256_file, update_card
from dicom_node.models.ood import Mahalanobis, pooled_features
from train.cli import run_command
from train.data import read_dataset
from train.provenance import later_step

__all__ = ["bundle_features", "fit_ood", "get_args_parser", "main"]

log = logging.getLogger(__name__)


def bundle_features(bundle: Bundle, views: list[RoutedView], batch: int = 32) -> torch.Tensor:
    """(N, D) pooled classifier features of each view, prepared as the node prepares it."""
    predictor = Predictor({bundle.card.task: bundle})
    chunks = []
    for start in range(0, len(views), batch):
        prepared = [predictor.prepare(v) for v in views[start : start + batch]]
        tensors = torch.stack([p.tensor for p in prepared])
        with torch.no_grad():
            _, features = pooled_features(bundle.model, tensors)
        chunks.append(features.cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0)


def _manifest_views(folder: Path, task: str) -> list[RoutedView]:
    """Every image of a manifest, routed to ``task`` whatever it shows (the negatives)."""
    with (folder / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [
        RoutedView(
            InstanceRef(r["sop_instance_uid"], "", r["study_instance_uid"], "", folder / r["path"]),
            task,
            r["view"],
        )
        for r in rows
    ]


def fit_ood(args: argparse.Namespace) -> dict[str, Any]:
    bundle = load_bundle(args.bundle)
    task = bundle.card.task
    names = [c.name for c in bundle.card.classes]
    sets = [read_dataset(folder, classes=names) for folder in args.data]
    for folder, part in zip(args.data, sets, strict=True):
        if part.task != task:
            raise ValueError(f"{folder} is a {part.task} set; the bundle is for {task}")
    # Patients of two sets never share an ID (the set's folder qualifies it).
    dataset = replace(
        sets[0],
        samples=tuple(
            replace(s, patient_id=f"{folder}/{s.patient_id}")
            for folder, part in zip(args.data, sets, strict=True)
            for s in part.samples
        ),
    )
    patients = sorted({s.patient_id for s in dataset.samples})
    rng = np.random.default_rng(args.seed)
    fit_patients = set(rng.permutation(patients)[: len(patients) // 2])
    views = [
        RoutedView(
            InstanceRef(s.sop_instance_uid, "", s.study_instance_uid, "", s.path), task, s.view
        )
        for s in dataset.samples
    ]
    features = bundle_features(bundle, views)
    labels = torch.tensor([s.label_index for s in dataset.samples])
    fitting = torch.tensor([s.patient_id in fit_patients for s in dataset.samples])
    model = Mahalanobis.fit(features[fitting], labels[fitting], shrinkage=args.shrinkage)
    held = model.score(features[~fitting])
    threshold = float(np.quantile(held, args.quantile))
    validation: dict[str, Any] = {
        "data": [str(folder) for folder in args.data],
        "fitted_images": int(fitting.sum()),
        "threshold_images": int((~fitting).sum()),
        "quantile": args.quantile,
        "in_distribution_rejected": round(float(np.mean(held > threshold)), 4),
        "shrinkage": args.shrinkage,
        "negatives": {},
    }
    for folder in args.negatives or []:
        scores = model.score(bundle_features(bundle, _manifest_views(folder, task)))
        validation["negatives"][str(folder)] = {
            "images": len(scores),
            "rejected": round(float(np.mean(scores > threshold)), 4),
        }
    target = args.bundle / "ood.pt"
    torch.save(model.state(), target)
    spec = {
        "kind": "mahalanobis",
        "file": target.name,
        "sha256": sha256_file(target),
        "threshold": round(threshold, 3),
        "validation": validation,
    }
    training = later_step(bundle.card.training, getattr(args, "command_line", "") or "train ood")
    update_card(args.bundle, {"ood": spec, "training": training})
    load_bundle(args.bundle)  # what the node will load: verified now
    log.info(
        "ood threshold %.1f; in-distribution rejected %.4f",
        threshold,
        validation["in_distribution_rejected"],
    )
    return {"bundle": str(args.bundle), **spec}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train ood",
        add_help=add_help,
        description="Fit a bundle's out-of-distribution score (Mahalanobis distance on the "
        "classifier's features) and its threshold on in-distribution data it was not trained on.",
    )
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument(
        "--data",
        type=Path,
        nargs="+",
        required=True,
        help="labelled in-distribution sets (manifest folders): every acquisition the bundle "
        "is meant to read, never the sets it is evaluated on",
    )
    parser.add_argument(
        "--negatives", type=Path, nargs="*", help="sets to measure (never to choose with)"
    )
    parser.add_argument(
        "--quantile", type=float, default=0.998, help="of held-out in-distribution scores"
    )
    parser.add_argument("--shrinkage", type=float, default=0.1, help="covariance shrinkage")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(args: argparse.Namespace) -> int:
    return run_command("ood", lambda: fit_ood(args))
