"""``python -m train robustness``: a bundle on a grid of acquisition shifts, one factor at a time.

Every cell of :data:`CELLS` is a fresh phantom set generated for it (:func:`train.synth.generate.
generate`) and scored through the node's own inference (:func:`train.predict.evaluate`). The
cells change one acquisition option of the baseline (:data:`BASELINE`: quantum noise ×1,
tone-curve contrast ×1, detector pitch ×1, rotation ±15°, 1024 px, bits stored drawn per patient
from 12/14/16, DX, MONOCHROME2, Explicit VR Little Endian) and keep the others; ``external`` is
the synth command's ``--acquisition external`` preset, every option shifted at once.

All cells use the same seed (default 1000, away from the seeds the demo bundles were trained
and tested on), so they hold the same patients, anatomy and implant designs and differ only in
the acquisition: a cell's change from the baseline is the factor's effect, not a different
draw of patients. ``--base-size`` sets the baseline matrix (and so every cell's, but the
``matrix-*`` cells, whose sizes are absolute): the tests use 128 px to stay fast.

Each cell records the figure its task is judged on (:data:`TARGETS`: knee and spine the fused
accuracy, hip the AUC of its one view, AP) against the task's target, with accuracy, AUC, ECE,
the number of patients and, as the evaluation reports it, the studies the node's applicability
stage refused (``not_applicable``; ``--image-check`` adds the image-check bundle's stage to the
out-of-distribution score). The results go to ``OUT/robustness.json``, a markdown table to stdout
and, with ``--markdown CARD``, into the model card between ``<!-- robustness:begin -->`` and
``<!-- robustness:end -->`` (the section is replaced when it is there, appended otherwise).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node.models.bundle import load_card
from train.cli import run_command
from train.predict import evaluate
from train.synth.generate import EXTERNAL, SynthOptions, generate

__all__ = [
    "BASELINE",
    "BEGIN",
    "CELLS",
    "DEFAULT_TARGET",
    "END",
    "TARGETS",
    "Cell",
    "Target",
    "cells_markdown",
    "get_args_parser",
    "main",
    "markdown_table",
    "run_cells",
    "score",
    "write_section",
]

log = logging.getLogger(__name__)

BEGIN = "<!-- robustness:begin -->"
END = "<!-- robustness:end -->"

#: The baseline acquisition: SynthOptions keywords, written out rather than taken from the
#: dataclass's defaults, so the grid stays put when those change.
BASELINE: dict[str, Any] = {
    "noise": 1.0,
    "contrast": 1.0,
    "spacing_scale": 1.0,
    "rotation": 15.0,
    "bits_stored": None,
    "modality": "DX",
    "photometric": "MONOCHROME2",
    "transfer_syntax": "explicit",
}


@dataclass(frozen=True)
class Cell:
    """One cell of the grid: ``settings`` are the SynthOptions keywords it changes."""

    name: str
    factor: str  # the acquisition option it shifts: "baseline", "noise", ..., "external"
    shift: str  # in words, for tables
    settings: tuple[tuple[str, Any], ...] = ()

    def acquisition(self, base_size: int) -> dict[str, Any]:
        """Every acquisition keyword of this cell: the baseline at ``base_size`` px, changed."""
        return {"rows": base_size, "cols": base_size, **BASELINE, **dict(self.settings)}

    def options(
        self, *, task: str, patients: int, out: Path, seed: int, base_size: int, workers: int
    ) -> SynthOptions:
        return SynthOptions(
            task=task,
            patients=patients,
            out=out,
            seed=seed,
            workers=workers,
            **self.acquisition(base_size),
        )


def _factor(factor: str, key: str, values: Sequence[Any], words: str) -> tuple[Cell, ...]:
    return tuple(
        Cell(f"{factor}-{value:g}", factor, words.format(value), ((key, value),))
        for value in values
    )


#: The grid, in report order.
CELLS: tuple[Cell, ...] = (
    Cell("baseline", "baseline", "none (the baseline acquisition)"),
    *_factor("noise", "noise", (1.5, 2.0, 2.5), "quantum noise ×{:g}"),
    *_factor("contrast", "contrast", (0.6, 0.8, 1.2), "tone-curve contrast ×{:g}"),
    *_factor("pitch", "spacing_scale", (0.8, 1.3), "detector pixel pitch ×{:g}"),
    *_factor("rotation", "rotation", (30.0,), "rotation ±{:g}°"),
    *(
        Cell(
            f"matrix-{size}",
            "matrix",
            f"matrix {size} × {size} px",
            (("rows", size), ("cols", size)),
        )
        for size in (512, 3000)
    ),
    *_factor("bits", "bits_stored", (10, 16), "{:d} bits stored, every patient"),
    Cell("modality-CR", "modality", "modality CR", (("modality", "CR"),)),
    Cell(
        "photometric-MONOCHROME1",
        "photometric",
        "MONOCHROME1 (inverted grey scale)",
        (("photometric", "MONOCHROME1"),),
    ),
    Cell(
        "external",
        "external",
        "all at once: the synth --acquisition external preset",
        tuple(sorted(EXTERNAL.items())),
    ),
)
_BY_NAME = {cell.name: cell for cell in CELLS}


@dataclass(frozen=True)
class Target:
    """The study-level figure a task is judged on: ``metric`` ("accuracy" or "auc") of the
    report's ``section`` ("fused", or the one view of a single-view task), and its target."""

    section: str
    metric: str
    value: float | None


#: Targets by task (the published references the model cards cite).
TARGETS: dict[str, Target] = {
    "knee": Target("fused", "accuracy", 0.964),
    "spine": Target("fused", "accuracy", 0.943),
    "hip": Target("AP", "auc", 0.90),
}
#: Any other task: its fused accuracy (or its one view's), no target.
DEFAULT_TARGET = Target("fused", "accuracy", None)


def _auc(metrics: dict[str, Any]) -> float | None:
    """``auc`` of a two-class section, ``auc_macro`` of a multi-class one (None: undefined)."""
    value = metrics.get("auc", metrics.get("auc_macro"))
    return None if value is None else float(value)


def score(report: dict[str, Any], target: Target) -> dict[str, Any]:
    """The figures of one cell from a :func:`train.predict.evaluate` report."""
    sections: dict[str, dict[str, Any]] = report["sections"]
    # The target's section, else fused, else the first; none when every study was refused.
    section = next(
        (name for name in (target.section, "fused", *sections) if name in sections),
        target.section,
    )
    metrics = sections.get(section, {})
    value = _auc(metrics) if target.metric == "auc" else metrics.get(target.metric)
    meets = shortfall = None
    if target.value is not None and value is not None:
        meets = value >= target.value
        shortfall = round(max(0.0, target.value - value), 4)
    return {
        "patients": report["patients"],
        "studies": report["studies"],
        "n": metrics.get("n"),
        "section": section,
        "metric": target.metric,
        "value": value,
        "target": target.value,
        "meets_target": meets,
        "shortfall": shortfall,
        "accuracy": metrics.get("accuracy"),
        "auc": _auc(metrics),
        "ece": metrics.get("ece"),
        "sensitivity": metrics.get("sensitivity"),  # two classes at the operating threshold
        "specificity": metrics.get("specificity"),
        "views": {
            name: figures.get("accuracy") for name, figures in sections.items() if name != "fused"
        },
        # The node's applicability stage, when the evaluation reports it.
        "not_applicable": report.get("not_applicable"),
    }


def run_cells(
    bundle: Path,
    cells: Sequence[Cell],
    out: Path,
    *,
    patients: int,
    seed: int = 1000,
    base_size: int = 1024,
    workers: int = 1,
    keep: bool = False,
    image_check: Path | None = None,
) -> list[dict[str, Any]]:
    """Generate and evaluate every cell; one record per cell, in order. The sets are written
    under ``out`` and deleted after evaluation, unless ``keep`` (then ``out/sets/<cell>``).
    ``image_check`` (an image-check bundle) adds that stage to the node's applicability checks
    in the evaluation."""
    task = load_card(bundle).task
    target = TARGETS.get(task, DEFAULT_TARGET)
    extra: dict[str, Any] = {} if image_check is None else {"image_check": image_check}
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    records: list[dict[str, Any]] = []

    def run(cell: Cell, folder: Path) -> dict[str, Any]:
        options = cell.options(
            task=task,
            patients=patients,
            out=folder,
            seed=seed,
            base_size=base_size,
            workers=workers,
        )
        began = time.perf_counter()
        generate(options)
        generated = time.perf_counter()
        report = evaluate(bundle, folder, **extra)
        return {
            "cell": cell.name,
            "factor": cell.factor,
            "shift": cell.shift,
            "acquisition": cell.acquisition(base_size),
            "seed": seed,
            **score(report, target),
            "seconds": {
                "generate": round(generated - began, 1),
                "evaluate": round(time.perf_counter() - generated, 1),
            },
        }

    for number, cell in enumerate(cells, start=1):
        cell_started = time.perf_counter()
        if keep:
            folder = out / "sets" / cell.name
            if folder.exists():
                if not (folder / "synth.json").is_file():
                    raise ValueError(f"{folder} exists and is not a phantom set; not replacing it")
                shutil.rmtree(folder)
            folder.parent.mkdir(parents=True, exist_ok=True)
            record = {**run(cell, folder), "data": str(folder)}
        else:
            with tempfile.TemporaryDirectory(prefix=f".{cell.name}-", dir=out) as temporary:
                record = run(cell, Path(temporary))
        records.append(record)
        figure = "–" if record["value"] is None else f"{record['value']:.3f}"
        log.info(
            "cell %d/%d %s: %s %s %s%s; %.1f s (generate %.1f s, evaluate %.1f s), %.0f s elapsed",
            number,
            len(cells),
            cell.name,
            record["section"],
            record["metric"],
            figure,
            "" if record["target"] is None else f" (target {record['target']:.3f})",
            time.perf_counter() - cell_started,
            record["seconds"]["generate"],
            record["seconds"]["evaluate"],
            time.perf_counter() - started,
        )
    baseline = next((r for r in records if r["cell"] == "baseline"), None)
    for record in records:
        record["vs_baseline"] = (
            None
            if baseline is None or record["value"] is None or baseline["value"] is None
            else round(record["value"] - baseline["value"], 4)
        )
    return records


def _not_applicable(value: Any) -> str:
    """The evaluation's count of studies the applicability stage refused: "studies (rate)"."""
    if isinstance(value, dict) and "studies" in value:
        rate = value.get("rate")
        return f"{value['studies']}" + ("" if rate is None else f" ({rate:.3f})")
    return _figure(value)


def _figure(value: Any, signed: bool = False) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:+.3f}" if signed else f"{value:.3f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value)


def markdown_table(records: Sequence[dict[str, Any]]) -> str:
    """One row per cell: the judged figure against its target, then accuracy, AUC, ECE."""
    if not records:
        return ""
    first = records[0]
    judged = f"{first['section']} {first['metric']}"
    columns = [
        ("cell", "cell", False),
        ("shift", "shift", False),
        ("patients", "patients", False),
        (judged, "value", False),
        ("target", "target", False),
        ("meets", "meets_target", False),
        ("short by", "shortfall", False),
        ("vs baseline", "vs_baseline", True),
        ("accuracy", "accuracy", False),
        ("AUC", "auc", False),
        ("ECE", "ece", False),
    ]
    if any(r.get("not_applicable") is not None for r in records):
        columns.append(("not applicable", "not_applicable", False))
    columns.append(("seconds", "seconds", False))

    def cell(record: dict[str, Any], key: str, signed: bool) -> str:
        if key == "seconds":
            return f"{record['seconds']['generate'] + record['seconds']['evaluate']:.0f}"
        if key == "cell":
            return f"`{record['cell']}`"
        if key == "not_applicable":
            return _not_applicable(record.get(key))
        return _figure(record.get(key), signed)

    lines = [
        "| " + " | ".join(title for title, _, _ in columns) + " |",
        "| :--- | :--- |" + " ---: |" * (len(columns) - 2),
    ]
    lines += [
        "| " + " | ".join(cell(r, key, signed) for _, key, signed in columns) + " |"
        for r in records
    ]
    return "\n".join(lines) + "\n"


def cells_markdown() -> str:
    """The grid as a markdown table (for docs): each cell's name and what it changes."""
    lines = ["| cell | shift | synth options |", "| :--- | :--- | :--- |"]
    for cell in CELLS:
        options = ", ".join(f"{k}={v}" for k, v in cell.settings) or "–"
        lines.append(f"| `{cell.name}` | {cell.shift} | {options} |")
    return "\n".join(lines) + "\n"


def write_section(path: Path, body: str) -> None:
    """Put ``body`` between the robustness markers of ``path``: the section is replaced when the
    markers are there, appended (the file created) otherwise."""
    section = f"{BEGIN}\n{body.rstrip()}\n{END}"
    text = path.read_text() if path.is_file() else ""
    if BEGIN in text or END in text:
        pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)
        if text.count(BEGIN) != 1 or text.count(END) != 1 or not pattern.search(text):
            raise ValueError(f"{path}: the robustness markers are not one begin and one end")
        text = pattern.sub(lambda _: section, text)
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def short_commit() -> str:
    """``git rev-parse --short HEAD`` of this checkout; empty when git cannot say."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def machine() -> str:
    """The CPU the evaluation ran on, in words (the node's inference runs on the CPU here)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPU cores, {platform.system()}"


def _section(result: dict[str, Any]) -> str:
    target = result["target"]
    judged = f"{target['section']} {target['metric']}"
    goal = "no target" if target["value"] is None else f"target {target['value']:.3f}"
    lines = [
        "## Robustness to acquisition shifts",
        "",
        f"Bundle {result['bundle_version']} (`{result['bundle']}`), {result['task']}: one "
        f"acquisition option changed at a time around the baseline, each cell a fresh phantom "
        f"set of {result['patients']} patients (seed {result['seed']}, the same patients in "
        f"every cell; baseline matrix {result['base_size']} px), judged on the {judged} "
        f"({goal}). The figures are over the studies the node's applicability stage "
        "answered; every phantom shows the implant, so each study it refused (not applicable) "
        "is a wrong refusal.",
        "",
        markdown_table(result["cells"]).rstrip(),
        "",
        f"- Command: `{result['command']}`",
        f"- Date: {result['date']}; commit {result['commit'] or 'unknown'}; "
        f"machine: {result['machine']}.",
        "- Baseline acquisition: quantum noise ×1, contrast ×1, pitch ×1, rotation ±15°, "
        "bits stored 12/14/16 per patient, DX, MONOCHROME2, Explicit VR Little Endian; "
        f"`external`: {', '.join(f'{k}={v}' for k, v in _BY_NAME['external'].settings)}.",
    ]
    return "\n".join(lines) + "\n"


def _cell_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in _BY_NAME]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown cell(s) {', '.join(unknown)}; choose from {', '.join(_BY_NAME)}"
        )
    return names


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train robustness",
        add_help=add_help,
        description="Evaluate a bundle on a grid of acquisition shifts, one factor at a time, "
        "each cell a fresh phantom set.",
    )
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--patients", type=int, default=40, help="patients per cell")
    parser.add_argument("--out", type=Path, required=True, help="robustness.json goes here")
    parser.add_argument(
        "--cells",
        type=_cell_names,
        nargs="+",
        default=None,
        help=f"cells to run, space- or comma-separated (default all): {', '.join(_BY_NAME)}",
    )
    parser.add_argument(
        "--seed", type=int, default=1000, help="phantom seed of every cell (away from training's)"
    )
    parser.add_argument(
        "--base-size",
        type=int,
        default=1024,
        help="baseline matrix in px (the matrix-* cells keep their own sizes)",
    )
    parser.add_argument("--workers", type=int, default=1, help="phantom generation processes")
    parser.add_argument("--markdown", type=Path, default=None, help="model card to update")
    parser.add_argument(
        "--image-check",
        type=Path,
        default=None,
        help="image-check bundle: add its stage to the applicability checks of the evaluation",
    )
    parser.add_argument("--keep", action="store_true", help="keep each cell's set in OUT/sets")
    return parser


def main(args: argparse.Namespace) -> int:
    names = [n for group in (args.cells or [[c.name for c in CELLS]]) for n in group]
    cells = [_BY_NAME[name] for name in dict.fromkeys(names)]

    def work() -> dict[str, Any]:
        if args.patients < 1:
            raise ValueError("--patients must be at least 1")
        card = load_card(args.bundle)
        target = TARGETS.get(card.task, DEFAULT_TARGET)
        records = run_cells(
            args.bundle,
            cells,
            args.out,
            patients=args.patients,
            seed=args.seed,
            base_size=args.base_size,
            workers=max(1, args.workers),
            keep=args.keep,
            image_check=args.image_check,
        )
        return {
            "bundle": str(args.bundle),
            "bundle_version": card.version,
            "task": card.task,
            "target": {"section": target.section, "metric": target.metric, "value": target.value},
            "patients": args.patients,
            "seed": args.seed,
            "base_size": args.base_size,
            "command": getattr(args, "command_line", "") or "python -m train robustness",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "commit": short_commit(),
            "machine": machine(),
            "cells": records,
        }

    def show(result: dict[str, Any]) -> None:
        (args.out / "robustness.json").write_text(json.dumps(result, indent=2) + "\n")
        if args.markdown:
            write_section(args.markdown, _section(result))
        sys.stdout.write(markdown_table(result["cells"]))

    return run_command("robustness", work, show)
