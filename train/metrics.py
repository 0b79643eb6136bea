"""Classifier evaluation metrics: calibration, operating points and per-class statistics.

Pure numpy + scikit-learn, no torch and no I/O, so training and evaluation (``train.protocol``,
``train.predict``) and the report writer (``train.report``) share one definition of every
number. Inputs are always ``probabilities`` of shape (n, k), one row per sample summing to one,
and integer ``labels`` of shape (n,) in ``range(k)``. scikit-learn is used wherever it has the
metric; only specificity, expected calibration error and the reliability curve are written here.

Binary tasks: column 1 is the positive class, and the decision rule everywhere is
"positive iff P(positive) >= threshold".

It is one file so that every number has one definition: the operating points, calibration and
per-class statistics share their input checks, decision rule and rounding.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)
from sklearn.preprocessing import label_binarize

__all__ = [
    "abstention",
    "bootstrap_intervals",
    "choose_threshold",
    "choose_threshold_for_specificity",
    "classification_metrics",
    "expected_calibration_error",
    "reliability_curve",
    "roc_curves",
]

_DECIMALS = 4


def reliability_curve(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = 15
) -> dict[str, np.ndarray]:
    """Per-bin confidence and accuracy of the top class, for a reliability diagram.

    Parameters
    ----------
    probabilities : np.ndarray
        Class probabilities, shape (n, k).
    labels : np.ndarray
        True class indices, shape (n,).
    bins : int
        Number of equal-width bins over [0, 1]; a bin is the half-open interval (low, high].

    Returns
    -------
    dict[str, np.ndarray]
        ``edges`` (bins + 1 bin edges), ``confidence`` (mean top-class probability per bin),
        ``accuracy`` (share of correct top-class predictions per bin) and ``count`` (samples per
        bin, integers). ``confidence`` and ``accuracy`` are NaN for empty bins.

    Raises
    ------
    ValueError
        If ``bins`` is not positive or the arrays have inconsistent shapes.
    """
    probabilities, labels = _check_inputs(probabilities, labels)
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # side="left" gives edges[i - 1] < c <= edges[i]: the (low, high] convention.
    index = np.searchsorted(edges, confidence, side="left") - 1
    inside = (index >= 0) & (index < bins)
    count = np.bincount(index[inside], minlength=bins)
    confidence_sum = np.bincount(index[inside], weights=confidence[inside], minlength=bins)
    correct_sum = np.bincount(index[inside], weights=correct[inside], minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.where(count > 0, confidence_sum / count, np.nan)
        accuracy = np.where(count > 0, correct_sum / count, np.nan)
    return {
        "edges": edges,
        "confidence": mean_confidence,
        "accuracy": accuracy,
        "count": count.astype(np.int64),
    }


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = 15
) -> float:
    """Expected calibration error (ECE) of the top-class confidence.

    ``sum over bins of (samples in bin / n) * |accuracy in bin - mean confidence in bin|``,
    with equal-width bins over [0, 1], each the half-open interval (low, high].

    Parameters
    ----------
    probabilities : np.ndarray
        Class probabilities, shape (n, k).
    labels : np.ndarray
        True class indices, shape (n,).
    bins : int
        Number of equal-width bins.

    Returns
    -------
    float
        The ECE, between 0 (perfectly calibrated) and 1.
    """
    curve = reliability_curve(probabilities, labels, bins)
    count = curve["count"]
    filled = count > 0
    gap = np.abs(curve["accuracy"][filled] - curve["confidence"][filled])
    return float(np.sum(count[filled] / len(labels) * gap))


def _operating_curve(
    positive_probability: np.ndarray, labels: np.ndarray, name: str, required: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Checked inputs of the threshold choosers: the distinct scores (highest first), the
    sensitivity and specificity of ``score >= candidate`` at each, and whether any sample is
    positive (without positives sensitivity is 0, without negatives specificity is 1)."""
    scores = np.asarray(positive_probability, dtype=np.float64)
    truth = np.asarray(labels)
    if scores.ndim != 1 or truth.shape != scores.shape or scores.size == 0:
        raise ValueError(
            f"positive_probability and labels must be non-empty 1-D arrays of one length, "
            f"got shapes {scores.shape} and {truth.shape}"
        )
    if not np.isin(truth, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got values {np.unique(truth).tolist()}")
    if not 0.0 <= required <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {required}")
    positive = truth == 1
    candidates = np.unique(scores)[::-1]  # distinct scores, highest first
    if positive.any():
        sensitivity = _share_at_or_above(scores[positive], candidates)
    else:
        sensitivity = np.zeros(len(candidates))
    if (~positive).any():
        specificity = 1.0 - _share_at_or_above(scores[~positive], candidates)
    else:
        specificity = np.ones(len(candidates))
    return candidates, sensitivity, specificity, bool(positive.any())


def _midpoint_below(candidates: np.ndarray, chosen: int) -> float:
    """The threshold that classifies like ``candidates[chosen]`` without lying on a sample: the
    midpoint to the next lower distinct score, or the score itself when it is the lowest."""
    if chosen == len(candidates) - 1:
        return float(candidates[chosen])
    return float((candidates[chosen] + candidates[chosen + 1]) / 2.0)


def choose_threshold(
    positive_probability: np.ndarray, labels: np.ndarray, min_sensitivity: float
) -> float:
    """Operating point on P(positive) with the best specificity at a required sensitivity.

    The candidate thresholds are the distinct scores; at a candidate ``s`` a sample is called
    positive iff its score is ``>= s``. Among candidates whose sensitivity is at least
    ``min_sensitivity``, those with the highest specificity are kept, and of these the lowest
    score ``s`` is taken (the most sensitive operating point at that specificity: a margin for
    positives on new data). The returned threshold is the midpoint between ``s`` and the next lower
    distinct score, so that it classifies every given sample exactly as ``s`` does without lying
    on one of them; when ``s`` is the lowest score, ``s`` itself is returned. If no candidate
    reaches ``min_sensitivity`` (only possible when ``labels`` has no positive sample, which
    leaves sensitivity undefined), the lowest score is returned.

    Parameters
    ----------
    positive_probability : np.ndarray
        P(positive) per sample, shape (n,).
    labels : np.ndarray
        1 for positive samples, 0 for negative ones, shape (n,).
    min_sensitivity : float
        Required sensitivity (true-positive rate), in [0, 1].

    Returns
    -------
    float
        The threshold; apply it as ``positive_probability >= threshold``.

    Raises
    ------
    ValueError
        If the inputs are empty, of different lengths, labels are not 0/1, or
        ``min_sensitivity`` is outside [0, 1].
    """
    candidates, sensitivity, specificity, has_positive = _operating_curve(
        positive_probability, labels, "min_sensitivity", min_sensitivity
    )
    if not has_positive:
        return float(candidates[-1])
    # Exact comparison would drop a candidate whose sensitivity is k/n_pos == min_sensitivity
    # but evaluates a rounding error below it.
    eligible = sensitivity >= min_sensitivity - 1e-12
    if not eligible.any():
        return float(candidates[-1])
    best = specificity[eligible].max()
    chosen = int(np.flatnonzero(eligible & (specificity == best))[-1])  # lowest score of ties
    return _midpoint_below(candidates, chosen)


def choose_threshold_for_specificity(
    positive_probability: np.ndarray, labels: np.ndarray, min_specificity: float
) -> float:
    """Operating point on P(positive) with the best sensitivity at a required specificity.

    The mirror of :func:`choose_threshold`, for when a validation set is separable and a single
    high-scoring negative would otherwise push the threshold up: among the distinct scores whose
    specificity is at least ``min_specificity``, those with the highest sensitivity are kept, and
    of these the highest score ``s`` (the most specific). The threshold returned is the midpoint
    between ``s`` and the next lower distinct score (``s`` when it is the lowest); if no score
    reaches ``min_specificity``, a threshold above every score (nothing is called positive).
    Apply it as ``positive_probability >= threshold``.
    """
    candidates, sensitivity, specificity, _ = _operating_curve(
        positive_probability, labels, "min_specificity", min_specificity
    )
    eligible = specificity >= min_specificity - 1e-12
    if not eligible.any():
        return float(np.nextafter(candidates[0], np.inf))
    best = sensitivity[eligible].max()
    chosen = int(np.flatnonzero(eligible & (sensitivity == best))[0])  # highest score of ties
    return _midpoint_below(candidates, chosen)


def abstention(probabilities: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """What abstaining below ``threshold`` (top-class probability) does: the share of cases
    answered, and the accuracy on them (the node says "undetermined" for the others)."""
    probabilities, labels = _check_inputs(probabilities, labels)
    answered = probabilities.max(axis=1) >= threshold
    correct = probabilities.argmax(axis=1) == labels
    return {
        "answered": round(float(answered.mean()), _DECIMALS),
        "accuracy_answered": round(float(correct[answered].mean()), _DECIMALS)
        if answered.any()
        else 0.0,
    }


def classification_metrics(
    probabilities: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    threshold: float | None = None,
) -> dict[str, Any]:
    """All evaluation numbers for one classifier on one split, ready for ``json.dumps``.

    Predictions are the argmax of ``probabilities``; for two classes with a ``threshold``, they
    are ``probabilities[:, 1] >= threshold`` instead, which changes everything computed from
    predictions (accuracy, balanced accuracy, kappa, per-class, macro, micro, confusion) but not
    the probability-based numbers (AUC, ECE, Brier). Ratios with a zero denominator (e.g. the
    precision of a class never predicted) are 0, as in scikit-learn with ``zero_division=0``.

    Parameters
    ----------
    probabilities : np.ndarray
        Class probabilities, shape (n, k), k >= 2.
    labels : np.ndarray
        True class indices in ``range(k)``, shape (n,).
    class_names : Sequence[str]
        The k class names, in column order.
    threshold : float | None
        Binary tasks only: the decision threshold on P(class 1).

    Returns
    -------
    dict[str, Any]
        Floats rounded to 4 decimals, counts as ints:

        - ``n``, ``accuracy``, ``balanced_accuracy``, ``ece``, ``brier`` (multi-class Brier:
          mean over samples of the sum over classes of (p - one-hot)^2);
        - ``cohen_kappa``, omitted when undefined (truth and prediction one and the same class);
        - ``per_class``: {name: {``sensitivity``, ``specificity``, ``precision``, ``f1``,
          ``support``}};
        - ``macro``: {``sensitivity``, ``specificity``, ``precision``, ``f1``} (unweighted mean
          over all k classes); ``micro``: {``sensitivity``, ``precision``, ``f1``} from the
          pooled counts;
        - two classes: ``auc`` (of column 1), omitted when one class is absent from ``labels``;
          more classes: ``auc_macro`` (one-vs-rest), omitted when any class is absent, and
          ``auc_micro`` (binarised labels against probabilities, both ravelled);
        - ``confusion``: k lists of k ints, rows = true class, columns = predicted;
        - with ``threshold``: ``threshold`` (as given, not rounded), ``sensitivity`` and
          ``specificity`` of class 1 at it.

    Raises
    ------
    ValueError
        If shapes disagree, labels fall outside ``range(k)``, ``class_names`` does not have k
        entries, or ``threshold`` is given for more than two classes or outside [0, 1].
    """
    probabilities, labels = _check_inputs(probabilities, labels)
    n, k = probabilities.shape
    if k < 2:
        raise ValueError(f"need at least 2 classes, got probabilities of shape {(n, k)}")
    if len(class_names) != k:
        raise ValueError(f"class_names has {len(class_names)} entries for {k} columns")
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels must be in range({k}), got values {np.unique(labels).tolist()}")
    if threshold is not None:
        if k != 2:
            raise ValueError(f"threshold applies to 2 classes only, got {k}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        predicted = (probabilities[:, 1] >= threshold).astype(np.int64)
    else:
        predicted = probabilities.argmax(axis=1)

    classes = list(range(k))
    confusion = confusion_matrix(labels, predicted, labels=classes)
    true_positive = np.diag(confusion)
    false_negative = confusion.sum(axis=1) - true_positive
    false_positive = confusion.sum(axis=0) - true_positive
    true_negative = n - true_positive - false_negative - false_positive
    specificity = _ratio(true_negative, true_negative + false_positive)
    precision, sensitivity, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=classes, zero_division=0.0
    )

    result: dict[str, Any] = {
        "n": int(n),
        "accuracy": _round(accuracy_score(labels, predicted)),
        "balanced_accuracy": _round(_balanced_accuracy(labels, predicted)),
    }
    if len(np.union1d(labels, predicted)) > 1:
        result["cohen_kappa"] = _round(cohen_kappa_score(labels, predicted, labels=classes))
    one_hot = np.eye(k)[labels]
    result["ece"] = _round(expected_calibration_error(probabilities, labels))
    result["brier"] = _round(np.mean(np.sum((probabilities - one_hot) ** 2, axis=1)))
    result["per_class"] = {
        str(name): {
            "sensitivity": _round(sensitivity[i]),
            "specificity": _round(specificity[i]),
            "precision": _round(precision[i]),
            "f1": _round(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    }
    result["macro"] = {
        "sensitivity": _round(np.mean(sensitivity)),
        "specificity": _round(np.mean(specificity)),
        "precision": _round(np.mean(precision)),
        "f1": _round(np.mean(f1)),
    }
    pooled_tp = float(true_positive.sum())
    micro_sensitivity = _ratio(pooled_tp, pooled_tp + float(false_negative.sum()))
    micro_precision = _ratio(pooled_tp, pooled_tp + float(false_positive.sum()))
    result["micro"] = {
        "sensitivity": _round(micro_sensitivity),
        "precision": _round(micro_precision),
        "f1": _round(
            _ratio(2 * micro_precision * micro_sensitivity, micro_precision + micro_sensitivity)
        ),
    }
    result.update(_auc(probabilities, labels))
    result["confusion"] = confusion.astype(int).tolist()
    if threshold is not None:
        result["threshold"] = float(threshold)
        result["sensitivity"] = _round(sensitivity[1])
        result["specificity"] = _round(specificity[1])
    return result


def bootstrap_intervals(
    probabilities: np.ndarray,
    labels: np.ndarray,
    threshold: float | None = None,
    *,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of the headline numbers, resampling within each class.

    Resampling within each class keeps the class counts of the evaluated set (a test set's
    prevalence is fixed by design), so every resample has every class and its AUC is defined.
    With 150 studies the intervals are wide: an ECE target of 0.05 is within the sampling noise
    of one evaluation set, which is why the model cards report several sets.

    Parameters
    ----------
    probabilities : np.ndarray
        Class probabilities, shape (n, k).
    labels : np.ndarray
        True class indices, shape (n,).
    threshold : float | None
        Binary tasks: the decision threshold on P(class 1), as in :func:`classification_metrics`
        (then also ``sensitivity`` and ``specificity`` of class 1).
    resamples : int
        Bootstrap resamples.
    level : float
        Coverage of the interval, e.g. 0.95.
    seed : int
        Seed of the resampling, so a report is reproducible.

    Returns
    -------
    dict[str, list[float]]
        ``{name: [low, high]}`` for ``accuracy``, ``auc`` (two classes; ``auc_macro`` for more),
        ``ece`` and, with ``threshold``, ``sensitivity`` and ``specificity``; rounded to 4
        decimals. Empty when some class of ``range(k)`` is absent from ``labels``.
    """
    probabilities, labels = _check_inputs(probabilities, labels)
    n, k = probabilities.shape
    if resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1, got {resamples}, {level}")
    members = [np.flatnonzero(labels == c) for c in range(k)]
    if k < 2 or any(m.size == 0 for m in members):
        return {}
    rng = np.random.default_rng(seed)
    index = np.concatenate(
        [rng.choice(m, size=(resamples, m.size), replace=True) for m in members], axis=1
    )
    # Resamples in blocks of about 4 M probabilities (32 MB), so large sets fit in memory.
    block = max(1, 4_000_000 // (n * k))
    parts = [
        _bootstrap_draws(probabilities, labels, index[i : i + block], threshold)
        for i in range(0, resamples, block)
    ]
    draws = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    names = ["accuracy", "auc" if k == 2 else "auc_macro", "ece", "sensitivity", "specificity"]
    tail = (1.0 - level) / 2 * 100
    return {
        name: [
            _round(np.percentile(draws[name], tail)),
            _round(np.percentile(draws[name], 100 - tail)),
        ]
        for name in names
        if name in draws
    }


def _bootstrap_draws(
    probabilities: np.ndarray, labels: np.ndarray, index: np.ndarray, threshold: float | None
) -> dict[str, np.ndarray]:
    """The headline numbers of each resample (a row of ``index``), vectorised."""
    n, k = probabilities.shape
    p, y = probabilities[index], labels[index]  # (resamples, n, k) and (resamples, n)
    draws: dict[str, np.ndarray] = {}
    if threshold is not None:
        predicted = (p[:, :, 1] >= threshold).astype(np.int64)
        draws["sensitivity"] = np.mean(predicted[:, y[0] == 1] == 1, axis=1)
        draws["specificity"] = np.mean(predicted[:, y[0] == 0] == 0, axis=1)
    else:
        predicted = p.argmax(axis=2)
    draws["accuracy"] = np.mean(predicted == y, axis=1)
    # One-vs-rest AUC by the rank-sum (Mann-Whitney) identity, ties counted one half, as
    # roc_auc_score has it; every row has the same class counts (resampled within each class).
    aucs = []
    for c in range(1, 2) if k == 2 else range(k):
        positive = y[0] == c
        count = int(positive.sum())
        ranks = rankdata(p[:, :, c], axis=1)
        aucs.append(
            (ranks[:, positive].sum(axis=1) - count * (count + 1) / 2) / (count * (n - count))
        )
    draws["auc" if k == 2 else "auc_macro"] = np.mean(aucs, axis=0)
    draws["ece"] = np.array([expected_calibration_error(p[r], y[r]) for r in range(len(index))])
    return draws


def roc_curves(
    probabilities: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str] | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One-vs-rest ROC curves: false-positive rate and true-positive rate per class.

    Parameters
    ----------
    probabilities : np.ndarray
        Class probabilities, shape (n, k).
    labels : np.ndarray
        True class indices, shape (n,).
    class_names : Sequence[str] | None
        Keys of the result, in column order; ``str(index)`` when not given.

    Returns
    -------
    dict[str, tuple[np.ndarray, np.ndarray]]
        ``{class name: (fpr, tpr)}``. For two classes only the positive class (column 1);
        a class whose one-vs-rest labels take a single value (absent, or the only class
        present) has no ROC curve and is skipped.
    """
    probabilities, labels = _check_inputs(probabilities, labels)
    k = probabilities.shape[1]
    names = [str(i) for i in range(k)] if class_names is None else [str(c) for c in class_names]
    if len(names) != k:
        raise ValueError(f"class_names has {len(names)} entries for {k} columns")
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i in [1] if k == 2 else range(k):
        is_class = labels == i
        if is_class.all() or not is_class.any():
            continue
        fpr, tpr, _ = roc_curve(is_class.astype(np.int64), probabilities[:, i])
        curves[names[i]] = (fpr, tpr)
    return curves


def _check_inputs(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Arrays as float (n, k) and int (n,), or ValueError naming the bad shapes."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    if probabilities.ndim != 2 or labels.shape != (probabilities.shape[0],):
        raise ValueError(
            f"expected probabilities (n, k) and labels (n,), got shapes "
            f"{probabilities.shape} and {labels.shape}"
        )
    if probabilities.shape[0] == 0:
        raise ValueError("no samples: probabilities and labels are empty")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.mod(labels, 1) == 0):
            raise ValueError(f"labels must be class indices, got dtype {labels.dtype}")
        labels = labels.astype(np.int64)
    return probabilities, labels


def _share_at_or_above(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Share of ``values`` that are ``>= t`` for each ``t`` in ``thresholds``."""
    ordered = np.sort(values)
    below = np.searchsorted(ordered, thresholds, side="left")
    return np.asarray((len(ordered) - below) / len(ordered), dtype=np.float64)


def _ratio(numerator: Any, denominator: Any) -> Any:
    """``numerator / denominator`` elementwise, 0 where the denominator is 0."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    safe = np.where(denominator == 0, 1.0, denominator)
    return np.where(denominator == 0, 0.0, numerator / safe)


def _round(value: Any) -> float:
    """A plain Python float rounded for reports and JSON."""
    return round(float(value), _DECIMALS)


def _balanced_accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Mean recall over the classes present in ``labels`` (scikit-learn's definition)."""
    with warnings.catch_warnings():
        # Expected when a class is predicted but absent from the truth, or when truth and
        # prediction hold one class only; the result is still the documented mean recall over
        # the classes present in the truth.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", message="A single label was found")
        return float(balanced_accuracy_score(labels, predicted))


def _auc(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """AUC keys that are defined for these labels (see ``classification_metrics``)."""
    k = probabilities.shape[1]
    present = np.isin(np.arange(k), labels)
    if k == 2:
        return {"auc": _round(roc_auc_score(labels, probabilities[:, 1]))} if present.all() else {}
    result: dict[str, float] = {}
    if present.all():
        result["auc_macro"] = _round(
            roc_auc_score(labels, probabilities, multi_class="ovr", average="macro")
        )
    # The pooled one-vs-rest labels hold both values whenever k >= 2, so micro is always defined.
    binarised = label_binarize(labels, classes=list(range(k)))
    result["auc_micro"] = _round(roc_auc_score(binarised.ravel(), probabilities.ravel()))
    return result
