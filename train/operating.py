"""The two-class operating point: the threshold on the positive class's (fused) probability at
which a bundle decides, and the rule that chose it.

The rule is one constraint on validation data — a minimum sensitivity (the best specificity
that keeps it) or a minimum specificity (the best sensitivity that keeps it). ``fit`` takes it
from ``--min-sensitivity`` / ``--min-specificity``; ``calibrate`` may change it and stores it in
the card's ``training.operating_rule`` (:func:`stored_rule`); ``calibrate`` and ``ensemble``
choose the threshold again with the rule that set it (:func:`operating_rule`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from train.metrics import choose_threshold, choose_threshold_for_specificity

__all__ = ["DEFAULT_MIN_SENSITIVITY", "operating_point", "operating_rule", "stored_rule"]

#: the validation sensitivity the operating point keeps unless told otherwise.
DEFAULT_MIN_SENSITIVITY = 0.95


def operating_point(
    scores: np.ndarray,
    labels: np.ndarray,
    min_sensitivity: float,
    min_specificity: float | None,
) -> float:
    """The two-class decision threshold on validation scores: the best sensitivity at
    ``min_specificity`` when given, else the best specificity at ``min_sensitivity``."""
    if min_specificity is not None:
        return choose_threshold_for_specificity(scores, labels, min_specificity)
    return choose_threshold(scores, labels, min_sensitivity)


def operating_rule(training: dict[str, Any]) -> tuple[float, float | None]:
    """(min_sensitivity, min_specificity) that set a bundle's operating point: the last
    ``calibrate`` rule when there was one, else ``fit``'s arguments."""
    source = training.get("operating_rule") or training.get("args", {})
    specificity = source.get("min_specificity")
    return float(source.get("min_sensitivity", DEFAULT_MIN_SENSITIVITY)), (
        None if specificity in (None, "None") else float(specificity)
    )


def stored_rule(min_sensitivity: float, min_specificity: float | None) -> dict[str, float]:
    """The rule as the card's ``training.operating_rule`` stores it: the constraint that
    :func:`operating_point` applied."""
    if min_specificity is not None:
        return {"min_specificity": min_specificity}
    return {"min_sensitivity": min_sensitivity}
