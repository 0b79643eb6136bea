"""python -m train fit: split, metrics, and a tiny train → export → node loads → predicts run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node.domain import InstanceRef, RoutedView, StudyJob
from dicom_node.infer import Predictor
from dicom_node.models.bundle import load_bundle
from tests.conftest import make_set
from train.__main__ import main as train_main
from train.fit import augment_batch, expected_calibration_error, split_patients


def test_split_is_patient_level_stratified_and_deterministic() -> None:
    patients = [f"p{i}" for i in range(60)]
    labels = [i % 3 for i in range(60)]
    first = split_patients(patients, labels, (0.7, 0.2, 0.1), seed=1)
    assert first == split_patients(patients, labels, (0.7, 0.2, 0.1), seed=1)
    assert first != split_patients(patients, labels, (0.7, 0.2, 0.1), seed=2)
    for name, expected in (("train", 42), ("val", 12), ("test", 6)):
        members = [p for p, s in first.items() if s == name]
        assert len(members) == expected
        assert sorted(labels[int(p[1:])] for p in members).count(0) == expected // 3


def test_ece_matches_a_hand_computation() -> None:
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([0, 1, 1, 0])
    # bins (0.8,0.867]: {0.8 wrong}; (0.867,0.933]: {0.9 right}; (0.667,0.733]: {0.7 right};
    # (0.533,0.6]: {0.6 right}
    expected = (abs(0 - 0.8) + abs(1 - 0.9) + abs(1 - 0.7) + abs(1 - 0.6)) / 4
    assert expected_calibration_error(probabilities, labels) == pytest.approx(expected)
    perfect = np.eye(2)[labels]
    assert expected_calibration_error(perfect, labels) == pytest.approx(0.0)


def test_augmentation_keeps_shape_and_changes_pixels() -> None:
    batch = torch.randn(4, 1, 64, 64)
    generator = torch.Generator().manual_seed(0)
    out = augment_batch(batch, generator)
    assert out.shape == batch.shape and not torch.allclose(out, batch)


@pytest.mark.slow
def test_tiny_train_export_load_predict(tmp_path: Path) -> None:
    data = make_set(tmp_path, "data", task="knee", patients=30, seed=6, rows=128, cols=128)
    out = tmp_path / "bundle"
    code = train_main(
        [
            "fit",
            "--data",
            str(data),
            "--out",
            str(out),
            "--size",
            "96",
            "--epochs",
            "2",
            "--threads",
            "2",
            "--version",
            "0.0.1-test",
            "--split",
            "0.6",
            "0.2",
            "0.2",
        ]
    )
    assert code == 0
    bundle = load_bundle(out)
    card = json.loads((out / "card.json").read_text())
    assert card["task"] == "knee" and card["version"] == "0.0.1-test" and card["demo"] is True
    assert card["training"]["data_fingerprint"] and card["temperature"] > 0
    assert set(card["metrics"]) >= {"view_AP", "view_LAT", "fused"}
    assert not (out / "checkpoint.pt").exists()
    with (data / "manifest.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r["patient_id"] == "PH-KNEE-S6-00000"]
    views = tuple(
        RoutedView(
            InstanceRef(r["sop_instance_uid"], "", r["study_instance_uid"], "", data / r["path"]),
            "knee",
            r["view"],
        )
        for r in rows
    )
    [(prediction, _)] = Predictor({"knee": bundle}).predict(
        [StudyJob(rows[0]["study_instance_uid"], "knee", views)]
    )
    assert len(prediction.probabilities) == 6
    assert prediction.fused_probabilities is not None
    assert abs(sum(prediction.probabilities) - 1.0) < 1e-6
    # evaluate goes through the node's Predictor; its fused accuracy must match a recount.
    from train.evaluate import evaluate, to_markdown

    report = evaluate(out, data, saliency="gradcam")
    assert report["saliency"]["images"] == 60
    assert 0.0 <= report["saliency"]["mass_in_mask"] <= 1.0
    assert report["patients"] == 30 and report["AP"]["n"] == 30
    assert set(report) >= {"AP", "LAT", "fused"}
    matrix = np.array(report["fused"]["confusion"])
    assert matrix.sum() == 30
    assert report["fused"]["accuracy"] == pytest.approx(np.trace(matrix) / 30, abs=1e-4)
    assert 0.0 <= report["AP"]["auc_macro"] <= 1.0
    markdown = to_markdown(report, "held-out")
    assert "| fused | 30 |" in markdown and "Zimmer Persona" in markdown


def test_saliency_in_mask() -> None:
    from train.evaluate import saliency_in_mask

    heat = np.zeros((10, 10))
    heat[2, 2], heat[7, 7] = 3.0, 1.0
    mask = np.zeros((10, 10), dtype=bool)
    mask[1:4, 1:4] = True
    assert saliency_in_mask(heat, mask) == (0.75, True)
    assert saliency_in_mask(heat, ~mask) == (0.25, False)
    assert saliency_in_mask(np.zeros((4, 4)), np.ones((4, 4), dtype=bool)) == (0.0, True)
