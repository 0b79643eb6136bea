"""Saliency: captum Grad-CAM (default) or integrated gradients, mapped back to the source grid.

The heatmap is computed for the class the study-level result predicts, on the network input,
then the padding is cropped and it is resized to the source image's Rows × Columns (or, for a
bundle that crops a region of interest, to that region, zero elsewhere) and scaled to [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam
from scipy import ndimage

from dicom_node.domain import Explanation, PreparedView
from dicom_node.models.backbones import saliency_layer
from dicom_node.models.bundle import Bundle
from dicom_node.preprocess import heatmap_to_source

__all__ = ["METHODS", "explain"]

METHODS = {"gradcam": "Grad-CAM", "integrated-gradients": "Integrated gradients"}


def _normalise(heat: np.ndarray) -> np.ndarray:
    heat = np.nan_to_num(heat.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    heat = np.maximum(heat, 0.0)
    top = float(heat.max())
    return heat / top if top > 0 else heat


def explain(
    bundle: Bundle,
    view: PreparedView,
    target: int,
    method: str = "gradcam",
    device: torch.device | None = None,
) -> Explanation:
    """A heatmap for ``target`` on ``view``'s source grid."""
    device = device or torch.device("cpu")
    model = bundle.model
    size = bundle.card.input_size
    inputs = view.tensor[None].to(device).requires_grad_(True)
    if method == "gradcam":
        layer = saliency_layer(model, bundle.card.backbone)
        attribution = LayerGradCam(model, layer).attribute(
            inputs, target=target, relu_attributions=True
        )
        upsampled = LayerAttribution.interpolate(attribution, (size, size), "bilinear")
        heat = upsampled[0, 0].detach().cpu().numpy()
    elif method == "integrated-gradients":
        attribution = IntegratedGradients(model).attribute(
            inputs, baselines=torch.zeros_like(inputs), target=target, n_steps=16
        )
        heat = attribution[0].abs().sum(dim=0).detach().cpu().numpy()
        heat = ndimage.gaussian_filter(heat, sigma=size / 64)
    else:
        raise ValueError(f"unknown saliency method {method!r}; use {sorted(METHODS)}")
    rows, cols = view.display.shape
    source = heatmap_to_source(_normalise(heat), rows, cols, view.region)
    return Explanation(
        view=view.view, heatmap=_normalise(source), method=METHODS[method], region=view.region
    )
