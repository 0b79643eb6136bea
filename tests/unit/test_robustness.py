"""``python -m train robustness``: the grid, the per-cell record, the model card's section."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.factories import tiny_bundle
from train import robustness
from train.robustness import BEGIN, CELLS, END, TARGETS, Target, score, write_section

FIELDS = {
    "cell",
    "factor",
    "shift",
    "acquisition",
    "seed",
    "patients",
    "studies",
    "n",
    "section",
    "metric",
    "value",
    "target",
    "meets_target",
    "shortfall",
    "vs_baseline",
    "accuracy",
    "auc",
    "ece",
    "sensitivity",
    "specificity",
    "views",
    "not_applicable",
    "seconds",
}


def _run(arguments: list[str]) -> int:
    args = robustness.get_args_parser().parse_args(arguments)
    args.command_line = "python -m train robustness " + " ".join(arguments)
    return robustness.main(args)


@pytest.fixture(scope="module")
def knee_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, str]:
    """Two cells of 2 patients at 128 px with a random-weight knee bundle, into a model card
    that already has text: the bundle, the output folder, the card and stdout."""
    root = tmp_path_factory.mktemp("robustness")
    tiny_bundle(root / "bundle", "knee")
    card = root / "card.md"
    card.write_text("# Model card\n\nSome text.\n")
    out = root / "out"
    arguments = ["--bundle", str(root / "bundle"), "--patients", "2", "--out", str(out)]
    arguments += ["--cells", "baseline,noise-2", "--base-size", "128", "--markdown", str(card)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(robustness, "short_commit", lambda: "abc1234")  # no git in the tests
        assert _run(arguments) == 0
    return root / "bundle", out, card, card.read_text()


def test_the_grid_has_every_cell_once() -> None:
    names = [cell.name for cell in CELLS]
    assert names == [
        "baseline",
        "noise-1.5",
        "noise-2",
        "noise-2.5",
        "contrast-0.6",
        "contrast-0.8",
        "contrast-1.2",
        "pitch-0.8",
        "pitch-1.3",
        "rotation-30",
        "matrix-512",
        "matrix-3000",
        "bits-10",
        "bits-16",
        "modality-CR",
        "photometric-MONOCHROME1",
        "external",
    ]
    by_name = {cell.name: cell for cell in CELLS}
    # One factor at a time: every cell but external changes the baseline in one option.
    baseline = by_name["baseline"].acquisition(1024)
    for cell in CELLS:
        changed = {k for k, v in cell.acquisition(1024).items() if baseline[k] != v}
        if cell.name == "external":
            assert changed == {
                "noise",
                "contrast",
                "spacing_scale",
                "photometric",
                "rotation",
                "transfer_syntax",
                "modality",
            }
        elif cell.factor == "matrix":
            assert changed == {"rows", "cols"}
        else:
            assert len(changed) == (cell.name != "baseline")
    assert by_name["matrix-3000"].acquisition(256)["rows"] == 3000  # absolute, not scaled
    assert by_name["pitch-1.3"].acquisition(256) == {
        **baseline,
        "rows": 256,
        "cols": 256,
        "spacing_scale": 1.3,
    }
    assert "| `bits-10` |" in robustness.cells_markdown()


def test_an_unknown_cell_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        robustness.get_args_parser().parse_args(["--bundle", "b", "--out", "o", "--cells", "x"])
    assert refused.value.code == 2
    assert "unknown cell(s) x" in capsys.readouterr().err


def test_the_json_has_one_record_per_cell(knee_run: tuple[Path, Path, Path, str]) -> None:
    _, out, _, _ = knee_run
    result = json.loads((out / "robustness.json").read_text())
    assert result["task"] == "knee" and result["commit"] == "abc1234"
    assert result["target"] == {"section": "fused", "metric": "accuracy", "value": 0.964}
    cells = result["cells"]
    assert [c["cell"] for c in cells] == ["baseline", "noise-2"]
    for record in cells:
        assert set(record) == FIELDS
        assert record["patients"] == 2 and record["n"] == 2
        assert record["section"] == "fused" and set(record["views"]) == {"AP", "LAT"}
        assert record["acquisition"]["rows"] == 128
    assert cells[1]["acquisition"]["noise"] == 2.0
    assert cells[0]["vs_baseline"] == 0.0
    # The sets were deleted after evaluation.
    assert sorted(p.name for p in out.iterdir()) == ["robustness.json"]


def test_a_missed_target_is_reported_with_its_shortfall(
    knee_run: tuple[Path, Path, Path, str],
) -> None:
    _, out, _, text = knee_run
    for record in json.loads((out / "robustness.json").read_text())["cells"]:
        # Random weights over six classes cannot reach 0.964 on two patients.
        assert record["meets_target"] is False
        assert record["shortfall"] == pytest.approx(0.964 - record["value"], abs=1e-4)
        assert record["shortfall"] > 0
    row = next(line for line in text.splitlines() if line.startswith("| `baseline`"))
    assert "| no |" in row and "0.964" in row


def test_the_card_section_is_replaced_not_duplicated(
    knee_run: tuple[Path, Path, Path, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bundle, _, card, first = knee_run
    assert first.startswith("# Model card\n\nSome text.\n\n" + BEGIN)
    assert first.count(BEGIN) == first.count(END) == 1 and "abc1234" in first
    assert "| `noise-2` |" in first
    card.write_text(first + "\n## After\n")
    monkeypatch.setattr(robustness, "short_commit", lambda: "")
    arguments = ["--bundle", str(bundle), "--patients", "1", "--out", str(tmp_path)]
    assert (
        _run([*arguments, "--cells", "baseline", "--base-size", "128", "--markdown", str(card)])
        == 0
    )
    second = card.read_text()
    assert second.count(BEGIN) == second.count(END) == 1
    assert second.startswith("# Model card\n\nSome text.\n\n" + BEGIN)
    assert second.endswith(END + "\n\n## After\n")
    assert "| `noise-2` |" not in second and "| `baseline` |" in second
    assert "commit unknown" in second


def test_write_section_refuses_broken_markers(tmp_path: Path) -> None:
    card = tmp_path / "card.md"
    write_section(card, "body")  # a new file
    assert card.read_text() == f"{BEGIN}\nbody\n{END}\n"
    card.write_text(f"text\n{BEGIN}\nno end\n")
    with pytest.raises(ValueError, match="markers"):
        write_section(card, "body")


def _report(sections: dict[str, dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"patients": 10, "studies": 10, "sections": sections, **extra}


def test_score_picks_the_task_figure_and_target() -> None:
    hip = score(
        _report({"AP": {"n": 10, "accuracy": 0.8, "auc": 0.95, "ece": 0.05}}), TARGETS["hip"]
    )
    assert (hip["section"], hip["metric"], hip["value"]) == ("AP", "auc", 0.95)
    assert hip["meets_target"] is True and hip["shortfall"] == 0.0
    assert hip["not_applicable"] is None
    spine = score(
        _report(
            {"AP": {"accuracy": 0.9}, "LAT": {"accuracy": 0.8}, "fused": {"accuracy": 0.9}},
            not_applicable=3,
        ),
        TARGETS["spine"],
    )
    assert spine["meets_target"] is False and spine["shortfall"] == pytest.approx(0.043)
    assert spine["not_applicable"] == 3 and spine["views"] == {"AP": 0.9, "LAT": 0.8}
    # Another task: its one view's accuracy, no target.
    other = score(_report({"AP": {"accuracy": 0.7, "auc_macro": 0.9}}), robustness.DEFAULT_TARGET)
    assert (other["section"], other["value"], other["auc"]) == ("AP", 0.7, 0.9)
    assert other["meets_target"] is None and other["shortfall"] is None
    # Every study refused: no figure, and the table shows the refusals.
    refused = score(_report({}, not_applicable={"studies": 10, "rate": 1.0}), TARGETS["knee"])
    assert (refused["section"], refused["value"], refused["meets_target"]) == ("fused", None, None)
    row = robustness.markdown_table(
        [
            {
                **refused,
                "cell": "x",
                "shift": "y",
                "vs_baseline": None,
                "seconds": {"generate": 1.0, "evaluate": 2.0},
            }
        ]
    ).splitlines()[2]
    assert row.startswith("| `x` | y | 10 | – |") and "| 10 (1.000) | 3 |" in row
    # An undefined figure (a class absent) meets nothing and misses by nothing known.
    missing = score(_report({"AP": {"accuracy": 1.0}}), Target("AP", "auc", 0.9))
    assert missing["value"] is None and missing["meets_target"] is None
