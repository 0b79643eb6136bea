"""Evaluation report: a markdown file with summary and per-class tables, plus PNG plots.

Each section is one classifier on one split, e.g. the AP view, the lateral view and the fused
AP + lateral prediction, given as ``(name, metrics, probabilities, labels)`` with ``metrics``
from :func:`train.metrics.classification_metrics`. Plots are drawn on
:class:`matplotlib.figure.Figure` with the Agg canvas directly, so pyplot's global state (and
the backend any other importer chose) is never touched.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import auc

from train.metrics import expected_calibration_error, reliability_curve, roc_curves

__all__ = ["Section", "markdown_summary", "write_report"]

Section: TypeAlias = tuple[str, dict[str, Any], np.ndarray, np.ndarray]
"""(name, metrics from ``classification_metrics``, probabilities (n, k), labels (n,))."""

_MISSING = "–"
_DPI = 120


def write_report(
    sections: Sequence[Section], out_dir: Path, title: str, preamble: str = ""
) -> Path:
    """Write ``report.md`` and its plots into ``out_dir``.

    Per section ``<name>`` (characters other than letters, digits, ``-`` and ``_`` replaced by
    ``_``), three PNGs: ``confusion_<name>.png`` (annotated counts), ``roc_<name>.png``
    (one-vs-rest curves with their AUC) and ``reliability_<name>.png`` (accuracy per confidence
    bin against the diagonal, ECE in the title). The markdown holds the tables of
    :func:`markdown_summary` and links to the plots by relative path.

    Parameters
    ----------
    sections : Sequence[Section]
        ``(name, metrics, probabilities, labels)`` per classifier; class names are the keys of
        ``metrics["per_class"]``.
    out_dir : Path
        Folder for ``report.md`` and the PNGs; created if missing, existing files overwritten.
    title : str
        Top-level heading of the report.
    preamble : str
        Markdown placed under the title (data set, weights, command line, ...).

    Returns
    -------
    Path
        The path of ``report.md``.

    Raises
    ------
    ValueError
        If two sections share a file name.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stems = [_file_stem(name) for name, *_ in sections]
    if len(set(stems)) != len(stems):
        raise ValueError(f"section names must give distinct file names, got {stems}")
    images: dict[str, list[tuple[str, str]]] = {}
    for (name, metrics, probabilities, labels), stem in zip(sections, stems, strict=True):
        class_names = list(metrics["per_class"])
        files = {
            "confusion": f"confusion_{stem}.png",
            "ROC": f"roc_{stem}.png",
            "reliability": f"reliability_{stem}.png",
        }
        _plot_confusion(metrics, class_names, name, out_dir / files["confusion"])
        _plot_roc(probabilities, labels, class_names, name, out_dir / files["ROC"])
        _plot_reliability(probabilities, labels, metrics, name, out_dir / files["reliability"])
        images[name] = [(f"{kind} {name}", file) for kind, file in files.items()]
    path = out_dir / "report.md"
    path.write_text(_markdown(sections, title, 1, preamble, images), encoding="utf-8")
    return path


def markdown_summary(sections: Sequence[Section], title: str) -> str:
    """The report's tables as markdown, without plots, to append to another document.

    Parameters
    ----------
    sections : Sequence[Section]
        As for :func:`write_report`; only the names and metrics are used.
    title : str
        Heading of the summary (a level-2 heading; sections are level 3).

    Returns
    -------
    str
        Markdown: the summary table, then per section the per-class and confusion tables.
    """
    return _markdown(sections, title, 2, "", None)


def _markdown(
    sections: Sequence[Section],
    title: str,
    level: int,
    preamble: str,
    images: dict[str, list[tuple[str, str]]] | None,
) -> str:
    """Assemble the document; ``level`` is the heading level of ``title``."""
    lines = [f"{'#' * level} {title}", ""]
    if preamble:
        lines += [preamble.strip(), ""]
    lines += _summary_table(sections)
    if any(metrics.get("ci95") for _, metrics, _, _ in sections):
        lines += ["", "95 % bootstrap intervals (1000 resamples of the studies within each class):"]
        lines += ["", *_interval_table(sections)]
    for name, metrics, _, _ in sections:
        lines += ["", f"{'#' * (level + 1)} {name}", ""]
        lines += _per_class_table(metrics)
        lines += ["", "Confusion matrix (rows: true class, columns: predicted class):", ""]
        lines += _confusion_table(metrics)
        if images is not None:
            lines.append("")
            lines += [f"![{alt}]({file})" for alt, file in images[name]]
    return "\n".join(lines) + "\n"


def _summary_table(sections: Sequence[Section]) -> list[str]:
    """One row per section; threshold (and abstention) columns only when some section has
    them."""
    header = [
        "section",
        "n",
        "accuracy",
        "balanced accuracy",
        "kappa",
        "AUC (macro)",
        "AUC micro",
        "ECE",
    ]
    with_threshold = any("threshold" in metrics for _, metrics, _, _ in sections)
    if with_threshold:
        header += ["threshold", "sensitivity", "specificity"]
    with_abstention = any("answered" in metrics for _, metrics, _, _ in sections)
    if with_abstention:
        header += ["answered", "accuracy when answered"]
    rows = []
    for name, metrics, _, _ in sections:
        row = [
            _cell(name),
            str(metrics["n"]),
            _number(metrics.get("accuracy")),
            _number(metrics.get("balanced_accuracy")),
            _number(metrics.get("cohen_kappa")),
            _number(metrics.get("auc", metrics.get("auc_macro"))),
            _number(metrics.get("auc_micro")),
            _number(metrics.get("ece")),
        ]
        if with_threshold:
            row += [
                _number(metrics.get("threshold")),
                _number(metrics.get("sensitivity")),
                _number(metrics.get("specificity")),
            ]
        if with_abstention:
            row += [_number(metrics.get("answered")), _number(metrics.get("accuracy_answered"))]
        rows.append(row)
    return _table(header, rows)


def _interval_table(sections: Sequence[Section]) -> list[str]:
    """Low–high per headline number and section (see ``train.metrics.bootstrap_intervals``)."""
    columns = [
        ("accuracy", "accuracy"),
        ("auc", "AUC"),
        ("auc_macro", "AUC (macro)"),
        ("ece", "ECE"),
        ("sensitivity", "sensitivity"),
        ("specificity", "specificity"),
    ]
    present = [
        (key, title)
        for key, title in columns
        if any(key in (metrics.get("ci95") or {}) for _, metrics, _, _ in sections)
    ]
    rows = []
    for name, metrics, _, _ in sections:
        intervals = metrics.get("ci95") or {}
        rows.append(
            [_cell(name)]
            + [
                f"{_number(intervals[key][0])}–{_number(intervals[key][1])}"
                if key in intervals
                else "–"
                for key, _ in present
            ]
        )
    return _table(["section"] + [title for _, title in present], rows)


def _per_class_table(metrics: dict[str, Any]) -> list[str]:
    """Per-class rows, then macro and micro averages."""
    header = ["class", "sensitivity", "specificity", "precision", "F1", "support"]
    rows = [
        [
            _cell(name),
            _number(stats["sensitivity"]),
            _number(stats["specificity"]),
            _number(stats["precision"]),
            _number(stats["f1"]),
            str(stats["support"]),
        ]
        for name, stats in metrics["per_class"].items()
    ]
    for average in ("macro", "micro"):
        stats = metrics.get(average, {})
        rows.append(
            [
                f"*{average}*",
                _number(stats.get("sensitivity")),
                _number(stats.get("specificity")),
                _number(stats.get("precision")),
                _number(stats.get("f1")),
                str(metrics["n"]),
            ]
        )
    return _table(header, rows)


def _confusion_table(metrics: dict[str, Any]) -> list[str]:
    """The confusion matrix with class names on both axes."""
    names = [_cell(name) for name in metrics["per_class"]]
    rows = [
        [f"**{name}**", *(str(count) for count in counts)]
        for name, counts in zip(names, metrics["confusion"], strict=True)
    ]
    return _table(["true \\ predicted", *names], rows)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A GitHub-flavoured markdown table, text left-aligned, the rest right-aligned."""
    alignment = [":---", *("---:" for _ in header[1:])]
    return [_row(header), _row(alignment), *(_row(row) for row in rows)]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _cell(text: str) -> str:
    """Text safe inside a table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _number(value: float | None) -> str:
    return _MISSING if value is None else f"{value:.4f}"


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name) or "_"


def _new_figure(width: float, height: float) -> Figure:
    """A figure bound to an Agg canvas, independent of pyplot."""
    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _plot_confusion(metrics: dict[str, Any], class_names: list[str], name: str, path: Path) -> None:
    counts = np.asarray(metrics["confusion"])
    k = len(class_names)
    side = max(4.0, 1.0 + 0.7 * k)
    figure = _new_figure(side + 1.0, side)
    axes = figure.add_subplot()
    image = axes.imshow(counts, cmap="Blues", vmin=0)
    figure.colorbar(image, ax=axes, shrink=0.8)
    # Dark text on light cells and light text on dark ones keeps every count readable.
    middle = counts.max() / 2 if counts.size and counts.max() > 0 else 0.5
    for row in range(k):
        for column in range(k):
            value = int(counts[row, column])
            colour = "white" if value > middle else "black"
            axes.text(column, row, str(value), ha="center", va="center", color=colour)
    axes.set_xticks(
        range(k), class_names, rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center"
    )
    axes.set_yticks(range(k), class_names)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(f"{name}: confusion matrix (n = {metrics['n']})")
    figure.savefig(path)


def _plot_roc(
    probabilities: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    name: str,
    path: Path,
) -> None:
    figure = _new_figure(5.5, 5.0)
    axes = figure.add_subplot()
    for class_name, (fpr, tpr) in roc_curves(probabilities, labels, class_names).items():
        axes.plot(fpr, tpr, label=f"{class_name} (AUC {auc(fpr, tpr):.3f})")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.01)
    axes.set_xlabel("1 − specificity (false-positive rate)")
    axes.set_ylabel("sensitivity (true-positive rate)")
    axes.set_title(f"{name}: ROC, one vs rest")
    axes.legend(loc="lower right", fontsize="small")
    figure.savefig(path)


def _plot_reliability(
    probabilities: np.ndarray,
    labels: np.ndarray,
    metrics: dict[str, Any],
    name: str,
    path: Path,
) -> None:
    curve = reliability_curve(probabilities, labels)
    edges = curve["edges"]
    filled = curve["count"] > 0
    ece = metrics.get("ece", expected_calibration_error(probabilities, labels))
    figure = _new_figure(5.5, 5.0)
    axes = figure.add_subplot()
    axes.bar(
        edges[:-1][filled],
        curve["accuracy"][filled],
        width=np.diff(edges)[filled],
        align="edge",
        edgecolor="black",
        label="accuracy",
    )
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("confidence (top-class probability)")
    axes.set_ylabel("accuracy")
    axes.set_title(f"{name}: reliability (ECE {ece:.4f})")
    axes.legend(loc="upper left", fontsize="small")
    figure.savefig(path)
