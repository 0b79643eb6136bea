"""Region of interest: where the implant is, so the classifier sees it at the source's resolution.

The screw study crops every screw with a detector before classifying it; this is our version
for all three tasks: a small fully convolutional network (:class:`Localiser`) reads the whole
radiograph at a low resolution and predicts, per cell of an eighth of its input, the
probability that implant metal (or, for hip, the bone–implant zones) lies there. The cells above
the bundle's threshold (their largest connected groups) give a box; the box grows by a margin,
becomes a square, and the classifier reads that square cut from the displayed image at full
resolution (:func:`dicom_node.preprocess.crop_square`). Cropping also takes out the detector
pitch, magnification and field of view, which differ between sites.

Training (``python -m train fit --roi``) and the node use the same :func:`locate`; the boxes are
plain :class:`~dicom_node.domain.RegionOfInterest` values, so explain and encode map heatmaps
back to the source without knowing about the network.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from dicom_node.domain import RegionOfInterest

__all__ = ["STRIDE", "Localiser", "boxes_from_probabilities", "locate"]

#: Output cells per input pixel: a 256 px input gives a 32 × 32 probability map.
STRIDE = 8


def _block(cin: int, cout: int, dilation: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class Localiser(nn.Module):
    """(N, 1, S, S) standardised whole images → (N, 1, S/8, S/8) implant logits.

    About 40 k weights and 60 M multiply-adds at 256 px, so it adds little to a CPU node's
    time per study. Dilated convolutions at the end give each cell a receptive field of about
    a third of the image, enough to tell an implant from a bright marker or a bone edge.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5, stride=2, padding=2, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            *_block(16, 32),
            nn.MaxPool2d(2),
            *_block(32, 48, dilation=2),
            *_block(48, 48, dilation=4),
        )
        self.head = nn.Conv2d(48, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _square_box(
    top: float, left: float, bottom: float, right: float, margin: float, minimum: float
) -> tuple[float, float, float]:
    """(top, left, side) of the square centred on a box, grown by ``margin`` of its side."""
    side = max(bottom - top, right - left, minimum) * (1.0 + 2.0 * margin)
    centre_row, centre_col = (top + bottom) / 2.0, (left + right) / 2.0
    return centre_row - side / 2.0, centre_col - side / 2.0, side


def boxes_from_probabilities(
    probabilities: np.ndarray,
    shapes: Sequence[tuple[int, int]],
    threshold: float,
    margin: float,
    keep: float = 0.2,
) -> list[RegionOfInterest]:
    """Square regions of interest in source pixels from (N, h, w) probability maps.

    Parameters
    ----------
    probabilities
        The localiser's sigmoid output for N images resized and padded to a square input
        (:func:`dicom_node.preprocess.resize_pad`), one map per image.
    shapes
        (Rows, Columns) of each source image, to undo the resize and padding.
    threshold
        Cells at or above it are implant.
    margin
        The box grows by this share of its side on every side (context around the implant).
    keep
        Connected groups of cells whose summed probability is below ``keep`` times the largest
        group's are ignored (a stray marker does not stretch the box).

    Returns
    -------
    list of RegionOfInterest
        One per image. ``found`` is False when no cell reached the threshold; the region is then
        the whole image (a square around it), so the classifier still gets an input.
    """
    regions = []
    for probability, (rows, cols) in zip(probabilities, shapes, strict=True):
        cells = probability.shape[0]
        input_side = cells * STRIDE
        scale = input_side / max(rows, cols)
        pad_top = (input_side - round(rows * scale)) // 2
        pad_left = (input_side - round(cols * scale)) // 2
        above = probability >= threshold
        labelled, count = ndimage.label(above)
        if count == 0:
            top, left, side = _square_box(0, 0, rows, cols, 0.0, 0.0)
            regions.append(RegionOfInterest(round(top), round(left), round(side), found=False))
            continue
        mass = ndimage.sum(probability, labelled, index=range(1, count + 1))
        chosen = np.isin(labelled, 1 + np.flatnonzero(mass >= keep * mass.max()))
        occupied_rows = np.flatnonzero(chosen.any(axis=1))
        occupied_cols = np.flatnonzero(chosen.any(axis=0))
        # Cell edges in input pixels → source pixels (undo the centre padding, then the scale).
        top = (occupied_rows[0] * STRIDE - pad_top) / scale
        bottom = ((occupied_rows[-1] + 1) * STRIDE - pad_top) / scale
        left = (occupied_cols[0] * STRIDE - pad_left) / scale
        right = ((occupied_cols[-1] + 1) * STRIDE - pad_left) / scale
        top, left, side = _square_box(
            top, left, bottom, right, margin, minimum=0.1 * max(rows, cols)
        )
        regions.append(RegionOfInterest(round(top), round(left), max(8, round(side))))
    return regions


def locate(
    localiser: nn.Module,
    inputs: torch.Tensor,
    shapes: Sequence[tuple[int, int]],
    threshold: float,
    margin: float,
) -> list[RegionOfInterest]:
    """Regions of interest for a batch of (N, 1, S, S) standardised whole-image inputs."""
    localiser.eval()
    device = next(localiser.parameters()).device
    with torch.no_grad():
        logits = localiser(inputs.to(device)).float()
    probabilities = torch.sigmoid(logits)[:, 0].cpu().numpy()
    return boxes_from_probabilities(probabilities, shapes, threshold, margin)
