"""``python -m train lr-find``: the learning-rate range test the knee study chose its rate with.

The learning rate grows exponentially from ``--start`` to ``--end`` over ``--steps`` training
batches (augmented, class-weighted loss, AdamW, as ``fit``); the smoothed loss is recorded and
plotted. The suggestion is the rate at the steepest descent of the smoothed loss, capped at a
tenth of the rate where the loss is lowest (Smith 2017; fastai's rule). The model is discarded:
pass the suggestion to ``python -m train fit --lr``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from dicom_node.models.backbones import build_backbone
from train.cli import run_command
from train.data import load_images, read_dataset, split_patients
from train.engine import Augmentation, augment_batch, input_format

__all__ = ["get_args_parser", "main", "range_test", "suggest"]


def suggest(rates: np.ndarray, losses: np.ndarray) -> float:
    """The rate at the steepest descent of the loss, at most a tenth of the minimum's rate."""
    log_rates = np.log10(rates)
    slope = np.gradient(losses, log_rates)
    lowest = int(np.argmin(losses))
    steepest = int(np.argmin(slope[: max(lowest, 1)]))
    return float(min(rates[steepest], rates[lowest] / 10))


def range_test(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    start: float,
    end: float,
    steps: int,
    batch_size: int,
    seed: int,
    weight: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Learning rates and smoothed losses of an exponential range test (stops on divergence)."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=start, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    factor = (end / start) ** (1 / max(steps - 1, 1))
    rates, losses = [], []
    smoothed, best = 0.0, math.inf
    model.train()
    for step in range(steps):
        rate = start * factor**step
        for group in optimiser.param_groups:
            group["lr"] = rate
        index = torch.randint(len(x), (batch_size,), generator=generator)
        inputs, _ = augment_batch(x[index], generator, None, Augmentation())
        optimiser.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs), y[index])
        loss.backward()
        optimiser.step()
        smoothed = 0.9 * smoothed + 0.1 * loss.item()
        value = smoothed / (1 - 0.9 ** (step + 1))  # bias-corrected moving average
        rates.append(rate)
        losses.append(value)
        best = min(best, value)
        if value > 4 * best and step > 10:  # diverged: the rest says nothing
            break
    return np.array(rates), np.array(losses)


def _plot(rates: np.ndarray, losses: np.ndarray, suggestion: float, path: Path) -> None:
    figure = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(rates, losses)
    axes.axvline(suggestion, color="tab:red", linestyle="--", label=f"suggested {suggestion:.2g}")
    axes.set_xscale("log")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss (smoothed)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    dataset = read_dataset(args.data, args.labels)
    normalisation, channels = input_format(args.backbone)
    patients = [s.patient_id for s in dataset.samples]
    labels = [s.label_index for s in dataset.samples]
    split = split_patients(patients, labels, (0.75, 0.15, 0.10), args.seed)
    train = [i for i, p in enumerate(patients) if split[p] == "train"]
    samples = [dataset.samples[i] for i in train]
    loaded = load_images(
        samples,
        size=args.size,
        channels=channels,
        normalisation=normalisation,
        workers=args.workers,
    )
    assert loaded.inputs is not None
    y = torch.tensor([s.label_index for s in samples])
    counts = np.bincount(y.numpy(), minlength=len(dataset.classes)).astype(np.float32)
    weight = torch.from_numpy(counts.sum() / np.maximum(counts, 1) / len(dataset.classes))
    model = build_backbone(args.backbone, len(dataset.classes))
    if args.pretrained:
        model.load_state_dict(
            torch.load(args.pretrained, map_location="cpu", weights_only=True), strict=False
        )
    rates, losses = range_test(
        model,
        loaded.inputs,
        y,
        start=args.start,
        end=args.end,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        weight=weight,
    )
    suggestion = suggest(rates, losses)
    args.out.mkdir(parents=True, exist_ok=True)
    _plot(rates, losses, suggestion, args.out / "lr-find.png")
    result = {
        "task": dataset.task,
        "backbone": args.backbone,
        "suggested_lr": float(f"{suggestion:.3g}"),
        "lowest_loss_lr": float(f"{rates[int(np.argmin(losses))]:.3g}"),
        "steps": len(rates),
        "plot": str(args.out / "lr-find.png"),
    }
    (args.out / "lr-find.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train lr-find",
        add_help=add_help,
        description="Learning-rate range test (on the training split; writes lr-find.png).",
    )
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--labels", type=Path, default=None)
    parser.add_argument("--out", type=Path, required=True, help="folder for the plot and JSON")
    parser.add_argument("--backbone", default="orthonode_cnn")
    parser.add_argument("--pretrained", type=Path, default=None)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--start", type=float, default=1e-5)
    parser.add_argument("--end", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    return parser


def main(args: argparse.Namespace) -> int:
    return run_command("lr-find", lambda: run(args))
