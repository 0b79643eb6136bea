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
  Columns, Bits Allocated, Bits Stored, Samples per Pixel, Pixel Representation (0 or 1:
  pydicom decodes nothing else) and Photometric Interpretation present and consistent; for
  native (uncompressed) pixel data, a length that holds every frame; for JPEG 2000, JPEG-LS
  and JPEG, a codestream that declares the same size as Rows and Columns (a decoder allocates
  what its codestream says: a bomb declares 60000 × 60000 under a small header); and the image
  within the configured size (``node.max_image_pixels``), so that no large allocation is ever
  made for a 65535 × 65535 header.

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
from pydicom.uid import UID, RLELossless

__all__ = ["Refusal", "check_deflate", "check_image", "codestream_size"]

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


# Every JPEG start-of-frame (huffman and arithmetic; not DHT C4, JPG C8, DAC CC) and JPEG-LS's.
_START_OF_FRAME = frozenset([*range(0xC0, 0xD0)]) - {0xC4, 0xC8, 0xCC} | {0xF7}


def _first_fragment(pixel_data: bytes) -> bytes:
    """The start of the first frame's first fragment of encapsulated Pixel Data (after the
    Basic Offset Table item), at most 64 KiB; empty when the items cannot be read."""
    offset = 0
    for _ in range(2):  # the Basic Offset Table item, then the first fragment
        if len(pixel_data) < offset + 8 or pixel_data[offset : offset + 4] != b"\xfe\xff\x00\xe0":
            return b""
        length = int.from_bytes(pixel_data[offset + 4 : offset + 8], "little")
        start = offset + 8
        if _ == 1:
            return pixel_data[start : start + min(length, 65536)]
        offset = start + length
    return b""


def codestream_size(pixel_data: bytes) -> tuple[int, int] | None:
    """(rows, columns) that a JPEG 2000 (SIZ), JPEG-LS (SOF55) or JPEG (SOFn) codestream in
    encapsulated Pixel Data declares; None when none is found."""
    data = _first_fragment(pixel_data)
    box = data.find(b"jp2c")  # a JP2 file (not conformant in DICOM): its codestream box
    if data[:2] != b"\xff\x4f" and box >= 0:
        data = data[box + 4 :]
    siz = data.find(b"\xff\x51")
    if data[:2] == b"\xff\x4f" and siz >= 0 and len(data) >= siz + 22:
        width = int.from_bytes(data[siz + 6 : siz + 10], "big")
        height = int.from_bytes(data[siz + 10 : siz + 14], "big")
        x_offset = int.from_bytes(data[siz + 14 : siz + 18], "big")
        y_offset = int.from_bytes(data[siz + 18 : siz + 22], "big")
        return height - y_offset, width - x_offset
    if data[:2] == b"\xff\xd8":  # JPEG and JPEG-LS: the first start-of-frame marker
        i = 2
        while i + 9 <= len(data):
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker == 0xFF:  # a fill byte
                i += 1
                continue
            length = int.from_bytes(data[i + 2 : i + 4], "big")
            if marker in _START_OF_FRAME:
                rows = int.from_bytes(data[i + 5 : i + 7], "big")
                columns = int.from_bytes(data[i + 7 : i + 9], "big")
                return rows, columns
            i += 2 + length
    return None


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def check_image(ds: Dataset, *, syntax: UID, max_pixels: int) -> Refusal | None:
    """Refuse an image whose Image Pixel module the node cannot read, or one over its size.

    ``syntax`` is the transfer syntax the data set came in: native pixel data must hold every
    frame; a JPEG, JPEG-LS or JPEG 2000 codestream (any compressed syntax but RLE) must
    declare the size that Rows and Columns say."""
    compressed = syntax.is_compressed
    codestream = compressed and syntax != RLELossless
    if ds.get("PixelData") is None:  # absent, or empty: pydicom reads no value as None
        return Refusal(DOES_NOT_MATCH_SOP_CLASS, "no Pixel Data")
    values = {
        k: _int(ds, k)
        for k in (
            "Rows",
            "Columns",
            "BitsAllocated",
            "BitsStored",
            "SamplesPerPixel",
            "PixelRepresentation",
        )
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
    if values["PixelRepresentation"] not in (0, 1):
        return Refusal(
            DOES_NOT_MATCH_SOP_CLASS, f"Pixel Representation {values['PixelRepresentation']}"
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
    if codestream:
        declared = codestream_size(bytes(ds.PixelData[: 1 << 20]))
        if declared is None:
            return Refusal(
                DOES_NOT_MATCH_SOP_CLASS,
                "the compressed image's size cannot be read from its codestream",
            )
        if declared != (rows, columns):
            return Refusal(
                DOES_NOT_MATCH_SOP_CLASS,
                f"the compressed image is {declared[0]} x {declared[1]}, "
                f"Rows and Columns say {rows} x {columns}",
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
