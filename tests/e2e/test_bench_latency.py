"""Smoke test of ``python -m bench latency``: a tiny run against a real Orthanc and the node."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from dicom_node.metrics import STAGES
from tests.conftest import require_tool

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _table(text: str, header_start: str) -> tuple[list[str], list[list[str]]]:
    """The header and body rows of the first table whose header begins with header_start."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(header_start):
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append(_cells(row))
            return _cells(line), rows
    raise AssertionError(f"no table starting {header_start!r} in:\n{text}")


def _seconds(cell: str) -> float:
    match = re.fullmatch(r"(\d+\.\d+) s", cell)
    assert match, cell
    return float(match[1])


def test_bench_latency_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for tool in ("Orthanc", "storescu", "echoscu"):
        require_tool(tool)
    from bench.latency import HEADING, append, main

    target = tmp_path / "BENCHMARKS.md"
    shutil.copy(ROOT / "BENCHMARKS.md", target)
    before = target.read_text()
    argv = ["--studies", "2", "--warmup", "0", "--inflight", "2", "--size", "256"]
    assert main([*argv, "--write", str(target)]) == 0
    printed = capsys.readouterr().out

    written = target.read_text()
    assert written.startswith(before)
    section = written[len(before) :]
    assert section.strip() in printed.strip() or printed.strip() in section
    assert written.count(HEADING) == 1

    header, rows = _table(section, "| date | machine | commit | command |")
    [row] = rows
    values = dict(zip(header, row, strict=True))
    assert values["studies"].startswith("2 × 2 views, 256²")
    assert _seconds(values["p95"]) > 0
    assert _seconds(values["p50"]) <= _seconds(values["p95"]) <= _seconds(values["max"])
    assert "p95 ≤ 0.5 s target" in values["verdict"]
    floor = _seconds(values["PACS floor"])
    assert floor > 0
    assert float(values["p50 / floor"]) == pytest.approx(_seconds(values["p50"]) / floor, abs=0.06)

    header, rows = _table(section, "| date | commit | in flight |")
    [row] = rows
    values = dict(zip(header, row, strict=True))
    assert values["in flight"] == "2"
    assert values["studies"] == "4"
    assert float(values["throughput"].split()[0]) > 0
    assert _seconds(values["p95"]) > 0

    header, rows = _table(section, "| date | commit | stage |")
    stages = [dict(zip(header, r, strict=True))["stage"] for r in rows]
    assert tuple(stages[: len(STAGES)]) == STAGES

    # A second run appends its tables, not a second heading.
    append(target, "| next run |\n")
    again = target.read_text()
    assert again.count(HEADING) == 1
    assert again.startswith(written)
    assert again.endswith("\n\n| next run |\n")
