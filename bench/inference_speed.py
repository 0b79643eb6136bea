"""Inference speed of the shipped bundles: seconds per study from DICOM files to heatmaps.

Run: ``python bench/inference_speed.py [--studies 20] [--size 1024] [--threads 2]
[--repeat 1] [--write BENCHMARKS.md]``

For each task it generates ``--studies`` phantom studies (``--size`` px, AP + lateral for knee
and spine), then times, per study, what the node's inference worker does: read and display the
views, locate the implant and crop (bundles with a region of interest), classify, fuse, and one
Grad-CAM heatmap per view. The reference, measured in the same run on the same files, is
reading and displaying the views only (pydicom + the modality/VOI LUT) — the floor any
implementation pays; the ratio to it is what to compare between machines. With ``--repeat N``
every study is timed N times and its fastest time counts (on a shared machine, other processes
only ever add time). Peak resident memory of the process is reported too. Target: a study
analysed well within the time a radiologist takes to open it (seconds, on a CPU).
"""

from __future__ import annotations

import argparse
import datetime as dt
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import torch
from machine import add_rows, cpu_name  # bench/ is on sys.path when run as a script

from dicom_node.explain import explain
from dicom_node.infer import Predictor
from dicom_node.models.bundle import load_bundle
from dicom_node.preprocess import display_image
from train.data import read_dataset
from train.predict import study_jobs
from train.synth.generate import SynthOptions, generate

ROOT = Path(__file__).resolve().parents[1]


def measure(task: str, studies: int, size: int, work: Path, repeat: int = 1) -> dict[str, float]:
    folder = work / task
    generate(SynthOptions(task=task, patients=studies, out=folder, seed=77, rows=size, cols=size))
    bundle = load_bundle(ROOT / "weights" / task)
    jobs, _ = study_jobs(read_dataset(folder))
    predictor = Predictor({task: bundle})
    predictor.predict(jobs[:1])  # warm-up: first-call allocations are not per-study cost
    reference = np.full((repeat, len(jobs)), np.inf)
    inference = np.full((repeat, len(jobs)), np.inf)
    for attempt in range(repeat):
        for i, job in enumerate(jobs):
            started = time.perf_counter()
            for routed in job.views:
                display_image(pydicom.dcmread(routed.instance.path))
            reference[attempt, i] = time.perf_counter() - started
            started = time.perf_counter()
            [(prediction, prepared)] = predictor.predict([job])
            for view in prepared:
                explain(bundle, view, prediction.predicted_index, "gradcam")
            inference[attempt, i] = time.perf_counter() - started
    return {
        "views": float(np.mean([len(j.views) for j in jobs])),
        "inference_s": float(np.median(inference.min(axis=0))),
        "reference_s": float(np.median(reference.min(axis=0))),
        "roi": float(bundle.card.roi is not None),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--repeat", type=int, default=1, help="time each study N times, keep its fastest"
    )
    parser.add_argument("--write", type=Path, default=None, help="append rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for task in ("knee", "hip", "spine"):
            result = measure(task, args.studies, args.size, Path(work), args.repeat)
            ratio = result["inference_s"] / result["reference_s"]
            rows.append(
                f"| {dt.date.today()} | {cpu_name()}, {args.threads} threads | {task} "
                f"({result['views']:.0f} view(s), {args.size}², ROI "
                f"{'on' if result['roi'] else 'off'}) | {result['inference_s']:.3f} s | "
                f"{result['reference_s']:.3f} s | {ratio:.1f} | "
                f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB |"
            )
    text = "\n".join(rows) + "\n"
    sys.stdout.write(text)
    if args.write:
        add_rows(args.write, "## Inference speed", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
