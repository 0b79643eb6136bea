"""Backbones: torchvision architectures with the head replaced for the task's classes.

Weights are never downloaded: models are built uninitialised and filled from a bundle's
``model.pt`` (or, in training, from a local ImageNet state dict named in the command line).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision import models

__all__ = ["BACKBONES", "SmallCNN", "build_backbone", "saliency_layer"]


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


class SmallCNN(nn.Module):
    """A deliberately small CNN (about 0.17 M weights, ~45 M multiply-adds at 256 px).

    Small enough to train on a 2-core CPU in minutes. ``python -m train synth-check`` uses it
    to ask whether phantom classes are learnable; as the backbone ``orthonode_cnn`` (one input
    channel, per-image standardisation) it is what the first CPU-trained demo bundles used.

    With ``fine=True`` (backbone ``orthonode_cnn16``) the last stage keeps 1/16 of the input's
    resolution and dilates instead of pooling, so Grad-CAM, which reads the last feature map,
    draws a heatmap four times finer (14 × 14 cells at 224 px instead of 7 × 7); same weights,
    about 1.6 × the compute.
    """

    def __init__(self, classes: int, fine: bool = False) -> None:
        super().__init__()

        def stage(cin: int, cout: int, pool: bool = True, dilation: int = 1) -> nn.Sequential:
            layers: list[nn.Module] = [
                nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]
            if pool:
                layers.append(nn.MaxPool2d(2))
            return nn.Sequential(*layers)

        dilation = 2 if fine else 1
        self.features = nn.Sequential(
            nn.Conv2d(1, 12, 5, stride=2, padding=2, bias=False),
            nn.BatchNorm2d(12),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            stage(12, 24),
            stage(24, 48),
            stage(48, 96, pool=not fine, dilation=dilation),
            nn.Conv2d(96, 128, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(256, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        return self.head(pooled)


#: name → builder(classes). densenet201/efficientnet_b0 are the published studies' choices;
#: resnet18 and mobilenet_v3_small are small enough for CPU-trained demo weights.
BACKBONES: dict[str, Callable[[int], nn.Module]] = {
    "densenet121": _densenet(models.densenet121),
    "densenet201": _densenet(models.densenet201),
    "efficientnet_b0": _efficientnet_b0,
    "resnet18": _resnet(models.resnet18),
    "resnet50": _resnet(models.resnet50),
    "mobilenet_v3_small": _mobilenet_v3_small,
    "orthonode_cnn": SmallCNN,
    "orthonode_cnn16": lambda classes: SmallCNN(classes, fine=True),
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
    elif name in ("orthonode_cnn", "orthonode_cnn16"):
        layer = model.features
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
