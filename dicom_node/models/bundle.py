"""Weight bundles: ``<bundle>/model.pt`` (a state dict) + ``<bundle>/card.json``.

The card says everything the node needs to use the weights the way they were trained: task,
classes and their codes, backbone, input size, preprocessing, decision threshold, temperature,
the AP + lateral stacker, the region-of-interest localiser (``localiser.pt``, optional), metrics,
version, and the sha256 of every weight file — a bundle whose sha256 does not match is refused.
Schema: docs/bundles.md. ``train`` writes bundles with :func:`save_bundle`; the node reads them
with :func:`load_bundle`.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from torch import nn

from dicom_node.domain import ClassInfo, ModelInfo
from dicom_node.errors import BundleError
from dicom_node.models.backbones import build_backbone
from dicom_node.models.localiser import Localiser
from dicom_node.models.ood import Mahalanobis, OodSpec
from dicom_node.preprocess import preprocessing_record
from dicom_node.tasks import CardClass

if TYPE_CHECKING:
    from dicom_node.config import Config

__all__ = [
    "Bundle",
    "Card",
    "CardClass",
    "PreprocessingStep",
    "RoiSpec",
    "Stacker",
    "device_uid",
    "load_bundle",
    "load_bundles",
    "save_bundle",
    "sha256_file",
    "update_card",
]

CARD_SCHEMA_VERSION = 1


class Stacker(BaseModel):
    """How the views' probabilities become the study's.

    ``logistic``: a multinomial logistic regression on the concatenated per-view
    log-probabilities (``coefficients``: classes × (views × classes), ``intercepts``).
    ``mean``: the mean of the views' probabilities, sharpened by ``temperature`` (below 1 when
    agreeing views deserve more confidence than either alone).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["logistic", "mean"] = "logistic"
    views: list[str] = Field(default_factory=lambda: ["AP", "LAT"])
    coefficients: list[list[float]] = Field(default_factory=list)
    intercepts: list[float] = Field(default_factory=list)
    temperature: float = Field(default=1.0, gt=0.0)

    @model_validator(mode="after")
    def _complete(self) -> Stacker:
        if self.kind == "logistic" and not (self.coefficients and self.intercepts):
            raise ValueError("a logistic stacker needs coefficients and intercepts")
        return self


class RoiSpec(BaseModel):
    """The region-of-interest stage: a :class:`~dicom_node.models.localiser.Localiser`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = Field(default="localiser.pt", pattern=r"^[A-Za-z0-9_.-]+\.pt$")
    sha256: str
    input_size: int = Field(
        default=256, ge=64, le=1024, multiple_of=8, description="whole-image input side"
    )
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0, description="implant probability")
    margin: float = Field(default=0.15, ge=0.0, le=1.0, description="context, share of side")


class PreprocessingStep(BaseModel):
    """One transform of the preprocessing (:class:`dicom_node.preprocess.Preprocessing`): the
    MONAI or ``dicom_node.preprocess`` array transform's name and its arguments."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    transform: str
    args: dict[str, Any] = Field(default_factory=dict)


class Card(BaseModel):
    """card.json."""

    model_config = ConfigDict(extra="allow", frozen=True)

    schema_version: int = CARD_SCHEMA_VERSION
    task: str
    name: str
    version: str
    demo: bool = True
    device_uid: str
    classes: list[CardClass]
    backbone: str
    input_size: int = Field(ge=32, le=2048)
    channels: int = 3
    normalisation: str = Field(default="imagenet", description="imagenet, unit or standardise")
    views: list[str] = Field(default_factory=lambda: ["AP", "LAT"])
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    decision_threshold: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description="two classes only: the second class when its probability is at or above it",
    )
    temperature: float = Field(default=1.0, gt=0.0)
    stacker: Stacker | None = None
    roi: RoiSpec | None = None
    ood: OodSpec | None = Field(
        default=None, description="out-of-distribution score and threshold (train ood)"
    )
    preprocessing: list[PreprocessingStep] | None = Field(
        default=None,
        validate_default=True,
        description="the composition input_size, channels, normalisation and roi make (derived "
        "when absent; a card whose record differs from it is refused)",
    )
    metrics: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    model_sha256: str

    @field_validator("preprocessing", mode="after")
    @classmethod
    def _preprocessing(
        cls, value: list[PreprocessingStep] | None, info: ValidationInfo
    ) -> list[PreprocessingStep] | None:
        fields = info.data
        if not {"input_size", "channels", "normalisation", "roi"} <= fields.keys():
            return value  # an earlier field is invalid, and reported
        derived = [
            PreprocessingStep.model_validate(step)
            for step in preprocessing_record(
                fields["input_size"], fields["channels"], fields["normalisation"], fields["roi"]
            )
        ]
        if value is not None and value != derived:
            raise ValueError(
                "the recorded preprocessing is not the one this node builds from input_size, "
                "channels, normalisation and roi (the bundle was made with other code): "
                f"recorded {[s.model_dump() for s in value]}, "
                f"built {[s.model_dump() for s in derived]}"
            )
        return derived


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified bundle: the card and the network in eval mode."""

    path: Path
    card: Card
    model: nn.Module
    localiser: nn.Module | None = None
    ood: Mahalanobis | None = None

    @property
    def classes(self) -> tuple[ClassInfo, ...]:
        return tuple(ClassInfo(index=i, **c.model_dump()) for i, c in enumerate(self.card.classes))

    @property
    def model_info(self) -> ModelInfo:
        return ModelInfo(
            name=self.card.name,
            version=self.card.version,
            device_uid=self.card.device_uid,
            demo=self.card.demo,
        )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_card(path: Path) -> Card:
    card_path = path / "card.json"
    if not card_path.is_file():
        raise BundleError(f"{card_path} is missing")
    try:
        return Card.model_validate(json.loads(card_path.read_text()))
    except (ValueError, ValidationError) as error:
        raise BundleError(f"{card_path} is not a valid card: {error}") from None


def _verified(path: Path, expected: str) -> Path:
    if not path.is_file():
        raise BundleError(f"{path} is missing")
    actual = sha256_file(path)
    if actual != expected:
        raise BundleError(
            f"{path} sha256 {actual[:12]}… does not match the card's "
            f"{expected[:12]}…; the bundle was altered or is incomplete"
        )
    return path


def _load_state(model: nn.Module, weights: Path, what: str) -> None:
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (RuntimeError, OSError, ValueError) as error:
        raise BundleError(f"{weights} does not fit {what}: {error}") from None


def load_bundle(path: Path, device: torch.device | str = "cpu") -> Bundle:
    """Read, verify (sha256) and instantiate a bundle.

    Raises
    ------
    BundleError
        When a file is missing, the card is invalid, a sha256 differs, or the weights do not
        fit the backbone.
    """
    card = load_card(path)
    if card.decision_threshold is not None and len(card.classes) != 2:
        raise BundleError(f"{path / 'card.json'}: decision_threshold needs exactly two classes")
    weights = _verified(path / "model.pt", card.model_sha256)
    model = build_backbone(card.backbone, len(card.classes))
    _load_state(model, weights, f"backbone {card.backbone}")
    model.eval().to(device)
    localiser = None
    if card.roi is not None:
        localiser = Localiser()
        _load_state(localiser, _verified(path / card.roi.file, card.roi.sha256), "the localiser")
        localiser.eval().to(device)
    ood = None
    if card.ood is not None:
        ood_path = _verified(path / card.ood.file, card.ood.sha256)
        try:
            ood = Mahalanobis.from_state(
                torch.load(ood_path, map_location="cpu", weights_only=True)
            )
        except (RuntimeError, OSError, KeyError, ValueError) as error:
            raise BundleError(f"{ood_path} is not an out-of-distribution model: {error}") from None
    return Bundle(path=path, card=card, model=model, localiser=localiser, ood=ood)


_TRAIN_HINT = (
    "python -m train synth --task {task} --patients 400 --out data/{task} && "
    "python -m train fit --data data/{task} --out runs/{task} && "
    "python -m train export --bundle runs/{task} --out {path}"
)


def load_bundles(config: Config, device: torch.device | str = "cpu") -> dict[str, Bundle]:
    """Every enabled task's bundle, verified; refuses with the missing file and the fix.

    Raises
    ------
    BundleError
        Naming the task, the problem, and the commands that make a bundle; also when no task
        is enabled, or a bundle's card is for another task.
    """
    bundles = {}
    for task, task_config in config.tasks.items():
        if not task_config.enabled:
            continue
        path = task_config.bundle
        try:
            bundle = load_bundle(path, device)
        except BundleError as error:
            raise BundleError(
                f"task {task}: {error}. Make a bundle with "
                f"`{_TRAIN_HINT.format(task=task, path=path)}`, point tasks.{task}.bundle at "
                f"one, or set tasks.{task}.enabled: false in conf.yaml"
            ) from None
        if bundle.card.task != task:
            raise BundleError(
                f"tasks.{task}.bundle {path} is a bundle for task {bundle.card.task!r}; "
                f"point it at a {task} bundle"
            )
        bundles[task] = bundle
    if not bundles:
        raise BundleError("no task is enabled in conf.yaml (tasks.<name>.enabled)")
    return bundles


def device_uid(task: str, version: str, model_sha256: str) -> str:
    """The SR observer's Device UID: stable for one model version, new whenever the weights are."""
    key = f"orthonode/{task}/{version}/{model_sha256}"
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, key).int}"


def save_bundle(
    path: Path,
    model: nn.Module,
    card_fields: dict[str, Any],
    localiser: nn.Module | None = None,
) -> Card:
    """Write model.pt (and localiser.pt) and card.json (the sha256s are computed here, and the
    Device UID from the weights' sha256 unless ``card_fields`` gives one)."""
    path.mkdir(parents=True, exist_ok=True)
    weights = path / "model.pt"
    torch.save(_cpu_state(model), weights)
    fields = {**card_fields, "model_sha256": sha256_file(weights)}
    if not fields.get("device_uid"):
        fields["device_uid"] = device_uid(fields["task"], fields["version"], fields["model_sha256"])
    if localiser is not None:
        roi = dict(fields.get("roi") or {})
        target = path / roi.get("file", "localiser.pt")
        torch.save(_cpu_state(localiser), target)
        fields["roi"] = {**roi, "file": target.name, "sha256": sha256_file(target)}
    else:
        fields["roi"] = None
        (path / "localiser.pt").unlink(missing_ok=True)
    card = Card.model_validate(fields)
    (path / "card.json").write_text(card.model_dump_json(indent=2) + "\n")
    return card


def update_card(path: Path, changes: dict[str, Any]) -> Card:
    """Change fields of a bundle's card (temperature, stacker, metrics...); weights untouched."""
    card = load_card(path)
    updated = Card.model_validate({**card.model_dump(), **changes})
    (path / "card.json").write_text(updated.model_dump_json(indent=2) + "\n")
    return updated


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    module = getattr(model, "module", model)  # unwrap DistributedDataParallel
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
