"""The training loop shared by the classifier and the localiser (torchvision-reference style).

:func:`train_one_epoch` and :func:`fit_network` (best epoch by validation loss, early stopping,
a checkpoint after every epoch for ``--resume``), MONAI augmentation, AMP (bfloat16 autocast)
and channels_last on CUDA, and DistributedDataParallel when started by ``torchrun``: every rank
trains on its shard of each epoch's permutation; rank 0 validates, checkpoints and exports.
:func:`input_format` says how each backbone's inputs are normalised.

It is one file because every part works on the same batches under the same device, AMP and
DDP settings; split, the loop's invariants would be spread over several modules.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
)
from torch import nn
from tqdm import tqdm

__all__ = [
    "NORMALISATION",
    "Augmentation",
    "DistributedContext",
    "FitSettings",
    "Guidance",
    "augment_batch",
    "fit_network",
    "fit_temperature",
    "init_distributed",
    "input_format",
    "outside_share",
    "predict_logits",
    "train_one_epoch",
]

log = logging.getLogger(__name__)

#: backbone → (normalisation, channels); others: ImageNet statistics, 3 channels.
NORMALISATION = {"orthonode_cnn": ("standardise", 1), "orthonode_cnn16": ("standardise", 1)}


def input_format(backbone: str) -> tuple[str, int]:
    """(normalisation, channels) of ``backbone``'s inputs, as its card records them."""
    return NORMALISATION.get(backbone, ("imagenet", 3))


@dataclass(frozen=True)
class Augmentation:
    """Ranges of the random training transformations (each drawn per image).

    The defaults cover more than one site's acquisition differs from another's: in-plane
    rotation, magnification and detector pitch (zoom), positioning (shift), the tone curve
    (gamma), contrast (gain) and quantum noise.
    """

    rotation_deg: float = 25.0
    zoom: float = 0.18  # ± share
    shift: float = 0.06  # ± share of the side
    flip: bool = True  # left-right; the anatomy of every task allows it (laterality is a tag)
    gamma: float = 0.4  # log-uniform in exp(±gamma)
    gain: float = 0.15  # ± share
    noise: float = 0.25  # up to this many standard deviations of the image


@functools.lru_cache(maxsize=16)
def _pipeline(settings: Augmentation, shape: tuple[int, int], with_target: bool) -> Compose:
    """The MONAI dictionary transforms for one input size (grids cached per size)."""
    keys = ["image", "target"] if with_target else ["image"]
    modes = ["bilinear", "nearest"][: len(keys)]
    transforms: list[Any] = [
        RandAffined(
            keys,
            prob=1.0,
            rotate_range=(math.radians(settings.rotation_deg),),
            scale_range=(settings.zoom, settings.zoom),
            translate_range=(settings.shift * shape[0], settings.shift * shape[1]),
            mode=modes,
            padding_mode="zeros",
            spatial_size=shape,
            cache_grid=True,
        )
    ]
    if settings.flip:
        transforms.append(RandFlipd(keys, prob=0.5, spatial_axis=1))
    transforms += [
        RandAdjustContrastd(
            "image", prob=1.0, gamma=(math.exp(-settings.gamma), math.exp(settings.gamma))
        ),
        RandScaleIntensityd("image", prob=1.0, factors=settings.gain),
        RandGaussianNoised("image", prob=1.0, mean=0.0, std=settings.noise),
    ]
    return Compose(transforms)


def augment_batch(
    batch: torch.Tensor,
    generator: torch.Generator,
    targets: torch.Tensor | None = None,
    settings: Augmentation = Augmentation(),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Randomly transform a (N, C, H, W) batch with MONAI; map targets (N, 1, h, w) move with it.

    Per image: ``RandAffined`` (rotation, zoom, shift; the target with nearest-neighbour
    sampling, at the image's resolution and pooled back), ``RandFlipd`` (left-right),
    ``RandAdjustContrastd`` (gamma), ``RandScaleIntensityd`` (contrast) and
    ``RandGaussianNoised`` (noise of a random spread). With cached grids this costs about 11 ms
    per 384 px image on one core. The area outside the moved image is the image's minimum (dark,
    as past a crop's edge), and each result has its input's mean and standard deviation, so it
    stays in the normalisation the network expects. The random draws follow ``generator``.
    """
    shape = (int(batch.shape[-2]), int(batch.shape[-1]))
    cells = (int(targets.shape[-2]), int(targets.shape[-1])) if targets is not None else shape
    pipeline = _pipeline(settings, shape, targets is not None)
    pipeline.set_random_state(seed=int(torch.randint(2**31 - 1, (1,), generator=generator)))
    images, moved_maps = [], []
    for i in range(batch.shape[0]):
        image = batch[i]
        low = image.min()
        item: dict[str, torch.Tensor] = {"image": image - low}
        if targets is not None:
            item["target"] = nn.functional.interpolate(
                targets[i : i + 1], size=shape, mode="nearest"
            )[0]
        out = pipeline(item)
        result = torch.as_tensor(out["image"]).float() + low
        mean, std = image.mean(), image.std().clamp_min(1e-6)
        result = (result - result.mean()) / result.std().clamp_min(1e-6) * std + mean
        images.append(result)
        if targets is not None:
            moved = torch.as_tensor(out["target"]).float()[None]
            moved_maps.append(
                # A cell at least a third covered is on: areas keep their size, thin
                # structures survive a rotation between cells.
                nn.functional.adaptive_avg_pool2d(moved, cells)[0].gt(0.33).float()
            )
    return torch.stack(images), torch.stack(moved_maps) if targets is not None else None


@dataclass(frozen=True)
class DistributedContext:
    """Where this process trains: its rank among ``world`` processes, and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(prefer_cuda: bool = True) -> DistributedContext:
    """Join the process group ``torchrun`` describes (NCCL on CUDA, gloo on CPU), or run alone."""
    cuda = prefer_cuda and torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedContext(device=torch.device("cuda" if cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    return DistributedContext(rank=dist.get_rank(), world=dist.get_world_size(), device=device)


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if device.type == "cuda" and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def predict_logits(
    model: nn.Module, x: torch.Tensor, device: torch.device | None = None, batch: int = 64
) -> torch.Tensor:
    """Logits of ``model`` (eval mode, no augmentation) on CPU, in ``batch``-sized chunks."""
    device = device or next(model.parameters()).device
    model.eval()
    outputs = []
    with torch.no_grad(), _autocast(device):
        for start in range(0, len(x), batch):
            outputs.append(model(_to_device(x[start : start + batch], device)).float().cpu())
    return torch.cat(outputs) if outputs else torch.zeros(0)


def _autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
    )


def train_one_epoch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    order: torch.Tensor,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimiser: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler | None,
    batch_size: int,
    generator: torch.Generator,
    augmentation: Augmentation | None,
    context: DistributedContext,
    progress: bool = False,
    guidance: Guidance | None = None,
) -> float:
    """One pass over ``order`` (this rank's shard of it); the mean training loss.

    With ``guidance``, the loss also counts the share of the guided layer's activation that lies
    outside each image's implant mask (see :class:`Guidance`).
    """
    model.train()
    captured: list[torch.Tensor] = []
    hook = None
    if guidance is not None:
        hook = guidance.layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    shard = order[context.rank :: context.world]
    batches = len(order) // context.world // batch_size + bool(
        len(order) // context.world % batch_size
    )
    total, seen = 0.0, 0
    steps = range(batches)
    for step in tqdm(steps, disable=not progress, leave=False, desc="batches"):
        index = shard[step * batch_size : (step + 1) * batch_size]
        if len(index) == 0:  # every rank must step the same number of times
            index = shard[:batch_size]
        inputs, targets = x[index], y[index]
        masks = guidance.masks[index] if guidance is not None else None
        if augmentation is not None:
            maps = targets if targets.ndim == 4 else masks
            inputs, moved = augment_batch(inputs, generator, maps, augmentation)
            if targets.ndim == 4:
                targets = moved if moved is not None else targets
            else:
                masks = moved
        inputs, targets = _to_device(inputs, context.device), targets.to(context.device)
        optimiser.zero_grad(set_to_none=True)
        captured.clear()
        with _autocast(context.device):
            loss = loss_fn(model(inputs).float(), targets)
            if guidance is not None and masks is not None and captured:
                outside = outside_share(captured[-1].float(), masks.to(context.device))
                loss = loss + guidance.weight * outside
        loss.backward()
        optimiser.step()
        if schedule is not None:
            schedule.step()
        total += loss.item() * len(index)
        seen += len(index)
    if hook is not None:
        hook.remove()
    return total / max(seen, 1)


@dataclass(frozen=True)
class Guidance:
    """Attention guidance: penalise activation of ``layer`` outside the implant ``masks``.

    Grad-CAM draws its heatmap from the activations of one layer; a network whose activations
    lie on the implant explains itself on the implant. During training the loss adds ``weight``
    times the share of that layer's (non-negative) activation outside each image's mask — a
    form of attention supervision from segmentation masks (as in GAIN, Li et al. 2018, "Tell me
    where to look"). Needs masks; the phantoms have them.
    """

    layer: nn.Module
    masks: torch.Tensor  # (N, 1, h, w) 0/1, any resolution; pooled to the layer's
    weight: float = 1.0


def outside_share(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean share of each image's activation mass outside its mask (cells the mask touches
    count as inside)."""
    inside = nn.functional.adaptive_max_pool2d(masks, features.shape[-2:])
    energy = features.clamp_min(0).sum(dim=1, keepdim=True)
    total = energy.sum(dim=(1, 2, 3)).clamp_min(1e-6)
    return ((energy * (1 - inside)).sum(dim=(1, 2, 3)) / total).mean()


@dataclass(frozen=True)
class FitSettings:
    """How :func:`fit_network` trains (from the command line)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 1e-4
    patience: int = 25
    seed: int = 0
    progress: bool = False
    augmentation: Augmentation | None = Augmentation()


def fit_network(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    train_index: torch.Tensor,
    val_index: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    settings: FitSettings,
    checkpoint: Path,
    *,
    resume: bool = False,
    context: DistributedContext | None = None,
    name: str = "model",
    guidance: Guidance | None = None,
) -> dict[str, torch.Tensor]:
    """Train with AdamW and a one-cycle cosine schedule; return the best state by val loss.

    After each epoch rank 0 writes ``checkpoint`` (model, optimiser, schedule, epoch, best);
    ``resume`` continues from it. Training stops early after ``settings.patience`` epochs
    without a better validation loss.
    """
    context = context or DistributedContext()
    model.to(context.device)
    if context.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    network: nn.Module = model
    if context.world > 1:
        network = nn.parallel.DistributedDataParallel(
            model, device_ids=[context.device.index] if context.device.type == "cuda" else None
        )
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    per_rank = len(train_index) // context.world
    steps_per_epoch = max(1, per_rank // settings.batch_size + bool(per_rank % settings.batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=settings.lr, total_steps=settings.epochs * steps_per_epoch
    )
    start, best, stale = 0, math.inf, 0
    best_state: dict[str, torch.Tensor] | None = None
    if resume and checkpoint.is_file():
        saved: dict[str, Any] = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(saved["model"])
        optimiser.load_state_dict(saved["optimiser"])
        schedule.load_state_dict(saved["schedule"])
        start, best, best_state, stale = (
            saved["epoch"] + 1,
            saved["best"],
            saved["best_state"],
            saved["stale"],
        )
        if saved.get("finished"):
            log.info("%s: finished in the checkpoint; not trained again", name)
            model.load_state_dict(saved["best_state"])
            return saved["best_state"]
        log.info("%s: resuming at epoch %d", name, start + 1)
    generator = torch.Generator().manual_seed(settings.seed)
    for _ in range(start):  # the same permutations and draws as an uninterrupted run
        torch.randperm(len(train_index), generator=generator)
    for epoch in range(start, settings.epochs):
        order = train_index[torch.randperm(len(train_index), generator=generator)]
        epoch_generator = torch.Generator().manual_seed(settings.seed * 100_003 + epoch)
        train_loss = train_one_epoch(
            network,
            x,
            y,
            order,
            loss_fn=loss_fn,
            optimiser=optimiser,
            schedule=schedule,
            batch_size=settings.batch_size,
            generator=epoch_generator,
            augmentation=settings.augmentation,
            context=context,
            progress=settings.progress and context.main,
            guidance=guidance,
        )
        val_logits = predict_logits(model, x[val_index], context.device)
        val_loss = float(loss_fn(val_logits, y[val_index]))
        if context.world > 1:
            # Ranks' BatchNorm statistics differ a little: rank 0's loss decides for all, so
            # every rank stops at the same epoch (a rank left in a forward pass would hang).
            shared = torch.tensor([val_loss], device=context.device)
            dist.broadcast(shared, src=0)
            val_loss = float(shared.item())
        if val_loss < best:
            best, stale = val_loss, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
        if context.main:
            log.info(
                "%s epoch %d/%d train loss %.4f val loss %.4f%s",
                name,
                epoch + 1,
                settings.epochs,
                train_loss,
                val_loss,
                " *" if stale == 0 else "",
            )
            _save_atomically(
                {
                    "model": model.state_dict(),
                    "optimiser": optimiser.state_dict(),
                    "schedule": schedule.state_dict(),
                    "epoch": epoch,
                    "best": best,
                    "best_state": best_state,
                    "stale": stale,
                    "finished": stale >= settings.patience or epoch + 1 == settings.epochs,
                },
                checkpoint,
            )
        if stale >= settings.patience:
            if context.main:
                log.info("%s: early stop, no better validation loss for %d epochs", name, stale)
            break
    assert best_state is not None, "no epoch was trained"
    model.load_state_dict(best_state)
    return best_state


def _save_atomically(state: dict[str, Any], path: Path) -> None:
    """Write a checkpoint so that a kill mid-write leaves the previous one intact."""
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising the negative log-likelihood of ``labels`` (calibration)."""
    log_t = torch.zeros(1, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100)

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimiser.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))
