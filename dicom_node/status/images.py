"""The node's Secondary Captures as PNG, for the status page: a thumbnail for a study's row,
the full-size image (as the PACS receives it) for the study page.

The SC's pixels are what it carries (8-bit RGB with its burned-in banner); an image of another
depth is stretched to 8 bits. Encodings are cached while the file is unchanged.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

__all__ = ["THUMBNAIL_PX", "capture_png"]

THUMBNAIL_PX = 320


@functools.lru_cache(maxsize=64)
def _png(path: Path, stamp: float, largest: int | None) -> bytes:
    ds = pydicom.dcmread(path)
    pixels = np.asarray(ds.pixel_array)
    if pixels.dtype != np.uint8:
        low, high = float(pixels.min()), float(pixels.max())
        pixels = ((pixels - low) / max(high - low, 1.0) * 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if largest is not None:
        image.thumbnail((largest, largest))
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=3)
    return out.getvalue()


def capture_png(path: Path, *, full: bool = False) -> bytes:
    """The SC at ``path`` as a PNG: at most :data:`THUMBNAIL_PX` on a side, or its own size
    with ``full``. Raises ``OSError`` or a pydicom error for a file that cannot be read."""
    return _png(path, path.stat().st_mtime, None if full else THUMBNAIL_PX)
