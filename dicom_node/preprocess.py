"""Image preprocessing shared by the node and by ``train/``: one function, so they cannot drift.

From a DICOM data set to a float image in [0, 1] displayed as a radiologist sees it (modality
LUT, VOI LUT or window, MONOCHROME1 inverted), then an aspect-preserving resize and pad to the
model's square input. With a region of interest (bundles with a localiser), the classifier's input
is that square cut from the displayed image (:func:`crop_square`) and the heatmap goes back into
it (:func:`heatmap_to_source`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from dicom_node.domain import RegionOfInterest

__all__ = ["crop_square", "display_image", "heatmap_to_source", "resize_pad", "to_model_input"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


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


def to_model_input(
    display: np.ndarray, size: int, channels: int = 3, normalisation: str = "imagenet"
) -> torch.Tensor:
    """A (channels, size, size) float tensor for the network, from a displayed image.

    ``normalisation`` is "imagenet" (channel mean/std of ImageNet, for backbones trained from
    ImageNet weights), "unit" (the [0, 1] image centred at 0.5 and scaled by 4) or
    "standardise" (zero mean, unit variance per image).
    """
    square = torch.from_numpy(resize_pad(display, size))
    tensor = square[None].expand(channels, size, size).clone()
    if normalisation == "imagenet":
        mean = torch.tensor(_IMAGENET_MEAN[:channels] if channels == 3 else (0.449,) * channels)
        std = torch.tensor(_IMAGENET_STD[:channels] if channels == 3 else (0.226,) * channels)
        tensor = (tensor - mean[:, None, None]) / std[:, None, None]
    elif normalisation == "unit":
        tensor = (tensor - 0.5) * 4.0
    elif normalisation == "standardise":
        tensor = (tensor - tensor.mean()) / tensor.std().clamp_min(1e-3)
    else:
        raise ValueError(
            f"unknown normalisation {normalisation!r}: use imagenet, unit or standardise"
        )
    return tensor


def crop_square(display: np.ndarray, region: RegionOfInterest) -> np.ndarray:
    """The ``region`` of a displayed image as a (side, side) array; zeros past the image's edges."""
    rows, cols = display.shape
    out = np.zeros((region.side, region.side), dtype=np.float32)
    top, left = max(region.top, 0), max(region.left, 0)
    bottom = min(region.top + region.side, rows)
    right = min(region.left + region.side, cols)
    if bottom > top and right > left:
        out[top - region.top : bottom - region.top, left - region.left : right - region.left] = (
            display[top:bottom, left:right]
        )
    return out


def heatmap_to_source(
    heatmap: np.ndarray, rows: int, cols: int, region: RegionOfInterest | None = None
) -> np.ndarray:
    """Undo :func:`resize_pad` (and :func:`crop_square`): a (size, size) map on the source grid.

    Without a region, the padding is cropped and the map resized to Rows × Columns. With one,
    the map is resized to the region's side and pasted at its place; outside it the map is 0.
    """
    size = heatmap.shape[0]
    if region is None:
        scale = size / max(rows, cols)
        inner_rows, inner_cols = max(1, round(rows * scale)), max(1, round(cols * scale))
        top, left = (size - inner_rows) // 2, (size - inner_cols) // 2
        cropped = np.ascontiguousarray(heatmap[top : top + inner_rows, left : left + inner_cols])
        return _resize(cropped, rows, cols)
    square = _resize(heatmap, region.side, region.side)
    out = np.zeros((rows, cols), dtype=np.float32)
    top, left = max(region.top, 0), max(region.left, 0)
    bottom = min(region.top + region.side, rows)
    right = min(region.left + region.side, cols)
    if bottom > top and right > left:
        out[top:bottom, left:right] = square[
            top - region.top : bottom - region.top, left - region.left : right - region.left
        ]
    return out


def _resize(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    resized = F.interpolate(tensor, size=(rows, cols), mode="bilinear", align_corners=False)
    return resized[0, 0].numpy()
