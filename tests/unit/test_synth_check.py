"""synth-check: the probe detects leaks, the CNN learns, the command records its result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_set
from train.__main__ import main as train_main
from train.synth.check import SmallCNN, _probe, train_small_cnn


def test_probe_finds_a_brightness_leak_and_not_noise() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 40)
    groups = np.arange(len(labels))
    noise = rng.normal(size=(len(labels), 32, 32)).astype(np.float32)
    leaky = noise + 0.5 * labels[:, None, None]
    assert _probe("knee", leaky, labels, groups, seed=0) > 0.9
    assert _probe("knee", noise, labels, groups, seed=0) < 0.45


def test_small_cnn_learns_a_visible_detail() -> None:
    """A bright bar whose orientation is the class: learnable in a few epochs."""
    rng = np.random.default_rng(1)
    n = 96
    labels = np.arange(n) % 2
    images = rng.normal(0.0, 0.3, size=(n, 64, 64)).astype(np.float32)
    for i, label in enumerate(labels):
        r, c = rng.integers(10, 50, size=2)
        if label:
            images[i, r - 8 : r + 8, c - 1 : c + 2] += 2.0
        else:
            images[i, r - 1 : r + 2, c - 8 : c + 8] += 2.0
    train, test = np.arange(0, 72), np.arange(72, 96)
    probabilities = train_small_cnn(images, labels, train, test, classes=2, epochs=8, seed=0)
    assert probabilities.shape == (24, 2)
    assert (probabilities.argmax(axis=1) == labels[test]).mean() >= 0.9


def test_small_cnn_shape() -> None:
    model = SmallCNN(7)
    assert model(torch.zeros(2, 1, 256, 256)).shape == (2, 7)
    assert sum(p.numel() for p in model.parameters()) < 300_000


@pytest.mark.slow
def test_command_writes_its_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_set(tmp_path, "hip", task="hip", patients=16, seed=2, rows=128, cols=128)
    code = train_main(["synth-check", str(folder), "--epochs", "1"])
    record = json.loads((folder / "synth-check.json").read_text())
    assert code == (0 if record["passed"] else 1)
    assert record["task"] == "hip" and record["metric"] == "auc"
    assert record["patients"] == 16 and record["images"] == 16
    assert 0.0 <= record["probe"] <= 1.0 and 0.0 <= record["cnn"] <= 1.0
    assert "linear probe" in capsys.readouterr().out


def test_command_reports_a_missing_directory(tmp_path: Path) -> None:
    assert train_main(["synth-check", str(tmp_path / "nothing")]) == 2
