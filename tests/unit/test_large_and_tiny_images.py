"""1 x 1 and 10 000 x 10 000 radiographs: read, displayed and made into a classifier input
within the node's memory bound (docs/reliability.md, "Bad input").

The bound: an image of ``node.max_image_pixels`` or fewer pixels (120 M by default; larger ones
are refused at C-STORE) costs at most 8 bytes per pixel on top of its decoded pixels while it is
displayed and preprocessed (measured with tracemalloc, which sees numpy's allocations).
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.preprocess import build_preprocessing, display_image

BYTES_PER_PIXEL = 8


def radiograph(side: int, window: bool) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ramp = (np.arange(side * side, dtype=np.uint32) % 4096).astype(np.uint16)
    ds.PixelData = ramp.tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    if window:
        ds.WindowCenter, ds.WindowWidth = 1000, 3000
    return ds


@pytest.mark.slow
@pytest.mark.parametrize("window", [True, False], ids=["window", "percentiles"])
def test_a_10000_square_image_stays_within_the_memory_bound(window: bool) -> None:
    ds = radiograph(10_000, window)
    pixels = ds.pixel_array  # decoded once: what the bound is measured on top of
    tracemalloc.start()
    try:
        display = display_image(ds, pixels)
        tensor, _ = build_preprocessing(256, 1, "standardise")(display)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tensor.shape == (1, 256, 256) and bool(np.isfinite(tensor.numpy()).all())
    assert peak <= BYTES_PER_PIXEL * pixels.size, f"{peak / pixels.size:.1f} bytes per pixel"


def test_a_1_by_1_image_is_read() -> None:
    display = display_image(radiograph(1, window=True))
    assert display.shape == (1, 1) and 0.0 <= float(display[0, 0]) <= 1.0
    tensor, _ = build_preprocessing(64, 1, "standardise")(display)
    assert tensor.shape == (1, 64, 64) and bool(np.isfinite(tensor.numpy()).all())
