"""Phantom files pass dicom3tools' dciodvfy (no line starting with "Error")."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest

from tests.conftest import make_set, require_tool

pytestmark = pytest.mark.integration


def _errors(dciodvfy: str, path: Path) -> list[str]:
    result = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def _paths(folder: Path) -> list[Path]:
    with (folder / "manifest.csv").open() as handle:
        return [folder / row["path"] for row in csv.DictReader(handle)]


@pytest.mark.parametrize("task", ["knee", "hip", "spine"])
def test_default_sets_validate(phantom_sets: dict[str, Path], task: str) -> None:
    dciodvfy = require_tool("dciodvfy")
    paths = _paths(phantom_sets[task])
    assert paths
    for path in paths:
        assert _errors(dciodvfy, path) == [], path


def test_shifted_acquisition_validates(tmp_path: Path) -> None:
    """CR, MONOCHROME1, JPEG 2000 lossless and 12-bit: the "external" acquisition."""
    dciodvfy = require_tool("dciodvfy")
    folder = make_set(
        tmp_path,
        "ext",
        task="knee",
        patients=2,
        seed=8,
        modality="CR",
        photometric="MONOCHROME1",
        transfer_syntax="jpeg2000",
        bits_stored=12,
        noise=1.6,
        contrast=0.8,
        spacing_scale=1.15,
    )
    for path in _paths(folder):
        assert _errors(dciodvfy, path) == [], path


def test_dx_monochrome1_validates(tmp_path: Path) -> None:
    dciodvfy = require_tool("dciodvfy")
    folder = make_set(
        tmp_path,
        "m1",
        task="hip",
        patients=2,
        seed=8,
        photometric="MONOCHROME1",
        views=("AP", "LAT"),
    )
    for path in _paths(folder):
        assert _errors(dciodvfy, path) == [], path


def test_dciodvfy_catches_a_broken_file(phantom_sets: dict[str, Path], tmp_path: Path) -> None:
    """The check itself can fail: remove a Type 1 attribute and dciodvfy must report it."""
    import pydicom

    dciodvfy = require_tool("dciodvfy")
    ds = pydicom.dcmread(_paths(phantom_sets["knee"])[0])
    del ds.ImagerPixelSpacing
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken)
    assert _errors(dciodvfy, broken)
