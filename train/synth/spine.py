"""Lumbar spine phantoms with posterior instrumentation: seven schematic pedicle-screw brands.

Each brand is a parametric family named after a class of the pedicle-screw study, differing in
the details that tell real systems apart: the tulip (head) height, width and top (round, flat,
protruding set screw, flared rim, reduction tabs, deep saddle), a neck between head and shaft,
the thread crest spacing and depth, a cylindrical or conical core, and the crosslink design.
Screw size, the number of instrumented levels (2–4 vertebrae, 4–8 screws) and whether a
crosslink is fitted vary within every brand. The families are not the manufacturers' geometry.

Mask labels: 1 screws (shaft and head), 2 rods and crosslinks.

Anatomy frame: millimetres, origin at the middle of the instrumented segment, y towards the feet;
+x is the patient's left (AP) or anterior (lateral).

It is one file because it is one generator of one anatomy: the brands, the vertebrae and both
views share one anatomy frame, and splitting the phantom's parts would scatter one geometry.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import numpy as np

from dicom_node.tasks import builtin_task
from train.synth.xray import Canvas, draw_family

__all__ = [
    "CLASSES",
    "FIELD_OF_VIEW_MM",
    "SUPPORTED_VIEWS",
    "VIEWS",
    "render",
    "sample_anatomy",
    "sample_design",
]

_SPEC = builtin_task("spine")
#: The task's classes and views, as its spec (dicom_node/tasks.yaml) names them.
CLASSES: tuple[str, ...] = tuple(c.name for c in _SPEC.classes)
VIEWS: tuple[str, ...] = tuple(_SPEC.views)
SUPPORTED_VIEWS = VIEWS
FIELD_OF_VIEW_MM = 330.0
SCREW_LABEL = 1
ROD_LABEL = 2

_BRANDS: dict[str, dict[str, Any]] = {
    "A-Spine EVO": dict(
        tulip_height=(15.0, 17.0),
        tulip_width=(10.0, 11.0),
        top="round",
        head_ap="round",
        neck=(1.0, 1.5),
        core="conical",
        crest=(2.6, 3.0),
        thread=(0.9, 1.1),
        crosslink="plate",
    ),
    "Armstrong": dict(
        tulip_height=(11.0, 12.5),
        tulip_width=(13.0, 14.0),
        top="flat",
        head_ap="square",
        neck=(1.0, 1.5),
        core="cylindrical",
        crest=(2.0, 2.3),
        thread=(1.1, 1.3),
        crosslink="rod-clamp",
    ),
    "CDH": dict(
        tulip_height=(13.0, 14.5),
        tulip_width=(11.5, 12.5),
        top="cap",
        head_ap="round",
        neck=(1.0, 1.5),
        core="cylindrical",
        crest=(2.5, 2.8),
        thread=(0.8, 1.0),
        crosslink="arched",
    ),
    "Expedium": dict(
        tulip_height=(14.0, 15.5),
        tulip_width=(12.0, 13.0),
        top="flared",
        head_ap="square",
        neck=(1.0, 1.5),
        core="conical",
        crest=(3.1, 3.5),
        thread=(0.7, 0.9),
        crosslink="rod-clamp",
    ),
    "Gezen": dict(
        tulip_height=(11.0, 12.5),
        tulip_width=(10.0, 11.0),
        top="flat",
        head_ap="round",
        neck=(4.0, 6.0),
        core="cylindrical",
        crest=(2.9, 3.3),
        thread=(0.5, 0.7),
        crosslink="plate",
    ),
    "NOVA": dict(
        tulip_height=(17.0, 19.0),
        tulip_width=(13.0, 14.0),
        top="tabs",
        head_ap="square",
        neck=(1.0, 1.5),
        core="conical",
        crest=(2.2, 2.5),
        thread=(0.9, 1.1),
        crosslink="none",
    ),
    "Xia 3": dict(
        tulip_height=(13.0, 14.5),
        tulip_width=(12.0, 13.0),
        top="saddle",
        head_ap="round",
        neck=(1.0, 1.5),
        core="dual",
        crest=(1.7, 1.9),
        thread=(0.7, 0.9),
        crosslink="arched",
    ),
}


def sample_anatomy(rng: np.random.Generator, scale: float) -> dict[str, Any]:
    """Vertebral size, lordosis, the instrumented levels and abdominal girth."""
    levels = int(rng.integers(2, 5))  # instrumented vertebrae
    first = int(rng.integers(0, 6 - levels))  # 0 = L1 ... 4 = L5
    return {
        "scale": scale,
        "levels": levels,
        "first_level": first,
        "lordosis": float(rng.uniform(4.0, 14.0)),
        "girth": float(rng.uniform(100.0, 150.0)) * scale,
        "scoliosis": float(rng.uniform(-4.0, 4.0)),
    }


def sample_design(rng: np.random.Generator, label: str, scale: float) -> dict[str, Any]:
    """Draw one construct of brand ``label``."""
    design = draw_family(rng, _BRANDS[label])
    design["screw_length"] = float(rng.uniform(38.0, 50.0)) * scale
    design["screw_radius"] = float(rng.uniform(2.6, 3.4)) * scale
    design["rod_radius"] = float(rng.choice([2.75, 3.0, 3.175]))
    design["convergence"] = float(rng.uniform(10.0, 20.0))
    fitted = design["crosslink"] != "none" and rng.random() < 0.6
    design["crosslink_fitted"] = bool(fitted)
    return design


def _vertebra_y(anatomy: dict[str, Any]) -> list[float]:
    """Centres of L1–L5 (vertebral body plus disc = 38 mm × body size), segment centred."""
    pitch = 38.0 * anatomy["scale"]
    mid = anatomy["first_level"] + (anatomy["levels"] - 1) / 2.0
    return [(i - mid) * pitch for i in range(5)]


def render(canvas: Canvas, view: str, anatomy: dict[str, Any], design: dict[str, Any]) -> None:
    """Draw soft tissue, lumbar vertebrae, screws, rods and crosslink for one view."""
    canvas.rod((0.0, -500.0), (0.0, 500.0), anatomy["girth"], material="soft", caps=False)
    if view == "AP":
        _render_ap(canvas, anatomy, design)
    else:
        _render_lateral(canvas, anatomy, design)


def _render_ap(canvas: Canvas, anatomy: dict[str, Any], d: dict[str, Any]) -> None:
    s = anatomy["scale"]
    ys = _vertebra_y(anatomy)
    body_h = 27.0 * s
    heads: dict[float, list[tuple[float, float]]] = {-1.0: [], 1.0: []}
    for i, y in enumerate(ys):
        x = anatomy["scoliosis"] * (y / 100.0) ** 2
        width = (20.0 + 1.5 * i) * s
        canvas.ellipsoid((x, y), width, body_h / 2, 36.0 * s, material="cancellous", power=4.0)
        canvas.ellipsoid(
            (x, y),
            width + 1.0,
            body_h / 2 + 1.0,
            38.0 * s,
            material="cortical",
            power=4.0,
            shell=0.08,
        )
        canvas.ellipsoid(
            (x, y + 0.45 * body_h), 4.5 * s, 10.0 * s, 25.0 * s, material="cortical", shell=0.35
        )
        for side in (-1.0, 1.0):
            px = x + side * 14.0 * s
            canvas.ellipsoid(
                (px, y - 0.2 * body_h), 5.0 * s, 7.0 * s, 20.0 * s, material="cortical", shell=0.4
            )
            canvas.rod(
                (x + side * 20.0 * s, y - 0.1 * body_h),
                (x + side * (38.0 + 4.0 * (i == 2)) * s, y - 0.05 * body_h),
                4.0 * s,
                material="cortical",
                hollow=0.4,
            )
            if anatomy["first_level"] <= i < anatomy["first_level"] + anatomy["levels"]:
                head = (px + side * 3.0, y - 0.2 * body_h)
                heads[side].append(head)
                _screw_ap(canvas, d, head, side)
    # Iliac crests at the bottom of the field.
    for side in (-1.0, 1.0):
        canvas.ellipsoid(
            (side * 95.0 * s, ys[-1] + 60.0 * s),
            60.0 * s,
            45.0 * s,
            30.0 * s,
            material="cortical",
            shell=0.15,
        )
    for side in (-1.0, 1.0):
        pts = heads[side]
        ext = 6.0
        for a, b in pairwise(pts):
            canvas.rod(a, b, d["rod_radius"], material="titanium", label=ROD_LABEL)
        canvas.rod(
            pts[0],
            (pts[0][0], pts[0][1] - ext),
            d["rod_radius"],
            material="titanium",
            label=ROD_LABEL,
        )
        canvas.rod(
            pts[-1],
            (pts[-1][0], pts[-1][1] + ext),
            d["rod_radius"],
            material="titanium",
            label=ROD_LABEL,
        )
    if d["crosslink_fitted"] and len(heads[1.0]) >= 2:
        y = 0.5 * (heads[1.0][0][1] + heads[1.0][1][1])
        xl, xr = heads[-1.0][0][0], heads[1.0][0][0]
        _crosslink_ap(canvas, d, xl, xr, y)


def _screw_ap(canvas: Canvas, d: dict[str, Any], head: tuple[float, float], side: float) -> None:
    conv = np.radians(d["convergence"])
    length = d["screw_length"]
    projected = length * np.sin(conv) + 4.0
    tip = (head[0] - side * projected, head[1] + 2.0)
    r = d["screw_radius"]
    r_tip = r * (0.55 if d["core"] != "cylindrical" else 0.9)
    canvas.rod(
        head, tip, r, r_tip, material="titanium", label=SCREW_LABEL, weight=1.0 / np.sin(conv) * 0.6
    )
    w = d["tulip_width"]
    if d["head_ap"] == "round":
        canvas.ellipsoid(
            head, w / 2, w / 2, d["tulip_height"], material="titanium", label=SCREW_LABEL, shell=0.4
        )
    else:
        canvas.plate(
            head, w, w, d["tulip_height"] * 0.5, corner=1.5, material="titanium", label=SCREW_LABEL
        )
        canvas.plate(
            head,
            w * 0.55,
            w * 0.55,
            d["tulip_height"] * 0.35,
            corner=1.0,
            material="titanium",
            weight=-1.0,
        )
    if d["top"] == "tabs":
        for k in (-1.0, 1.0):
            canvas.plate(
                (head[0], head[1] + k * w * 0.45),
                w * 0.9,
                1.5,
                20.0,
                material="titanium",
                label=SCREW_LABEL,
            )


def _crosslink_ap(canvas: Canvas, d: dict[str, Any], xl: float, xr: float, y: float) -> None:
    kind = d["crosslink"]
    mid = 0.5 * (xl + xr)
    span = xr - xl
    if kind == "plate":
        canvas.plate(
            (mid, y), span + 8.0, 8.0, 3.0, corner=2.0, material="titanium", label=ROD_LABEL
        )
    elif kind == "rod-clamp":
        canvas.rod((xl, y), (xr, y), 2.5, material="titanium", label=ROD_LABEL)
        for x in (xl, xr):
            canvas.plate((x, y), 9.0, 11.0, 7.0, corner=2.5, material="titanium", label=ROD_LABEL)
    else:  # arched over the spinous process
        radius = span / 2
        canvas.arc(
            (mid, y + radius * 0.6),
            radius * 1.05,
            radius * 1.05 + 4.0,
            214.0,
            326.0,
            6.0,
            material="titanium",
            label=ROD_LABEL,
        )
        for x in (xl, xr):
            canvas.ellipsoid((x, y), 5.0, 5.0, 8.0, material="titanium", label=ROD_LABEL)


def _render_lateral(canvas: Canvas, anatomy: dict[str, Any], d: dict[str, Any]) -> None:
    s = anatomy["scale"]
    ys = _vertebra_y(anatomy)
    body_h = 27.0 * s
    entries: list[tuple[float, float]] = []
    for i, y in enumerate(ys):
        x = anatomy["lordosis"] * (1.0 - (y / 110.0) ** 2)
        tilt = -anatomy["lordosis"] * 0.4 * (y / 60.0)
        with canvas.frame(rotate_deg=tilt, about=(x, y)):
            canvas.ellipsoid(
                (x + 14.0 * s, y), 17.0 * s, body_h / 2, 45.0 * s, material="cancellous", power=4.0
            )
            canvas.ellipsoid(
                (x + 14.0 * s, y),
                18.0 * s,
                body_h / 2 + 1.0,
                47.0 * s,
                material="cortical",
                power=4.0,
                shell=0.08,
            )
            canvas.rod(
                (x - 4.0 * s, y - 0.2 * body_h),
                (x - 24.0 * s, y - 0.1 * body_h),
                5.5 * s,
                material="cortical",
                hollow=0.4,
                weight=2.0,
            )
            canvas.ellipsoid(
                (x - 30.0 * s, y + 0.1 * body_h),
                9.0 * s,
                13.0 * s,
                30.0 * s,
                material="cortical",
                shell=0.3,
            )
            canvas.rod(
                (x - 34.0 * s, y + 0.2 * body_h),
                (x - 62.0 * s, y + 0.35 * body_h),
                5.0 * s,
                4.0 * s,
                material="cortical",
                hollow=0.4,
            )
            if anatomy["first_level"] <= i < anatomy["first_level"] + anatomy["levels"]:
                entry = (x - 26.0 * s, y - 0.2 * body_h)
                entries.append(canvas_point(x, y, tilt, entry))
                _screw_lateral(canvas, d, entry)
    # Rods: through the tulip saddles, posterior to the entry points.
    offset = d["tulip_height"] * 0.55 + d["neck"]
    rod_pts = [(ex - offset, ey) for ex, ey in entries]
    for a, b in pairwise(rod_pts):
        canvas.rod(a, b, d["rod_radius"], material="titanium", label=ROD_LABEL, weight=1.6)
    canvas.rod(
        rod_pts[0],
        (rod_pts[0][0], rod_pts[0][1] - 6.0),
        d["rod_radius"],
        material="titanium",
        label=ROD_LABEL,
        weight=1.6,
    )
    canvas.rod(
        rod_pts[-1],
        (rod_pts[-1][0], rod_pts[-1][1] + 6.0),
        d["rod_radius"],
        material="titanium",
        label=ROD_LABEL,
        weight=1.6,
    )
    if d["crosslink_fitted"] and len(rod_pts) >= 2:
        cx = 0.5 * (rod_pts[0][0] + rod_pts[1][0]) - 4.0
        cy = 0.5 * (rod_pts[0][1] + rod_pts[1][1])
        # Seen end-on: a small dense profile whose shape follows the design.
        if d["crosslink"] == "plate":
            canvas.plate((cx, cy), 4.0, 8.0, 40.0, corner=1.0, material="titanium", label=ROD_LABEL)
        elif d["crosslink"] == "rod-clamp":
            canvas.ellipsoid((cx, cy), 3.0, 3.0, 40.0, material="titanium", label=ROD_LABEL)
            canvas.plate(
                (cx + 2.0, cy), 10.0, 11.0, 9.0, corner=2.5, material="titanium", label=ROD_LABEL
            )
        else:
            canvas.arc(
                (cx + 12.0, cy),
                10.0,
                14.0,
                150.0,
                210.0,
                30.0,
                material="titanium",
                label=ROD_LABEL,
            )


def canvas_point(
    x: float, y: float, tilt_deg: float, p: tuple[float, float]
) -> tuple[float, float]:
    """Point ``p`` drawn inside a frame rotated by ``tilt_deg`` about (x, y), in the parent."""
    th = np.radians(tilt_deg)
    dx, dy = p[0] - x, p[1] - y
    return (
        float(x + dx * np.cos(th) - dy * np.sin(th)),
        float(y + dx * np.sin(th) + dy * np.cos(th)),
    )


def _screw_lateral(canvas: Canvas, d: dict[str, Any], entry: tuple[float, float]) -> None:
    """One bilateral pair seen from the side: shaft with thread, neck and tulip profile."""
    r = d["screw_radius"]
    length = d["screw_length"]
    core_tip = {"cylindrical": 0.9, "conical": 0.55, "dual": 0.7}[d["core"]]
    for shift in (0.0, 1.5):
        with canvas.frame(translate=(shift, -shift)):
            x0, y0 = entry
            neck = d["neck"]
            tip = (x0 + length, y0 + 3.0)
            canvas.rod(
                (x0, y0),
                tip,
                r - d["thread"],
                (r - d["thread"]) * core_tip,
                material="titanium",
                label=SCREW_LABEL,
                weight=1.2,
                thread_pitch=d["crest"],
                thread_depth=d["thread"],
            )
            canvas.rod(
                (x0 - neck, y0),
                (x0, y0),
                r * 0.7,
                material="titanium",
                label=SCREW_LABEL,
                caps=False,
                weight=1.2,
            )
            _tulip_profile(canvas, d, (x0 - neck, y0))


def _tulip_profile(canvas: Canvas, d: dict[str, Any], base: tuple[float, float]) -> None:
    h, w = d["tulip_height"], d["tulip_width"]
    x0, y0 = base
    top = d["top"]
    corner = 3.5 if top == "round" else 1.0
    canvas.plate(
        (x0 - h / 2, y0), h, w, w * 0.8, corner=corner, material="titanium", label=SCREW_LABEL
    )
    if top == "cap":
        canvas.plate(
            (x0 - h - 1.5, y0),
            3.0,
            w * 0.6,
            w * 0.6,
            corner=0.5,
            material="titanium",
            label=SCREW_LABEL,
        )
    elif top == "flared":
        canvas.plate(
            (x0 - h + 1.5, y0),
            3.0,
            w + 3.0,
            w * 0.8,
            corner=0.5,
            material="titanium",
            label=SCREW_LABEL,
        )
    elif top == "tabs":
        for k in (-1.0, 1.0):
            canvas.plate(
                (x0 - h - 5.0, y0 + k * (w / 2 - 1.0)),
                10.0,
                1.6,
                w * 0.8,
                material="titanium",
                label=SCREW_LABEL,
            )
    elif top == "saddle":
        canvas.plate(
            (x0 - h + 3.0, y0), 6.5, w * 0.45, w * 0.6, corner=1.0, material="titanium", weight=-1.0
        )
