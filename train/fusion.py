"""AP + lateral fusion: the logistic-regression stacker, as in the screw study (``python -m
train fit`` fits it on its validation split, ``python -m train ensemble`` refits it for a bundle,
``python -m train calibrate`` chooses the operating point on its fused scores).

Per study, the views' calibrated probabilities go in as concatenated log-probabilities; a
logistic regression fitted on validation studies gives the fused probabilities, and the node
applies it (:func:`dicom_node.infer.fuse`). :func:`fit_stacker` chooses, by cross-validated
log-loss on the validation studies, between the full multinomial regression, a tied one (a
weighted product of the views: one weight per view, one bias per class), the mean of the views
sharpened by a fitted temperature, and the plain mean (no stacker).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from torch import nn

from dicom_node.infer import fuse
from dicom_node.models.bundle import Stacker
from train.data import Sample
from train.engine import fit_temperature

__all__ = ["by_study", "fit_stacker", "fused_probabilities"]

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
