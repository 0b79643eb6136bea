"""``python -m train synth-figures DIR --out FILE.png``: one example per class and view.

Draws, for each class of a phantom set, the first patient's views as displayed (VOI applied,
MONOCHROME1 inverted) with the mask outlined in a second copy, captioned, in one PNG. Used for
docs/phantoms.md.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageDraw
from scipy import ndimage

from dicom_node.preprocess import display_image, resize_pad

__all__ = ["get_args_parser", "main", "make_figure"]

_TILE = 256
_CAPTION = 18


def _tile(folder: Path, row: dict[str, str], outline: bool) -> np.ndarray:
    image = display_image(pydicom.dcmread(folder / row["path"]))
    grey = resize_pad(image, _TILE)
    rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2)
    if outline:
        mask = np.array(Image.open(folder / row["mask_path"]).convert("F"))
        small = resize_pad(mask, _TILE) > 0.5
        edge = small & ~ndimage.binary_erosion(small)
        rgb[edge] = (255, 64, 32)
    return rgb


def make_figure(folder: Path, out: Path) -> Path:
    """Write the example grid for the phantom set in ``folder`` to ``out``."""
    with (folder / "manifest.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("implant", "present") == "present"]
    if not rows:
        raise ValueError(f"{folder}/manifest.csv lists no images with the implant present")
    views = sorted({r["view"] for r in rows}, key=lambda v: (v != "AP", v))
    labels = sorted(
        {r["label"] for r in rows},
        key=lambda lab: int(next(r["label_index"] for r in rows if r["label"] == lab)),
    )
    columns = [(view, outline) for view in views for outline in (False, True)]
    canvas = Image.new("RGB", (_TILE * len(columns), (_TILE + _CAPTION) * len(labels)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, label in enumerate(labels):
        patient = next(r["patient_id"] for r in rows if r["label"] == label)
        top = i * (_TILE + _CAPTION)
        for j, (view, outline) in enumerate(columns):
            row = next(r for r in rows if r["patient_id"] == patient and r["view"] == view)
            canvas.paste(Image.fromarray(_tile(folder, row, outline)), (j * _TILE, top + _CAPTION))
            caption = f"{label} - {view}" + (" - mask" if outline else "")
            draw.text((j * _TILE + 4, top + 3), caption, fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, optimize=True)
    return out


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train synth-figures",
        add_help=add_help,
        description="Example images of every class and view.",
    )
    parser.add_argument("directory", type=Path, help="a directory written by train synth")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    return parser


def main(args: argparse.Namespace) -> int:
    try:
        make_figure(args.directory, args.out)
    except (OSError, ValueError, StopIteration) as error:
        sys.stderr.write(f"synth-figures: {error!r}\n")
        return 2
    return 0
