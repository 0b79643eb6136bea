"""train.metrics against scikit-learn and hand computations; train.report writes its files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    brier_score_loss,
    cohen_kappa_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from train.metrics import (
    bootstrap_intervals,
    choose_threshold,
    classification_metrics,
    expected_calibration_error,
    reliability_curve,
    roc_curves,
)
from train.report import markdown_summary, write_report

HAND_PROBABILITIES = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
HAND_LABELS = np.array([0, 1, 1, 0])
BINARY_NAMES = ["intact", "loose"]


def _random_case(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities that lean towards the true class, so metrics are neither 0 nor 1."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, size=n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[labels]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probabilities, labels


def _sensitivity_specificity(
    scores: np.ndarray, labels: np.ndarray, threshold: float
) -> tuple[float, float]:
    called = scores >= threshold
    positive = labels == 1
    return float((called & positive).sum() / positive.sum()), float(
        (~called & ~positive).sum() / (~positive).sum()
    )


# ---------------------------------------------------------------- calibration


def test_ece_matches_a_hand_computation() -> None:
    # Top-class confidences 0.9 (right), 0.8 (wrong), 0.7 (right), 0.6 (right), one per bin:
    # |1 - 0.9| + |0 - 0.8| + |1 - 0.7| + |1 - 0.6| = 0.1 + 0.8 + 0.3 + 0.4 = 1.6, over 4.
    assert expected_calibration_error(HAND_PROBABILITIES, HAND_LABELS) == pytest.approx(0.4)


def test_ece_pools_samples_that_share_a_bin() -> None:
    # One bin (0.8, 1.0] with confidences 0.85 and 0.95, one right: |0.5 - 0.9| weighted 1.
    probabilities = np.array([[0.85, 0.15], [0.05, 0.95]])
    labels = np.array([0, 0])
    assert expected_calibration_error(probabilities, labels, bins=5) == pytest.approx(0.4)


def test_ece_is_zero_for_perfect_one_hot_predictions() -> None:
    labels = np.array([0, 2, 1, 1, 2, 0])
    assert expected_calibration_error(np.eye(3)[labels], labels) == 0.0


def test_reliability_curve_bins_are_half_open_on_the_left() -> None:
    # With 5 bins, 0.8 is exactly the edge between (0.6, 0.8] and (0.8, 1.0]: it belongs below.
    probabilities = np.array([[0.6, 0.4], [0.3, 0.7], [0.2, 0.8], [0.9, 0.1]])
    labels = np.array([0, 0, 1, 0])
    curve = reliability_curve(probabilities, labels, bins=5)
    assert curve["edges"] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert curve["count"].tolist() == [0, 0, 1, 2, 1]
    assert curve["confidence"][2:] == pytest.approx([0.6, 0.75, 0.9])
    assert curve["accuracy"][2:] == pytest.approx([1.0, 0.5, 1.0])
    assert np.isnan(curve["accuracy"][:2]).all()


# ---------------------------------------------------------------- classification_metrics


def test_binary_metrics_agree_with_sklearn_and_hand_counts() -> None:
    probabilities = np.array(
        [[0.9, 0.1], [0.7, 0.3], [0.4, 0.6], [0.2, 0.8], [0.55, 0.45], [0.1, 0.9], [0.6, 0.4]]
    )
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    predicted = probabilities.argmax(axis=1)  # [0, 0, 1, 1, 0, 1, 0]
    result = classification_metrics(probabilities, labels, BINARY_NAMES)

    assert result["n"] == 7
    assert result["confusion"] == [[2, 1], [2, 2]]
    assert result["accuracy"] == pytest.approx(accuracy_score(labels, predicted), abs=1e-4)
    assert result["accuracy"] == pytest.approx(4 / 7, abs=1e-4)
    assert result["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(labels, predicted), abs=1e-4
    )
    assert result["cohen_kappa"] == pytest.approx(cohen_kappa_score(labels, predicted), abs=1e-4)
    assert result["auc"] == pytest.approx(roc_auc_score(labels, probabilities[:, 1]), abs=1e-4)
    assert "auc_macro" not in result and "auc_micro" not in result
    # Binary multi-class Brier = twice sklearn's Brier score of the positive column.
    assert result["brier"] == pytest.approx(
        2 * brier_score_loss(labels, probabilities[:, 1]), abs=1e-4
    )
    loose = result["per_class"]["loose"]
    intact = result["per_class"]["intact"]
    # By hand: loose TP 2, FN 2, FP 1, TN 2; intact is the mirror image.
    assert loose == {
        "sensitivity": 0.5,
        "specificity": pytest.approx(2 / 3, abs=1e-4),
        "precision": pytest.approx(2 / 3, abs=1e-4),
        "f1": pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5), abs=1e-4),
        "support": 4,
    }
    assert intact["specificity"] == loose["sensitivity"]
    assert intact["sensitivity"] == loose["specificity"]
    assert "threshold" not in result and "sensitivity" not in result


def test_multiclass_metrics_agree_with_sklearn() -> None:
    probabilities, labels = _random_case(n=300, k=4, seed=7)
    names = ["a", "b", "c", "d"]
    predicted = probabilities.argmax(axis=1)
    result = classification_metrics(probabilities, labels, names)

    def close(value: float) -> object:
        return pytest.approx(value, abs=1e-4)

    assert result["n"] == 300
    assert result["accuracy"] == close(accuracy_score(labels, predicted))
    assert 0.3 < result["accuracy"] < 0.95  # neither trivial nor hopeless, so checks bite
    assert result["balanced_accuracy"] == close(balanced_accuracy_score(labels, predicted))
    assert result["cohen_kappa"] == close(cohen_kappa_score(labels, predicted))
    assert result["confusion"] == confusion_matrix(labels, predicted).tolist()
    assert result["ece"] == close(expected_calibration_error(probabilities, labels))
    assert result["brier"] == close(
        np.mean([np.sum((probabilities[i] - np.eye(4)[labels[i]]) ** 2) for i in range(300)])
    )
    assert result["auc_macro"] == close(
        roc_auc_score(labels, probabilities, multi_class="ovr", average="macro")
    )
    assert result["auc_micro"] == close(
        roc_auc_score(labels, probabilities, multi_class="ovr", average="micro")
    )
    assert "auc" not in result

    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted)
    for i, name in enumerate(names):
        stats = result["per_class"][name]
        negatives = labels != i
        specificity = np.sum(negatives & (predicted != i)) / np.sum(negatives)
        assert stats["sensitivity"] == close(recall[i])
        assert stats["precision"] == close(precision[i])
        assert stats["f1"] == close(f1[i])
        assert stats["support"] == support[i]
        assert stats["specificity"] == close(specificity)
    assert list(result["per_class"]) == names

    for average in ("macro", "micro"):
        precision_avg, recall_avg, f1_avg, _ = precision_recall_fscore_support(
            labels, predicted, average=average
        )
        assert result[average]["sensitivity"] == close(recall_avg)
        assert result[average]["precision"] == close(precision_avg)
        assert result[average]["f1"] == close(f1_avg)
    assert result["macro"]["specificity"] == close(
        np.mean([result["per_class"][name]["specificity"] for name in names])
    )
    assert result["micro"]["sensitivity"] == close(result["accuracy"])
    assert set(result["micro"]) == {"sensitivity", "precision", "f1"}


def test_result_is_json_ready_and_rounded() -> None:
    probabilities, labels = _random_case(n=50, k=3, seed=1)
    result = classification_metrics(probabilities, labels, ["x", "y", "z"])
    assert json.loads(json.dumps(result)) == result
    assert set(result) == {
        "n",
        "accuracy",
        "balanced_accuracy",
        "cohen_kappa",
        "ece",
        "brier",
        "per_class",
        "macro",
        "micro",
        "auc_macro",
        "auc_micro",
        "confusion",
    }
    for key in ("accuracy", "balanced_accuracy", "cohen_kappa", "ece", "brier", "auc_macro"):
        assert type(result[key]) is float
        assert result[key] == round(result[key], 4)
    assert type(result["per_class"]["x"]["support"]) is int


def test_threshold_changes_predictions_as_expected() -> None:
    scores = np.array([0.1, 0.25, 0.35, 0.45, 0.55, 0.7, 0.3, 0.4, 0.6, 0.8])
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    probabilities = np.column_stack([1 - scores, scores])

    default = classification_metrics(probabilities, labels, BINARY_NAMES)
    # argmax: positives are 0.55, 0.7 (negatives) and 0.6, 0.8 (positives).
    assert default["confusion"] == [[4, 2], [2, 2]]

    lowered = classification_metrics(probabilities, labels, BINARY_NAMES, threshold=0.3)
    # >= 0.3: negatives 0.35, 0.45, 0.55, 0.7 and every positive (0.3 itself included).
    assert lowered["confusion"] == [[2, 4], [0, 4]]
    assert lowered["threshold"] == 0.3
    assert lowered["sensitivity"] == 1.0
    assert lowered["specificity"] == pytest.approx(2 / 6, abs=1e-4)
    assert lowered["accuracy"] == pytest.approx(0.6)
    predicted = (scores >= 0.3).astype(int)
    assert lowered["cohen_kappa"] == pytest.approx(cohen_kappa_score(labels, predicted), abs=1e-4)
    assert lowered["per_class"]["loose"]["precision"] == pytest.approx(0.5)
    # Probability-based metrics do not depend on the threshold.
    for key in ("auc", "ece", "brier"):
        assert lowered[key] == default[key]

    raised = classification_metrics(probabilities, labels, BINARY_NAMES, threshold=0.75)
    assert raised["confusion"] == [[6, 0], [3, 1]]
    assert raised["sensitivity"] == 0.25
    assert raised["specificity"] == 1.0


def test_absent_class_omits_undefined_auc_without_crashing() -> None:
    probabilities = np.array(
        [[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.5, 0.3, 0.2], [0.1, 0.3, 0.6], [0.3, 0.6, 0.1]]
    )
    labels = np.array([0, 1, 0, 1, 1])  # class 2 never occurs
    result = classification_metrics(probabilities, labels, ["knee", "hip", "spine"])
    assert "auc_macro" not in result
    binarised = np.eye(3)[labels]
    assert result["auc_micro"] == pytest.approx(
        roc_auc_score(binarised.ravel(), probabilities.ravel()), abs=1e-4
    )
    assert result["confusion"] == [[2, 0, 0], [0, 2, 1], [0, 0, 0]]
    assert result["per_class"]["spine"]["support"] == 0
    assert result["per_class"]["spine"]["sensitivity"] == 0.0
    assert result["per_class"]["spine"]["precision"] == 0.0
    assert result["per_class"]["spine"]["specificity"] == 0.8
    json.dumps(result)

    binary = classification_metrics(
        np.array([[0.8, 0.2], [0.4, 0.6]]), np.array([1, 1]), BINARY_NAMES
    )
    assert "auc" not in binary
    assert binary["confusion"] == [[0, 0], [1, 1]]
    assert binary["accuracy"] == 0.5


def test_kappa_is_omitted_when_undefined() -> None:
    result = classification_metrics(np.array([[0.9, 0.1], [0.8, 0.2]]), np.array([0, 0]), "ab")
    assert "cohen_kappa" not in result
    assert result["accuracy"] == 1.0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((HAND_PROBABILITIES, HAND_LABELS, ["one"]), "class_names"),
        ((HAND_PROBABILITIES, HAND_LABELS[:3], BINARY_NAMES), "shapes"),
        ((HAND_PROBABILITIES, np.array([0, 1, 2, 0]), BINARY_NAMES), "range"),
        ((HAND_PROBABILITIES, HAND_LABELS, BINARY_NAMES, 1.5), "threshold"),
        ((np.full((2, 3), 1 / 3), np.array([0, 1]), "abc", 0.5), "2 classes"),
    ],
)
def test_bad_arguments_raise_value_error(arguments: tuple[object, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        classification_metrics(*arguments)  # type: ignore[arg-type]


# ---------------------------------------------------------------- choose_threshold


def test_choose_threshold_on_a_hand_example() -> None:
    scores = np.array([0.1, 0.25, 0.35, 0.45, 0.55, 0.7, 0.3, 0.4, 0.6, 0.8])
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    # Sensitivity >= 0.5 first holds at 0.6 (positives 0.6, 0.8; specificity 5/6); the next
    # lower distinct score is 0.55, so the threshold is their midpoint.
    assert choose_threshold(scores, labels, 0.5) == pytest.approx(0.575)
    # Sensitivity 1 needs 0.3 (specificity 2/6); next lower score 0.25.
    assert choose_threshold(scores, labels, 1.0) == pytest.approx(0.275)
    # Sensitivity 0.25 is reached at the top score 0.8, specificity 1; next lower score 0.7.
    assert choose_threshold(scores, labels, 0.25) == pytest.approx(0.75)


def test_choose_threshold_breaks_specificity_ties_at_the_lowest_score() -> None:
    scores = np.array([0.1, 0.3, 0.5, 0.9])
    labels = np.array([0, 1, 1, 1])
    # 0.9, 0.5 and 0.3 all give specificity 1 with sensitivity >= 1/3: 0.3 (sensitivity 1) is
    # kept, and the threshold lies halfway to the next lower score.
    assert choose_threshold(scores, labels, 0.3) == pytest.approx(0.2)
    scores = np.array([0.1, 0.3, 0.35, 0.5, 0.9])
    labels = np.array([0, 1, 0, 1, 1])
    # specificity 1 needs a threshold above 0.35 (sensitivity 2/3); 1/3 more needs 0.3 (spec 0.5).
    assert choose_threshold(scores, labels, 0.6) == pytest.approx(0.425)
    assert choose_threshold(scores, labels, 0.9) == pytest.approx(0.2)


def test_choose_threshold_at_the_lowest_score_and_without_positives() -> None:
    scores = np.array([0.2, 0.5, 0.9])
    assert choose_threshold(scores, np.array([1, 0, 1]), 1.0) == 0.2
    assert choose_threshold(scores, np.array([0, 0, 0]), 0.9) == 0.2
    with pytest.raises(ValueError, match="min_sensitivity"):
        choose_threshold(scores, np.array([1, 0, 1]), 1.2)


@pytest.mark.parametrize("min_sensitivity", [0.0, 0.3, 0.5, 0.8, 0.9, 0.95, 1.0])
def test_choose_threshold_is_best_specificity_by_brute_force(min_sensitivity: float) -> None:
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 2, size=120)
    # Two decimals make ties between samples, including across classes.
    scores = np.round(np.clip(rng.normal(0.35 + 0.3 * labels, 0.18), 0, 1), 2)
    threshold = choose_threshold(scores, labels, min_sensitivity)

    sensitivity, specificity = _sensitivity_specificity(scores, labels, threshold)
    assert sensitivity >= min_sensitivity
    # Any threshold up to the top score acts exactly as some distinct score.
    operating_points = [_sensitivity_specificity(scores, labels, t) for t in np.unique(scores)]
    best = max(spec for sens, spec in operating_points if sens >= min_sensitivity)
    assert specificity == best
    if threshold > scores.min():
        assert threshold not in scores  # between two samples, not on one
        below = scores[scores < threshold].max()
        above = scores[scores >= threshold].min()
        assert threshold == pytest.approx((below + above) / 2)
        # The lowest tied score: the next lower distinct score has a worse specificity.
        _sens_down, spec_down = _sensitivity_specificity(scores, labels, below)
        assert spec_down < best


# ---------------------------------------------------------------- roc_curves


def test_roc_curves_binary_and_multiclass() -> None:
    binary = roc_curves(HAND_PROBABILITIES, HAND_LABELS, BINARY_NAMES)
    assert list(binary) == ["loose"]
    fpr, tpr, _ = roc_curve(HAND_LABELS, HAND_PROBABILITIES[:, 1])
    assert binary["loose"][0] == pytest.approx(fpr)
    assert binary["loose"][1] == pytest.approx(tpr)

    probabilities, labels = _random_case(n=60, k=3, seed=2)
    labels[labels == 1] = 0  # class 1 absent: skipped
    curves = roc_curves(probabilities, labels)
    assert list(curves) == ["0", "2"]
    fpr, tpr, _ = roc_curve(labels == 2, probabilities[:, 2])
    assert curves["2"][1] == pytest.approx(tpr)


# ---------------------------------------------------------------- report


def test_write_report_writes_markdown_and_pngs(tmp_path: Path) -> None:
    probabilities, labels = _random_case(n=80, k=3, seed=5)
    names = ["TKA", "UKA", "none"]
    multi = classification_metrics(probabilities, labels, names)
    scores = probabilities[:, 0] / (probabilities[:, 0] + probabilities[:, 1])
    binary_probabilities = np.column_stack([1 - scores, scores])
    binary_labels = (labels == 0).astype(int)
    threshold = choose_threshold(scores, binary_labels, 0.9)
    binary = classification_metrics(
        binary_probabilities, binary_labels, BINARY_NAMES, threshold=threshold
    )
    sections = [
        ("AP", multi, probabilities, labels),
        ("fused", binary, binary_probabilities, binary_labels),
    ]

    path = write_report(sections, tmp_path / "out", "Test report", preamble="Synthetic data.")

    assert path == tmp_path / "out" / "report.md"
    text = path.read_text(encoding="utf-8")
    for name in ("AP", "fused"):
        for kind in ("confusion", "roc", "reliability"):
            png = tmp_path / "out" / f"{kind}_{name}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"]({kind}_{name}.png)" in text
    assert text.startswith("# Test report\n")
    assert "Synthetic data." in text
    assert f"| AP | 80 | {multi['accuracy']:.4f} | {multi['balanced_accuracy']:.4f} |" in text
    assert f"{multi['auc_macro']:.4f} | {multi['auc_micro']:.4f} | {multi['ece']:.4f} |" in text
    assert f"{binary['auc']:.4f} | – | {binary['ece']:.4f} | {threshold:.4f} |" in text
    assert f"{binary['sensitivity']:.4f} | {binary['specificity']:.4f} |" in text
    uka = multi["per_class"]["UKA"]
    assert (
        f"| UKA | {uka['sensitivity']:.4f} | {uka['specificity']:.4f} | "
        f"{uka['precision']:.4f} | {uka['f1']:.4f} | {uka['support']} |"
    ) in text
    assert f"| *macro* | {multi['macro']['sensitivity']:.4f} |" in text
    row = " | ".join(str(count) for count in multi["confusion"][2])
    assert f"| **none** | {row} |" in text

    summary = markdown_summary(sections, "Evaluation")
    assert summary.startswith("## Evaluation\n")
    assert "### fused" in summary
    assert ".png" not in summary
    assert f"| {multi['accuracy']:.4f} |" in summary
    assert "bootstrap" not in summary  # no intervals given, no interval table

    binary["ci95"] = bootstrap_intervals(binary_probabilities, binary_labels, threshold)
    with_intervals = markdown_summary(sections, "Evaluation")
    low, high = binary["ci95"]["ece"]
    assert "95 % bootstrap intervals" in with_intervals
    assert "| section | accuracy | AUC | ECE | sensitivity | specificity |" in with_intervals
    assert f"| fused | {binary['ci95']['accuracy'][0]:.4f}–" in with_intervals
    assert f"| {low:.4f}–{high:.4f} |" in with_intervals
    assert "| AP | – | – | – | – | – |" in with_intervals


def test_write_report_rejects_names_that_collide_as_files(tmp_path: Path) -> None:
    probabilities, labels = _random_case(n=20, k=2, seed=3)
    metrics = classification_metrics(probabilities, labels, BINARY_NAMES)
    sections = [("a b", metrics, probabilities, labels), ("a/b", metrics, probabilities, labels)]
    with pytest.raises(ValueError, match="distinct file names"):
        write_report(sections, tmp_path, "t")


@pytest.mark.parametrize("min_specificity", [0.0, 0.5, 0.75, 0.9, 1.0])
def test_threshold_for_specificity_is_best_sensitivity_by_brute_force(
    min_specificity: float,
) -> None:
    from train.metrics import choose_threshold_for_specificity

    rng = np.random.default_rng(12)
    labels = rng.integers(0, 2, size=120)
    scores = np.round(np.clip(rng.normal(0.35 + 0.3 * labels, 0.18), 0, 1), 2)
    threshold = choose_threshold_for_specificity(scores, labels, min_specificity)
    sensitivity, specificity = _sensitivity_specificity(scores, labels, threshold)
    points = [_sensitivity_specificity(scores, labels, t) for t in np.unique(scores)]
    points.append((0.0, 1.0))  # a threshold above every score
    eligible = [(sens, spec) for sens, spec in points if spec >= min_specificity]
    assert specificity >= min_specificity
    assert sensitivity == max(sens for sens, _ in eligible)
    # Of the equally sensitive thresholds, the most specific.
    assert specificity == max(spec for sens, spec in eligible if sens == sensitivity)


def test_threshold_for_specificity_ignores_one_high_negative() -> None:
    from train.metrics import choose_threshold_for_specificity

    # Separable but for one negative at 0.8: best-specificity-at-sensitivity would need t > 0.8.
    scores = np.array([0.01, 0.02, 0.05, 0.8, 0.3, 0.6, 0.85, 0.9, 0.95])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    assert choose_threshold(scores, labels, 0.6) == pytest.approx(0.825)
    assert choose_threshold_for_specificity(scores, labels, 0.75) == pytest.approx(0.175)


def test_abstention_counts_answered_cases_and_their_accuracy() -> None:
    from train.metrics import abstention

    probabilities = np.array([[0.9, 0.1, 0.0], [0.3, 0.35, 0.35], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]])
    labels = np.array([0, 0, 1, 0])
    # answered at 0.45: rows 0, 2, 3 (0.9, 0.7, 0.5); correct among them: rows 0 and 3.
    assert abstention(probabilities, labels, 0.45) == {
        "answered": 0.75,
        "accuracy_answered": pytest.approx(0.6667),
    }
    assert abstention(probabilities, labels, 0.95) == {"answered": 0.0, "accuracy_answered": 0.0}


def test_bootstrap_intervals_cover_the_estimate_and_narrow_with_more_studies() -> None:
    small_p, small_y = _random_case(150, 2, seed=11)
    large_p, large_y = _random_case(1500, 2, seed=11)
    small = bootstrap_intervals(small_p, small_y, threshold=0.5)
    point = classification_metrics(small_p, small_y, BINARY_NAMES, threshold=0.5)
    assert set(small) == {"accuracy", "auc", "ece", "sensitivity", "specificity"}
    for name, (low, high) in small.items():
        assert low <= point[name] <= high, (name, low, point[name], high)
    # Sensitivity over ~75 positives: about ±1.96·sqrt(p(1-p)/75), as a binomial would have it.
    positives = int((small_y == 1).sum())
    binomial = 1.96 * np.sqrt(point["sensitivity"] * (1 - point["sensitivity"]) / positives)
    low, high = small["sensitivity"]
    assert 0.7 * binomial < (high - low) / 2 < 1.3 * binomial
    large = bootstrap_intervals(large_p, large_y, threshold=0.5)
    for name in small:
        assert large[name][1] - large[name][0] < small[name][1] - small[name][0], name
    # Reproducible for one seed; another seed moves the ends a little.
    assert bootstrap_intervals(small_p, small_y, threshold=0.5) == small
    assert bootstrap_intervals(small_p, small_y, threshold=0.5, seed=1) != small


def test_bootstrap_intervals_edge_cases() -> None:
    perfect = np.array([[0.9, 0.1]] * 5 + [[0.2, 0.8]] * 5)
    truth = np.array([0] * 5 + [1] * 5)
    intervals = bootstrap_intervals(perfect, truth, threshold=0.5, resamples=200)
    assert intervals["auc"] == [1.0, 1.0] and intervals["sensitivity"] == [1.0, 1.0]
    assert intervals["ece"][0] == pytest.approx(0.15)  # confidence 0.9 / 0.8, always right
    multi_p, multi_y = _random_case(60, 4, seed=2)
    assert set(bootstrap_intervals(multi_p, multi_y, resamples=50)) == {
        "accuracy",
        "auc_macro",
        "ece",
    }
    assert bootstrap_intervals(perfect[:5], truth[:5]) == {}  # one class only: no intervals
    with pytest.raises(ValueError):
        bootstrap_intervals(perfect, truth, level=1.5)


@pytest.mark.parametrize(
    ("n", "k", "threshold", "resamples"),
    # The last case is large enough to be computed in two blocks of resamples.
    [(90, 2, 0.4, 200), (90, 4, None, 200), (2100, 2, 0.5, 1000)],
)
def test_bootstrap_intervals_agree_with_scikit_learn_per_resample(
    n: int, k: int, threshold: float | None, resamples: int
) -> None:
    """The vectorised rank-sum AUC and the per-resample figures equal scikit-learn's on the
    same resamples (drawn here the way bootstrap_intervals draws them)."""
    probabilities, labels = _random_case(n, k, seed=21)
    if k == 2:  # ties, which the rank-sum counts one half (multi-class rows must sum to 1)
        probabilities = np.round(probabilities, 2)
    rng = np.random.default_rng(5)
    members = [np.flatnonzero(labels == c) for c in range(k)]
    index = np.concatenate(
        [rng.choice(m, size=(resamples, m.size), replace=True) for m in members], axis=1
    )
    draws: dict[str, list[float]] = {"accuracy": [], "auc": [], "ece": []}
    for row in index:
        p, y = probabilities[row], labels[row]
        predicted = (p[:, 1] >= threshold).astype(int) if threshold is not None else p.argmax(1)
        draws["accuracy"].append(accuracy_score(y, predicted))
        draws["ece"].append(expected_calibration_error(p, y))
        draws["auc"].append(
            roc_auc_score(y, p[:, 1]) if k == 2 else roc_auc_score(y, p, multi_class="ovr")
        )
    got = bootstrap_intervals(probabilities, labels, threshold, resamples=resamples, seed=5)
    for name, values in draws.items():
        key = name if name != "auc" or k == 2 else "auc_macro"
        expected = [np.percentile(values, 2.5), np.percentile(values, 97.5)]
        assert got[key] == pytest.approx(expected, abs=1e-4), name
