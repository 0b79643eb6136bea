"""How a result is said to a reader: the one rounding rule and the sentences built on it.

The SR's content (labels drawn on the radiograph, the summary text), the Secondary Capture's
burned-in lines and the status page all word a result through these functions, so they can
never disagree (before, the SC said "100 %" where the SR said 99.81 %).

The rounding rule (:func:`percent_text`): a probability is shown in whole percent, except that
a value that would round to 0 or 100 is shown as "<1 %" or ">99 %", even when a saturated
softmax gives exactly 0 or 1. A model is never certain; "100 %" on a radiograph reads as if it
were. The SR's NUM items keep two decimals (:func:`percent_value`): they are for machines, and
the text shows the rule; a value read back from them (100.00 may be 0.99996 or 1.0) is worded
the same way, so the status page agrees with the Secondary Capture.

A task with an operating point (two classes, ``decision_threshold``: hip loosening) is worded
as a decision with its probability and the point where it is called, e.g. "Present —
probability of loosening 44 % (called present at ≥ 17 %)": a reader who sees "Present" beside a
probability under 50 % would otherwise read a contradiction.

No patient data here: only class names, probabilities and thresholds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["decision_text", "percent_text", "percent_value", "result_text"]

_EM_DASH = "—"


def percent_value(probability: float) -> float:
    """A probability as the SR's NUM writes it: percent, rounded to 0.01."""
    return round(100.0 * float(probability), 2)


def percent_text(probability: float) -> str:
    """A probability as text: "97 %", "<1 %" or ">99 %" (see the module's rounding rule).

    Raises ``ValueError`` for a value outside [0, 1] or not finite.
    """
    value = float(probability)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"a probability lies in [0, 1], not {probability!r}")
    percent = 100.0 * value
    # Python rounds halves to even; a reader expects 0.5 → 1 and 96.5 → 97.
    whole = math.floor(percent + 0.5)
    if whole >= 100:
        return ">99 %"
    if whole <= 0:
        return "<1 %"
    return f"{whole} %"


def decision_text(
    called: str,
    positive: str,
    probability: float,
    operating_point: float,
    *,
    finding: str | None = None,
) -> str:
    """A two-class decision at an operating point, e.g. "Present — probability of loosening
    44 % (called present at ≥ 17 %)".

    Parameters
    ----------
    called : str
        The class called (its reader-facing name, e.g. the SR's code meaning "Present").
    positive : str
        The positive class as the reader says it ("present").
    probability : float
        The probability of the positive class.
    operating_point : float
        The probability from which the positive class is called.
    finding : str, optional
        What the probability is of, e.g. "loosening"; left out where the text already names
        it ("Hip prosthesis loosening: Present — probability 44 % (...)").
    """
    of = f" of {finding}" if finding else ""
    return (
        f"{called} {_EM_DASH} probability{of} {percent_text(probability)} "
        f"(called {positive.lower()} at ≥ {percent_text(operating_point)})"
    )


def result_text(
    class_names: Sequence[str],
    probabilities: Sequence[float],
    *,
    predicted: int,
    abstained: bool = False,
    threshold: float | None = None,
    decision_threshold: float | None = None,
    finding: str | None = None,
) -> str:
    """The result in one phrase, as every output says it.

    - a class: "Zimmer LPS 97 %";
    - abstained: "Undetermined — best Zimmer LPS 41 %, below the 50 % threshold";
    - at an operating point: :func:`decision_text` with the second class as positive.
    """
    if len(class_names) != len(probabilities):
        raise ValueError(f"{len(class_names)} class names for {len(probabilities)} probabilities")
    name = class_names[predicted]
    if decision_threshold is not None and len(class_names) == 2:
        return decision_text(
            name, class_names[1], probabilities[1], decision_threshold, finding=finding
        )
    figure = percent_text(probabilities[predicted])
    if abstained:
        below = f", below the {percent_text(threshold)} threshold" if threshold is not None else ""
        return f"Undetermined {_EM_DASH} best {name} {figure}{below}"
    return f"{name} {figure}"
