"""``python -m train evaluate``: a bundle on a labelled set, through the node's own inference.

Every patient of the manifest is one study; its views go through :class:`dicom_node.infer.
Predictor` exactly as the node runs them (preprocessing, temperature, AP + lateral fusion), and
the report gives accuracy, macro one-vs-rest AUC (or AUC for a binary task), ECE, per-class
sensitivity and specificity, and the confusion matrix — per view and fused. Use it on a held-out
phantom set and on a differently acquired ``--acquisition external`` set.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from sklearn.metrics import confusion_matrix

from dicom_node.domain import InstanceRef, RoutedView, StudyJob
from dicom_node.explain import explain
from dicom_node.infer import Predictor
from dicom_node.models.bundle import load_bundle
from train.fit import _metrics

__all__ = ["evaluate", "get_args_parser", "main", "study_jobs", "to_markdown"]


def _per_class(matrix: np.ndarray, names: list[str]) -> dict[str, dict[str, float]]:
    total = matrix.sum()
    result = {}
    for i, name in enumerate(names):
        tp = matrix[i, i]
        fn = matrix[i].sum() - tp
        fp = matrix[:, i].sum() - tp
        tn = total - tp - fn - fp
        result[name] = {
            "sensitivity": round(float(tp / max(tp + fn, 1)), 4),
            "specificity": round(float(tn / max(tn + fp, 1)), 4),
        }
    return result


def study_jobs(data: Path, task: str) -> tuple[list[StudyJob], dict[str, list[dict[str, str]]]]:
    """One StudyJob per study of a manifest (AP first), and the manifest rows by study UID."""
    with (data / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    studies: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        studies.setdefault(row["study_instance_uid"], []).append(row)
    jobs = [
        StudyJob(
            uid,
            task,
            tuple(
                RoutedView(
                    InstanceRef(
                        r["sop_instance_uid"], "", uid, r["series_instance_uid"], data / r["path"]
                    ),
                    task,
                    r["view"],
                    r["laterality"] if r["laterality"] in ("R", "L") else None,
                )
                for r in sorted(members, key=lambda r: r["view"] != "AP")
            ),
        )
        for uid, members in studies.items()
    ]
    return jobs, studies


def saliency_in_mask(heatmap: np.ndarray, mask: np.ndarray) -> tuple[float, bool]:
    """Share of the heatmap's mass inside the mask, and whether its peak falls inside it."""
    total = float(heatmap.sum())
    share = float(heatmap[mask].sum()) / total if total > 0 else 0.0
    peak = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return share, bool(mask[peak])


def evaluate(
    bundle_path: Path, data: Path, batch: int = 32, saliency: str | None = None
) -> dict[str, Any]:
    """Metrics of the bundle at ``bundle_path`` on the manifest in ``data``.

    With ``saliency`` ("gradcam" or "integrated-gradients"), also the localisation of the
    heatmaps on the phantom masks (dilated by 2 mm): the mean share of heatmap mass inside the
    mask and the pointing-game hit rate (the peak inside the mask).
    """
    bundle = load_bundle(bundle_path)
    task = bundle.card.task
    jobs, studies = study_jobs(data, task)
    predictor = Predictor({task: bundle})
    per_view: dict[str, list[tuple[np.ndarray, int]]] = {}
    fused: list[tuple[np.ndarray, int]] = []
    shares: list[float] = []
    hits: list[bool] = []
    for start in range(0, len(jobs), batch):
        for prediction, prepared in predictor.predict(jobs[start : start + batch]):
            label = int(studies[prediction.study_instance_uid][0]["label_index"])
            if saliency:
                rows_by_sop = {
                    r["sop_instance_uid"]: r for r in studies[prediction.study_instance_uid]
                }
                for image in prepared:
                    heat = explain(bundle, image, prediction.predicted_index, saliency).heatmap
                    row = rows_by_sop[image.view.instance.sop_instance_uid]
                    mask = np.asarray(Image.open(data / row["mask_path"])) > 0
                    spacing = float(row["imager_pixel_spacing_mm"]) / float(row["magnification"])
                    mask = ndimage.binary_dilation(mask, iterations=max(1, round(2.0 / spacing)))
                    share, hit = saliency_in_mask(heat, mask)
                    shares.append(share)
                    hits.append(hit)
            for view in prediction.views:
                per_view.setdefault(view.view.view, []).append(
                    (np.array(view.probabilities), label)
                )
            fused.append((np.array(prediction.probabilities), label))
    names = [c.name for c in bundle.classes]
    report: dict[str, Any] = {
        "task": task,
        "bundle": bundle.card.version,
        "data": str(data),
        "patients": len(jobs),
    }
    if saliency:
        report["saliency"] = {
            "method": saliency,
            "images": len(shares),
            "mass_in_mask": round(float(np.mean(shares)), 4),
            "pointing_game": round(float(np.mean(hits)), 4),
        }
    for name, pairs in [*sorted(per_view.items()), ("fused", fused)]:
        if name == "fused" and len(per_view) < 2:
            continue
        probabilities = np.stack([p for p, _ in pairs])
        labels = np.array([label for _, label in pairs])
        matrix = confusion_matrix(labels, probabilities.argmax(1), labels=list(range(len(names))))
        report[name] = {
            **_metrics(task, probabilities, labels),
            "per_class": _per_class(matrix, names),
            "confusion": matrix.tolist(),
        }
    return report


def to_markdown(report: dict[str, Any], title: str) -> str:
    """The report as a markdown section: a metrics table, then per-class figures."""
    lines = [
        f"### {title}",
        "",
        f"{report['patients']} patients, data `{report['data']}`, bundle {report['bundle']}.",
        "",
        "| result | n | accuracy | AUC | ECE |",
        "|---|---|---|---|---|",
    ]
    parts = [k for k in ("AP", "LAT", "fused") if k in report]
    for key in parts:
        m = report[key]
        auc = m.get("auc", m.get("auc_macro", float("nan")))
        lines.append(f"| {key} | {m['n']} | {m['accuracy']:.3f} | {auc:.3f} | {m['ece']:.3f} |")
    if "saliency" in report:
        sal = report["saliency"]
        lines += [
            "",
            f"Saliency ({sal['method']}, {sal['images']} images, masks dilated by "
            f"2 mm): mass inside the implant mask {sal['mass_in_mask']:.3f}, pointing game "
            f"{sal['pointing_game']:.3f}.",
        ]
    final = report[parts[-1]]
    lines += [
        "",
        f"Per class ({parts[-1]}):",
        "",
        "| class | sensitivity | specificity |",
        "|---|---|---|",
    ]
    for name, values in final["per_class"].items():
        lines.append(f"| {name} | {values['sensitivity']:.3f} | {values['specificity']:.3f} |")
    return "\n".join(lines) + "\n"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train evaluate",
        add_help=add_help,
        description="Evaluate a bundle on a labelled set.",
    )
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="folder with manifest.csv")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON")
    parser.add_argument("--markdown", type=Path, default=None, help="append a markdown section")
    parser.add_argument("--title", default="Evaluation", help="title of the markdown section")
    parser.add_argument(
        "--saliency",
        choices=["gradcam", "integrated-gradients"],
        default=None,
        help="also score heatmap localisation on the phantom masks",
    )
    return parser


def main(args: argparse.Namespace) -> int:
    try:
        report = evaluate(args.bundle, args.data, saliency=args.saliency)
    except (OSError, ValueError) as error:
        sys.stderr.write(f"evaluate: {error}\n")
        return 2
    text = json.dumps(report, indent=2) + "\n"
    if args.out:
        args.out.write_text(text)
    if args.markdown:
        with args.markdown.open("a") as handle:
            handle.write(to_markdown(report, args.title) + "\n")
    sys.stdout.write(text)
    return 0
