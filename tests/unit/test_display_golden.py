"""The displayed image (dicom_node.preprocess.display_image) of radiographs the way modalities
write them, asserted on golden arrays computed by hand: MONOCHROME1, signed 16-bit, 10/12/14
bits stored with junk in the unused bits, rescale, RGB; multi-frame is refused with a reason
(the pipeline records the study as failed, docs/reliability.md)."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian

from dicom_node.preprocess import display_image

ROWS, COLS = 16, 32


def radiograph(
    values: np.ndarray,
    *,
    bits_stored: int = 16,
    signed: bool = False,
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    junk_bits: bool = False,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.Rows, ds.Columns = values.shape[:2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    raw = values.astype(np.int32) & ((1 << bits_stored) - 1)  # two's complement in the bits
    if junk_bits and bits_stored < 16:
        raw |= 0xA000 & ~((1 << bits_stored) - 1) & 0xFFFF  # overlay bits set above HighBit
    ds.PixelData = raw.astype(np.uint16).tobytes()
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    return ds


def ramp(low: int, high: int) -> np.ndarray:
    return np.linspace(low, high, ROWS * COLS).round().astype(np.int32).reshape(ROWS, COLS)


def expected(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.float64)
    return (v - v.min()) / (v.max() - v.min())


@pytest.mark.parametrize("bits", [10, 12, 14, 16])
def test_bits_stored_with_junk_above_the_high_bit(bits: int) -> None:
    values = ramp(0, (1 << bits) - 1)
    top = (1 << bits) - 1
    ds = radiograph(values, bits_stored=bits, window=(top / 2 + 0.5, top + 1), junk_bits=True)
    np.testing.assert_allclose(display_image(ds), expected(values), atol=2e-3)


def test_monochrome1_is_inverted() -> None:
    values = ramp(0, 4095)
    ds = radiograph(values, bits_stored=12, photometric="MONOCHROME1", window=(2048, 4096))
    np.testing.assert_allclose(display_image(ds), 1 - expected(values), atol=2e-3)


def test_signed_16_bit() -> None:
    values = ramp(-2000, 2000)
    ds = radiograph(values, signed=True, window=(0.5, 4001))
    out = display_image(ds)
    np.testing.assert_allclose(out, expected(values), atol=2e-3)
    assert out[0, 0] == 0.0 and out[-1, -1] == 1.0  # the negative end is the dark end


def test_rescale_then_window() -> None:
    values = ramp(0, 1000)  # stored; displayed through slope 2, intercept -1000
    ds = radiograph(values, bits_stored=12, rescale=(2, -1000), window=(0.5, 2001))
    np.testing.assert_allclose(display_image(ds), expected(values), atol=2e-3)


def test_without_a_window_the_percentiles_stretch() -> None:
    values = ramp(100, 900)
    out = display_image(radiograph(values, bits_stored=12))
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.all(np.diff(out.ravel()) >= 0)  # monotonic: nothing inverted or folded


def test_rgb_radiograph_is_read_by_its_luminance() -> None:
    grey = ramp(0, 255).astype(np.uint8)
    ds = radiograph(grey.astype(np.int32), bits_stored=8, window=(128, 256))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = np.stack([grey, grey, grey], axis=-1).tobytes()
    np.testing.assert_allclose(display_image(ds), expected(grey), atol=3e-3)


def test_multi_frame_is_refused_with_a_reason() -> None:
    frames = np.stack([ramp(0, 4095)] * 3)
    ds = radiograph(frames.reshape(3 * ROWS, COLS), bits_stored=12)
    ds.Rows, ds.NumberOfFrames = ROWS, 3
    with pytest.raises(ValueError, match="multi-frame images \\(3 frames\\)"):
        display_image(ds)
