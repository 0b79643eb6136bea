"""``python -m train fit``: train, calibrate, fuse, choose the operating point, report, write a
bundle — the whole published protocol (:mod:`train.protocol`, its stages and options) in one
command.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from train.cli import print_json, run_command
from train.protocol import get_args_parser, run

__all__ = ["get_args_parser", "main"]


def _run(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`train.protocol.run`, then the process group (``torchrun``) closed."""
    try:
        return run(args)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _show(metrics: dict[str, Any]) -> None:
    if metrics:  # rank 0 only under torchrun
        print_json(metrics)


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    return run_command("fit", lambda: _run(args), _show)
