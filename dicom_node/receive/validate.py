"""What a C-STORE data set must be before the node acknowledges it (docs/reliability.md,
"Bad input").

The node acknowledges only what it can keep and read, so an image it could never analyse is
refused with a status the sender logs, instead of being stored and failing later. The checks
read attributes only, never the pixels: they run in the association's thread before the file
is written.

* :func:`check_deflate` — a Deflated Explicit VR Little Endian data set is inflated in bounded
  steps first: one that would expand past ``max_bytes`` (a decompression bomb) is refused
  before pydicom inflates it whole.
* :func:`check_image` — the Image Pixel module (PS3.3 C.7.6.3): Pixel Data present; Rows,
  Columns, Bits Allocated, Bits Stored, Samples per Pixel and Photometric Interpretation
  present and consistent; for native (uncompressed) pixel data, a length that holds every
  frame; and the image within the configured size (``node.max_image_pixels``), so that no
  large allocation is ever made for a 65535 × 65535 header.

Each problem is a :class:`Refusal`: the DIMSE status (0xA900 "data set does not match SOP
class" for an image that breaks its IOD, 0xA700 "out of resources" for one over the node's
limits) and a reason for the log and the audit trail (no element values that could carry
patient data: numbers and keywords only).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import BinaryIO

from pydicom.dataset import Dataset

__all__ = ["Refusal", "check_deflate", "check_image"]

DOES_NOT_MATCH_SOP_CLASS = 0xA900
OUT_OF_RESOURCES = 0xA700

_PHOTOMETRIC = {
    "MONOCHROME1": 1,
    "MONOCHROME2": 1,
    "PALETTE COLOR": 1,
    "RGB": 3,
    "YBR_FULL": 3,
    "YBR_FULL_422": 3,
    "YBR_PARTIAL_420": 3,
    "YBR_ICT": 3,
    "YBR_RCT": 3,
}


@dataclass(frozen=True)
class Refusal:
    status: int
    reason: str


def check_deflate(stream: BinaryIO, max_bytes: int) -> Refusal | None:
    """Refuse a deflated data set that inflates to more than ``max_bytes``."""
    position = stream.tell()
    stream.seek(0)  # pynetdicom leaves the received bytes' stream at its end
    try:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        while chunk := stream.read(1 << 16):
            data = inflater.decompress(chunk, 1 << 20)
            total += len(data)
            while inflater.unconsumed_tail and total <= max_bytes:
                data = inflater.decompress(inflater.unconsumed_tail, 1 << 20)
                total += len(data)
            if total > max_bytes:
                return Refusal(
                    OUT_OF_RESOURCES,
                    f"deflated data set inflates past {max_bytes >> 20} MiB (node.max_dataset_mb)",
                )
        return None
    except zlib.error:
        return Refusal(DOES_NOT_MATCH_SOP_CLASS, "deflated data set is not valid deflate")
    finally:
        stream.seek(position)


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def check_image(ds: Dataset, *, compressed: bool, max_pixels: int) -> Refusal | None:
    """Refuse an image whose Image Pixel module the node cannot read, or one over its size."""
    if "PixelData" not in ds:
        return Refusal(DOES_NOT_MATCH_SOP_CLASS, "no Pixel Data")
    values = {
        k: _int(ds, k)
        for k in ("Rows", "Columns", "BitsAllocated", "BitsStored", "SamplesPerPixel")
    }
    missing = [k for k, v in values.items() if v is None]
    if missing:
        return Refusal(DOES_NOT_MATCH_SOP_CLASS, f"missing or invalid {', '.join(missing)}")
    rows, columns = values["Rows"], values["Columns"]
    allocated, stored = values["BitsAllocated"], values["BitsStored"]
    samples = values["SamplesPerPixel"]
    assert rows is not None and columns is not None and allocated is not None
    assert stored is not None and samples is not None
    frames = _int(ds, "NumberOfFrames") or 1
    if rows < 1 or columns < 1 or frames < 1:
        return Refusal(DOES_NOT_MATCH_SOP_CLASS, f"image of {rows} x {columns} x {frames}")
    if allocated not in (1, 8, 16, 32):
        return Refusal(DOES_NOT_MATCH_SOP_CLASS, f"Bits Allocated {allocated}")
    if not 1 <= stored <= allocated:
        return Refusal(
            DOES_NOT_MATCH_SOP_CLASS, f"Bits Stored {stored} with Bits Allocated {allocated}"
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    expected = _PHOTOMETRIC.get(photometric)
    if expected is None:
        return Refusal(DOES_NOT_MATCH_SOP_CLASS, "missing or unknown Photometric Interpretation")
    if samples != expected:
        return Refusal(DOES_NOT_MATCH_SOP_CLASS, f"{samples} samples per pixel for {photometric}")
    pixels = rows * columns * frames
    if pixels > max_pixels:
        return Refusal(
            OUT_OF_RESOURCES,
            f"{rows} x {columns} x {frames} frame(s) is over the node's "
            f"{max_pixels:,} pixels (node.max_image_pixels)",
        )
    if not compressed:
        needed = (pixels * samples * allocated + 7) // 8
        length = len(ds.PixelData)
        if length < needed:
            return Refusal(
                DOES_NOT_MATCH_SOP_CLASS,
                f"Pixel Data holds {length} bytes, {rows} x {columns} x {frames} x {samples} "
                f"x {allocated} bits need {needed}",
            )
    return None
