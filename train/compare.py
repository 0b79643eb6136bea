"""``python -m train compare``: several backbones (with and without the region-of-interest
stage) trained on one split, side by side — the hip study's six-CNN comparison, as a command.

Every variant runs the protocol of ``python -m train fit`` (:func:`train.protocol.run`) with
the same data, split and seed into ``OUT/<backbone>-roi-<on|off>/``; ``OUT/compare.md`` and
``compare.json`` give the test figures (and those of every ``--external`` set), weights and
training time of each. Options other than those below go to ``fit``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dicom_node.models.backbones import BACKBONES
from dicom_node.models.bundle import load_bundle
from train import protocol
from train.cli import run_command

__all__ = ["compare", "get_args_parser", "main"]


def compare(args: argparse.Namespace, fit_arguments: list[str]) -> list[dict[str, Any]]:
    """Run fit for every (backbone, roi) variant; the rows of the comparison table."""
    rows = []
    for backbone in args.backbones:
        for roi in args.roi:
            out = args.out / f"{backbone}-roi-{roi}"
            fit_args = protocol.get_args_parser().parse_args(
                [*fit_arguments, "--out", str(out), "--backbone", backbone, "--roi", roi]
            )
            fit_args.command_line = getattr(args, "command_line", "")
            metrics = protocol.run(fit_args)
            bundle = load_bundle(out)
            # The test split, then every --external set, each at its study level.
            sets = {"test": metrics}
            sets.update({k: v for k, v in metrics.items() if k.startswith("external:")})
            parameters = sum(p.numel() for p in bundle.model.parameters())
            for name, figures in sets.items():
                headline = figures.get("fused") or figures.get("AP") or {}
                rows.append(
                    {
                        "backbone": backbone,
                        "roi": roi,
                        "set": name,
                        "parameters": parameters,
                        "seconds": bundle.card.training.get("seconds"),
                        **{k: headline.get(k) for k in _FIGURES},
                    }
                )
    return rows


_FIGURES = ("n", "accuracy", "auc", "auc_macro", "ece", "sensitivity", "specificity")


def _markdown(rows: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "–"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    columns = [
        "backbone",
        "roi",
        "set",
        "parameters",
        "seconds",
        "n",
        "accuracy",
        "auc",
        "auc_macro",
        "ece",
        "sensitivity",
        "specificity",
    ]
    used = [c for c in columns if any(r.get(c) is not None for r in rows)]
    lines = ["| " + " | ".join(used) + " |", "|" + "---|" * len(used)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in used) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train compare",
        add_help=add_help,
        description="Train several backbones on one split and compare them (other options "
        "go to python -m train fit, e.g. --data, --epochs, --size).",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for every variant")
    parser.add_argument(
        "--backbones", nargs="+", default=["orthonode_cnn"], choices=sorted(BACKBONES)
    )
    parser.add_argument("--roi", nargs="+", default=["on"], choices=["on", "off"])
    return parser


def main(args: argparse.Namespace) -> int:
    def show(rows: list[dict[str, Any]]) -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
        table = _markdown(rows)
        title = "# Backbone comparison (one split: its test set, then each --external set)\n\n"
        (args.out / "compare.md").write_text(title + table)
        sys.stdout.write(table)

    fit_arguments = list(getattr(args, "fit_arguments", []))
    return run_command("compare", lambda: compare(args, fit_arguments), show)
