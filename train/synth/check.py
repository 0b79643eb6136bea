"""``python -m train synth-check DIR``: is a phantom set hard in the right way?

Two measurements, both on a patient-level split so no patient is in train and test:

(a) a linear probe — logistic regression on 32 × 32 thumbnails — must stay weak: the classes must
    not differ in global brightness, size or position;
(b) a small CNN trained from scratch on the images at 256 px must learn the task: the classes
    must differ in details a model can see.

Bounds: probe accuracy ≤ 0.60 (knee, spine) or AUC ≤ 0.70 (hip); CNN accuracy ≥ 0.90 (knee,
spine; AP + lateral fused per patient) or AUC ≥ 0.90 (hip). The result is printed and written to
``DIR/synth-check.json``; the exit status is 1 when a bound is missed.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from dicom_node.models.backbones import SmallCNN
from dicom_node.preprocess import display_image, resize_pad

__all__ = ["BOUNDS", "CheckResult", "SmallCNN", "get_args_parser", "main", "run_check"]

log = logging.getLogger(__name__)

#: (probe upper bound, CNN lower bound); the metric is accuracy, or AUC for the binary hip task.
BOUNDS: dict[str, tuple[float, float]] = {
    "knee": (0.60, 0.90),
    "spine": (0.60, 0.90),
    "hip": (0.70, 0.90),
}


@dataclass(frozen=True)
class CheckResult:
    task: str
    metric: str
    patients: int
    images: int
    probe: float
    probe_bound: float
    cnn_per_image: float
    cnn: float
    cnn_bound: float
    cnn_epochs: int
    seconds: float

    @property
    def passed(self) -> bool:
        return self.probe <= self.probe_bound and self.cnn >= self.cnn_bound


def _load(directory: Path, size: int) -> tuple[np.ndarray, list[dict[str, str]]]:
    with (directory / "manifest.csv").open() as handle:
        # Only images with the task's implant have a class (``--implant`` may add others).
        rows = [r for r in csv.DictReader(handle) if r.get("implant", "present") == "present"]
    if not rows:
        raise ValueError(f"{directory}/manifest.csv lists no images with the implant present")
    images = np.zeros((len(rows), size, size), dtype=np.float32)
    for i, row in enumerate(rows):
        ds = pydicom.dcmread(directory / row["path"])
        images[i] = resize_pad(display_image(ds), size)
    return images, rows


def _score(task: str, labels: np.ndarray, probabilities: np.ndarray) -> float:
    if task == "hip":
        return float(roc_auc_score(labels, probabilities[:, 1]))
    return float(accuracy_score(labels, probabilities.argmax(axis=1)))


def _probe(
    task: str, thumbs: np.ndarray, labels: np.ndarray, groups: np.ndarray, seed: int
) -> float:
    """Cross-validated (4 patient-level folds) logistic regression on thumbnails."""
    features = thumbs.reshape(len(thumbs), -1)
    probabilities = np.zeros((len(labels), int(labels.max()) + 1))
    folds = StratifiedGroupKFold(n_splits=4, shuffle=True, random_state=seed)
    for train, test in folds.split(features, labels, groups):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=3000))
        model.fit(features[train], labels[train])
        probabilities[test] = model.predict_proba(features[test])
    return _score(task, labels, probabilities)


def _augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flips, small shifts and a contrast jitter (training only)."""
    flip = torch.rand(batch.shape[0], generator=generator) < 0.5
    batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    dy, dx = (int(v) for v in torch.randint(-12, 13, (2,), generator=generator))
    batch = torch.roll(batch, shifts=(dy, dx), dims=(-2, -1))
    gain = 1.0 + 0.2 * (torch.rand(batch.shape[0], 1, 1, 1, generator=generator) - 0.5)
    return batch * gain


def _standardise(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images)[:, None]
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True).clamp_min(1e-3)
    return (x - mean) / std


def train_small_cnn(
    images: np.ndarray,
    labels: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    classes: int,
    epochs: int,
    seed: int,
) -> np.ndarray:
    """Train :class:`SmallCNN` on ``train`` and return softmax probabilities for ``test``."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x = _standardise(images)
    y = torch.from_numpy(labels).long()
    model = SmallCNN(classes)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    batch_size = 32
    steps = epochs * ((len(train) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=steps)
    counts = np.bincount(labels[train], minlength=classes).astype(np.float32)
    weights = torch.from_numpy(counts.sum() / np.maximum(counts, 1.0) / classes)
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=0.05)
    train_index = torch.from_numpy(train)
    for epoch in range(epochs):
        model.train()
        order = train_index[torch.randperm(len(train_index), generator=generator)]
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = _augment(x[idx], generator)
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(model(batch), y[idx])
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(idx)
        log.info("synth-check CNN epoch %d/%d loss %.3f", epoch + 1, epochs, total / len(order))
    model.eval()
    with torch.no_grad():
        logits = torch.cat(
            [model(x[torch.from_numpy(test[i : i + 64])]) for i in range(0, len(test), 64)]
        )
    return torch.softmax(logits, dim=1).numpy()


def run_check(directory: Path, epochs: int = 80, seed: int = 0, size: int = 256) -> CheckResult:
    """Run the probe and the CNN on the set in ``directory``."""
    started = time.perf_counter()
    images, rows = _load(directory, size)
    task = rows[0]["task"]
    labels = np.array([int(r["label_index"]) for r in rows])
    patients = np.array([r["patient_id"] for r in rows])
    _, groups = np.unique(patients, return_inverse=True)
    thumbs = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(images)[:, None], 32)[
        :, 0
    ].numpy()
    probe = _probe(task, thumbs, labels, groups, seed)
    log.info("synth-check %s: linear probe %.3f", task, probe)
    folds = StratifiedGroupKFold(n_splits=4, shuffle=True, random_state=seed)
    train, test = next(folds.split(images, labels, groups))
    classes = int(labels.max()) + 1
    probabilities = train_small_cnn(images, labels, train, test, classes, epochs, seed)
    per_image = _score(task, labels[test], probabilities)
    # Fuse the views of each test patient (mean of probabilities), as the node does.
    test_groups = groups[test]
    fused, fused_labels = [], []
    for g in np.unique(test_groups):
        members = test_groups == g
        fused.append(probabilities[members].mean(axis=0))
        fused_labels.append(labels[test][members][0])
    per_patient = _score(task, np.array(fused_labels), np.array(fused))
    probe_bound, cnn_bound = BOUNDS[task]
    return CheckResult(
        task=task,
        metric="auc" if task == "hip" else "accuracy",
        patients=len(np.unique(groups)),
        images=len(rows),
        probe=round(probe, 4),
        probe_bound=probe_bound,
        cnn_per_image=round(per_image, 4),
        cnn=round(per_patient, 4),
        cnn_bound=cnn_bound,
        cnn_epochs=epochs,
        seconds=round(time.perf_counter() - started, 1),
    )


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train synth-check",
        add_help=add_help,
        description="Measure a phantom set's difficulty: a linear probe on 32x32 thumbnails "
        "must stay weak and a small CNN at 256 px must learn the task.",
    )
    parser.add_argument("directory", type=Path, help="a directory written by train synth")
    parser.add_argument("--epochs", type=int, default=80, help="CNN training epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    return parser


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = run_check(args.directory, epochs=args.epochs, seed=args.seed)
    except (OSError, ValueError) as error:
        sys.stderr.write(f"synth-check: {error}\n")
        return 2
    record: dict[str, Any] = {**asdict(result), "passed": result.passed}
    (args.directory / "synth-check.json").write_text(json.dumps(record, indent=2) + "\n")
    metric = result.metric
    lines = [
        f"task {result.task}: {result.patients} patients, {result.images} images",
        f"  linear probe (32x32, 4-fold, patient split) {metric}: {result.probe:.3f} "
        f"(bound <= {result.probe_bound:.2f})",
        f"  small CNN (256 px, {result.cnn_epochs} epochs) {metric}: per image "
        f"{result.cnn_per_image:.3f}, per patient {result.cnn:.3f} (bound >= "
        f"{result.cnn_bound:.2f})",
        f"  {'PASS' if result.passed else 'FAIL'} in {result.seconds:.0f} s",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0 if result.passed else 1
