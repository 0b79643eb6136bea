"""Out-of-distribution score of a task bundle: Mahalanobis distance on the classifier's features.

Lee et al. 2018 ("A simple unified framework for detecting out-of-distribution samples"):
class-conditional Gaussians with one shared covariance over the input of the classifier's last
linear layer; an image far from every class mean is outside what the model was trained on.
``python -m train ood`` fits it and its threshold on in-distribution validation images and
writes ``ood.pt`` with ``card.ood``; :mod:`dicom_node.applicability` reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

__all__ = ["Mahalanobis", "OodSpec", "pooled_features"]


class OodSpec(BaseModel):
    """A task bundle's out-of-distribution score (``card.ood``), fitted by ``train ood``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["mahalanobis"] = "mahalanobis"
    file: str = "ood.pt"
    sha256: str
    threshold: float = Field(description="scores above it are out of distribution")
    validation: dict[str, Any] = Field(default_factory=dict)


def _last_linear(model: nn.Module) -> nn.Linear:
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module
    if last is None:
        raise ValueError("the model has no linear head to read features from")
    return last


def pooled_features(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, features): the classifier's output and the input of its last linear layer."""
    captured: list[torch.Tensor] = []
    hook = _last_linear(model).register_forward_hook(
        lambda _m, inputs, _out: captured.append(inputs[0].detach())
    )
    try:
        logits = model(batch)
    finally:
        hook.remove()
    return logits, captured[-1].float().flatten(1)


@dataclass(frozen=True)
class Mahalanobis:
    """Class-conditional Gaussians with one shared covariance over the classifier's features.

    score(f) = min over classes c of (f - μ_c)ᵀ Σ⁻¹ (f - μ_c); large: far from every class.
    """

    means: torch.Tensor  # (C, D)
    precision: torch.Tensor  # (D, D)

    @classmethod
    def fit(
        cls, features: torch.Tensor, labels: torch.Tensor, shrinkage: float = 0.1
    ) -> Mahalanobis:
        features = features.double()
        classes = sorted(int(c) for c in labels.unique())
        means = torch.stack([features[labels == c].mean(dim=0) for c in classes])
        centred = features - means[torch.searchsorted(torch.tensor(classes), labels)]
        covariance = centred.T @ centred / max(1, len(features) - len(classes))
        # Shrink towards the mean variance: far fewer images than feature pairs otherwise.
        target = (
            torch.eye(covariance.shape[0], dtype=covariance.dtype) * covariance.diagonal().mean()
        )
        covariance = (1 - shrinkage) * covariance + shrinkage * target
        return cls(means=means.float(), precision=torch.linalg.inv(covariance).float())

    def score(self, features: torch.Tensor) -> np.ndarray:
        f = features.float().cpu()
        diff = f[:, None, :] - self.means[None, :, :]  # (N, C, D)
        distances = torch.einsum("ncd,de,nce->nc", diff, self.precision, diff)
        return distances.min(dim=1).values.numpy().astype(np.float64)

    def state(self) -> dict[str, torch.Tensor]:
        return {"means": self.means, "precision": self.precision}

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> Mahalanobis:
        return cls(means=state["means"].float(), precision=state["precision"].float())
