"""``python -m train calibrate``: temperature scaling (and, for two classes, the operating point)
of an existing bundle on a labelled set — its validation split, or a site's own calibration set.

The bundle's views go through the node's Predictor; their logits (recovered from the calibrated
probabilities: T · log p, equal to the logits up to a constant per image) give the temperature
that minimises the negative log-likelihood. For two-class tasks the operating threshold is then
chosen again: at ``--min-sensitivity`` / ``--min-specificity`` when given, else by the rule that
set it before. Only card.json changes (the command is appended to ``training.later_steps``);
the weights, and so their sha256, stay as they are. ``python -m train fit`` runs the same steps
on its validation split.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicom_node.models.bundle import load_bundle, update_card
from train.cli import run_command
from train.data import read_dataset
from train.engine import fit_temperature
from train.fusion import by_study, fused_probabilities
from train.metrics import expected_calibration_error
from train.operating import DEFAULT_MIN_SENSITIVITY, operating_point, operating_rule, stored_rule
from train.predict import predict_views, select_studies
from train.provenance import later_step

__all__ = ["calibrate", "get_args_parser", "main"]


def calibrate(
    bundle_path: Path,
    data: Path,
    *,
    labels: Path | None = None,
    subset: str = "val",
    min_sensitivity: float | None = None,
    min_specificity: float | None = None,
    write: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Fit the temperature (and operating point) on ``data``; update the card when ``write``
    (``command`` is recorded in the card's ``training.later_steps``).

    Without ``min_sensitivity`` / ``min_specificity`` the rule that set the bundle's operating
    point is kept."""
    bundle = load_bundle(bundle_path)
    names = [c.name for c in bundle.card.classes]
    dataset = select_studies(read_dataset(data, labels, classes=names), bundle_path, subset)
    samples, probabilities = predict_views(bundle, dataset)
    truth = np.array([s.label_index for s in samples])
    old = bundle.card.temperature
    logits = torch.from_numpy(old * np.log(np.clip(probabilities, 1e-12, 1.0)))
    new = fit_temperature(logits, torch.from_numpy(truth))
    recalibrated = torch.softmax(logits / new, dim=1).numpy().astype(np.float64)
    result: dict[str, Any] = {
        "images": len(samples),
        "temperature": {"before": round(old, 4), "after": round(new, 4)},
        "ece_per_view": {
            "before": round(expected_calibration_error(probabilities, truth), 4),
            "after": round(expected_calibration_error(recalibrated, truth), 4),
        },
    }
    changes: dict[str, Any] = {"temperature": new}
    rule: dict[str, float] | None = None
    if len(bundle.card.classes) == 2:
        views = bundle.card.views
        if len(views) == 2:  # the study-level result, as fit chose it and the node decides
            index = np.arange(len(samples))
            _, per_view, study_truth = by_study(samples, index, recalibrated, views)
            stacker = bundle.card.stacker.model_dump() if bundle.card.stacker else None
            scores = fused_probabilities(per_view, stacker)[:, 1]
        else:
            scores, study_truth = recalibrated[:, 1], truth
        if min_sensitivity is None and min_specificity is None:
            sensitivity, min_specificity = operating_rule(bundle.card.training)
        else:
            sensitivity = (
                min_sensitivity if min_sensitivity is not None else DEFAULT_MIN_SENSITIVITY
            )
        threshold = operating_point(scores, study_truth, sensitivity, min_specificity)
        rule = stored_rule(sensitivity, min_specificity)
        changes["decision_threshold"] = threshold
        changes["threshold"] = 0.0
        result["decision_threshold"] = {
            "before": bundle.card.decision_threshold,
            "after": round(threshold, 4),
            **rule,
        }
    step = command or "python -m train calibrate"
    changes["training"] = later_step(bundle.card.training, step, rule)
    if write:
        update_card(bundle_path, changes)
    return result


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train calibrate",
        add_help=add_help,
        description="Temperature scaling (and the two-class operating point) of a bundle.",
    )
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--labels", type=Path, default=None)
    parser.add_argument(
        "--subset",
        choices=["val", "all"],
        default="val",
        help="val: the validation split that trained the bundle; all: every study of --data",
    )
    rule = parser.add_mutually_exclusive_group()  # one constraint; the other is what is best
    rule.add_argument(
        "--min-sensitivity",
        type=float,
        default=None,
        help="two classes: the best specificity at this sensitivity",
    )
    rule.add_argument(
        "--min-specificity",
        type=float,
        default=None,
        help="two classes: the best sensitivity at this specificity",
    )
    parser.add_argument("--dry-run", action="store_true", help="report, do not change the card")
    return parser


def main(args: argparse.Namespace) -> int:
    return run_command(
        "calibrate",
        lambda: calibrate(
            args.bundle,
            args.data,
            labels=args.labels,
            subset=args.subset,
            min_sensitivity=args.min_sensitivity,
            min_specificity=args.min_specificity,
            write=not args.dry_run,
            command=getattr(args, "command_line", ""),
        ),
    )
