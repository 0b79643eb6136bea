"""The record of how a bundle was made: the card's ``training`` block.

``fit`` writes it (:func:`training_record`: data fingerprint, git commit, the exact command, its
arguments, time, processes, device); every later step that changes the card (``calibrate``,
``ensemble``) appends itself with :func:`later_step`, so the card still says how every field
came to be.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["command_line", "git_commit", "later_step", "training_record"]


def git_commit() -> str:
    """HEAD of the checkout the code runs from, with "-dirty" when tracked files differ from it;
    empty outside a git checkout."""

    def git(*arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", *arguments],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        )

    try:
        head = git("rev-parse", "HEAD").stdout.strip()
        if head and git("diff", "--quiet", "HEAD", "--").returncode == 1:
            head += "-dirty"
        return head
    except (OSError, subprocess.SubprocessError):
        return ""


def command_line() -> str:
    """This process's ``python -m train`` command line (``sys.argv``), shell-quoted."""
    return "python -m train " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def training_record(
    args: argparse.Namespace,
    *,
    data_fingerprint: str,
    commit: str,
    started: float,
    processes: int,
    device: str,
) -> dict[str, Any]:
    """The card's ``training`` block for ``fit``: ``commit`` is :func:`git_commit` when training
    began, ``started`` its :func:`time.perf_counter`; the command is ``args.command_line`` (set
    by ``python -m train``) or :func:`command_line`."""
    return {
        "data_fingerprint": data_fingerprint,
        "git_commit": commit,
        "command": getattr(args, "command_line", "") or command_line(),
        "args": {k: str(v) for k, v in vars(args).items() if k != "command_line"},
        "seconds": round(time.perf_counter() - started, 1),
        "processes": processes,
        "device": device,
    }


def later_step(
    training: dict[str, Any], command: str, rule: dict[str, float] | None = None
) -> dict[str, Any]:
    """The card's ``training`` block with one more step after ``fit`` (``calibrate``,
    ``ensemble``) appended to ``later_steps``: its command, the git commit and the date, so the
    card still says how every field came to be. ``rule`` (``{"min_specificity": s}`` or
    ``{"min_sensitivity": s}``, from :func:`train.operating.stored_rule`) becomes the
    operating-point rule later steps reuse (:func:`train.operating.operating_rule`)."""
    step = {
        "command": command,
        "git_commit": git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    updated = {**training, "later_steps": [*training.get("later_steps", []), step]}
    if rule is not None:
        updated["operating_rule"] = rule
    return updated
