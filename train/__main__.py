"""``python -m train <command>``: phantoms, training, evaluation, calibration, fusion, export."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Callable, Sequence

__all__ = ["main"]


def _commands() -> dict[
    str, tuple[Callable[[bool], argparse.ArgumentParser], Callable[[argparse.Namespace], int], str]
]:
    from train import (
        calibrate,
        compare,
        ensemble,
        evaluate,
        export,
        fit,
        image_check,
        lr_find,
        ood,
        robustness,
    )
    from train.synth import check, command, figures

    return {
        "synth": (command.get_args_parser, command.main, "write a phantom data set"),
        "synth-check": (
            check.get_args_parser,
            check.main,
            "measure a phantom set's difficulty (linear probe vs small CNN)",
        ),
        "synth-figures": (
            figures.get_args_parser,
            figures.main,
            "draw one example per class and view (docs/phantoms.md)",
        ),
        "fit": (
            fit.get_args_parser,
            fit.main,
            "train (with the region-of-interest stage), calibrate, fuse, report, write a bundle",
        ),
        "lr-find": (lr_find.get_args_parser, lr_find.main, "learning-rate range test with plot"),
        "evaluate": (
            evaluate.get_args_parser,
            evaluate.main,
            "metrics and report of a bundle on a labelled set, through the node's inference",
        ),
        "calibrate": (
            calibrate.get_args_parser,
            calibrate.main,
            "temperature scaling (and two-class operating point) of a bundle",
        ),
        "ensemble": (
            ensemble.get_args_parser,
            ensemble.main,
            "fit a bundle's AP + lateral stacker; single views vs fused",
        ),
        "compare": (
            compare.get_args_parser,
            compare.main,
            "several backbones (with / without ROI) on one split, one table",
        ),
        "image-check": (
            image_check.get_args_parser,
            image_check.main,
            "train the image check (anatomy, view, implant present) on phantoms of all tasks",
        ),
        "ood": (
            ood.get_args_parser,
            ood.main,
            "fit a bundle's out-of-distribution score and threshold on in-distribution data",
        ),
        "robustness": (
            robustness.get_args_parser,
            robustness.main,
            "evaluate a bundle on a grid of acquisition shifts (fresh phantoms per cell)",
        ),
        "export": (
            export.get_args_parser,
            export.main,
            "copy a trained bundle to the node's weights folder, verified",
        ),
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        lines = ["usage: python -m train <command> [options]", "", "commands:"]
        lines += [f"  {name:<14} {help_}" for name, (_, _, help_) in commands.items()]
        sys.stderr.write("\n".join(lines) + "\n")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    build, run, _ = commands[argv[0]]
    if argv[0] == "compare":  # options compare does not know go to fit
        args, rest = build(True).parse_known_args(argv[1:])
        args.fit_arguments = rest
    else:
        args = build(True).parse_args(argv[1:])
    args.command_line = "python -m train " + shlex.join(argv)  # recorded in bundle cards
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("openjpeg").setLevel(logging.WARNING)  # per-tile INFO lines otherwise
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
