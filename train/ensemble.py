"""AP + lateral fusion: the logistic-regression stacker, as in the screw study.

Per study, the views' calibrated probabilities go in as concatenated log-probabilities; a
multinomial logistic regression fitted on validation studies gives the fused probabilities.
The node applies the same stacker (:func:`dicom_node.infer.fuse`). Its regularisation is
chosen by cross-validation on the validation studies; if the stacker does not beat the plain
mean of the views there (log-loss, cross-validated), none is stored and the node averages.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from dicom_node.infer import fuse
from dicom_node.models.bundle import Stacker
from train.data import Sample

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
