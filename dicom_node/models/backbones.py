"""Backbones: torchvision architectures with the head replaced for the task's classes.

Weights are never downloaded: models are built uninitialised and filled from a bundle's
``model.pt`` (or, in training, from a local ImageNet state dict named in the command line).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision import models

__all__ = ["BACKBONES", "build_backbone", "saliency_layer"]


def _densenet(factory: Callable[..., models.DenseNet]) -> Callable[[int], nn.Module]:
    def build(classes: int) -> nn.Module:
        model = factory(weights=None)
        model.classifier = nn.Linear(model.classifier.in_features, classes)
        return model

    return build


def _efficientnet_b0(classes: int) -> nn.Module:
    model = models.efficientnet_b0(weights=None)
    linear = model.classifier[1]
    assert isinstance(linear, nn.Linear)
    model.classifier[1] = nn.Linear(linear.in_features, classes)
    return model


def _resnet(factory: Callable[..., models.ResNet]) -> Callable[[int], nn.Module]:
    def build(classes: int) -> nn.Module:
        model = factory(weights=None)
        model.fc = nn.Linear(model.fc.in_features, classes)
        return model

    return build


def _mobilenet_v3_small(classes: int) -> nn.Module:
    model = models.mobilenet_v3_small(weights=None)
    linear = model.classifier[3]
    assert isinstance(linear, nn.Linear)
    model.classifier[3] = nn.Linear(linear.in_features, classes)
    return model


#: name → builder(classes). densenet201/efficientnet_b0 are the published studies' choices;
#: resnet18 and mobilenet_v3_small are small enough for CPU-trained demo weights.
BACKBONES: dict[str, Callable[[int], nn.Module]] = {
    "densenet121": _densenet(models.densenet121),
    "densenet201": _densenet(models.densenet201),
    "efficientnet_b0": _efficientnet_b0,
    "resnet18": _resnet(models.resnet18),
    "resnet50": _resnet(models.resnet50),
    "mobilenet_v3_small": _mobilenet_v3_small,
}


def build_backbone(name: str, classes: int) -> nn.Module:
    """An uninitialised ``name`` network with a ``classes``-way head."""
    try:
        return BACKBONES[name](classes)
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}") from None


def saliency_layer(model: nn.Module, name: str) -> nn.Module:
    """The last convolutional block, where Grad-CAM looks."""
    layer: object
    if name.startswith("densenet"):
        layer = model.features
    elif name.startswith("resnet"):
        layer = model.layer4
    elif name in ("efficientnet_b0", "mobilenet_v3_small"):
        layer = model.features[-1]  # type: ignore[index]
    else:
        raise ValueError(f"no saliency layer known for backbone {name!r}")
    assert isinstance(layer, nn.Module)
    return layer


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":  # pragma: no cover - a quick size table for docs
    for key, builder in BACKBONES.items():
        net = builder(6)
        size = sum(t.numel() * t.element_size() for t in net.state_dict().values())
        print(f"{key:20s} {count_parameters(net) / 1e6:6.1f} M  {size / 2**20:6.1f} MiB")  # noqa: T201
        del net
        torch.cuda.empty_cache()
