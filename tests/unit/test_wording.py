"""The one rounding rule and the result sentences shared by the SR, the SC and the page."""

from __future__ import annotations

import pytest

from dicom_node.wording import decision_text, percent_text, result_text


@pytest.mark.parametrize(
    ("probability", "text"),
    [
        (0.0, "<1 %"),  # never "0 %" or "100 %": a saturated softmax is not a certainty
        (0.004, "<1 %"),
        (0.005, "1 %"),  # halves round up, not to even
        (0.125, "13 %"),
        (0.4369, "44 %"),
        (0.965, "97 %"),
        (0.9949, "99 %"),
        (0.9981, ">99 %"),  # the SC said "100 %" where the SR said 99.81 %
        (1.0, ">99 %"),
    ],
)
def test_percent_text(probability: float, text: str) -> None:
    assert percent_text(probability) == text


@pytest.mark.parametrize("bad", [-0.01, 1.01, float("nan"), float("inf")])
def test_percent_text_refuses_what_is_not_a_probability(bad: float) -> None:
    with pytest.raises(ValueError, match="probability"):
        percent_text(bad)


def test_a_decision_names_its_operating_point() -> None:
    assert decision_text("Present", "Present", 0.4369, 0.17, finding="loosening") == (
        "Present — probability of loosening 44 % (called present at ≥ 17 %)"
    )
    assert decision_text("Absent", "Present", 0.12, 0.17) == (
        "Absent — probability 12 % (called present at ≥ 17 %)"
    )


def test_result_text_for_a_class_an_abstention_and_an_operating_point() -> None:
    names = ["Zimmer LPS", "Zimmer Persona"]
    assert result_text(names, [0.97, 0.03], predicted=0) == "Zimmer LPS 97 %"
    assert result_text(names, [0.41, 0.59], predicted=1, abstained=True, threshold=0.6) == (
        "Undetermined — best Zimmer Persona 59 %, below the 60 % threshold"
    )
    assert result_text(["Absent", "Present"], [0.8, 0.2], predicted=1, decision_threshold=0.17) == (
        "Present — probability 20 % (called present at ≥ 17 %)"
    )
    with pytest.raises(ValueError, match="class names"):
        result_text(names, [1.0], predicted=0)
