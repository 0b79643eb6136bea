"""What machine a benchmark ran on, for the rows of BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

__all__ = ["add_rows", "commit", "cpu_name", "machine"]

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def add_rows(path: Path, heading: str, rows: str) -> None:
    """Add table rows at the end of the section that starts with ``heading`` (a line beginning
    ``## ``), before the next section; at the end of the file when there is no such section."""
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    start = next((i for i, line in enumerate(lines) if line.startswith(heading)), None)
    if start is None:
        with path.open("a") as handle:
            handle.write(rows)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1  # before the blank lines that close the section
    if lines[end - 1] and not lines[end - 1].endswith("\n"):
        lines[end - 1] += "\n"
    lines[end:end] = [rows]
    path.write_text("".join(lines))


def machine() -> str:
    """The CPU and the cores this process may use, e.g. "AMD EPYC, 2 cores"."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return f"{cpu_name()}, {cores} cores"


def commit() -> str:
    """The repository's short HEAD, "-dirty" when tracked files have changed."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "--no-optional-locks", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")
