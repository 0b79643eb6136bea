"""AP + lateral fusion: the logistic-regression stacker, as in the screw study
(``python -m train ensemble`` refits it for a bundle; ``fit`` runs the same on its validation
split).

Per study, the views' calibrated probabilities go in as concatenated log-probabilities; a
multinomial logistic regression fitted on validation studies gives the fused probabilities.
The node applies the same stacker (:func:`dicom_node.infer.fuse`). Its regularisation is
chosen by cross-validation on the validation studies; if the stacker does not beat the plain
mean of the views there (log-loss, cross-validated), none is stored and the node averages.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from dicom_node.errors import DicomNodeError
from dicom_node.infer import fuse
from dicom_node.models.bundle import Stacker
from train.data import Sample

__all__ = ["by_study", "fit_stacker", "fused_probabilities", "get_args_parser", "main", "refit"]

log = logging.getLogger(__name__)


def by_study(
    samples: Sequence[Sample],
    index: Sequence[int] | np.ndarray,
    probabilities: np.ndarray,
    views: list[str],
) -> tuple[list[str], list[dict[str, np.ndarray]], np.ndarray]:
    """Studies of ``index`` that have every view: UIDs, per-view probabilities, labels.

    ``probabilities`` has one row per entry of ``index``.
    """
    per_study: dict[str, dict[str, np.ndarray]] = {}
    labels: dict[str, int] = {}
    for i, p in zip(index, probabilities, strict=True):
        sample = samples[i]
        per_study.setdefault(sample.study_instance_uid, {})[sample.view] = p
        labels[sample.study_instance_uid] = sample.label_index
    uids = [uid for uid, v in per_study.items() if all(view in v for view in views)]
    return uids, [per_study[u] for u in uids], np.array([labels[u] for u in uids], dtype=int)


def _features(per_view: Sequence[dict[str, np.ndarray]], views: list[str]) -> np.ndarray:
    return np.array(
        [np.concatenate([np.log(np.clip(p[v], 1e-7, 1.0)) for v in views]) for p in per_view]
    )


def fused_probabilities(
    per_view: Sequence[dict[str, np.ndarray]], stacker: dict[str, Any] | None
) -> np.ndarray:
    """Study-level probabilities exactly as the node fuses them."""
    model = Stacker(**stacker) if stacker else None
    out = [fuse(p, model) for p in per_view]
    return np.array([p for p in out if p is not None])


def fit_stacker(
    per_view: Sequence[dict[str, np.ndarray]],
    labels: np.ndarray,
    views: list[str],
    classes: int,
    seed: int = 0,
) -> tuple[dict[str, Any] | None, dict[str, float]]:
    """The stacker for a card (or None: average the views), and the cross-validated log-losses.

    Returns
    -------
    stacker, scores
        ``scores`` has ``mean_log_loss`` (the views' mean) and ``stacker_log_loss`` (best C).
    """
    x = _features(per_view, views)
    mean = np.array([np.mean([p[v] for v in views], axis=0) for p in per_view])
    mean /= mean.sum(axis=1, keepdims=True)  # float32 softmax outputs sum to 1 ± 1e-7
    scores = {"mean_log_loss": float(log_loss(labels, mean, labels=list(range(classes))))}
    counts = np.bincount(labels, minlength=classes)
    folds = int(min(5, counts[counts > 0].min())) if (counts > 0).all() else 0
    if folds < 2:
        log.warning("stacker: too few validation studies per class; the views are averaged")
        return None, scores
    best: tuple[float, float] | None = None
    for c in (0.01, 0.1, 1.0, 10.0):
        model = LogisticRegression(C=c, max_iter=5000)
        cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
        predicted = cross_val_predict(model, x, labels, cv=cv, method="predict_proba")
        loss = float(log_loss(labels, predicted, labels=list(range(classes))))
        if best is None or loss < best[0]:
            best = (loss, c)
    assert best is not None
    scores["stacker_log_loss"] = round(best[0], 4)
    scores["stacker_C"] = best[1]
    scores["mean_log_loss"] = round(scores["mean_log_loss"], 4)
    if best[0] >= scores["mean_log_loss"]:
        log.info("stacker: no better than the mean of the views (%s); not used", scores)
        return None, scores
    model = LogisticRegression(C=best[1], max_iter=5000).fit(x, labels)
    if classes > 2:
        coefficients, intercepts = model.coef_, model.intercept_
    else:  # sklearn's binary form → the two-row softmax form the node applies
        coefficients = np.vstack([-model.coef_[0] / 2, model.coef_[0] / 2])
        intercepts = np.array([-model.intercept_[0] / 2, model.intercept_[0] / 2])
    stacker = {
        "kind": "logistic",
        "views": views,
        "coefficients": coefficients.tolist(),
        "intercepts": intercepts.tolist(),
    }
    return stacker, scores


def refit(
    bundle_path: Path,
    data: Path,
    *,
    labels: Path | None = None,
    subset: str = "val",
    report_subset: str = "test",
    write: bool = True,
) -> dict[str, Any]:
    """Fit the stacker on ``subset`` of ``data``; compare single views, their mean and the
    stacker on ``report_subset`` (side by side); store it in the card when ``write``."""
    from dicom_node.models.bundle import load_bundle, update_card
    from train.data import read_dataset
    from train.evaluate import predict_views, select_studies
    from train.metrics import classification_metrics

    bundle = load_bundle(bundle_path)
    views = list(bundle.card.views)
    if len(views) != 2:
        raise ValueError(f"the {bundle.card.task} bundle has one view ({views}); nothing to fuse")
    names = [c.name for c in bundle.classes]
    full = read_dataset(data, labels)
    samples, probabilities = predict_views(bundle, select_studies(full, bundle_path, subset))
    _, per_view, truth = by_study(samples, np.arange(len(samples)), probabilities, views)
    stacker, scores = fit_stacker(per_view, truth, views, len(names))
    fitted_views, fitted_truth = per_view, truth
    result: dict[str, Any] = {"fitted_on": {"subset": subset, "studies": len(truth)}, **scores}
    try:
        shown = select_studies(full, bundle_path, report_subset)
    except ValueError:
        shown = None
    if shown is not None:
        samples, probabilities = predict_views(bundle, shown)
        _, per_view, truth = by_study(samples, np.arange(len(samples)), probabilities, views)
        table = {}
        threshold = bundle.card.decision_threshold
        for view in views:
            p = np.array([v[view] for v in per_view])
            table[view] = classification_metrics(p, truth, names, threshold)
        table["mean"] = classification_metrics(
            fused_probabilities(per_view, None), truth, names, threshold
        )
        if stacker:
            table["stacker"] = classification_metrics(
                fused_probabilities(per_view, stacker), truth, names, threshold
            )
        result["compared_on"] = {"subset": report_subset, "studies": len(truth)}
        result["side_by_side"] = {
            name: {k: m[k] for k in ("accuracy", "auc", "auc_macro", "ece") if k in m}
            for name, m in table.items()
        }
    changes: dict[str, Any] = {"stacker": stacker}
    if bundle.card.decision_threshold is not None:
        # The operating point was chosen on the old fused scores: choose it again on the new
        # ones, with the rule that trained the bundle.
        from train.fit import operating_point

        arguments = bundle.card.training.get("args", {})
        specificity = arguments.get("min_specificity")
        fused = fused_probabilities(fitted_views, stacker)[:, 1]
        changes["decision_threshold"] = operating_point(
            fused,
            fitted_truth,
            float(arguments.get("min_sensitivity", 0.95)),
            None if specificity in (None, "None") else float(specificity),
        )
        result["decision_threshold"] = {
            "before": bundle.card.decision_threshold,
            "after": round(changes["decision_threshold"], 4),
        }
    if write:
        update_card(bundle_path, changes)
    return result


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train ensemble",
        add_help=add_help,
        description="Fit the AP + lateral stacker of a bundle; single views vs fused.",
    )
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--labels", type=Path, default=None)
    parser.add_argument("--subset", choices=["val", "all"], default="val")
    parser.add_argument("--report-subset", choices=["test", "all"], default="test")
    parser.add_argument("--dry-run", action="store_true", help="report, do not change the card")
    return parser


def main(args: argparse.Namespace) -> int:
    try:
        result = refit(
            args.bundle,
            args.data,
            labels=args.labels,
            subset=args.subset,
            report_subset=args.report_subset,
            write=not args.dry_run,
        )
    except (OSError, ValueError, DicomNodeError) as error:
        sys.stderr.write(f"ensemble: {error}\n")
        return 2
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0
