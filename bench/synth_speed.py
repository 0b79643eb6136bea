"""Phantom generation speed: 1,000 images at 1024 × 1024 on one core (target: under 120 s).

Run: ``python bench/synth_speed.py [--images 1000] [--size 1024] [--write BENCHMARKS.md]``

It pins itself to one core (BLAS/OpenMP threads = 1, CPU affinity = one core), generates a
third of the images per task (knee and spine patients give two views each), and measures a
reference in the same run: writing the same number of ready-made images of the same size as
DICOM with pydicom, plus one Gaussian noise field each — a floor that any generator pays. The
ratio to that reference is what to compare between machines; the absolute time is what the
target is about.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from machine import add_rows, cpu_name  # noqa: E402  (bench/ is on sys.path when run as a script)

from train.synth.generate import SynthOptions, generate  # noqa: E402

TARGET_S = 120.0


def _reference(images: int, size: int, out: Path) -> float:
    template_path = next(out.rglob("*.dcm"))
    template = pydicom.dcmread(template_path)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for i in range(images):
        noise = rng.standard_normal((size, size), dtype=np.float32)
        pixels = np.clip(2048 + 200 * noise, 0, 4095).astype(np.uint16)
        template.PixelData = pixels.tobytes()
        template.save_as(out / f"reference_{i}.dcm", enforce_file_format=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument(
        "--write",
        type=Path,
        default=None,
        help="append the result to this markdown file (BENCHMARKS.md)",
    )
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    per_task = args.images // 3
    pairs = per_task // 2  # knee and spine patients have two views each
    plan = {"knee": pairs, "spine": pairs, "hip": args.images - 4 * pairs}
    work = Path(tempfile.mkdtemp(prefix="orthonode-bench-"))
    try:
        started = time.perf_counter()
        made = 0
        for task, patients in plan.items():
            generate(
                SynthOptions(
                    task=task,
                    patients=patients,
                    out=work / task,
                    rows=args.size,
                    cols=args.size,
                    seed=1,
                )
            )
            made += patients * (1 if task == "hip" else 2)
        elapsed = time.perf_counter() - started
        reference = _reference(made, args.size, work / "hip")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = elapsed / reference
    verdict = "meets" if elapsed < TARGET_S * made / 1000 else "MISSES"
    line = (
        f"| {dt.date.today().isoformat()} | {cpu_name()}, 1 core | {made} × {args.size}² | "
        f"{elapsed:.1f} s ({1000 * elapsed / made:.0f} ms/image) | {reference:.1f} s | "
        f"{ratio:.2f} | {verdict} the {TARGET_S:.0f} s per 1,000 target |"
    )
    print(line)
    if args.write:
        add_rows(args.write, "## Phantom generation speed", line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
