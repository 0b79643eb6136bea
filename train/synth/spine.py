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

import math
from itertools import pairwise
from typing import Any

import numpy as np

from dicom_node.tasks import builtin_task
from train.synth import hardware, thorax
from train.synth.xray import Canvas, draw_family

__all__ = [
    "CLASSES",
    "FIELD_OF_VIEW_MM",
    "OTHER_METAL",
    "SUPPORTED_VIEWS",
    "VIEWS",
    "render",
    "sample_anatomy",
    "sample_design",
    "sample_variant",
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


def render(
    canvas: Canvas,
    view: str,
    anatomy: dict[str, Any],
    design: dict[str, Any],
    variant: dict[str, Any] | None = None,
) -> None:
    """Draw soft tissue, lumbar vertebrae, screws, rods and crosslink for one view.

    ``variant`` (from :func:`sample_variant`) draws a lumbar spine without the screws instead
    (``none``), with other hardware (``other``), or the construct with the thoracic spine above
    it for a field moved off it (``cut``). Without it the output is the present-implant phantom
    as ever.
    """
    implant = variant is None or variant["implant"] == "cut"
    thoracic = 0 if variant is None else int(variant.get("thoracic", 0))
    top = -500.0 - (0.0 if variant is None else float(variant.get("reach", 0.0)))
    canvas.rod((0.0, top), (0.0, 500.0), anatomy["girth"], material="soft", caps=False)
    if view == "AP":
        _render_ap(canvas, anatomy, design, implant, thoracic)
    else:
        _render_lateral(canvas, anatomy, design, implant, thoracic)
    if variant is not None and variant.get("metal"):
        _hardware(canvas, view, anatomy, variant)


def _render_ap(
    canvas: Canvas,
    anatomy: dict[str, Any],
    d: dict[str, Any],
    implant: bool = True,
    thoracic: int = 0,
) -> None:
    s = anatomy["scale"]
    ys = _vertebra_y(anatomy)
    body_h = 27.0 * s
    heads: dict[float, list[tuple[float, float]]] = {-1.0: [], 1.0: []}
    if thoracic:
        _thoracic(canvas, "AP", anatomy, thoracic)
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
            if implant and anatomy["first_level"] <= i < anatomy["first_level"] + anatomy["levels"]:
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
    if not implant:
        return
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


def _render_lateral(
    canvas: Canvas,
    anatomy: dict[str, Any],
    d: dict[str, Any],
    implant: bool = True,
    thoracic: int = 0,
) -> None:
    s = anatomy["scale"]
    ys = _vertebra_y(anatomy)
    body_h = 27.0 * s
    entries: list[tuple[float, float]] = []
    if thoracic:
        _thoracic(canvas, "LAT", anatomy, thoracic)
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
            if implant and anatomy["first_level"] <= i < anatomy["first_level"] + anatomy["levels"]:
                entry = (x - 26.0 * s, y - 0.2 * body_h)
                entries.append(canvas_point(x, y, tilt, entry))
                _screw_lateral(canvas, d, entry)
    if not implant:
        return
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


# -- without the screws: native lumbar spines, other hardware -----------------------------------

#: Hardware that is not a posterior pedicle-screw construct, one kind per ``other`` phantom.
OTHER_METAL: tuple[str, ...] = ("anterior-plate", "cage", "stimulator", "clips")


def sample_variant(
    rng: np.random.Generator, implant: str, anatomy: dict[str, Any]
) -> dict[str, Any]:
    """Parameters of a spine without the screws (``none``, ``other``) or with them cut off."""
    if implant == "cut":
        return {
            "implant": "cut",
            "reach": 400.0,
            "thoracic": 15,
            "cut_axis": (0.0, -1.0),
            "metal": "",
        }
    variant: dict[str, Any] = {"implant": implant, "metal": ""}
    if implant != "other":
        return variant
    kind = OTHER_METAL[int(rng.integers(0, len(OTHER_METAL)))]
    variant["metal"] = kind
    if kind == "anterior-plate":
        variant["metal_level"] = int(rng.integers(0, 4))  # the upper of the two plated bodies
        variant["metal_width"] = float(rng.uniform(22.0, 30.0))
    elif kind == "cage":
        variant["metal_design"] = "anterior" if rng.random() < 0.5 else "posterior"
        levels = rng.choice(4, size=int(rng.integers(1, 3)), replace=False)
        variant["metal_levels"] = sorted(int(i) for i in levels)
    elif kind == "stimulator":
        variant["metal_offset"] = float(rng.uniform(-4.0, 4.0))
        variant["metal_contacts"] = int(rng.choice([8, 16]))
        variant["metal_exit"] = 1.0 if rng.random() < 0.5 else -1.0
    else:
        region = str(rng.choice(["right-upper-quadrant", "pelvis", "para-aortic"]))
        variant["metal_region"] = region
        count = int(rng.integers(3, 10))
        variant["metal_count"] = count
        variant["_clips"] = [
            [float(v) for v in rng.uniform(-1.0, 1.0, size=6)] for _ in range(count)
        ]
    return variant


def _lateral_x(anatomy: dict[str, Any], y: float) -> float:
    """Where the lateral view draws a lumbar vertebra's posterior body margin at height y."""
    return anatomy["lordosis"] * (1.0 - (y / 110.0) ** 2)


def _thoracic(canvas: Canvas, view: str, anatomy: dict[str, Any], count: int) -> None:
    """Vertebrae from T12 upwards (past T1 into the neck), their ribs and the lungs: the
    field above L1."""
    s = anatomy["scale"]
    ys = _vertebra_y(anatomy)
    y1 = ys[0]
    if view == "AP":
        x1 = anatomy["scoliosis"] * (y1 / 100.0) ** 2
        slope = anatomy["scoliosis"] * 2.0 * y1 / 100.0**2
    else:
        x1 = _lateral_x(anatomy, y1)
        slope = -2.0 * anatomy["lordosis"] * y1 / 110.0**2
    levels = []
    y, previous = y1, 27.0 * s
    for j in range(1, count + 1):
        height = (24.0 - 0.7 * (j - 1)) * s
        y -= 0.5 * previous + 0.5 * height + (6.0 - 0.15 * j) * s
        dy = y - y1
        x = x1 + 0.5 * slope * dy if view == "AP" else x1 + slope * dy + 0.0006 * dy * dy
        levels.append((j, x, y, height))
        previous = height
    top_lung = levels[min(11, len(levels) - 1)][2] - 20.0 * s  # the apices, at T1
    bottom_lung = levels[1][2] if len(levels) > 1 else y1
    height = bottom_lung - top_lung
    lung_x = levels[len(levels) // 2][1]
    if view == "AP":
        thorax.lungs(canvas, "AP", (lung_x, top_lung + height / 2), 130.0 * s, height, 150.0 * s, s)
        for j, x, y, h in levels:
            half = (19.0 - 0.4 * j) * s
            thorax.vertebra_ap(canvas, x, y, half, h, s)
            if j > 12:
                continue  # cervical: no ribs
            reach = (55.0 if j == 1 else 80.0 if j == 2 else 118.0 - 4.0 * max(j - 8, 0)) * s
            for side in (-1.0, 1.0):
                thorax.rib_ap(
                    canvas,
                    (x + side * (half + 10.0 * s), y - 0.25 * h),
                    side,
                    reach,
                    (30.0 + 2.0 * j) * s,
                    s,
                    anterior=j > 2,
                )
        return
    thorax.lungs(
        canvas, "LAT", (lung_x + 75.0 * s, top_lung + height / 2), 150.0 * s, height, 150.0 * s, s
    )
    for j, x, y, h in levels:
        tangent = slope + 0.0012 * (y - y1)
        tilt = math.degrees(math.atan(tangent)) * 0.7
        thorax.vertebra_lateral(canvas, x - 3.0 * s, y, 32.0 * s, h, s, tilt)
        if 2 < j <= 12:
            thorax.rib_lateral(canvas, (x - 20.0 * s, y - 0.2 * h), 170.0 * s, 60.0 * s, s)


def _level(anatomy: dict[str, Any], i: int) -> tuple[float, float, float]:
    """Centre of lumbar vertebral body ``i`` (0 = L1) in 3-D: AP x, y, lateral x."""
    s = anatomy["scale"]
    y = _vertebra_y(anatomy)[i]
    return (anatomy["scoliosis"] * (y / 100.0) ** 2, y, _lateral_x(anatomy, y) + 14.0 * s)


def _hardware(canvas: Canvas, view: str, anatomy: dict[str, Any], v: dict[str, Any]) -> None:
    s, kind = anatomy["scale"], v["metal"]
    if kind == "anterior-plate":
        upper, lower = _level(anatomy, v["metal_level"]), _level(anatomy, v["metal_level"] + 1)
        front = 0.5 * (upper[2] + lower[2]) + 19.0 * s
        center = (0.5 * (upper[0] + lower[0]), 0.5 * (upper[1] + lower[1]), front + 1.5)
        length = lower[1] - upper[1] + 22.0 * s
        hardware.plate(
            canvas, view, center, length, v["metal_width"], 3.0, "z", material="titanium"
        )
        for body, sign in ((upper, -1.0), (lower, 1.0)):
            for side in (-1.0, 1.0):
                head = (body[0] + side * 7.0 * s, body[1] + sign * 4.0 * s, front + 3.0)
                tip = (body[0] + side * 3.0 * s, body[1] + sign * 1.0 * s, front - 30.0 * s)
                hardware.screw(canvas, view, head, tip, 2.7, material="titanium", head_radius=4.0)
    elif kind == "cage":
        for i in v["metal_levels"]:
            upper, lower = _level(anatomy, i), _level(anatomy, i + 1)
            c = tuple(0.5 * (a + b) for a, b in zip(upper, lower, strict=True))
            disc = lower[1] - upper[1] - 29.0 * s
            if v["metal_design"] == "anterior":
                parts = [(c[0], 30.0 * s, 24.0 * s)]
            else:
                parts = [(c[0] - 9.0 * s, 10.0 * s, 26.0 * s), (c[0] + 9.0 * s, 10.0 * s, 26.0 * s)]
            for x, width, depth in parts:
                if view == "AP":
                    canvas.plate((x, c[1]), width, 0.9 * disc, depth, corner=1.5, material="peek")
                else:
                    front, back = c[2] + 0.5 * depth, c[2] - 0.5 * depth
                    canvas.polygon(
                        [
                            (back, c[1] - 0.4 * disc),
                            (front, c[1] - 0.5 * disc),
                            (front, c[1] + 0.5 * disc),
                            (back, c[1] + 0.4 * disc),
                        ],
                        width,
                        material="peek",
                    )
                for dx in (-0.4 * width, 0.4 * width):
                    for dz in (-0.4 * depth, 0.4 * depth):
                        p0 = (x + dx, c[1] - 0.3 * disc, c[2] + dz)
                        p1 = (x + dx, c[1] + 0.3 * disc, c[2] + dz)
                        hardware.rod(canvas, view, p0, p1, 0.5, material="cocr", weight=1.6)
    elif kind == "stimulator":
        x0 = v["metal_offset"]
        ys = _vertebra_y(anatomy)

        def canal(y: float) -> float:
            return _lateral_x(anatomy, y) - 20.0 * s

        side = v["metal_exit"]
        path: list[hardware.P3] = [(x0, y, canal(y)) for y in np.linspace(-450.0, ys[2], 24)]
        y_exit = ys[2] + 12.0 * s
        path += [
            (x0 + side * 10.0 * s, y_exit, canal(y_exit) - 15.0 * s),
            (side * 40.0 * s, y_exit + 20.0 * s, canal(y_exit) - 45.0 * s),
            (side * 75.0 * s, ys[4] + 40.0 * s, canal(ys[4]) - 60.0 * s),
            (side * 95.0 * s, ys[4] + 160.0 * s, canal(ys[4]) - 70.0 * s),
        ]
        hardware.polyline(canvas, view, path, 0.45, material="cocr", weight=0.8)
        y_top = ys[0] - 30.0 * s
        for k in range(v["metal_contacts"]):
            y = y_top - 4.5 * k * 8.0 / v["metal_contacts"] * 2.0
            hardware.rod(
                canvas,
                view,
                (x0, y, canal(y)),
                (x0, y + 3.0, canal(y)),
                0.7,
                material="cocr",
                caps=False,
                weight=1.5,
            )
    else:
        ys = _vertebra_y(anatomy)
        center = {
            "right-upper-quadrant": (-75.0 * s, ys[1], 70.0 * s),
            "pelvis": (35.0 * s, ys[4] + 45.0 * s, 45.0 * s),
            "para-aortic": (22.0 * s, ys[2], 45.0 * s),
        }[v["metal_region"]]
        for clip in v["_clips"]:
            apex = (
                center[0] + 25.0 * clip[0],
                center[1] + 25.0 * clip[1],
                center[2] + 25.0 * clip[2],
            )
            direction = np.array(clip[3:]) + 1e-3
            direction /= np.linalg.norm(direction)
            spread = np.cross(direction, [0.3, 0.8, 0.5])
            spread /= np.linalg.norm(spread)
            for sign in (-1.0, 1.0):
                arm = direction * 8.0 + sign * spread * 1.8
                end = (apex[0] + float(arm[0]), apex[1] + float(arm[1]), apex[2] + float(arm[2]))
                hardware.rod(canvas, view, apex, end, 0.45, material="titanium", weight=1.8)
