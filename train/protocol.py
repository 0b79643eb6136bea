"""The published protocol, stage by stage: what ``python -m train fit`` runs (and ``python -m
train compare`` for each of its variants) — train, calibrate, fuse, choose the operating point,
report, write a bundle.

1. Data (:mod:`train.data`): a manifest folder, or DICOM + ``--labels``; patients split 75/15/10
   (stratified, no patient in two splits) or ``--folds K --fold i``.
2. Region of interest (:mod:`train.roi`, ``--roi``): a localiser trained on the implant masks;
   every view is then cropped around the implant at the source's resolution, as the node does.
3. Classifier (:mod:`train.engine`): the node's backbone and preprocessing, augmentation on
   training data only, AdamW + one-cycle + class-weighted loss, best epoch by validation loss,
   a checkpoint per epoch (``--resume``), AMP and channels_last on CUDA, ``torchrun`` for DDP.
4. Calibration: temperature scaling on the validation split (as ``python -m train calibrate``).
5. Fusion (:mod:`train.fusion`): the AP + lateral logistic-regression stacker on validation
   studies (as ``python -m train ensemble``).
6. Operating point (:mod:`train.operating`), two-class tasks: the threshold with the best
   validation specificity at ``--min-sensitivity`` (stored in the card; the node decides with
   it).
7. Test: the test split through :mod:`train.metrics`.
8. Bundle and report: the bundle (model.pt, localiser.pt, card.json, with split.csv) in OUT;
   then the ``--external`` sets through it, ``OUT/report/report.md`` with plots and
   ``OUT/metrics.json``.

:func:`run` is the list of stages, one function each. It is one file because it is the protocol
and its options (:func:`get_args_parser`): read top to bottom, the stages in the order they run.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dicom_node.config import load_config
from dicom_node.domain import RegionOfInterest
from dicom_node.models.backbones import build_backbone, saliency_layer
from dicom_node.models.bundle import load_bundle, save_bundle, update_card
from dicom_node.models.localiser import STRIDE, Localiser
from train.data import (
    LabelledSet,
    Loaded,
    kfold_patients,
    load_images,
    read_dataset,
    split_patients,
    task_spec,
)
from train.engine import (
    Augmentation,
    DistributedContext,
    FitSettings,
    Guidance,
    fit_network,
    fit_temperature,
    init_distributed,
    input_format,
    predict_logits,
)
from train.fusion import by_study, fit_stacker, fused_probabilities
from train.metrics import abstention, classification_metrics
from train.operating import DEFAULT_MIN_SENSITIVITY, operating_point
from train.predict import evaluate, write_split
from train.provenance import git_commit, training_record
from train.report import Section, write_report
from train.roi import (
    LOCALISER_AUGMENTATION,
    crop_inputs,
    fit_localiser,
    input_masks,
    locate_all,
    region_quality,
)

__all__ = ["get_args_parser", "run", "split_sections"]

log = logging.getLogger(__name__)


@dataclass
class _Data:
    """Stage 1: the labelled set, its split (rows of each of train / val / test), its images
    and how they were read."""

    dataset: LabelledSet
    index: dict[str, np.ndarray]
    use_roi: bool
    normalisation: str
    channels: int
    loaded: Loaded


@dataclass
class _Inputs:
    """Stage 2: the classifier's inputs (cropped around the implant with the region of
    interest), their labels, and the localiser that cropped them."""

    x: torch.Tensor
    y: torch.Tensor
    localiser: Localiser | None
    regions: list[RegionOfInterest] | None
    roi_metrics: dict[str, float]


@dataclass
class _Decision:
    """Stages 4–6: how the card turns the classifier's logits into a decision."""

    temperature: float
    stacker: dict[str, Any] | None
    stacker_scores: dict[str, float]
    threshold: float | None  # two classes: the operating point


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train and write the bundle; the metrics (empty on ranks other than 0 under torchrun)."""
    context = init_distributed(prefer_cuda=args.device != "cpu")
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    commit = git_commit()  # the code that trains, not what the checkout holds when it ends
    data = _data(args, context)
    args.out.mkdir(parents=True, exist_ok=True)
    inputs = _region_of_interest(args, data, context)
    model = _classifier(args, data, inputs, context)
    if not context.main:
        return {}
    model = model.cpu().eval()
    probabilities, temperature = _calibration(model, inputs, data)
    stacker, stacker_scores = _fusion(args, data, probabilities)
    threshold = _operating_point(args, data, probabilities, stacker)
    decision = _Decision(temperature, stacker, stacker_scores, threshold)
    sections, metrics = _test(args, data, probabilities, decision, inputs.roi_metrics)
    training = training_record(
        args,
        data_fingerprint=data.dataset.fingerprint,
        commit=commit,
        started=started,
        processes=context.world,
        device=context.device.type,
    )
    card = _bundle(args, data, model, inputs.localiser, decision, metrics, training)
    _report(args, card, sections, metrics, inputs.roi_metrics)
    return metrics


def _data(args: argparse.Namespace, context: DistributedContext) -> _Data:
    """1. Data: read the set, split its patients, check the options against it, read the
    images (whole, or for the region of interest at the source's resolution)."""
    config = load_config(args.config) if args.config is not None else None
    dataset = read_dataset(args.data, args.labels, config)
    index = _split(dataset, args)
    if not len(index["train"]) or not len(index["val"]):
        raise ValueError("the split left no training or no validation patients; use more data")
    use_roi = args.roi == "on" or (args.roi == "auto" and dataset.has_masks)
    if use_roi and args.roi_size % STRIDE:
        raise ValueError(f"--roi-size must be a multiple of {STRIDE}, got {args.roi_size}")
    if use_roi and not dataset.has_masks:
        raise ValueError("--roi on needs implant masks (a manifest with mask_path)")
    normalisation, channels = input_format(args.backbone)
    if context.main:
        log.info(
            "%s: %d images, patients per split %s, views %s, region of interest %s",
            dataset.task,
            len(dataset.samples),
            {k: len({dataset.samples[i].patient_id for i in v}) for k, v in index.items()},
            dataset.views,
            "on" if use_roi else "off",
        )
    loaded = load_images(
        dataset.samples,
        size=args.size,
        channels=channels,
        normalisation=normalisation,
        roi_size=args.roi_size if use_roi else None,
        workers=args.workers,
    )
    return _Data(dataset, index, use_roi, normalisation, channels, loaded)


def _split(dataset: LabelledSet, args: argparse.Namespace) -> dict[str, np.ndarray]:
    patients = [s.patient_id for s in dataset.samples]
    labels = [s.label_index for s in dataset.samples]
    if args.folds:
        assignment = kfold_patients(
            patients, labels, args.folds, args.fold, args.split[1] / sum(args.split[:2]), args.seed
        )
    else:
        assignment = split_patients(patients, labels, tuple(args.split), args.seed)
    return {
        name: np.array([i for i, p in enumerate(patients) if assignment[p] == name], dtype=int)
        for name in ("train", "val", "test")
    }


def _region_of_interest(
    args: argparse.Namespace, data: _Data, context: DistributedContext
) -> _Inputs:
    """2. Region of interest: train the localiser on the implant masks and crop every view
    around what it finds (with ``--roi``; else the whole images)."""
    loaded = data.loaded
    y = torch.tensor([s.label_index for s in data.dataset.samples])
    if not data.use_roi:
        assert loaded.inputs is not None
        return _Inputs(loaded.inputs, y, None, None, {})
    assert loaded.displays is not None and loaded.whole is not None
    index = data.index
    localiser = fit_localiser(
        loaded,
        index["train"],
        index["val"],
        FitSettings(
            epochs=args.roi_epochs,
            batch_size=args.batch_size,
            lr=args.roi_lr,
            patience=args.patience,
            seed=args.seed,
            progress=args.progress,
            augmentation=LOCALISER_AUGMENTATION,
        ),
        args.out / "checkpoint-localiser.pt",
        resume=args.resume,
        context=context,
    )
    shapes = [d.shape for d in loaded.displays]
    regions = locate_all(localiser, loaded.whole, shapes, args.roi_threshold, args.roi_margin)
    x = crop_inputs(loaded.displays, regions, args.size, data.channels, data.normalisation)
    roi_metrics = region_quality(
        [data.dataset.samples[i] for i in index["test"]], [regions[i] for i in index["test"]]
    )
    loaded.displays = None
    return _Inputs(x, y, localiser, regions, roi_metrics)


def _classifier(
    args: argparse.Namespace, data: _Data, inputs: _Inputs, context: DistributedContext
) -> nn.Module:
    """3. Classifier: the backbone trained on the training split, its best epoch by validation
    loss (class-weighted cross-entropy, optionally guided towards the implant masks)."""
    dataset, index, names = data.dataset, data.index, list(data.dataset.classes)
    if args.attention_loss and not dataset.has_masks:
        raise ValueError("--attention-loss needs implant masks (a manifest with mask_path)")
    model = build_backbone(args.backbone, len(names))
    guidance = None
    if args.attention_loss:
        guidance = Guidance(
            saliency_layer(model, args.backbone),
            input_masks(dataset.samples, inputs.regions, args.size),
            args.attention_loss,
        )
    if args.pretrained:
        state = torch.load(args.pretrained, map_location="cpu", weights_only=True)
        missing = model.load_state_dict(state, strict=False)
        if context.main:
            log.info(
                "loaded %s (%d missing keys: the new head)",
                args.pretrained,
                len(missing.missing_keys),
            )
    counts = np.bincount(inputs.y[index["train"]].numpy(), minlength=len(names))
    counts = counts.astype(np.float32)
    weight = torch.from_numpy(counts.sum() / np.maximum(counts, 1) / len(names))
    cross_entropy = nn.CrossEntropyLoss(weight=weight.to(context.device))

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits.to(context.device), target.to(context.device))

    fit_network(
        model,
        inputs.x,
        inputs.y,
        torch.from_numpy(index["train"]),
        torch.from_numpy(index["val"]),
        loss_fn,
        FitSettings(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            patience=args.patience,
            seed=args.seed,
            progress=args.progress,
            augmentation=None
            if args.no_augment
            else Augmentation(gamma=args.aug_gamma, gain=args.aug_gain, noise=args.aug_noise),
        ),
        args.out / "checkpoint.pt",
        resume=args.resume,
        context=context,
        name="classifier",
        guidance=guidance,
    )
    return model


def _calibration(model: nn.Module, inputs: _Inputs, data: _Data) -> tuple[np.ndarray, float]:
    """4. Calibration: the temperature fitted on the validation split, and the calibrated
    probabilities of every image of the set (rows sum to 1 in float64)."""
    val = data.index["val"]
    val_logits = predict_logits(model, inputs.x[val], torch.device("cpu"))
    temperature = fit_temperature(val_logits, inputs.y[val])
    probabilities = (
        torch.softmax(predict_logits(model, inputs.x, torch.device("cpu")) / temperature, dim=1)
        .numpy()
        .astype(np.float64)
    )
    probabilities /= probabilities.sum(axis=1, keepdims=True)  # exactly 1 in float64
    return probabilities, temperature


def _fusion(
    args: argparse.Namespace, data: _Data, probabilities: np.ndarray
) -> tuple[dict[str, Any] | None, dict[str, float]]:
    """5. Fusion: with two views, the stacker fitted on the validation studies and the
    cross-validated scores it was chosen by; else none."""
    views = data.dataset.views
    if len(views) != 2:
        return None, {}
    val = data.index["val"]
    _, per_view, labels = by_study(data.dataset.samples, val, probabilities[val], views)
    return fit_stacker(per_view, labels, views, len(data.dataset.classes), args.seed)


def _operating_point(
    args: argparse.Namespace,
    data: _Data,
    probabilities: np.ndarray,
    stacker: dict[str, Any] | None,
) -> float | None:
    """6. Operating point: for two classes, the threshold on the validation split's last
    section (fused when there are two views) by ``--min-sensitivity`` / ``--min-specificity``;
    else None."""
    if len(data.dataset.classes) != 2:
        return None
    sections = split_sections(data.dataset, data.index["val"], probabilities, stacker, None)
    _, _, p, labels = sections[-1]
    return operating_point(p[:, 1], labels, args.min_sensitivity, args.min_specificity)


def _test(
    args: argparse.Namespace,
    data: _Data,
    probabilities: np.ndarray,
    decision: _Decision,
    roi_metrics: dict[str, float],
) -> tuple[list[Section], dict[str, Any]]:
    """7. Test: per-view and fused sections of the test split (with abstention for more than
    two classes) and the metrics the card and metrics.json keep."""
    dataset, index = data.dataset, data.index
    sections = split_sections(
        dataset, index["test"], probabilities, decision.stacker, decision.threshold
    )
    if decision.threshold is None and args.abstain > 0:
        for _, section_metrics, p, labels in sections:
            section_metrics.update(abstention(p, labels, args.abstain))
    metrics: dict[str, Any] = {
        "split": "test",
        "patients": {k: len({dataset.samples[i].patient_id for i in v}) for k, v in index.items()},
        "temperature": round(decision.temperature, 4),
        "stacker": decision.stacker_scores,
        **{name: _headline(m) for name, m, _, _ in sections},
    }
    if roi_metrics:
        metrics["region_of_interest"] = roi_metrics
    return sections, metrics


def _bundle(
    args: argparse.Namespace,
    data: _Data,
    model: nn.Module,
    localiser: Localiser | None,
    decision: _Decision,
    metrics: dict[str, Any],
    training: dict[str, Any],
) -> dict[str, Any]:
    """8. Bundle: model.pt, localiser.pt and card.json in OUT (the checkpoints removed), and
    split.csv; the card."""
    task = data.dataset.task
    card = {
        "task": task,
        "name": args.name or f"orthonode {task} classifier",
        "version": args.version,
        "demo": not args.not_demo,
        "classes": task_spec(
            task, load_config(args.config) if args.config else None
        ).card_classes(),
        "backbone": args.backbone,
        "input_size": args.size,
        "channels": data.channels,
        "normalisation": data.normalisation,
        "views": data.dataset.views,
        # Two-class tasks decide at the operating point and never abstain; others abstain
        # below --abstain.
        "threshold": 0.0 if decision.threshold is not None else args.abstain,
        "decision_threshold": decision.threshold,
        "temperature": decision.temperature,
        "stacker": decision.stacker,
        "roi": {
            "input_size": args.roi_size,
            "threshold": args.roi_threshold,
            "margin": args.roi_margin,
            "sha256": "",
        }
        if data.use_roi
        else None,
        "metrics": metrics,
        "training": training,
    }
    save_bundle(args.out, model, card, localiser)  # the Device UID follows the weights
    for checkpoint in ("checkpoint.pt", "checkpoint-localiser.pt"):
        (args.out / checkpoint).unlink(missing_ok=True)
    write_split(args.out / "split.csv", data.dataset, data.index)
    return card


def _report(
    args: argparse.Namespace,
    card: dict[str, Any],
    sections: list[Section],
    metrics: dict[str, Any],
    roi_metrics: dict[str, float],
) -> None:
    """8. Report: every ``--external`` set through the written bundle (its metrics added to
    the card), report.md with plots, metrics.json; then the bundle read back as the node
    reads it."""
    report_sections = [(f"test {n}", m, p, lab) for n, m, p, lab in sections]
    for external in args.external or []:
        result = evaluate(args.out, external)
        metrics[f"external:{external.name}"] = {
            name: _headline(m) for name, m in result["sections"].items()
        }
        report_sections += [
            (f"external {external.name} {n}", m, p, lab) for n, m, p, lab in result["raw"]
        ]
    if args.external:
        update_card(args.out, {"metrics": metrics})
    write_report(
        report_sections,
        args.out / "report",
        f"{card['name']} {card['version']}",
        preamble=_preamble(card, roi_metrics),
    )
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    load_bundle(args.out)  # the node can read what was written


def split_sections(
    dataset: LabelledSet,
    index: np.ndarray,
    probabilities: np.ndarray,
    stacker: dict[str, Any] | None,
    decision_threshold: float | None,
) -> list[Section]:
    """Per-view and fused (name, metrics, probabilities, labels) for the images of ``index``;
    ``probabilities`` has one row per image of the whole set."""
    names = list(dataset.classes)
    sections: list[Section] = []
    views = dataset.views
    for view in views:
        members = np.array([i for i in index if dataset.samples[i].view == view], dtype=int)
        if len(members) == 0:
            continue
        labels = np.array([dataset.samples[i].label_index for i in members])
        p = probabilities[members]
        sections.append(
            (view, classification_metrics(p, labels, names, decision_threshold), p, labels)
        )
    if len(views) == 2 and len(index):
        _, per_view, labels = by_study(dataset.samples, index, probabilities[index], views)
        if len(labels):
            fused = fused_probabilities(per_view, stacker)
            sections.append(
                (
                    "fused",
                    classification_metrics(fused, labels, names, decision_threshold),
                    fused,
                    labels,
                )
            )
    return sections


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "n",
        "accuracy",
        "answered",
        "accuracy_answered",
        "auc",
        "auc_macro",
        "auc_micro",
        "ece",
        "cohen_kappa",
        "sensitivity",
        "specificity",
        "threshold",
    )
    return {k: metrics[k] for k in keys if k in metrics}


def _preamble(card: dict[str, Any], roi: dict[str, float]) -> str:
    lines = [
        "Demo weights trained on synthetic phantoms: **not for clinical use**."
        if card["demo"]
        else "",
        f"Backbone `{card['backbone']}`, input {card['input_size']} px, "
        f"temperature {card['temperature']:.3f}, "
        f"fusion {'logistic stacker' if card['stacker'] else 'mean of the views'}"
        + (
            f", operating threshold {card['decision_threshold']:.3f}"
            if card["decision_threshold"] is not None
            else ""
        )
        + ".",
        f"Command: `{card['training']['command']}`",
    ]
    if roi:
        lines.append(
            f"Region of interest: {roi['mask_inside_mean']:.3f} of the implant mask inside the "
            f"crop on average (worst {roi['mask_inside_min']:.3f}), crop area "
            f"{roi['area_share_mean']:.3f} of the image."
        )
    return "\n\n".join(line for line in lines if line)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train fit",
        add_help=add_help,
        description="Train, calibrate, fuse and write a weight bundle with its report.",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, required=True, help="manifest folder or DICOM folder")
    data.add_argument("--labels", type=Path, default=None, help="labels CSV for a DICOM folder")
    data.add_argument(
        "--config",
        type=Path,
        default=None,
        help="conf.yaml: its routing rules read a DICOM folder given with --labels, and its "
        "tasks.<name>.spec defines a task that is not built in (classes and their codes)",
    )
    data.add_argument(
        "--split",
        type=float,
        nargs=3,
        default=(0.75, 0.15, 0.10),
        metavar=("TRAIN", "VAL", "TEST"),
        help="patient fractions",
    )
    data.add_argument("--folds", type=int, default=0, help="k-fold: K folds (0: --split)")
    data.add_argument("--fold", type=int, default=0, help="k-fold: the test fold")
    data.add_argument(
        "--external",
        type=Path,
        action="append",
        default=None,
        help="extra, differently acquired manifest folder to evaluate (repeatable)",
    )
    data.add_argument("--workers", type=int, default=1, help="processes reading images")
    model = parser.add_argument_group("model")
    model.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    model.add_argument("--backbone", default="orthonode_cnn")
    model.add_argument(
        "--pretrained",
        type=Path,
        default=None,
        help="local ImageNet state dict for the backbone (never downloaded)",
    )
    model.add_argument("--size", type=int, default=224, help="classifier input side")
    model.add_argument("--name", default=None, help="algorithm name in the SR")
    model.add_argument("--version", default="0.1.0-demo")
    model.add_argument(
        "--not-demo",
        action="store_true",
        help="weights trained on real data: outputs do not say DEMO WEIGHTS",
    )
    roi = parser.add_argument_group("region of interest")
    roi.add_argument(
        "--roi",
        choices=["auto", "on", "off"],
        default="auto",
        help="crop around the implant (auto: when the set has masks)",
    )
    roi.add_argument("--roi-size", type=int, default=256)
    roi.add_argument("--roi-epochs", type=int, default=15)
    roi.add_argument("--roi-lr", type=float, default=3e-3)
    roi.add_argument("--roi-threshold", type=float, default=0.5)
    roi.add_argument("--roi-margin", type=float, default=0.12)
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=60)
    optim.add_argument("--batch-size", type=int, default=32)
    optim.add_argument("--lr", type=float, default=3e-3, help="peak of the one-cycle schedule")
    optim.add_argument("--weight-decay", type=float, default=1e-4)
    optim.add_argument("--patience", type=int, default=20, help="early stopping, epochs")
    optim.add_argument("--no-augment", action="store_true")
    defaults = Augmentation()
    for name, meaning in (
        ("noise", "Gaussian noise up to this many standard deviations of the image"),
        ("gain", "contrast scaled by 1 ± this share"),
        ("gamma", "tone curve gamma log-uniform in exp(± this)"),
    ):
        optim.add_argument(
            f"--aug-{name}",
            type=float,
            default=getattr(defaults, name),
            help=f"augmentation: {meaning}",
        )
    optim.add_argument(
        "--attention-loss",
        type=float,
        default=0.0,
        help="weight of the attention guidance: the share of the saliency layer's activation "
        "outside the implant mask (needs masks; 0: off)",
    )
    optim.add_argument("--seed", type=int, default=0)
    optim.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint*.pt")
    decision = parser.add_argument_group("decision")
    decision.add_argument(
        "--min-specificity",
        type=float,
        default=None,
        help="two classes: choose the operating point for the best validation sensitivity at "
        "this specificity instead (robust when validation is separable)",
    )
    decision.add_argument(
        "--min-sensitivity",
        type=float,
        default=DEFAULT_MIN_SENSITIVITY,
        help="two classes: validation sensitivity the operating point keeps",
    )
    decision.add_argument(
        "--abstain",
        type=float,
        default=0.4,
        help="more classes: 'undetermined' below this probability",
    )
    machine = parser.add_argument_group("machine")
    machine.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    machine.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    machine.add_argument("--progress", action="store_true", help="progress bars")
    return parser
