"""`python -m train image-check`, `ood` and `evaluate --applicability` on tiny phantom sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dicom_node.applicability import load_image_checker
from dicom_node.models.bundle import load_bundle
from tests.conftest import make_set
from tests.factories import tiny_bundle
from train.__main__ import main
from train.image_check import CheckRow, choose_thresholds, read_rows
from train.predict import evaluate_applicability


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mixed")
    small = {"rows": 128, "cols": 128}
    return {
        "knee": make_set(root, "knee", task="knee", patients=8, seed=1, implant="mixed", **small),
        "other": make_set(root, "other", task="other", patients=3, seed=1, **small),
    }


def test_rows_carry_anatomy_and_implant(mixed: dict[str, Path]) -> None:
    rows = read_rows([mixed["knee"], mixed["other"]])
    assert {r.anatomy for r in rows} == {"knee", "other"}
    assert {r.implant for r in rows if r.anatomy == "knee"} <= {"present", "none", "other", "cut"}
    assert len({r.patient for r in rows}) == 11  # set-qualified: sets never share a patient


def test_thresholds_keep_the_implants_and_count_each_negative_kind() -> None:
    def row(implant: str, task: str = "knee") -> CheckRow:
        return CheckRow(Path("x"), "p", task if task != "other" else "other", "AP", implant, task)

    rows = [row("present")] * 200 + [row("none")] * 100 + [row("other")] * 100
    scores = np.concatenate([np.linspace(0.3, 1.0, 200), np.full(100, 0.01), np.full(100, 0.4)])
    probabilities = np.stack([scores, np.zeros(400), np.zeros(400)], axis=1)
    thresholds, figures = choose_thresholds(rows, probabilities, 0.99)
    assert 0.3 < thresholds["knee"] < 0.32  # the 1st percentile of the implant scores
    assert figures["knee"]["sensitivity"] >= 0.99
    assert figures["knee"]["rejected_none"] == 1.0
    assert figures["knee"]["rejected_other"] == 0.0  # 0.4 is above: counted, not hidden
    assert set(thresholds) == {"knee"}  # no hip or spine implant images: no threshold


def test_image_check_command_writes_a_bundle_the_node_loads(
    tmp_path: Path, mixed: dict[str, Path]
) -> None:
    out = tmp_path / "ic"
    status = main(
        [
            "image-check",
            "--data",
            str(mixed["knee"]),
            str(mixed["other"]),
            "--out",
            str(out),
            "--size",
            "64",
            "--epochs",
            "2",
            "--val-share",
            "0.4",
            "--device",
            "cpu",
        ]
    )
    assert status == 0
    checker = load_image_checker(out)
    card = json.loads((out / "card.json").read_text())
    assert card["training"]["command"].startswith("python -m train image-check")
    assert card["metrics"]["heads"]["images"] > 0
    assert checker.card.input_size == 64 and checker.card.anatomies[-1] == "other"
    # Thresholds again for the same weights, on a calibration set of their own.
    again = tmp_path / "ic-calibrated"
    status = main(
        [
            "image-check",
            "--data",
            str(mixed["knee"]),
            "--init",
            str(out),
            "--epochs",
            "0",
            "--size",
            "64",
            "--threshold-data",
            str(mixed["other"]),
            str(mixed["knee"]),
            "--out",
            str(again),
        ]
    )
    assert status == 0
    calibrated = json.loads((again / "card.json").read_text())
    assert calibrated["metrics"]["split"].startswith("calibration sets")
    assert calibrated["metrics"]["heads"]["images"] == len(
        read_rows([mixed["other"], mixed["knee"]])
    )
    assert calibrated["model_sha256"] == card["model_sha256"]  # the same weights


def test_ood_command_and_applicability_evaluation(tmp_path: Path, mixed: dict[str, Path]) -> None:
    bundle = tmp_path / "knee"
    tiny_bundle(bundle, "knee", backbone="orthonode_cnn")
    status = main(["ood", "--bundle", str(bundle), "--data", str(mixed["knee"])])
    assert status == 0
    card = load_bundle(bundle).card
    assert card.ood is not None and card.ood.validation["fitted_images"] > 0
    assert card.training["later_steps"][-1]["command"].startswith("python -m train ood")
    report = evaluate_applicability(bundle, mixed["other"], image_check=None)
    assert report["studies"] == 3
    assert report["answered"]["studies"] + report["not_applicable"]["studies"] == 3
    assert report["set"]["implant"].keys() <= {"none", "other"}
    # A set without the implant is refused by the classifier's own evaluation, with the fix.
    with pytest.raises(ValueError, match="--applicability"):
        from train.predict import evaluate

        evaluate(bundle, mixed["other"])
