"""Labelled data for training: the dataset formats, patient-level splits, and image loading.

Two formats (docs/training.md):

* a folder with ``manifest.csv`` as ``python -m train synth`` writes it — one row per image with
  at least ``path``, ``patient_id``, ``study_instance_uid``, ``sop_instance_uid``, ``task``,
  ``view``, ``label``; ``mask_path`` (implant mask PNG) enables the region-of-interest stage;
* a folder of DICOM files plus a labels CSV (``--labels``) with a ``label`` column and one of
  ``study_instance_uid`` or ``patient_id`` (``path`` or ``sop_instance_uid`` for per-image
  labels). The task and view come from the node's own routing rules (``dicom_node.route``), so
  an image is used for training exactly when the node would analyse it.

Images go through the node's preprocessing (:class:`dicom_node.preprocess.Preprocessing`, built
from the same card fields by :func:`~dicom_node.preprocess.build_preprocessing`) — the same MONAI
composition — so training and serving cannot drift apart.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from PIL import Image

from dicom_node.config import Config
from dicom_node.models.localiser import STRIDE
from dicom_node.preprocess import RoiSettings, build_preprocessing, resize_pad
from dicom_node.route import route
from dicom_node.tasks import TaskSpec, builtin_task

__all__ = [
    "LabelledSet",
    "Loaded",
    "Sample",
    "kfold_patients",
    "load_images",
    "mask_target",
    "read_dataset",
    "split_patients",
]

log = logging.getLogger(__name__)

_REQUIRED_COLUMNS = (
    "path",
    "patient_id",
    "study_instance_uid",
    "sop_instance_uid",
    "task",
    "view",
    "label",
)


@dataclass(frozen=True)
class Sample:
    """One labelled image."""

    path: Path
    patient_id: str
    study_instance_uid: str
    sop_instance_uid: str
    view: str  # "AP" or "LAT"
    label_index: int
    laterality: str | None = None
    mask_path: Path | None = None


@dataclass(frozen=True)
class LabelledSet:
    """A task's labelled images and a fingerprint of what was read."""

    task: str
    classes: tuple[str, ...]
    samples: tuple[Sample, ...]
    fingerprint: str  # sha256 of the manifest (or of the labels CSV and file list)

    @property
    def views(self) -> list[str]:
        """The views present, AP first."""
        return sorted({s.view for s in self.samples}, key=lambda v: (v != "AP", v))

    @property
    def has_masks(self) -> bool:
        return all(s.mask_path is not None for s in self.samples)


def read_dataset(
    data: Path,
    labels: Path | None = None,
    config: Config | None = None,
    classes: Sequence[str] | None = None,
) -> LabelledSet:
    """Read a manifest folder, or a DICOM folder with a labels CSV.

    Raises
    ------
    ValueError
        When the folder has no manifest and no labels CSV is given, a label is not one of the
        task's classes, the set mixes tasks, or nothing usable was found.
    """
    manifest = data / "manifest.csv"
    if labels is None:
        if not manifest.is_file():
            raise ValueError(
                f"{data} has no manifest.csv: pass --labels LABELS.csv for a DICOM folder "
                "(docs/training.md)"
            )
        return _from_manifest(data, manifest, config, classes)
    return _from_labels(data, labels, config or Config(), classes)


def _class_names(
    task: str, config: Config | None, classes: Sequence[str] | None
) -> tuple[str, ...]:
    """The task's class names in output order: a bundle's (``classes``) when given, else its
    spec's."""
    if classes is not None:
        return tuple(classes)
    return tuple(c.name for c in task_spec(task, config).classes)


def task_spec(task: str, config: Config | None = None) -> TaskSpec:
    """The spec of ``task``: from ``config`` (``tasks.<name>.spec``) when it has the task,
    else the built-in one; ValueError naming the fix for a task that is neither."""
    if config is not None and task in config.tasks:
        return config.spec(task)
    return builtin_task(task)


def _from_manifest(
    data: Path,
    manifest: Path,
    config: Config | None = None,
    classes: Sequence[str] | None = None,
) -> LabelledSet:
    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{manifest} lists no images")
    missing = [c for c in _REQUIRED_COLUMNS if c not in rows[0]]
    if missing:
        raise ValueError(f"{manifest} lacks the column(s) {missing} (docs/training.md)")
    views = {r["view"] for r in rows} - {"AP", "LAT"}
    if views:
        raise ValueError(f"{manifest}: views must be AP or LAT, found {sorted(views)}")
    # Phantoms without the task's implant (synth --implant none|other|cut|mixed) teach and
    # test the image check, not the classifier: they have no class.
    rows = [r for r in rows if (r.get("implant") or "present") == "present"]
    if not rows:
        raise ValueError(
            f"{manifest} has no image with the task's implant (implant column); sets without "
            "one are for `python -m train evaluate --applicability` and `train image-check`"
        )
    tasks = {r["task"] for r in rows}
    if len(tasks) != 1:
        raise ValueError(f"{manifest} mixes tasks {sorted(tasks)}; train one task at a time")
    task = tasks.pop()
    names = _class_names(task, config, classes)
    samples = []
    for row in rows:
        if row["label"] not in names:
            raise ValueError(f"{manifest}: label {row['label']!r} is not a {task} class {names}")
        mask = row.get("mask_path") or ""
        samples.append(
            Sample(
                path=data / row["path"],
                patient_id=row["patient_id"],
                study_instance_uid=row["study_instance_uid"],
                sop_instance_uid=row["sop_instance_uid"],
                view=row["view"],
                label_index=names.index(row["label"]),
                laterality=row.get("laterality") if row.get("laterality") in ("R", "L") else None,
                mask_path=data / mask if mask else None,
            )
        )
    fingerprint = hashlib.sha256(manifest.read_bytes()).hexdigest()
    return LabelledSet(task, names, tuple(samples), fingerprint)


def _from_labels(
    data: Path, labels: Path, config: Config, classes: Sequence[str] | None = None
) -> LabelledSet:
    with labels.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    keys = [
        k
        for k in ("path", "sop_instance_uid", "study_instance_uid", "patient_id")
        if rows and k in rows[0]
    ]
    if not rows or "label" not in rows[0] or not keys:
        raise ValueError(
            f"{labels} needs a 'label' column and one of path, sop_instance_uid, "
            "study_instance_uid, patient_id"
        )
    by_key = {(key, row[key]): row["label"] for row in rows for key in keys if row.get(key)}
    digest = hashlib.sha256(labels.read_bytes())
    found: list[tuple[str, Sample, str]] = []
    skipped = not_dicom = no_patient = 0
    for path in sorted(p for p in data.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError):
            not_dicom += 1
            continue
        tags = {
            k: ds.get(k, "")
            for k in (
                "Modality",
                "BodyPartExamined",
                "ViewPosition",
                "SeriesDescription",
                "ProtocolName",
                "ImageLaterality",
                "Laterality",
            )
        }
        routed = route(tags, config.routing.rules)
        relative = path.relative_to(data).as_posix()
        identifiers = {
            "path": relative,
            "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
            "study_instance_uid": str(ds.get("StudyInstanceUID", "")),
            "patient_id": str(ds.get("PatientID", "")),
        }
        label = next(
            (by_key[(k, identifiers[k])] for k in keys if (k, identifiers[k]) in by_key), None
        )
        if routed is None or label is None:
            skipped += 1
            continue
        digest.update(relative.encode())
        no_patient += not identifiers["patient_id"]
        sample = Sample(
            path=path,
            patient_id=identifiers["patient_id"] or identifiers["study_instance_uid"],
            study_instance_uid=identifiers["study_instance_uid"],
            sop_instance_uid=identifiers["sop_instance_uid"],
            view=routed.view,
            label_index=-1,
            laterality=routed.laterality,
        )
        found.append((routed.task, sample, label))
    tasks = {task for task, _, _ in found}
    if len(tasks) != 1:
        raise ValueError(
            f"{data}: found {len(found)} labelled images the routing rules match, of tasks "
            f"{sorted(tasks)}; train one task at a time"
        )
    task = tasks.pop()
    names = _class_names(task, config, classes)
    samples = []
    for _, sample, label in found:
        if label not in names:
            raise ValueError(f"{labels}: label {label!r} is not a {task} class {names}")
        samples.append(replace(sample, label_index=names.index(label)))
    log.info(
        "%s: %d labelled images; skipped %d files that are not DICOM and %d unrouted or unlabelled",
        data,
        len(samples),
        not_dicom,
        skipped,
    )
    if no_patient:
        log.warning(
            "%d images have no PatientID: each study counts as its own patient, so one "
            "patient's studies may fall into different splits",
            no_patient,
        )
    return LabelledSet(task, names, tuple(samples), digest.hexdigest())


def _patient_classes(patients: Sequence[str], labels: Sequence[int]) -> dict[int, list[str]]:
    by_class: dict[int, list[str]] = {}
    for patient, label in sorted(set(zip(patients, labels, strict=True))):
        by_class.setdefault(label, []).append(patient)
    return by_class


def split_patients(
    patients: Sequence[str], labels: Sequence[int], fractions: Sequence[float], seed: int
) -> dict[str, str]:
    """Patient → "train" | "val" | "test", stratified by class, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    assignment = {}
    for members in _patient_classes(patients, labels).values():
        order = [members[i] for i in rng.permutation(len(members))]
        n_val = round(fractions[1] * len(order))
        n_test = round(fractions[2] * len(order))
        for i, patient in enumerate(order):
            assignment[patient] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    return assignment


def kfold_patients(
    patients: Sequence[str],
    labels: Sequence[int],
    folds: int,
    fold: int,
    val_fraction: float,
    seed: int,
) -> dict[str, str]:
    """Fold ``fold`` of a stratified patient-level k-fold: that fold is the test split, and
    ``val_fraction`` of the other patients (stratified) the validation split."""
    if not 0 <= fold < folds:
        raise ValueError(f"fold {fold} is not in 0..{folds - 1}")
    rng = np.random.default_rng(seed)
    assignment = {}
    for members in _patient_classes(patients, labels).values():
        order = [members[i] for i in rng.permutation(len(members))]
        test = set(order[fold::folds])
        rest = [p for p in order if p not in test]
        n_val = round(val_fraction * len(rest))
        for i, patient in enumerate(rest):
            assignment[patient] = "val" if i < n_val else "train"
        assignment.update(dict.fromkeys(test, "test"))
    return assignment


def mask_target(mask: np.ndarray, size: int) -> torch.Tensor:
    """A (1, size/STRIDE, size/STRIDE) 0/1 target: cells the implant mask touches.

    The mask goes through the same resize and pad as the image, then a max over each cell, so
    thin screws still mark their cells.
    """
    square = torch.from_numpy(resize_pad((mask > 0).astype(np.float32), size))
    cells = F.max_pool2d(square[None, None], STRIDE)[0]
    return (cells > 0.05).float()


@dataclass
class Loaded:
    """Images of a set, ready for the networks (row i is ``samples[i]``)."""

    inputs: torch.Tensor | None  # (N, C, S, S) classifier inputs (whole images), or None
    displays: list[np.ndarray] | None  # float32 displayed images, kept for cropping
    whole: torch.Tensor | None  # (N, 1, R, R) localiser inputs
    masks: torch.Tensor | None  # (N, 1, R/8, R/8) localiser targets


def _load_one(
    sample: Sample,
    size: int,
    channels: int,
    normalisation: str,
    roi_size: int | None,
) -> tuple[torch.Tensor | None, np.ndarray | None, torch.Tensor | None, torch.Tensor | None]:
    roi = None if roi_size is None else RoiSettings(input_size=roi_size)
    preprocessing = build_preprocessing(size, channels, normalisation, roi)
    try:
        display = preprocessing.display(pydicom.dcmread(sample.path))
    except Exception as error:  # any decoder's error, named with the file
        raise ValueError(f"{sample.path}: cannot read the image: {error}") from error
    if roi_size is None:
        tensor, _ = preprocessing(display)
        return tensor, None, None, None
    whole = preprocessing.localiser_input(display)
    target = None
    if sample.mask_path is not None:
        target = mask_target(np.asarray(Image.open(sample.mask_path)), roi_size)
    return None, display, whole, target


def load_images(
    samples: Sequence[Sample],
    *,
    size: int,
    channels: int,
    normalisation: str,
    roi_size: int | None = None,
    workers: int = 1,
) -> Loaded:
    """Read and preprocess every sample (in ``workers`` processes) with the
    :class:`~dicom_node.preprocess.Preprocessing` of these card fields — the node's.

    Without ``roi_size``: the classifier inputs of the whole images. With it: the displayed
    images (to crop once the localiser is trained, :func:`train.roi.crop_inputs`), the
    localiser inputs and, where the samples have masks, the localiser targets.
    """
    arguments = [(s, size, channels, normalisation, roi_size) for s in samples]
    results: Iterable[
        tuple[torch.Tensor | None, np.ndarray | None, torch.Tensor | None, torch.Tensor | None]
    ]
    if workers > 1:
        with ProcessPoolExecutor(workers, initializer=_one_thread) as pool:
            results = list(pool.map(_load_star, arguments, chunksize=8))
    else:
        results = [_load_one(*a) for a in arguments]
    inputs, displays, whole, masks = zip(*results, strict=True) if arguments else ([], [], [], [])
    if roi_size is None:
        return Loaded(torch.stack(list(inputs)), None, None, None)
    have_masks = all(m is not None for m in masks)
    return Loaded(
        inputs=None,
        displays=list(displays),
        whole=torch.stack(list(whole)),
        masks=torch.stack(list(masks)) if have_masks else None,
    )


def _one_thread() -> None:
    torch.set_num_threads(1)  # the pool's processes share the cores


def _load_star(
    arguments: tuple[Sample, int, int, str, int | None],
) -> tuple[torch.Tensor | None, np.ndarray | None, torch.Tensor | None, torch.Tensor | None]:
    return _load_one(*arguments)
