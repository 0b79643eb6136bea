"""The phantom generator: write a phantom data set (DICOM files, masks and manifest.csv).

Its command line, ``python -m train synth``, is :mod:`train.synth.command`.

Each patient is generated from its own random stream, seeded by (seed, task, patient index), so a
set is reproducible byte for byte, whatever the number of worker processes. What ``--implant``
adds (whether the implant is drawn, other hardware, a field moved off the implant) is drawn from a
second stream per patient, so a patient with the implant present is the same as before the option
existed, and the same patient without it differs only in what the option changes.

It is one file because it is the one path from options to files on disk: the per-patient
seeding, the rendering jobs, the DICOM headers and the manifest columns must agree.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from train import __version__
from train.synth import hip, knee, other, spine
from train.synth.dicomio import (
    ImageHeader,
    PatientHeader,
    build_dataset,
    derive_uid,
    study_date,
)
from train.synth.xray import Acquisition, Canvas, expose

__all__ = [
    "EXTERNAL",
    "IMPLANTS",
    "MANIFEST_COLUMNS",
    "MIXED_SHARES",
    "TASKS",
    "SynthOptions",
    "generate",
]

log = logging.getLogger(__name__)

TASKS: dict[str, ModuleType] = {"knee": knee, "hip": hip, "spine": spine, "other": other}
_TASK_IDS = {"knee": 1, "hip": 2, "spine": 3, "other": 4}
_KVP = {"knee": (60.0, 70.0), "hip": (75.0, 85.0), "spine": (80.0, 95.0)}
#: ``--implant`` choices; ``mixed`` draws one of the others per patient with MIXED_SHARES.
IMPLANTS: tuple[str, ...] = ("present", "none", "other", "cut", "mixed")
MIXED_SHARES: tuple[tuple[str, float], ...] = (
    ("present", 0.40),
    ("none", 0.20),
    ("other", 0.25),
    ("cut", 0.15),
)
#: A ``cut`` image shows at most this share of the implant's footprint.
CUT_VISIBLE_MAX = 0.05
#: The seed suffix of the second per-patient stream (what ``--implant`` draws).
_VARIANT_STREAM = 104729
#: ``--tags-as other`` writes a chest's tags on images of another task.
_TAGS_OF_OTHER = "chest"

#: Columns every manifest has, in order; task-specific design parameters follow as ``design_*``.
MANIFEST_COLUMNS: tuple[str, ...] = (
    "path",
    "mask_path",
    "patient_id",
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "task",
    "view",
    "label",
    "label_index",
    "laterality",
    "view_position",
    "modality",
    "photometric",
    "transfer_syntax",
    "bits_stored",
    "rows",
    "columns",
    "imager_pixel_spacing_mm",
    "magnification",
    "rotation_deg",
    "shift_x_px",
    "shift_y_px",
    "mirror",
    "exposure",
    "noise",
    "contrast",
    "blur_mm",
    "heel",
    "scatter",
    "anatomy_scale",
    "implant",
    "other_metal",
    "implant_visible",
    "anatomy",
    "tagged_as",
)

EXTERNAL = {  # an "other hospital" acquisition: noisier, flatter, other pixel size and encoding
    "noise": 1.6,
    "contrast": 0.8,
    "spacing_scale": 1.15,
    "photometric": "MONOCHROME1",
    "rotation": 20.0,
    "transfer_syntax": "jpeg2000",
    "modality": "CR",
}


@dataclass(frozen=True)
class SynthOptions:
    """Everything that determines a phantom set (stored as ``synth.json`` beside it)."""

    task: str
    patients: int
    out: Path
    seed: int = 0
    rows: int = 1024
    cols: int = 1024
    modality: str = "DX"
    transfer_syntax: str = "explicit"
    photometric: str = "MONOCHROME2"
    bits_stored: int | None = None  # None: 12, 14 or 16 per patient, as modalities vary
    noise: float = 1.0
    contrast: float = 1.0
    exposure: tuple[float, float] = (0.6, 1.6)
    spacing_scale: float = 1.0
    rotation: float = 15.0
    views: tuple[str, ...] | None = None  # None: the task's views
    loose_fraction: float = 0.5
    lucency_free_fraction: float | None = None  # None: the hip generator's natural mix
    first_patient: int = 0
    workers: int = 1
    implant: str = "present"  # present | none | other | cut | mixed (IMPLANTS)
    tags_as: str | None = None  # write this task's anatomy tags (None: the true task's)
    no_tags: bool = False  # omit the tags that name the body part and the view
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def task_views(self) -> tuple[str, ...]:
        return self.views or TASKS[self.task].VIEWS


@dataclass(frozen=True)
class _Job:
    options: SynthOptions
    index: int
    label: str


def _labels(options: SynthOptions) -> list[str]:
    """Balanced class labels for all patients, shuffled deterministically ("" without classes)."""
    classes = TASKS[options.task].CLASSES
    total = options.first_patient + options.patients
    if not classes:
        return [""] * options.patients
    rng = np.random.default_rng([options.seed, _TASK_IDS[options.task], 7919])
    if options.task == "hip":
        n_loose = round(options.loose_fraction * total)
        labels = ["loose"] * n_loose + ["well-fixed"] * (total - n_loose)
    else:
        labels = [classes[i % len(classes)] for i in range(total)]
    order = rng.permutation(total)
    return [labels[i] for i in order][options.first_patient :]


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list | tuple):
        return ";".join(_fmt(v) for v in value)
    return str(value)


def _patient_header(
    options: SynthOptions, index: int, rng: np.random.Generator, sex: str
) -> PatientHeader:
    task = options.task
    date, tod = study_date(rng)
    year = int(date[:4]) - int(rng.integers(45, 85))
    birth = f"{year}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    key = f"{task.upper()}-S{options.seed}-{index:05d}"
    return PatientHeader(
        patient_name=f"PHANTOM^{task.upper()}^{index:05d}",
        patient_id=f"PH-{key}",
        birth_date=birth,
        sex=sex,
        study_instance_uid=derive_uid("study", options.seed, task, index),
        study_date=date,
        study_time=tod,
        accession_number=f"A{options.seed % 1000:03d}{_TASK_IDS[task]}{index:06d}",
        study_id=f"{index % 100000}",
    )


def _orientation(task: str, view: str, side: str) -> tuple[bool, tuple[str, str]]:
    """Mirror flag and PatientOrientation for a view (see the module docstrings' frames)."""
    if view == "AP":
        return (side == "L"), ("L", "F")
    if side == "U":  # an unpaired region (spine, chest): anterior on the image left
        return True, ("P", "F")
    # Laterals of a paired joint, unflipped: a right side's anterior lands on the image left.
    return (side == "R"), (("P", "F") if side == "R" else ("A", "F"))


def _implant_case(options: SynthOptions, extra: np.random.Generator) -> str:
    """This patient's ``--implant`` case. It always takes the second stream's first number, so
    what follows in that stream does not depend on the option."""
    u = float(extra.random())
    if options.task == "other" and options.implant in ("present", "mixed"):
        return "present"  # the other anatomy's natural mix: hardware in other.METAL_SHARE
    if options.implant != "mixed":
        return options.implant
    total = 0.0
    for case, share in MIXED_SHARES:
        total += share
        if u < total:
            return case
    return MIXED_SHARES[-1][0]


def _tags(options: SynthOptions, anatomy: dict[str, Any]) -> tuple[str, str]:
    """(tagged_as, the dicomio.ANATOMY key whose tags are written)."""
    task = options.task
    if options.tags_as is None or options.tags_as == task:
        return task, (anatomy["region"] if task == "other" else task)
    tagged = options.tags_as
    return tagged, (_TAGS_OF_OTHER if tagged == "other" else tagged)


def _field_of_view(module: ModuleType, anatomy: dict[str, Any]) -> float:
    if hasattr(module, "field_of_view"):
        return float(module.field_of_view(anatomy))
    return float(module.FIELD_OF_VIEW_MM)


def _footprint(canvas: Canvas) -> np.ndarray:
    """Where the implant is: its mask labels, or any metal (the hip's mask marks the interface
    zones, not the implant)."""
    return (canvas.mask > 0) | (canvas.metal_integral > 0.05)


def _field(
    rows: int, cols: int, collimation: tuple[float, float, float, float]
) -> tuple[int, int, int, int]:
    """The exposed rows and columns, as :func:`train.synth.xray.expose` collimates."""
    top, bottom, left, right = collimation
    return int(top * rows), rows - int(bottom * rows), int(left * cols), cols - int(right * cols)


def _cut_canvas(
    options: SynthOptions,
    module: ModuleType,
    view: str,
    anatomy: dict[str, Any],
    design: dict[str, Any],
    variant: dict[str, Any],
    geometry: tuple[float, float, bool, tuple[float, float]],
    collimation: tuple[float, float, float, float],
    extra: np.random.Generator,
) -> tuple[Canvas, float]:
    """Render with the field moved along the variant's ``cut_axis`` until at most
    CUT_VISIBLE_MAX of the implant's footprint is inside the collimated field.

    The whole implant is first drawn on a coarse canvas three fields wide, which gives its area
    and where the shift must go; the real image is then checked with its own mask and moved
    further where it still shows too much. The mask is cleared outside the collimated field
    (what the shutter hides is not in the image). Returns the canvas and the visible fraction.
    """
    rows, cols = options.rows, options.cols
    spacing, rotation, mirror, shift = geometry
    size = max(rows, cols)
    n = 384
    reference_spacing = 3.0 * size * spacing / n
    reference = Canvas(n, n, reference_spacing, (n / 2, n / 2), rotation, mirror)
    # Only the implant's footprint matters here: leave out the anatomy the cut field adds.
    module.render(reference, view, anatomy, design, {**variant, "reach": 0.0, "thoracic": 0})
    r_idx, c_idx = np.nonzero(_footprint(reference))
    if r_idx.size == 0:
        raise RuntimeError(f"{options.task}: the implant left no footprint to cut off")
    area = r_idx.size * reference_spacing**2
    k = reference_spacing / spacing
    base = np.array([cols / 2 + shift[0], rows / 2 + shift[1]])
    points = k * (np.stack([c_idx + 0.5, r_idx + 0.5], axis=1) - n / 2) + base
    origin = np.array(reference.to_pixel(0.0, 0.0))
    along = np.array(reference.to_pixel(*variant["cut_axis"])) - origin
    unit = along / np.linalg.norm(along)  # the image content moves against it
    r0, r1, c0, c1 = _field(rows, cols, collimation)
    target = 0.0 if extra.random() < 0.35 else float(extra.uniform(0.003, 0.035))
    t = 0.0
    while t < 4.0 * size:  # the smallest shift that leaves no more than the target in the field
        moved = points - t * unit
        inside = (moved[:, 0] >= c0) & (moved[:, 0] < c1) & (moved[:, 1] >= r0) & (moved[:, 1] < r1)
        if inside.mean() <= target:
            break
        t += size / 128.0
    if target == 0.0:
        t += float(extra.uniform(0.0, 0.2)) * size
    for _ in range(64):
        center = base - t * unit
        canvas = Canvas(rows, cols, spacing, (float(center[0]), float(center[1])), rotation, mirror)
        module.render(canvas, view, anatomy, design, variant)
        seen = int(_footprint(canvas)[r0:r1, c0:c1].sum())
        visible = min(seen * spacing**2 / area, 1.0)
        if visible <= CUT_VISIBLE_MAX:
            # The shutter hides the rest: the mask keeps what the image shows.
            exposed = np.zeros_like(canvas.mask)
            exposed[r0:r1, c0:c1] = canvas.mask[r0:r1, c0:c1]
            canvas.mask = exposed
            return canvas, visible
        t += size / 64.0
    raise RuntimeError(f"{options.task}: could not move the field off the implant")


def _render_patient(job: _Job) -> list[dict[str, str]]:
    options = job.options
    task, index = options.task, job.index
    module = TASKS[task]
    rng = np.random.default_rng([options.seed, _TASK_IDS[task], index])
    # What --implant adds comes from a second stream: the first one stays as it always was.
    extra = np.random.default_rng([options.seed, _TASK_IDS[task], index, _VARIANT_STREAM])
    case = _implant_case(options, extra)
    sex = "F" if rng.random() < 0.5 else "M"
    scale = float(np.clip(rng.normal(1.04 if sex == "M" else 0.95, 0.05), 0.82, 1.2))
    header = _patient_header(options, index, rng, sex)
    side = ("R" if rng.random() < 0.5 else "L") if task != "spine" else "U"
    anatomy = module.sample_anatomy(rng, scale)
    if hasattr(module, "paired") and not module.paired(anatomy):
        side = "U"
    if task == "hip":
        design = module.sample_design(rng, job.label, scale, options.lucency_free_fraction)
    else:
        design = module.sample_design(rng, job.label, scale)
    variant = None
    if case != "present" or task == "other":
        variant = module.sample_variant(extra, case, anatomy)
    implant = "present" if variant is None else str(variant["implant"])
    metal = "" if variant is None else str(variant.get("metal", ""))
    tagged, tag_key = _tags(options, anatomy)
    uid_variant: tuple[str, ...] = ()
    if implant != "present":
        uid_variant += (implant,)
    if tagged != task:
        uid_variant += ("tags", tagged)
    if options.no_tags:
        uid_variant += ("no-tags",)
    if uid_variant:
        header = replace(
            header,
            study_instance_uid=derive_uid("study", options.seed, task, index, *uid_variant),
        )
    label = job.label if implant == "present" else ""
    bits = options.bits_stored or int(rng.choice([12, 14, 16]))
    photometric = options.photometric
    if photometric == "mixed":
        photometric = "MONOCHROME1" if rng.random() < 0.5 else "MONOCHROME2"
    field_mm = _field_of_view(module, anatomy)
    rows = []
    out = options.out
    for series_number, view in enumerate(options.task_views, start=1):
        mirror, orientation = _orientation(task, view, side)
        magnification = float(rng.uniform(1.05, 1.2))
        pitch = field_mm / max(options.rows, options.cols) * options.spacing_scale
        spacing = pitch / magnification
        rotation = float(rng.uniform(-options.rotation, options.rotation))
        shift = (
            float(rng.uniform(-0.07, 0.07)) * options.cols,
            float(rng.uniform(-0.07, 0.07)) * options.rows,
        )
        # Rendering takes nothing from ``rng``: the acquisition is drawn first, so that a cut
        # field can be fitted inside its collimation.
        acquisition = Acquisition(
            exposure=float(rng.uniform(*options.exposure)),
            noise=options.noise,
            blur_mm=float(rng.uniform(0.15, 0.4)),
            heel=float(rng.uniform(0.05, 0.2)),
            heel_angle_deg=float(rng.choice([90.0, 270.0]) + rng.uniform(-10, 10)),
            scatter=float(rng.uniform(0.002, 0.008)),
            contrast=options.contrast * float(rng.uniform(0.9, 1.1)),
            collimation=tuple(float(v) for v in rng.uniform(0.0, 0.09, size=4)),  # type: ignore[arg-type]
        )
        if variant is not None and implant == "cut":
            canvas, visible = _cut_canvas(
                options,
                module,
                view,
                anatomy,
                design,
                variant,
                (spacing, rotation, mirror, shift),
                acquisition.collimation,
                extra,
            )
        else:
            canvas = Canvas(
                options.rows,
                options.cols,
                spacing,
                (options.cols / 2 + shift[0], options.rows / 2 + shift[1]),
                rotation_deg=rotation,
                mirror=mirror,
            )
            if variant is None:
                module.render(canvas, view, anatomy, design)
            else:
                module.render(canvas, view, anatomy, design, variant)
            visible = 1.0 if implant == "present" else 0.0
        marker = side if side != "U" else ("R" if rng.random() < 0.5 else "L")
        top, _, left, right = acquisition.collimation
        at_left = rng.random() < 0.5
        column = (left + 0.03) if at_left else (1.0 - right - 0.08)
        with canvas.detector_frame():
            canvas.letter(
                marker,
                (column * options.cols * spacing, (top + 0.03) * options.rows * spacing),
                14.0,
            )
        pixels = expose(canvas, acquisition, rng, bits)
        if hasattr(module, "view_position"):
            view_position = str(module.view_position(rng, view, anatomy))
        else:
            view_position = "AP" if view == "AP" else str(rng.choice(["LL", "LAT"]))
        series_uid = derive_uid("series", options.seed, task, index, view, *uid_variant)
        sop_uid = derive_uid("sop", options.seed, task, index, view, *uid_variant)
        kvp = module.kvp_range(anatomy) if hasattr(module, "kvp_range") else _KVP[task]
        image = ImageHeader(
            task=task,
            view=view,
            view_position=view_position,
            laterality=side,
            patient_orientation=orientation,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            series_number=series_number,
            imager_pixel_spacing_mm=pitch,
            magnification=magnification,
            bits_stored=bits,
            photometric=photometric,
            modality=options.modality,
            transfer_syntax=options.transfer_syntax,
            kvp=float(rng.uniform(*kvp)),
            exposure_mas=8.0 * acquisition.exposure,
            body_part_key=tag_key,
            anatomy_tags=not options.no_tags,
        )
        ds = build_dataset(header, image, pixels)
        rel = Path("dicom") / header.patient_id / f"{series_number:02d}_{view}.dcm"
        mask_rel = Path("masks") / f"{header.patient_id}_{view}.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out / rel, enforce_file_format=True)
        _write_png(out / mask_rel, canvas.mask)
        row = {
            "path": rel.as_posix(),
            "mask_path": mask_rel.as_posix(),
            "patient_id": header.patient_id,
            "study_instance_uid": header.study_instance_uid,
            "series_instance_uid": series_uid,
            "sop_instance_uid": sop_uid,
            "task": task,
            "view": view,
            "label": label,
            "label_index": module.CLASSES.index(label) if label else -1,
            "laterality": side,
            "view_position": view_position,
            "modality": options.modality,
            "photometric": photometric,
            "transfer_syntax": options.transfer_syntax,
            "bits_stored": bits,
            "rows": options.rows,
            "columns": options.cols,
            "imager_pixel_spacing_mm": pitch,
            "magnification": magnification,
            "rotation_deg": rotation,
            "shift_x_px": shift[0],
            "shift_y_px": shift[1],
            "mirror": mirror,
            "exposure": acquisition.exposure,
            "noise": acquisition.noise,
            "contrast": acquisition.contrast,
            "blur_mm": acquisition.blur_mm,
            "heel": acquisition.heel,
            "scatter": acquisition.scatter,
            "anatomy_scale": scale,
            "implant": implant,
            "other_metal": metal,
            "implant_visible": visible,
            "anatomy": "other" if task == "other" else task,
            "tagged_as": tagged,
        }
        parameters = {**anatomy, **(design if implant in ("present", "cut") else {})}
        if variant is not None:
            parameters.update(
                (k, v)
                for k, v in variant.items()
                if k not in ("implant", "metal") and not k.startswith("_")
            )
        for key, value in sorted(parameters.items()):
            row[f"design_{key}"] = value
        rows.append({k: _fmt(v) for k, v in row.items()})
    return rows


def _write_png(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buffer, format="PNG", compress_level=6)
    path.write_bytes(buffer.getvalue())


def _jobs(options: SynthOptions) -> list[_Job]:
    labels = _labels(options)
    return [_Job(options, options.first_patient + i, labels[i]) for i in range(options.patients)]


def generate(options: SynthOptions, progress: bool = False) -> Path:
    """Write the phantom set described by ``options``; returns the manifest's path."""
    if options.task not in TASKS:
        raise ValueError(f"unknown task {options.task!r}; choose one of {sorted(TASKS)}")
    if options.implant not in IMPLANTS:
        raise ValueError(f"--implant {options.implant!r}: choose one of {list(IMPLANTS)}")
    if options.task == "other" and options.implant == "cut":
        raise ValueError("--task other has no implant to cut off (--implant cut)")
    if options.tags_as is not None and options.tags_as not in TASKS:
        raise ValueError(f"--tags-as {options.tags_as!r}: choose one of {sorted(TASKS)}")
    if options.bits_stored is not None and not 8 < options.bits_stored <= 16:
        raise ValueError(f"--bits-stored {options.bits_stored}: from 9 to 16")
    if options.patients < 1:
        raise ValueError("--patients must be at least 1")
    for name, value in (("rows", options.rows), ("cols", options.cols)):
        if not 128 <= value <= 4096:
            raise ValueError(f"{name}={value}: matrix sizes from 128 to 4096 are supported")
    unknown = set(options.task_views) - set(TASKS[options.task].SUPPORTED_VIEWS)
    if unknown:
        raise ValueError(f"task {options.task} has no view {sorted(unknown)}")
    for name, share in (
        ("--loose-fraction", options.loose_fraction),
        ("--lucency-free-fraction", options.lucency_free_fraction),
    ):
        if share is not None and not 0.0 <= share <= 1.0:
            raise ValueError(f"{name}={share}: a share between 0 and 1")
    options.out.mkdir(parents=True, exist_ok=True)
    jobs = _jobs(options)
    started = time.perf_counter()
    results: Iterable[list[dict[str, str]]]
    bar = tqdm(total=len(jobs), unit="patient", disable=not progress, file=sys.stderr)
    rows: list[dict[str, str]] = []
    if options.workers > 1:
        with get_context("spawn").Pool(options.workers) as pool:
            results = pool.imap(_render_patient, jobs, chunksize=4)
            for result in results:
                rows.extend(result)
                bar.update(1)
    else:
        for job in jobs:
            rows.extend(_render_patient(job))
            bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - started
    manifest = options.out / "manifest.csv"
    design_columns = sorted({k for row in rows for k in row if k.startswith("design_")})
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(
            handle, fieldnames=[*MANIFEST_COLUMNS, *design_columns], lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(rows)
    record = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()}
    record.pop("workers")
    record["generator_version"] = __version__
    (options.out / "synth.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    if progress:
        _summary(rows, options, elapsed)
    return manifest


def _summary(rows: list[dict[str, str]], options: SynthOptions, elapsed: float) -> None:
    def name(row: dict[str, str]) -> str:
        if row["label"]:
            return row["label"]
        metal = f": {row['other_metal']}" if row["other_metal"] else ""
        return f"({row['implant']}{metal})"

    counts = Counter((name(r), r["view"]) for r in rows)
    views = options.task_views
    labels = sorted({name(r) for r in rows})
    width = max(len(label) for label in [*labels, "class"]) + 2
    lines = [f"{'class':<{width}}" + "".join(f"{v:>8}" for v in views)]
    for label in labels:
        lines.append(f"{label:<{width}}" + "".join(f"{counts[(label, v)]:>8}" for v in views))
    lines.append(
        f"{'total':<{width}}"
        + "".join(f"{sum(counts[(lab, v)] for lab in labels):>8}" for v in views)
    )
    rate = len(rows) / elapsed if elapsed > 0 else math.inf
    lines.append(
        f"{len(rows)} images of {options.rows}x{options.cols} in {elapsed:.1f} s "
        f"({rate:.1f} images/s) -> {options.out}"
    )
    sys.stderr.write("\n".join(lines) + "\n")
