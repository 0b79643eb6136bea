"""Image preprocessing shared by the node and by ``train/``: one function, so they cannot drift.

From a DICOM data set to a float image in [0, 1] displayed as a radiologist sees it (modality
LUT, VOI LUT or window, MONOCHROME1 inverted), then an aspect-preserving resize and pad to the
model's square input.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

__all__ = ["display_image", "resize_pad"]


def display_image(ds: Dataset, pixels: np.ndarray | None = None) -> np.ndarray:
    """The image as displayed: float32 in [0, 1], bright = dense, whatever the photometric.

    Applies the modality LUT (rescale), then the VOI LUT or the first window; falls back to the
    0.5–99.5 percentile range when the data set carries neither. MONOCHROME1 is inverted.
    """
    array = ds.pixel_array if pixels is None else pixels
    if array.ndim != 2:
        raise ValueError(f"expected a single-frame greyscale image, got shape {array.shape}")
    values = apply_modality_lut(array, ds).astype(np.float32)
    has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
    if has_voi:
        values = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float32)
        low, high = float(values.min()), float(values.max())
    else:
        low, high = (float(v) for v in np.percentile(values[::4, ::4], [0.5, 99.5]))
    span = max(high - low, 1e-6)
    image = np.clip((values - low) / span, 0.0, 1.0)
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        image = 1.0 - image
    return image.astype(np.float32)


def resize_pad(image: np.ndarray, size: int) -> np.ndarray:
    """Resize so the longer side is ``size`` (area-averaged when shrinking); centre-pad square."""
    rows, cols = image.shape
    scale = size / max(rows, cols)
    new_rows, new_cols = max(1, round(rows * scale)), max(1, round(cols * scale))
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    mode = "area" if scale < 1 else "bilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    resized = F.interpolate(tensor, size=(new_rows, new_cols), mode=mode, **kwargs)[0, 0]
    out = torch.zeros((size, size), dtype=torch.float32)
    top, left = (size - new_rows) // 2, (size - new_cols) // 2
    out[top : top + new_rows, left : left + new_cols] = resized
    return out.numpy()
