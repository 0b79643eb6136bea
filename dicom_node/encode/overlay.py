"""Drawing of the Secondary Capture's pixels: the heatmap over the radiograph, the burned-in text.

The pixels are the displayed radiograph (modality/VOI LUT applied, MONOCHROME1 inverted) in
grey, with the heatmap blended over it in a jet-like colour map whose opacity grows with the
heat (low saliency stays plain grey, so the anatomy remains readable). Burned in: a banner
"AI-GENERATED — NOT FOR DIAGNOSTIC USE" (and "DEMO WEIGHTS" for demo bundles), the task label,
the predicted class and its probability (or "undetermined"), the model's name and version, the
saliency method, the result version when it supersedes earlier ones, and a colour bar. No
patient identifier is ever drawn: :func:`burned_in_text` builds every string from the
prediction, the explanation and the task label alone.

Only numpy and Pillow here; the IOD is built in :mod:`dicom_node.encode.sc`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dicom_node.domain import Explanation, Prediction, RegionOfInterest
from dicom_node.encode.common import fused_view_names, result_phrase

__all__ = [
    "BANNER",
    "DEMO_BANNER",
    "BandLayout",
    "BurnedInText",
    "annotate",
    "band_layout",
    "blend",
    "burned_in_text",
    "downscale",
    "outline",
]

BANNER = "AI-GENERATED — NOT FOR DIAGNOSTIC USE"
DEMO_BANNER = "DEMO WEIGHTS — NOT FOR CLINICAL USE"

# Below this heat the overlay is fully transparent; above it opacity grows to _MAX_ALPHA.
_HEAT_FLOOR = 0.15
_MAX_ALPHA = 0.6


@dataclass(frozen=True)
class BurnedInText:
    """The strings drawn into the Secondary Capture (never a patient identifier)."""

    banner: tuple[str, ...]  # top: the warnings
    details: tuple[str, ...]  # bottom: result, method, model (and the result version)


def burned_in_text(
    prediction: Prediction, explanation: Explanation, label: str, *, version: int = 1
) -> BurnedInText:
    """The strings burned into the Secondary Capture of ``explanation``'s view.

    Built from the prediction, the explanation and the task label only, never from a data
    set, so no patient identifier can reach the pixels.

    Parameters
    ----------
    prediction : Prediction
        The study-level result (fused when available) is the one shown.
    explanation : Explanation
        Its view and saliency method are named.
    label : str
        What the task reports, as a reader sees it (the task spec's ``label``).
    version : int
        The result's version for this study and task; from 2 on, a line says that it
        supersedes the earlier results.

    Returns
    -------
    BurnedInText
        The banner lines (top) and the detail lines (bottom).
    """
    model = prediction.model
    banner = (BANNER, DEMO_BANNER) if model.demo else (BANNER,)
    top = prediction.classes[prediction.predicted_index]
    scope = ""
    if prediction.fused_probabilities is not None:
        scope = f" (fused {fused_view_names(prediction)})"
    result = f"{label}: {result_phrase(prediction, prediction.probabilities)}{scope}"
    view = explanation.view
    side = {"R": ", right", "L": ", left"}.get(view.laterality or "", "")
    region = "; dashed box: region analysed" if explanation.region is not None else ""
    details: tuple[str, ...] = (
        result,
        f"{explanation.method} heatmap for {top.code_meaning} — {view.view} view{side}{region}",
        f"Model: {model.name}, version {model.version}",
    )
    if version > 1:
        details += (f"Result version {version} — supersedes earlier results",)
    return BurnedInText(banner=banner, details=details)


def downscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Area-average by an integer ``factor``; edge rows/columns are padded by repetition."""
    rows, columns = image.shape
    out_rows, out_columns = math.ceil(rows / factor), math.ceil(columns / factor)
    padded = np.pad(
        image, ((0, out_rows * factor - rows), (0, out_columns * factor - columns)), mode="edge"
    )
    blocks = padded.reshape(out_rows, factor, out_columns, factor)
    return blocks.mean(axis=(1, 3)).astype(np.float32)


def outline(rgb: np.ndarray, region: RegionOfInterest, factor: int) -> None:
    """Draw the analysed region's edges (dashed, light grey) where they lie inside the image.

    ``region`` is in source pixels; ``factor`` is the downscale applied to ``rgb``.
    """
    rows, columns = rgb.shape[:2]
    width = max(1, round(max(rows, columns) / 512))
    top, left = region.top // factor, region.left // factor
    bottom, right = (region.top + region.side) // factor, (region.left + region.side) // factor
    dashes = (np.arange(max(rows, columns)) // (6 * width)) % 2 == 0
    colour = np.array([220, 220, 220], dtype=np.uint8)
    for edge in (top, bottom - width):
        if edge >= 0 and edge + width <= rows:
            span = slice(max(left, 0), min(right, columns))
            on = dashes[span]
            rgb[edge : edge + width, span][:, on] = colour
    for edge in (left, right - width):
        if edge >= 0 and edge + width <= columns:
            span = slice(max(top, 0), min(bottom, rows))
            on = dashes[span]
            rgb[span, edge : edge + width][on] = colour


def blend(display: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """Grey display with the coloured heatmap over it, uint8 RGB (Rows, Columns, 3).

    The colour is computed only where the overlay is visible (heat above the floor; with a
    region of interest, a small part of the image): elsewhere the pixel is the grey value,
    exactly what the blend gives with zero opacity.
    """
    grey = np.clip(np.nan_to_num(display), 0.0, 1.0)
    heat = np.clip(np.nan_to_num(heatmap), 0.0, 1.0)
    alpha = _MAX_ALPHA * np.clip((heat - _HEAT_FLOOR) / (1.0 - _HEAT_FLOOR), 0.0, 1.0)
    out = np.empty((*grey.shape, 3), dtype=np.uint8)
    out[...] = np.rint(grey * 255.0).astype(np.uint8)[..., None]
    visible = alpha > 0
    if visible.any():
        opacity = alpha[visible][:, None]
        rgb = grey[visible][:, None] * (1.0 - opacity) + _colour_map(heat[visible]) * opacity
        out[visible] = np.rint(rgb * 255.0).astype(np.uint8)
    return out


def annotate(rgb: np.ndarray, text: BurnedInText) -> np.ndarray:
    """The radiograph on an extended canvas: the banner above it, the details and the colour
    bar below it, so that no pixel of the image is hidden (uint8 RGB, the image's columns and
    its rows plus both bands).

    Before, the bands were drawn over the image and hid its bottom ~20 %: on a hip, the tip of
    the femoral stem, where loosening is judged.
    """
    rows, columns = rgb.shape[:2]
    layout = band_layout(rows, columns, text)
    canvas = np.zeros((layout.top + rows + layout.bottom, columns, 3), dtype=np.uint8)
    canvas[layout.top : layout.top + rows] = rgb
    image = Image.fromarray(canvas, mode="RGB")
    draw = ImageDraw.Draw(image)
    size, line_height, margin = layout.size, layout.line_height, layout.margin
    width = columns - 2 * margin
    y = float(margin)
    font = _fitted_font(draw, text.banner, size, width)
    for line in text.banner:
        _draw_text(draw, (margin, y), line, font, (255, 215, 0))
        y += line_height
    y = float(layout.top + rows + margin)
    font = _fitted_font(draw, text.details, size, width)
    for line in text.details:
        _draw_text(draw, (margin, y), line, font, (255, 255, 255))
        y += line_height
    _draw_colour_bar(draw, margin, round(y + margin), columns, size, layout.bar_height)
    return np.asarray(image, dtype=np.uint8).copy()


@dataclass(frozen=True)
class BandLayout:
    """Heights (pixels) of the bands above and below the radiograph, and the text metrics."""

    top: int
    bottom: int
    size: int
    line_height: int
    margin: int
    bar_height: int


def band_layout(rows: int, columns: int, text: BurnedInText) -> BandLayout:
    """Where :func:`annotate` puts the text: a top band for the banner, a bottom band for the
    details and the colour bar; the font follows the image's shorter side."""
    size = int(np.clip(round(min(rows, columns) / 30), 9, 56))
    line_height = round(size * 1.3)
    margin = max(2, size // 3)
    bar_height = max(4, size // 2)
    top = margin * 2 + line_height * len(text.banner)
    bottom = margin * 3 + line_height * len(text.details) + bar_height + line_height // 2
    return BandLayout(top, bottom, size, line_height, margin, bar_height)


def _colour_map(values: np.ndarray) -> np.ndarray:
    """Jet-like colour map: 0 → dark blue, 0.5 → green, 1 → dark red; float RGB in [0, 1]."""
    x = np.clip(values, 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25], dtype=np.float32)  # red, green, blue
    return np.clip(1.5 - np.abs(4.0 * (x - centres)), 0.0, 1.0)


_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def _font(size: int) -> _Font:
    return ImageFont.load_default(size=size)


def _font_size(font: _Font) -> float:
    return float(getattr(font, "size", 10))


# Characters the default font lacks, drawn by hand: the em dash as a line one em wide, "≥"
# as ">" over a short rule (the wording module uses both).
_DRAWN = re.compile("([—≥])")


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: _Font) -> float:
    size = _font_size(font)
    width = 0.0
    for part in _DRAWN.split(text):
        if part == "—":
            width += size
        elif part == "≥":
            width += draw.textlength(">", font=font)
        else:
            width += draw.textlength(part, font=font)
    return width


def _fitted_font(draw: ImageDraw.ImageDraw, lines: tuple[str, ...], size: int, width: int) -> _Font:
    """The default font at ``size``, or smaller until every line fits ``width`` (min 6 px)."""
    font = _font(size)
    while size > 6 and max(_text_width(draw, line, font) for line in lines) > width:
        size -= 1
        font = _font(size)
    return font


def _draw_text(
    draw: ImageDraw.ImageDraw,
    xy: tuple[float, float],
    text: str,
    font: _Font,
    fill: tuple[int, int, int],
) -> None:
    x, y = xy
    size = _font_size(font)
    stroke = max(1, round(size / 12))
    for part in _DRAWN.split(text):
        if part == "—":
            middle = round(y + 0.55 * size)
            draw.line((x + 0.15 * size, middle, x + 0.85 * size, middle), fill=fill, width=stroke)
            x += size
            continue
        if part == "≥":
            draw.text((x, y - 0.08 * size), ">", font=font, fill=fill)
            width = draw.textlength(">", font=font)
            rule = round(y + 0.92 * size)
            draw.line((x + 0.1 * width, rule, x + 0.9 * width, rule), fill=fill, width=stroke)
            x += width
            continue
        draw.text((x, y), part, font=font, fill=fill)
        x += draw.textlength(part, font=font)


def _draw_colour_bar(
    draw: ImageDraw.ImageDraw, left: int, top: int, columns: int, size: int, height: int
) -> None:
    font = _font(size)
    low, high = "saliency low", "high"
    x = left + draw.textlength(low, font=font) + size // 2
    bar_width = max(16, round(columns * 0.35))
    colours = np.rint(_colour_map(np.linspace(0.0, 1.0, bar_width)) * 255).astype(int)
    text_y = top + height / 2 - size * 0.6
    draw.text((left, text_y), low, font=font, fill=(255, 255, 255))
    for offset, (red, green, blue) in enumerate(colours):
        draw.line(
            (x + offset, top, x + offset, top + height - 1), fill=(int(red), int(green), int(blue))
        )
    draw.text((x + bar_width + size // 2, text_y), high, font=font, fill=(255, 255, 255))
