"""The training commands around fit: calibrate, ensemble, export, lr-find, compare, torchrun."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.models.bundle import load_bundle, sha256_file
from tests.conftest import make_set
from train.__main__ import main as train_main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def knee_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A knee set and a bundle fitted on it (2 epochs, region of interest on)."""
    root = tmp_path_factory.mktemp("knee-run")
    data = make_set(root, "data", task="knee", patients=24, seed=11, rows=160, cols=160)
    out = root / "run"
    arguments = ["fit", "--data", str(data), "--out", str(out), "--size", "64", "--epochs", "2"]
    arguments += ["--roi-epochs", "2", "--roi-size", "128", "--split", "0.5", "0.3", "0.2"]
    assert train_main([*arguments, "--threads", "2"]) == 0
    return data, out


@pytest.fixture(scope="module")
def hip_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_set(
        tmp_path_factory.mktemp("hip"), "hip", task="hip", patients=20, seed=12, rows=128, cols=128
    )


def test_calibrate_takes_one_operating_constraint(capsys: pytest.CaptureFixture[str]) -> None:
    """Both constraints at once used to keep the specificity one and drop the other silently."""
    from train.calibrate import get_args_parser

    parser = get_args_parser()
    args = parser.parse_args(["--bundle", "b", "--data", "d", "--min-specificity", "0.8"])
    assert (args.min_specificity, args.min_sensitivity) == (0.8, None)
    with pytest.raises(SystemExit) as refused:
        parser.parse_args(
            ["--bundle", "b", "--data", "d", "--min-specificity", "0.8", "--min-sensitivity", "0.9"]
        )
    assert refused.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.slow
def test_calibrate_changes_the_card_not_the_weights(
    knee_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    data, run = knee_run
    before = json.loads((run / "card.json").read_text())
    assert train_main(["calibrate", "--bundle", str(run), "--data", str(data), "--dry-run"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert json.loads((run / "card.json").read_text()) == before
    assert dry["temperature"]["before"] == pytest.approx(before["temperature"], abs=1e-4)
    # The validation split of split.csv (one study per patient), two views each.
    validation = (run / "split.csv").read_text().count(",val")
    assert validation == 6 and dry["images"] == 2 * validation  # round(0.3 × 4) of each class
    assert train_main(["calibrate", "--bundle", str(run), "--data", str(data)]) == 0
    after = json.loads((run / "card.json").read_text())
    assert after["temperature"] == pytest.approx(dry["temperature"]["after"], abs=1e-4)
    assert after["model_sha256"] == sha256_file(run / "model.pt") == before["model_sha256"]
    # The card says how its temperature came to be: the fit command, then this one.
    assert after["training"]["command"] == before["training"]["command"]
    steps = after["training"]["later_steps"]
    assert [s["command"] for s in steps] == [
        f"python -m train calibrate --bundle {run} --data {data}"
    ]
    assert re.fullmatch(r"([0-9a-f]{40}(-dirty)?)?", steps[0]["git_commit"])
    assert steps[0]["date"].endswith("Z")
    load_bundle(run)


@pytest.mark.slow
def test_ensemble_reports_single_views_and_fused(
    knee_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    data, run = knee_run
    code = train_main(["ensemble", "--bundle", str(run), "--data", str(data), "--subset", "all"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fitted_on"]["studies"] == 24
    assert {"AP", "LAT", "mean"} <= set(result["side_by_side"])
    assert result["compared_on"]["studies"] == (run / "split.csv").read_text().count(",test")
    card = json.loads((run / "card.json").read_text())
    assert (card["stacker"] is not None) == ("stacker" in result["side_by_side"])


@pytest.mark.slow
def test_export_copies_verifies_and_renames(
    knee_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, run = knee_run
    target = tmp_path / "weights" / "knee"
    assert (
        train_main(["export", "--bundle", str(run), "--out", str(target), "--version", "9.9"]) == 0
    )
    assert "bundle: " in capsys.readouterr().out
    assert sorted(p.name for p in target.iterdir()) == ["card.json", "localiser.pt", "model.pt"]
    exported, source = load_bundle(target), load_bundle(run)
    assert exported.card.version == "9.9" and exported.card.device_uid != source.card.device_uid
    # A tampered source is refused, with the reason.
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for name in ("card.json", "localiser.pt", "model.pt"):
        (tampered / name).write_bytes((run / name).read_bytes())
    (tampered / "localiser.pt").write_bytes(b"not the weights")
    code = train_main(["export", "--bundle", str(tampered), "--out", str(tmp_path / "x")])
    assert code == 2
    assert "sha256" in capsys.readouterr().err


@pytest.mark.slow
def test_lr_find_suggests_a_rate_in_range(
    knee_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, _ = knee_run
    arguments = ["lr-find", "--data", str(data), "--out", str(tmp_path), "--size", "64"]
    assert train_main([*arguments, "--steps", "30", "--batch-size", "8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 1e-5 <= result["suggested_lr"] <= 1.0
    assert result["suggested_lr"] <= result["lowest_loss_lr"]
    assert (tmp_path / "lr-find.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_compare_with_and_without_roi_and_hip_operating_point(
    hip_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arguments = ["compare", "--out", str(tmp_path), "--roi", "on", "off", "--data", str(hip_data)]
    arguments += ["--epochs", "1", "--roi-epochs", "1", "--roi-size", "64", "--size", "64"]
    assert train_main([*arguments, "--split", "0.5", "0.3", "0.2"]) == 0
    table = (tmp_path / "compare.md").read_text()
    assert "| orthonode_cnn | on | test |" in table and "| orthonode_cnn | off | test |" in table
    rows = json.loads((tmp_path / "compare.json").read_text())
    assert [r["roi"] for r in rows] == ["on", "off"] and all(r["n"] == 4 for r in rows)
    capsys.readouterr()
    for variant in ("orthonode_cnn-roi-on", "orthonode_cnn-roi-off"):
        card = load_bundle(tmp_path / variant).card
        # Two classes: an operating threshold from validation, and no abstention.
        assert card.decision_threshold is not None and card.threshold == 0.0
        assert card.metrics["AP"]["threshold"] == pytest.approx(card.decision_threshold)
    run = tmp_path / "orthonode_cnn-roi-off"
    code = train_main(
        ["calibrate", "--bundle", str(run), "--data", str(hip_data), "--min-sensitivity", "1.0"]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["decision_threshold"]["min_sensitivity"] == 1.0
    card = load_bundle(run).card
    assert card.decision_threshold == pytest.approx(result["decision_threshold"]["after"], abs=1e-4)
    assert card.training["operating_rule"] == {"min_sensitivity": 1.0}
    # Without a rule on the command line, calibrate keeps the one the card now records.
    assert train_main(["calibrate", "--bundle", str(run), "--data", str(hip_data)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["decision_threshold"]["min_sensitivity"] == 1.0
    assert len(load_bundle(run).card.training["later_steps"]) == 2


@pytest.mark.slow
def test_torchrun_trains_with_two_processes(hip_data: Path, tmp_path: Path) -> None:
    """DistributedDataParallel on CPU (gloo): two ranks, one bundle written by rank 0."""
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "train", "fit", "--data", str(hip_data), "--out", str(out), "--roi", "off"]
    command += ["--epochs", "2", "--size", "64", "--split", "0.5", "0.3", "0.2", "--threads", "1"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=environment
    )
    assert result.returncode == 0, result.stderr[-3000:]
    card = load_bundle(out).card
    assert card.training["processes"] == 2
    assert card.training["command"].startswith("python -m train fit")


@pytest.mark.slow
def test_evaluate_writes_report_markdown_and_json(
    knee_run: tuple[Path, Path], tmp_path: Path
) -> None:
    data, run = knee_run
    card = tmp_path / "card.md"
    card.write_text("# Model card\n\n")
    arguments = ["evaluate", "--bundle", str(run), "--data", str(data), "--title", "Held out"]
    arguments += ["--report", str(tmp_path / "report"), "--markdown", str(card)]
    assert train_main([*arguments, "--out", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["studies"] == 24 and set(metrics["sections"]) == {"AP", "LAT", "fused"}
    assert "raw" not in metrics  # arrays stay out of the JSON
    text = card.read_text()
    assert text.startswith("# Model card") and "Held out" in text and "24 patients" in text
    report = (tmp_path / "report" / "report.md").read_text()
    assert "reliability_fused.png" in report
    assert (tmp_path / "report" / "reliability_fused.png").is_file()
    bad = ["evaluate", "--bundle", str(run), "--data", str(tmp_path / "nothing")]
    assert train_main(bad) == 2
