"""``python -m train evaluate``: a bundle on a labelled set, through the node's own inference.

Every study of the set goes through :class:`dicom_node.infer.Predictor` exactly as the node runs
it (preprocessing, region of interest, temperature, AP + lateral fusion, operating threshold),
and :mod:`train.metrics` scores it per view and fused (:func:`train.predict.evaluate`): accuracy,
balanced accuracy, Cohen's kappa, per-class sensitivity / specificity / precision / F1, macro and
micro averages, one-vs-rest AUC (macro and micro), ECE, Brier score, the confusion matrix, and
for two-class tasks sensitivity and specificity at the card's operating threshold.
``--saliency`` also scores the heatmaps on the phantom masks. ``--report DIR`` writes report.md
with ROC, reliability and confusion plots; ``--markdown FILE`` appends the tables to a model card.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from train.cli import run_command
from train.predict import evaluate, evaluate_applicability
from train.report import markdown_summary, write_report

__all__ = ["get_args_parser", "main", "to_markdown"]


def to_markdown(report: dict[str, Any], title: str) -> str:
    """The report as a markdown section for a model card: tables, then saliency."""
    text = markdown_summary(report["raw"], title)
    lead = (
        f"{report['patients']} patients ({report['studies']} studies), data `{report['data']}`, "
        f"bundle {report['bundle']}."
    )
    text = text.replace("\n", f"\n\n{lead}\n", 1)
    if report.get("saliency", {}).get("images"):
        sal = report["saliency"]
        text += (
            f"\nSaliency ({sal['method']}, {sal['images']} images, masks dilated by 2 mm): "
            f"heatmap mass inside the implant mask {sal['mass_in_mask']:.3f}, pointing game "
            f"{sal['pointing_game']:.3f}.\n"
        )
    return text


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train evaluate",
        add_help=add_help,
        description="Evaluate a bundle on a labelled set through the node's inference.",
    )
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="manifest folder or DICOM folder")
    parser.add_argument("--labels", type=Path, default=None, help="labels CSV for a DICOM folder")
    parser.add_argument("--out", type=Path, default=None, help="write the metrics as JSON")
    parser.add_argument("--report", type=Path, default=None, help="write report.md + plots here")
    parser.add_argument("--markdown", type=Path, default=None, help="append a markdown section")
    parser.add_argument("--title", default="Evaluation", help="title of the markdown section")
    parser.add_argument(
        "--saliency",
        choices=["gradcam", "integrated-gradients"],
        default=None,
        help="also score heatmap localisation on the phantom masks",
    )
    parser.add_argument(
        "--image-check",
        type=Path,
        default=None,
        help="image check bundle (e.g. weights/image-check): refuse as the node does",
    )
    parser.add_argument(
        "--no-ood", action="store_true", help="without the bundle's out-of-distribution score"
    )
    parser.add_argument(
        "--applicability",
        action="store_true",
        help="count how often the bundle's task refuses this set's studies (any manifest: "
        "native anatomy, other metal, other tasks' phantoms), instead of scoring classes",
    )
    return parser


def main(args: argparse.Namespace) -> int:
    def show(report: dict[str, Any]) -> None:
        text = json.dumps({k: v for k, v in report.items() if k != "raw"}, indent=2) + "\n"
        if args.out:
            args.out.write_text(text)
        if args.report:
            write_report(
                report["raw"],
                args.report,
                f"{args.title}: {report['task']} {report['bundle']}",
                preamble=f"Data `{report['data']}`, {report['patients']} patients.",
            )
        if args.markdown:
            with args.markdown.open("a") as handle:
                handle.write(to_markdown(report, args.title) + "\n")
        sys.stdout.write(text)

    if args.applicability:
        return run_command(
            "evaluate",
            lambda: evaluate_applicability(
                args.bundle, args.data, image_check=args.image_check, ood=not args.no_ood
            ),
            lambda report: _write_json(report, args.out),
        )
    return run_command(
        "evaluate",
        lambda: evaluate(
            args.bundle,
            args.data,
            labels=args.labels,
            saliency=args.saliency,
            image_check=args.image_check,
            ood=not args.no_ood,
        ),
        show,
    )


def _write_json(report: dict[str, Any], out: Path | None) -> None:
    text = json.dumps(report, indent=2) + "\n"
    if out:
        out.write_text(text)
    sys.stdout.write(text)
