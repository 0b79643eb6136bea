"""The region-of-interest stage of training: fit the localiser on implant masks, crop the views.

The localiser (:class:`dicom_node.models.localiser.Localiser`) learns, from the phantom masks
(or any per-image implant mask a site has), which cells of a 256 px whole image hold the implant.
Its boxes then crop every view at the source's resolution, exactly as the node will: the node's
composition (:class:`dicom_node.preprocess.Preprocessing`), given the regions that
:func:`locate_all` found in batches with the node's :func:`dicom_node.models.localiser.locate`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from dicom_node.domain import RegionOfInterest
from dicom_node.models.localiser import Localiser, locate
from dicom_node.preprocess import RegionSettings, RoiSettings, build_preprocessing, crop_square
from train.data import Loaded, Sample, mask_target
from train.engine import Augmentation, DistributedContext, FitSettings, fit_network

__all__ = ["crop_inputs", "fit_localiser", "input_masks", "locate_all", "region_quality"]

log = logging.getLogger(__name__)


def fit_localiser(
    loaded: Loaded,
    train_index: np.ndarray,
    val_index: np.ndarray,
    settings: FitSettings,
    checkpoint: Path,
    *,
    resume: bool = False,
    context: DistributedContext | None = None,
) -> Localiser:
    """Train a localiser on the whole-image inputs and mask targets of ``loaded``."""
    if loaded.whole is None or loaded.masks is None:
        raise ValueError("the region-of-interest stage needs implant masks (mask_path)")
    context = context or DistributedContext()
    targets = loaded.masks
    positive = float(targets[train_index].mean())
    pos_weight = torch.tensor([min(20.0, (1 - positive) / max(positive, 1e-4))])
    bce = nn.BCEWithLogitsLoss(pos_weight=pos_weight.to(context.device))

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return bce(logits, target.to(logits.device))

    localiser = Localiser()
    fit_network(
        localiser,
        loaded.whole,
        targets,
        torch.from_numpy(train_index),
        torch.from_numpy(val_index),
        loss_fn,
        settings,
        checkpoint,
        resume=resume,
        context=context,
        name="localiser",
    )
    return localiser.cpu().eval()


def locate_all(
    localiser: nn.Module,
    whole: torch.Tensor,
    shapes: Sequence[tuple[int, int]],
    threshold: float,
    margin: float,
    batch: int = 64,
) -> list[RegionOfInterest]:
    """Regions of interest for every whole-image input (batched :func:`locate`)."""
    regions: list[RegionOfInterest] = []
    for start in range(0, len(whole), batch):
        regions += locate(
            localiser,
            whole[start : start + batch],
            shapes[start : start + batch],
            threshold,
            margin,
        )
    return regions


def crop_inputs(
    displays: Sequence[np.ndarray],
    regions: Sequence[RegionOfInterest],
    size: int,
    channels: int,
    normalisation: str,
    roi: RegionSettings | None = None,
) -> torch.Tensor:
    """The classifier inputs: each region cut from its displayed image by the node's
    composition (its region-of-interest step given the region; ``roi``, the card's, does not
    change the crop of a given region)."""
    preprocessing = build_preprocessing(size, channels, normalisation, roi or RoiSettings())
    return torch.stack([preprocessing(d, r)[0] for d, r in zip(displays, regions, strict=True)])


def input_masks(
    samples: Sequence[Sample],
    regions: Sequence[RegionOfInterest] | None,
    size: int,
) -> torch.Tensor:
    """Implant masks aligned with the classifier inputs: (N, 1, size/8, size/8), a cell is 1
    when the mask touches it. With ``regions`` the mask is cropped as the image was."""
    targets = []
    for i, sample in enumerate(samples):
        if sample.mask_path is None:
            raise ValueError(f"image {sample.sop_instance_uid} has no mask for attention guidance")
        mask = (np.asarray(Image.open(sample.mask_path)) > 0).astype(np.float32)
        if regions is not None:
            mask = crop_square(mask, regions[i])
        targets.append(mask_target(mask, size))
    return torch.stack(targets)


def region_quality(
    samples: Sequence[Sample], regions: Sequence[RegionOfInterest]
) -> dict[str, float]:
    """How well the regions hold the implants: mean and worst share of mask pixels inside the
    region, mean region area as a share of the image, and the share of images located."""
    covered, areas = [], []
    for sample, region in zip(samples, regions, strict=True):
        if sample.mask_path is None:
            continue
        mask = np.asarray(Image.open(sample.mask_path)) > 0
        rows, cols = mask.shape
        inside = mask[
            max(region.top, 0) : max(region.top + region.side, 0),
            max(region.left, 0) : max(region.left + region.side, 0),
        ].sum()
        covered.append(float(inside) / max(int(mask.sum()), 1))
        visible_rows = min(region.top + region.side, rows) - max(region.top, 0)
        visible_cols = min(region.left + region.side, cols) - max(region.left, 0)
        areas.append(max(visible_rows, 0) * max(visible_cols, 0) / (rows * cols))
    if not covered:
        return {}
    return {
        "images": len(covered),
        "mask_inside_mean": round(float(np.mean(covered)), 4),
        "mask_inside_min": round(float(np.min(covered)), 4),
        "mask_inside_ge_0.95": round(float(np.mean(np.array(covered) >= 0.95)), 4),
        "area_share_mean": round(float(np.mean(areas)), 4),
        "located": round(float(np.mean([r.found for r in regions])), 4),
    }


#: The localiser trains on geometry only: intensity changes matter less for "where".
LOCALISER_AUGMENTATION = Augmentation(gamma=0.3, gain=0.1, noise=0.2)
