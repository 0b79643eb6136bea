"""``python -m train image-check``: train the image check on phantoms of every task.

One small network (:class:`dicom_node.models.backbones.SmallCNN`) reads the whole radiograph at
a low resolution and answers three questions with one linear head
(:func:`dicom_node.applicability.split_logits`): which body part (softmax over the anatomies:
knee, hip, spine, other), which projection (AP or lateral), and, per task, whether that task's
implant is in the image (a sigmoid each). It is trained on manifests made by ``python -m train
synth --implant mixed`` for each task plus ``--task other``: native anatomy, other metal and
implants cut off by the collimator are the negatives of the implant head.

Thresholds are chosen on the validation patients (never on the test patients, never on real
radiographs): for each task, the implant threshold keeps at least ``--min-sensitivity`` of the
validation images that show the implant (it is capped at 0.5); the card records, per task, the
sensitivity on implants and the share of each negative kind (none, other metal, cut off, other
anatomy) below the threshold, and the accuracy of the anatomy and view heads. The bundle is
``model.pt`` + ``card.json`` (:class:`dicom_node.applicability.ImageCheckCard`).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from torch import nn

from dicom_node.applicability import (
    IMAGE_CHECK_FILE,
    ImageCheckCard,
    image_check_preprocessing,
    split_logits,
)
from dicom_node.models.backbones import build_backbone
from dicom_node.models.bundle import sha256_file
from dicom_node.preprocess import display_image
from train.cli import run_command
from train.engine import Augmentation, FitSettings, fit_network, init_distributed, predict_logits
from train.provenance import git_commit, training_record

__all__ = [
    "ANATOMIES",
    "CheckRow",
    "choose_thresholds",
    "get_args_parser",
    "load_inputs",
    "main",
    "read_rows",
]

log = logging.getLogger(__name__)

ANATOMIES = ("knee", "hip", "spine", "other")
VIEWS = ("AP", "LAT")
IMPLANTS = ("knee", "hip", "spine")


@dataclass(frozen=True)
class CheckRow:
    """One image of a phantom manifest, as the image check sees it."""

    path: Path
    patient: str  # set-qualified, so patients of two sets never collide
    anatomy: str
    view: str
    implant: str  # present | none | other | cut
    task: str  # the task whose phantom it is ("other": other anatomy)


def read_rows(folders: list[Path]) -> list[CheckRow]:
    """The images of every manifest; old manifests (no ``implant`` column) are all present."""
    rows: list[CheckRow] = []
    for folder in folders:
        manifest = folder / "manifest.csv"
        if not manifest.is_file():
            raise ValueError(f"{folder} has no manifest.csv (make one with python -m train synth)")
        with manifest.open(newline="") as handle:
            for row in csv.DictReader(handle):
                task = row["task"]
                anatomy = row.get("anatomy") or (task if task in ANATOMIES else "other")
                if anatomy not in ANATOMIES:
                    anatomy = "other"
                rows.append(
                    CheckRow(
                        path=folder / row["path"],
                        patient=f"{folder.name}/{row['patient_id']}",
                        anatomy=anatomy,
                        view=row["view"],
                        implant=row.get("implant") or "present",
                        task=task,
                    )
                )
    if not rows:
        raise ValueError("the manifests list no images")
    return rows


def targets(rows: list[CheckRow]) -> torch.Tensor:
    """(N, 2 + implants): anatomy index, view index, then 0/1 per task's implant."""
    out = torch.zeros(len(rows), 2 + len(IMPLANTS))
    for i, row in enumerate(rows):
        out[i, 0] = ANATOMIES.index(row.anatomy)
        out[i, 1] = VIEWS.index(row.view)
        if row.implant == "present" and row.task in IMPLANTS:
            out[i, 2 + IMPLANTS.index(row.task)] = 1.0
    return out


def _load(arguments: tuple[Path, int]) -> torch.Tensor:
    path, size = arguments
    torch.set_num_threads(1)
    card = _card_stub(size)
    try:
        display = display_image(pydicom.dcmread(path))
    except Exception as error:
        raise ValueError(f"{path}: cannot read the image: {error}") from error
    tensor, _ = image_check_preprocessing(card)(display)
    return tensor


def _card_stub(size: int) -> ImageCheckCard:
    return ImageCheckCard(
        version="0",
        input_size=size,
        anatomies=list(ANATOMIES),
        views=list(VIEWS),
        implants=list(IMPLANTS),
        model_sha256="",
    )


#: The heads' layout (what split_logits reads); the input size does not matter to it.
_HEADS = _card_stub(192)


def load_inputs(rows: list[CheckRow], size: int, workers: int = 1) -> torch.Tensor:
    """(N, 1, size, size): each image as the node's image check reads it."""
    arguments = [(r.path, size) for r in rows]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            tensors = list(pool.map(_load, arguments, chunksize=16))
    else:
        tensors = [_load(a) for a in arguments]
    return torch.stack(tensors)


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of anatomy and view, plus binary cross-entropy of each task's implant."""
    anatomy, view, implant = split_logits(logits, _HEADS)
    ce = nn.functional.cross_entropy
    return (
        ce(anatomy, y[:, 0].long())
        + ce(view, y[:, 1].long())
        + nn.functional.binary_cross_entropy_with_logits(implant, y[:, 2:])
    )


def _split(rows: list[CheckRow], val_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    patients = sorted({r.patient for r in rows})
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(patients, size=max(1, round(val_share * len(patients))), replace=False))
    val = np.array([i for i, r in enumerate(rows) if r.patient in chosen])
    train = np.array([i for i, r in enumerate(rows) if r.patient not in chosen])
    return train, val


def choose_thresholds(
    rows: list[CheckRow], probabilities: np.ndarray, min_sensitivity: float
) -> tuple[dict[str, float], dict[str, Any]]:
    """Per task: the implant threshold keeping ``min_sensitivity`` of its implant images, and
    what it does on each kind of image (share below the threshold)."""
    thresholds: dict[str, float] = {}
    figures: dict[str, Any] = {}
    for k, task in enumerate(IMPLANTS):
        scores = probabilities[:, k]
        present = np.array([r.implant == "present" and r.task == task for r in rows])
        if not present.any():
            continue
        # "lower": an observed score, so that a small set keeps at least the share asked for.
        quantile = np.quantile(scores[present], 1.0 - min_sensitivity, method="lower")
        threshold = float(min(0.5, quantile))
        thresholds[task] = round(threshold, 4)
        kinds: dict[str, Any] = {
            "threshold": round(threshold, 4),
            "implant_images": int(present.sum()),
            "sensitivity": round(float(np.mean(scores[present] >= threshold)), 4),
        }
        for kind in ("none", "other", "cut"):
            mask = np.array([r.implant == kind and r.anatomy == task for r in rows])
            if mask.any():
                kinds[f"rejected_{kind}"] = round(float(np.mean(scores[mask] < threshold)), 4)
                kinds[f"images_{kind}"] = int(mask.sum())
        others = np.array([not (r.implant == "present" and r.task == task) for r in rows])
        kinds["rejected_all_negatives"] = round(float(np.mean(scores[others] < threshold)), 4)
        figures[task] = kinds
    return thresholds, figures


def choose_head_thresholds(
    rows: list[CheckRow], logits: torch.Tensor, card: ImageCheckCard, max_contradiction: float
) -> tuple[float, float]:
    """The lowest anatomy and view thresholds (from 0.5) at which the check contradicts the
    true anatomy or view of at most ``max_contradiction`` of the validation images that show a
    task's implant (what confirm mode must not refuse)."""
    anatomy, view, _ = split_logits(logits, card)
    implants = np.array([r.implant == "present" and r.task in IMPLANTS for r in rows])
    chosen = []
    for probabilities, truth in (
        (torch.softmax(anatomy, 1).numpy(), [ANATOMIES.index(r.anatomy) for r in rows]),
        (torch.softmax(view, 1).numpy(), [VIEWS.index(r.view) for r in rows]),
    ):
        wrong = (probabilities.argmax(1) != np.array(truth)) & implants
        confidence = probabilities.max(1)
        threshold = 0.5
        for candidate in np.unique(np.concatenate([[0.5], confidence[wrong]])):
            if candidate < 0.5:
                continue
            threshold = float(candidate)
            if np.mean(wrong & (confidence >= candidate)) <= max_contradiction:
                break
        else:
            threshold = float(np.nextafter(np.float32(confidence[wrong].max()), np.float32(2)))
        chosen.append(round(min(threshold + 1e-6, 1.0), 6))
    return chosen[0], chosen[1]


def _head_accuracy(
    rows: list[CheckRow], logits: torch.Tensor, card: ImageCheckCard
) -> dict[str, Any]:
    anatomy, view, _ = split_logits(logits, card)
    pa = torch.softmax(anatomy, 1).numpy()
    pv = torch.softmax(view, 1).numpy()
    truth_a = np.array([ANATOMIES.index(r.anatomy) for r in rows])
    truth_v = np.array([VIEWS.index(r.view) for r in rows])
    guess_a, guess_v = pa.argmax(1), pv.argmax(1)
    # Confidently wrong: what would make confirm mode refuse a correct route.
    wrong_a = (guess_a != truth_a) & (pa.max(1) >= card.anatomy_threshold)
    wrong_v = (guess_v != truth_v) & (pv.max(1) >= card.view_threshold)
    per_anatomy = {
        a: round(float(np.mean(guess_a[truth_a == i] == i)), 4)
        for i, a in enumerate(ANATOMIES)
        if (truth_a == i).any()
    }
    return {
        "images": len(rows),
        "anatomy_accuracy": round(float(np.mean(guess_a == truth_a)), 4),
        "anatomy_accuracy_by_class": per_anatomy,
        "anatomy_confidently_wrong": round(float(np.mean(wrong_a)), 4),
        "view_accuracy": round(float(np.mean(guess_v == truth_v)), 4),
        "view_confidently_wrong": round(float(np.mean(wrong_v)), 4),
    }


def fit_image_check(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    commit = git_commit()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = read_rows(args.data)
    counts = Counter((r.anatomy, r.implant) for r in rows)
    log.info("image check: %d images %s", len(rows), dict(sorted(counts.items())))
    x = load_inputs(rows, args.size, args.workers)
    y = targets(rows)
    train_index, val_index = _split(rows, args.val_share, args.seed)
    stub = _card_stub(args.size)
    model = build_backbone(args.backbone, stub.outputs)
    if args.init is not None:  # fine-tune an earlier image check (same backbone and heads)
        model.load_state_dict(torch.load(args.init / IMAGE_CHECK_FILE, weights_only=True))
    args.out.mkdir(parents=True, exist_ok=True)
    context = init_distributed(prefer_cuda=args.device != "cpu")
    settings = FitSettings(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        patience=args.patience,
        seed=args.seed,
        augmentation=Augmentation(rotation_deg=35.0, zoom=0.25, shift=0.1, noise=0.35),
    )
    if args.epochs > 0:
        fit_network(
            model,
            x,
            y,
            torch.as_tensor(train_index),
            torch.as_tensor(val_index),
            loss_fn,
            settings,
            args.out / "checkpoint.pt",
            resume=args.resume,
            context=context,
            name="image-check",
        )
    elif args.init is None:
        raise ValueError("--epochs 0 chooses thresholds for the weights of --init: give --init")
    model.cpu()
    if args.threshold_data:
        # A calibration set of its own (never trained on): thresholds and figures from it.
        val_rows = read_rows(args.threshold_data)
        logits = predict_logits(
            model, load_inputs(val_rows, args.size, args.workers), torch.device("cpu")
        )
        split = "calibration sets (thresholds chosen here): " + ", ".join(
            str(f) for f in args.threshold_data
        )
    else:
        logits = predict_logits(model, x[val_index], torch.device("cpu"))
        val_rows = [rows[i] for i in val_index]
        split = "validation patients (thresholds chosen here)"
    _, _, implant = split_logits(logits, stub)
    thresholds, figures = choose_thresholds(
        val_rows, torch.sigmoid(implant).numpy(), args.min_sensitivity
    )
    anatomy_threshold, view_threshold = choose_head_thresholds(
        val_rows, logits, stub, args.max_contradiction
    )
    stub = stub.model_copy(
        update={"anatomy_threshold": anatomy_threshold, "view_threshold": view_threshold}
    )
    metrics = {
        "split": split,
        "patients": {
            "train": len({rows[i].patient for i in train_index}),
            "val": len({r.patient for r in val_rows}),
        },
        "heads": _head_accuracy(val_rows, logits, stub),
        "implant": figures,
    }
    weights = args.out / IMAGE_CHECK_FILE
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, weights)
    fingerprint = hashlib.sha256(
        b"".join(
            (folder / "manifest.csv").read_bytes()
            for folder in [*args.data, *(args.threshold_data or [])]
        )
    ).hexdigest()
    card = ImageCheckCard(
        version=args.version,
        demo=not args.not_demo,
        backbone=args.backbone,
        input_size=args.size,
        anatomies=list(ANATOMIES),
        views=list(VIEWS),
        implants=list(IMPLANTS),
        implant_thresholds=thresholds,
        anatomy_threshold=anatomy_threshold,
        view_threshold=view_threshold,
        metrics=metrics,
        training=training_record(
            args,
            data_fingerprint=fingerprint,
            commit=commit,
            started=started,
            processes=context.world,
            device=str(context.device),
        ),
        model_sha256=sha256_file(weights),
    )
    (args.out / "card.json").write_text(card.model_dump_json(indent=2) + "\n")
    (args.out / "checkpoint.pt").unlink(missing_ok=True)
    return {"out": str(args.out), **metrics}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train image-check",
        add_help=add_help,
        description="Train the image check (anatomy, view, implant present) on phantom sets "
        "of every task (synth --implant mixed, and --task other).",
    )
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="manifest folders")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    parser.add_argument("--size", type=int, default=192, help="input side, pixels")
    parser.add_argument("--backbone", default="orthonode_cnn")
    parser.add_argument(
        "--epochs", type=int, default=30, help="0: only choose the thresholds of --init's weights"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--patience", type=int, default=8)
    parser.add_argument("--val-share", type=float, default=0.2, help="share of patients")
    parser.add_argument(
        "--min-sensitivity",
        type=float,
        default=0.995,
        help="share of validation implant images the implant threshold keeps",
    )
    parser.add_argument(
        "--max-contradiction",
        type=float,
        default=0.002,
        help="share of validation implant images whose true anatomy or view the check may "
        "contradict at its thresholds (chosen from 0.5 up)",
    )
    parser.add_argument(
        "--init", type=Path, default=None, help="start from this image check bundle's weights"
    )
    parser.add_argument(
        "--threshold-data",
        type=Path,
        nargs="+",
        default=None,
        help="choose the thresholds on these manifest folders (a calibration set never "
        "trained on) instead of the validation patients",
    )
    parser.add_argument("--version", default="0.1.0-demo")
    parser.add_argument("--not-demo", action="store_true", help="trained on clinical data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="processes reading images")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--resume", action="store_true", help="continue from checkpoint.pt")
    return parser


def main(args: argparse.Namespace) -> int:
    return run_command("image-check", lambda: fit_image_check(args))
