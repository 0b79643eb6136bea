"""``python -m train <command>``: phantom generation and checks (training commands follow)."""

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
    from train import evaluate, fit
    from train.synth import check, figures, generate

    return {
        "synth": (generate.get_args_parser, generate.main, "write a phantom data set"),
        "synth-check": (
            check.get_args_parser,
            check.main,
            "measure a phantom set's difficulty (linear probe vs small CNN)",
        ),
        "fit": (
            fit.get_args_parser,
            fit.main,
            "train, calibrate, fuse AP + lateral, and export a weight bundle",
        ),
        "evaluate": (
            evaluate.get_args_parser,
            evaluate.main,
            "metrics of a bundle on a labelled set, through the node's inference",
        ),
        "synth-figures": (
            figures.get_args_parser,
            figures.main,
            "draw one example per class and view (docs/phantoms.md)",
        ),
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        lines = ["usage: python -m train <command> [options]", "", "commands:"]
        lines += [f"  {name:<12} {help_}" for name, (_, _, help_) in commands.items()]
        sys.stderr.write("\n".join(lines) + "\n")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    build, run, _ = commands[argv[0]]
    args = build(True).parse_args(argv[1:])
    args.command_line = "python -m train " + shlex.join(argv)  # recorded in bundle cards
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("openjpeg").setLevel(logging.WARNING)  # per-tile INFO lines otherwise
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
