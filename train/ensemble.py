"""AP + lateral fusion: the logistic-regression stacker, as in the screw study
(``python -m train ensemble`` refits it for a bundle; ``fit`` runs the same on its validation
split).

Per study, the views' calibrated probabilities go in as concatenated log-probabilities; a
logistic regression fitted on validation studies gives the fused probabilities, and the node
applies it (:func:`dicom_node.infer.fuse`). :func:`fit_stacker` chooses, by cross-validated
log-loss on the validation studies, between the full multinomial regression, a tied one (a
weighted product of the views: one weight per view, one bias per class), the mean of the views
sharpened by a fitted temperature, and the plain mean (no stacker).
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
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from torch import nn

from dicom_node.errors import DicomNodeError
from dicom_node.infer import fuse
from dicom_node.models.bundle import Stacker
from train.data import Sample
from train.engine import fit_temperature

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


def _weighted_product(x: np.ndarray, labels: np.ndarray, views: int, classes: int) -> np.ndarray:
    """Fit softmax(Σ_v w_v · log p_v + b): one weight per view and one bias per class — a
    logistic regression whose coefficient matrix is tied to w_v times the identity, so it has
    views + classes parameters and cannot overfit a small validation set. Returns [w..., b...].
    """
    features = torch.from_numpy(x.reshape(len(x), views, classes)).float()
    target = torch.from_numpy(labels).long()
    weights = torch.full((views,), 0.5, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimiser = torch.optim.LBFGS([weights, bias], lr=0.5, max_iter=200)

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        logits = (features * weights[None, :, None]).sum(dim=1) + bias
        loss = nn.functional.cross_entropy(logits, target) + 1e-3 * (bias**2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return np.concatenate([weights.detach().numpy(), bias.detach().numpy()]).astype(np.float64)


def _mean_temperature(mean: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T in [0.5, 1] minimising the NLL of softmax(log(mean) / T).

    The bounds are what two views can justify: T = 1 when the lateral view adds nothing to the
    AP one, T = 0.5 when they are independent evidence (the product of two agreeing views
    squares the odds). A nearly separable validation set would otherwise drive T towards 0.
    """
    logits = torch.from_numpy(np.log(np.clip(mean, 1e-12, 1.0))).float()
    return min(1.0, max(0.5, fit_temperature(logits, torch.from_numpy(labels).long())))


def _sharpen(mean: np.ndarray, temperature: float) -> np.ndarray:
    logits = np.log(np.clip(mean, 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=1, keepdims=True)


def _product_probabilities(x: np.ndarray, parameters: np.ndarray, views: int) -> np.ndarray:
    classes = x.shape[1] // views
    logits = (x.reshape(len(x), views, classes) * parameters[:views, None]).sum(axis=1)
    logits = logits + parameters[views:]
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=1, keepdims=True)


def fit_stacker(
    per_view: Sequence[dict[str, np.ndarray]],
    labels: np.ndarray,
    views: list[str],
    classes: int,
    seed: int = 0,
) -> tuple[dict[str, Any] | None, dict[str, float]]:
    """The fusion for a card (a stacker, or None: the mean of the views) and the
    cross-validated log-losses it was chosen by.

    Four candidates, scored by cross-validated log-loss on the validation studies: the mean of
    the views' probabilities (no parameters, robust to one confidently wrong view, but
    under-confident when the views agree: two views at 0.9 deserve more than 0.9); that mean
    sharpened by a temperature fitted on the same studies (a "mean" stacker); the weighted
    product of the views (the tied logistic regression of :func:`_weighted_product`:
    calibrated, views + classes parameters); the full
    multinomial logistic regression on the views' log-probabilities (the screw study's
    ensemble; its C chosen by the same cross-validation). The lowest log-loss wins; the two
    stackers are stored in the one form the node applies (a coefficient matrix on the
    concatenated log-probabilities).

    Returns
    -------
    stacker, scores
        ``scores`` has ``mean_log_loss``, ``calibrated_mean_log_loss``, ``product_log_loss``,
        ``stacker_log_loss``, ``stacker_C`` and ``chosen``.
    """
    x = _features(per_view, views)
    mean = np.array([np.mean([p[v] for v in views], axis=0) for p in per_view])
    mean /= mean.sum(axis=1, keepdims=True)  # float32 softmax outputs sum to 1 ± 1e-7
    every = list(range(classes))
    scores: dict[str, Any] = {
        "mean_log_loss": round(float(log_loss(labels, mean, labels=every)), 4)
    }
    counts = np.bincount(labels, minlength=classes)
    folds = int(min(5, counts[counts > 0].min())) if (counts > 0).all() else 0
    if folds < 2:
        log.warning("stacker: too few validation studies per class; the views are averaged")
        scores["chosen"] = "mean"
        return None, scores
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    product = np.zeros((len(x), classes))
    sharpened = np.zeros((len(x), classes))
    for train_rows, held_rows in cv.split(x, labels):
        parameters = _weighted_product(x[train_rows], labels[train_rows], len(views), classes)
        product[held_rows] = _product_probabilities(x[held_rows], parameters, len(views))
        temperature = _mean_temperature(mean[train_rows], labels[train_rows])
        sharpened[held_rows] = _sharpen(mean[held_rows], temperature)
    scores["product_log_loss"] = round(float(log_loss(labels, product, labels=every)), 4)
    scores["calibrated_mean_log_loss"] = round(float(log_loss(labels, sharpened, labels=every)), 4)
    best: tuple[float, float] | None = None
    for c in (0.01, 0.1, 1.0, 10.0):
        model = LogisticRegression(C=c, max_iter=5000)
        predicted = cross_val_predict(model, x, labels, cv=cv, method="predict_proba")
        loss = float(log_loss(labels, predicted, labels=every))
        if best is None or loss < best[0]:
            best = (loss, c)
    assert best is not None
    scores["stacker_log_loss"] = round(best[0], 4)
    scores["stacker_C"] = best[1]
    chosen = min(
        ("mean", "calibrated_mean", "product", "stacker"),
        key=lambda name: (scores[f"{name}_log_loss"], name != "mean"),
    )
    scores["chosen"] = chosen
    log.info("fusion: %s (cross-validated log-loss %s)", chosen, scores)
    if chosen == "mean":
        return None, scores
    if chosen == "calibrated_mean":
        temperature = _mean_temperature(mean, labels)
        scores["mean_temperature"] = round(temperature, 4)
        return {"kind": "mean", "views": views, "temperature": temperature}, scores
    if chosen == "product":
        parameters = _weighted_product(x, labels, len(views), classes)
        identity = np.eye(classes)
        coefficients = np.hstack([w * identity for w in parameters[: len(views)]])
        intercepts = parameters[len(views) :]
    else:
        model = LogisticRegression(C=best[1], max_iter=5000).fit(x, labels)
        if classes > 2:
            coefficients, intercepts = model.coef_, model.intercept_
        else:  # sklearn's binary form → the two-row softmax form the node applies
            coefficients = np.vstack([-model.coef_[0] / 2, model.coef_[0] / 2])
            intercepts = np.array([-model.intercept_[0] / 2, model.intercept_[0] / 2])
    stacker = {
        "kind": "logistic",
        "views": views,
        "coefficients": np.asarray(coefficients).tolist(),
        "intercepts": np.asarray(intercepts).tolist(),
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
    command: str = "",
) -> dict[str, Any]:
    """Fit the stacker on ``subset`` of ``data``; compare single views, their mean and the
    stacker on ``report_subset`` (side by side); store it in the card when ``write``."""
    from dicom_node.models.bundle import load_bundle, update_card
    from train.data import read_dataset
    from train.evaluate import predict_views, select_studies
    from train.fit import later_step, operating_point, operating_rule
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
        sensitivity, specificity = operating_rule(bundle.card.training)
        fused = fused_probabilities(fitted_views, stacker)[:, 1]
        changes["decision_threshold"] = operating_point(
            fused, fitted_truth, sensitivity, specificity
        )
        result["decision_threshold"] = {
            "before": bundle.card.decision_threshold,
            "after": round(changes["decision_threshold"], 4),
        }
    changes["training"] = later_step(bundle.card.training, command or "python -m train ensemble")
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
            command=getattr(args, "command_line", ""),
        )
    except (OSError, ValueError, DicomNodeError) as error:
        sys.stderr.write(f"ensemble: {error}\n")
        return 2
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0
