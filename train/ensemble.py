"""``python -m train ensemble``: refit a bundle's AP + lateral fusion (:mod:`train.fusion`, the
screw study's logistic-regression stacker, as ``fit`` fits it on its validation split) on a
labelled set, and compare single views, their mean and the stacker side by side.

Only card.json changes: the stacker, the two-class operating point (chosen again on the new
fused scores, with the rule that set it), and ``training.later_steps``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.models.bundle import load_bundle, update_card
from train.cli import run_command
from train.data import read_dataset
from train.fusion import by_study, fit_stacker, fused_probabilities
from train.metrics import classification_metrics
from train.operating import operating_point, operating_rule
from train.predict import predict_views, select_studies
from train.provenance import later_step

__all__ = ["get_args_parser", "main", "refit"]


def refit(
    bundle_path: Path,
    data: Path,
    *,
    labels: Path | None = None,
    subset: str = "val",
    report_subset: str = "test",
    write: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Fit the stacker on ``subset`` of ``data``; compare single views, their mean and the
    stacker on ``report_subset`` (side by side); store it in the card when ``write``."""
    bundle = load_bundle(bundle_path)
    views = list(bundle.card.views)
    if len(views) != 2:
        raise ValueError(f"the {bundle.card.task} bundle has one view ({views}); nothing to fuse")
    names = [c.name for c in bundle.classes]
    full = read_dataset(data, labels, classes=names)
    samples, probabilities = predict_views(bundle, select_studies(full, bundle_path, subset))
    _, per_view, truth = by_study(samples, np.arange(len(samples)), probabilities, views)
    stacker, scores = fit_stacker(per_view, truth, views, len(names))
    fitted_views, fitted_truth = per_view, truth
    result: dict[str, Any] = {"fitted_on": {"subset": subset, "studies": len(truth)}, **scores}
    try:
        shown = select_studies(full, bundle_path, report_subset)
    except ValueError:
        shown = None
    if shown is not None:
        samples, probabilities = predict_views(bundle, shown)
        _, per_view, truth = by_study(samples, np.arange(len(samples)), probabilities, views)
        table = {}
        threshold = bundle.card.decision_threshold
        for view in views:
            p = np.array([v[view] for v in per_view])
            table[view] = classification_metrics(p, truth, names, threshold)
        table["mean"] = classification_metrics(
            fused_probabilities(per_view, None), truth, names, threshold
        )
        if stacker:
            table["stacker"] = classification_metrics(
                fused_probabilities(per_view, stacker), truth, names, threshold
            )
        result["compared_on"] = {"subset": report_subset, "studies": len(truth)}
        result["side_by_side"] = {
            name: {k: m[k] for k in ("accuracy", "auc", "auc_macro", "ece") if k in m}
            for name, m in table.items()
        }
    changes: dict[str, Any] = {"stacker": stacker}
    if bundle.card.decision_threshold is not None:
        # The operating point was chosen on the old fused scores: choose it again on the new
        # ones, with the rule that trained the bundle.
        sensitivity, specificity = operating_rule(bundle.card.training)
        fused = fused_probabilities(fitted_views, stacker)[:, 1]
        changes["decision_threshold"] = operating_point(
            fused, fitted_truth, sensitivity, specificity
        )
        result["decision_threshold"] = {
            "before": bundle.card.decision_threshold,
            "after": round(changes["decision_threshold"], 4),
        }
    changes["training"] = later_step(bundle.card.training, command or "python -m train ensemble")
    if write:
        update_card(bundle_path, changes)
    return result


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train ensemble",
        add_help=add_help,
        description="Fit the AP + lateral stacker of a bundle; single views vs fused.",
    )
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--labels", type=Path, default=None)
    parser.add_argument("--subset", choices=["val", "all"], default="val")
    parser.add_argument("--report-subset", choices=["test", "all"], default="test")
    parser.add_argument("--dry-run", action="store_true", help="report, do not change the card")
    return parser


def main(args: argparse.Namespace) -> int:
    return run_command(
        "ensemble",
        lambda: refit(
            args.bundle,
            args.data,
            labels=args.labels,
            subset=args.subset,
            report_subset=args.report_subset,
            write=not args.dry_run,
            command=getattr(args, "command_line", ""),
        ),
    )
