"""Hip phantoms after cementless total hip replacement: loose or well-fixed.

"loose": radiolucent lines 2 mm or wider (with a thin sclerotic margin) in one or more Gruen
(femoral, 1–7) or DeLee–Charnley (acetabular, I–III) zones, and/or subsidence of the stem or
osteolysis at the interface. "well-fixed": no lucency, or a thin (< 1 mm) partial one. Stem
design, cup size and position are nuisance variables shared by both classes.

Mask labels: 1–7 Gruen zones, 8–10 DeLee–Charnley zones I–III (the interface bands, whether
lucent or not); the manifest lists which zones are lucent and how wide.

Anatomy frame: millimetres, origin at the centre of the femoral head, y towards the feet, +x
medial for a right hip (AP) or anterior (lateral).
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import numpy as np

from dicom_node.tasks import builtin_task
from train.synth import hardware
from train.synth.xray import Canvas

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

_SPEC = builtin_task("hip")
#: The task's classes and views, as its spec (dicom_node/tasks.yaml) names them.
CLASSES: tuple[str, ...] = tuple(c.name for c in _SPEC.classes)
VIEWS: tuple[str, ...] = tuple(_SPEC.views)
SUPPORTED_VIEWS: tuple[str, ...] = ("AP", "LAT")
FIELD_OF_VIEW_MM = 260.0
STEM_DESIGNS: tuple[str, ...] = ("taper-wedge", "fit-and-fill", "anatomic", "short")
_ZONES_STEM = (1, 2, 3, 4, 5, 6, 7)
_ZONES_CUP = (8, 9, 10)


def sample_anatomy(rng: np.random.Generator, scale: float) -> dict[str, float]:
    """Pelvis and femur size, soft-tissue girth, neck-shaft angle."""
    return {
        "scale": scale,
        "girth": float(rng.uniform(90.0, 140.0)) * scale,
        "neck_angle": float(rng.uniform(125.0, 140.0)),
        "shaft_lean": float(rng.uniform(-4.0, 4.0)),
        "pelvis_tilt": float(rng.uniform(-6.0, 6.0)),
    }


def sample_design(
    rng: np.random.Generator,
    label: str,
    scale: float,
    lucency_free: float | None = None,
) -> dict[str, Any]:
    """Implant (nuisance) and the fixation state that defines the class.

    ``lucency_free``: share of loose implants whose only signs are subsidence and/or osteolysis
    (no lucent line). None keeps the natural mix, where about 8 % of loose implants are such.
    """
    stem = str(rng.choice(STEM_DESIGNS))
    length = {
        "taper-wedge": (120, 140),
        "fit-and-fill": (135, 155),
        "anatomic": (125, 145),
        "short": (90, 105),
    }[stem]
    design: dict[str, Any] = {
        "stem_design": stem,
        "stem_length": float(rng.uniform(*length)) * scale,
        "stem_width": float(rng.uniform(16.0, 22.0)) * scale,
        "head_radius": float(rng.choice([14.0, 16.0, 18.0])),
        "cup_radius": float(rng.uniform(24.0, 30.0)) * scale,
        "cup_abduction": float(rng.uniform(35.0, 52.0)),
        "subsidence_mm": 0.0,
        "osteolysis": 0,
        "lucent_zones": [],
        "lucency_mm": 0.0,
        "lucency_extent": 0.0,
    }
    if label == "loose":
        if lucency_free is None:
            # The draw order here is what earlier sets were generated with; keep it.
            wants_lucency = rng.random() < 0.85
            if rng.random() < 0.3:
                design["subsidence_mm"] = float(rng.uniform(4.0, 10.0))
            if rng.random() < 0.3:
                design["osteolysis"] = int(rng.integers(1, 3))
        else:
            wants_lucency = rng.random() >= lucency_free
            # Without a lucent line: subsidence only, osteolysis only, or both (a third each).
            # ``kind`` is drawn either way: the hip demo bundle's training set has this order.
            kind = int(rng.integers(0, 3))
            subsides = rng.random() < 0.3 if wants_lucency else kind != 1
            osteolysis = rng.random() < 0.3 if wants_lucency else kind != 0
            if subsides:
                design["subsidence_mm"] = float(rng.uniform(4.0, 10.0))
            if osteolysis:
                design["osteolysis"] = int(rng.integers(1, 3))
        if wants_lucency or not (design["subsidence_mm"] or design["osteolysis"]):
            pool = _ZONES_STEM + _ZONES_CUP
            count = int(rng.integers(2, 5))
            zones = sorted(int(z) for z in rng.choice(pool, size=count, replace=False))
            design.update(
                lucent_zones=zones,
                lucency_mm=float(rng.uniform(2.0, 4.0)),
                lucency_extent=float(rng.uniform(0.8, 1.0)),
            )
    elif rng.random() < 0.5:
        count = int(rng.integers(1, 3))
        zones = sorted(
            int(z) for z in rng.choice(_ZONES_STEM + _ZONES_CUP, size=count, replace=False)
        )
        design.update(
            lucent_zones=zones,
            lucency_mm=float(rng.uniform(0.3, 0.9)),
            lucency_extent=float(rng.uniform(0.3, 0.7)),
        )
    return design


def _stem_edges(d: dict[str, Any], view: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre line and the lateral/medial edges of the stem, shoulder to tip (anatomy mm)."""
    n = 16
    t = np.linspace(0.0, 1.0, n)
    length = d["stem_length"]
    top = np.array([-30.0, 22.0 + d["subsidence_mm"]])
    width = d["stem_width"] * (0.6 if view == "LAT" else 1.0)
    design = d["stem_design"]
    if design == "fit-and-fill":
        half = width / 2 * (1.0 - 0.45 * np.minimum(t / 0.4, 1.0))
    elif design == "short":
        half = width / 2 * (1.0 - 0.55 * t)
    else:
        half = width / 2 * (1.0 - 0.65 * t)
    bow = 6.0 * np.sin(np.pi * t) if design in ("anatomic", "short") else 0.0 * t
    cx = top[0] - 4.0 * t + bow
    cy = top[1] + length * t
    center = np.stack([cx, cy], axis=1)
    lateral = center - np.stack([half, np.zeros(n)], axis=1)
    medial = center + np.stack([half, np.zeros(n)], axis=1)
    # The medial side flares into the calcar/neck region.
    flare = np.clip(1.0 - t / 0.25, 0.0, None) ** 2 * 12.0
    medial[:, 0] += flare
    return center, lateral, medial


def _band(
    edge: np.ndarray, outward: float, width: float, t0: float, t1: float
) -> list[tuple[float, float]]:
    """A band ``width`` mm wide outside ``edge`` between fractions t0..t1 of its length."""
    n = len(edge)
    i0, i1 = round(t0 * (n - 1)), round(t1 * (n - 1))
    part = edge[i0 : i1 + 1]
    inner = [(float(x), float(y)) for x, y in part]
    outer = [(float(x + outward * width), float(y)) for x, y in part[::-1]]
    return inner + outer


def render(
    canvas: Canvas,
    view: str,
    anatomy: dict[str, float],
    design: dict[str, Any],
    variant: dict[str, Any] | None = None,
) -> None:
    """Draw pelvis, femur, the THR and the fixation state for one view onto ``canvas``.

    ``variant`` (from :func:`sample_variant`) draws a hip without the THR instead: native
    (``none``), with other hardware (``other``), or the THR with a longer femur for a field
    moved off it (``cut``). Without it the output is the present-implant phantom as ever.
    """
    # Centre the field on the proximal femur and stem, as a THR follow-up film is framed.
    with canvas.frame(translate=(25.0, -70.0)):
        if variant is not None and variant["implant"] in ("none", "other"):
            _render_native(canvas, view, anatomy, variant)
        else:
            reach = 0.0 if variant is None else float(variant["reach"])
            _render(canvas, view, anatomy, design, reach)


def _render(
    canvas: Canvas,
    view: str,
    anatomy: dict[str, float],
    design: dict[str, Any],
    reach: float = 0.0,
) -> None:
    s = anatomy["scale"]
    d = design
    canvas.rod((40.0, -400.0), (40.0, 400.0 + reach), anatomy["girth"], material="soft", caps=False)
    lat = view == "LAT"
    # Pelvis (AP): ilium, acetabular roof, ischium, pubic ramus; fainter in the lateral.
    with canvas.frame(rotate_deg=anatomy["pelvis_tilt"]):
        depth = 0.5 if lat else 1.0
        canvas.ellipsoid(
            (38.0 * s, -70.0 * s), 75.0 * s, 60.0 * s, 10.0 * depth, material="cancellous"
        )
        canvas.ellipsoid(
            (38.0 * s, -70.0 * s), 76.0 * s, 61.0 * s, 14.0 * depth, material="cortical", shell=0.06
        )
        canvas.ellipsoid(
            (30.0 * s, 48.0 * s), 24.0 * s, 32.0 * s, 22.0 * depth, material="cortical", shell=0.25
        )
        canvas.rod(
            (25.0 * s, 22.0 * s), (100.0 * s, 30.0 * s), 9.0 * s, material="cortical", hollow=0.5
        )
        canvas.arc(
            (0.0, 0.0),
            d["cup_radius"] + 1.0,
            d["cup_radius"] + 5.0,
            200.0,
            320.0,
            24.0 * depth,
            material="cortical",
        )
    # Femur.
    lean = anatomy["shaft_lean"]
    with canvas.frame(rotate_deg=lean, about=(-30.0, 60.0)):
        canvas.ellipsoid((-45.0 * s, 22.0 * s), 17.0 * s, 26.0 * s, 40.0 * s, material="cancellous")
        canvas.ellipsoid(
            (-45.0 * s, 22.0 * s), 18.0 * s, 27.0 * s, 42.0 * s, material="cortical", shell=0.12
        )
        canvas.ellipsoid((-27.0 * s, 55.0 * s), 24.0 * s, 40.0 * s, 40.0 * s, material="cancellous")
        canvas.ellipsoid(
            (-6.0 * s, 78.0 * s), 8.0 * s, 10.0 * s, 18.0 * s, material="cortical", shell=0.4
        )
        canvas.rod(
            (-30.0 * s, 60.0 * s),
            (-40.0 * s, 320.0 + reach),
            17.0 * s,
            15.0 * s,
            material="cortical",
            hollow=0.58,
        )
        canvas.rod(
            (-30.0 * s, 60.0 * s),
            (-40.0 * s, 320.0 + reach),
            10.0 * s,
            9.0 * s,
            material="cancellous",
        )
        # Neck stump from the calcar towards the head.
        canvas.rod((-18.0 * s, 38.0 * s), (-8.0, 20.0), 13.0 * s, material="cancellous")

        center, lateral, medial = _stem_edges(d, view)
        outline = [(float(x), float(y)) for x, y in lateral]
        outline += [(float(x), float(y)) for x, y in medial[::-1]]
        _interface(canvas, d, lateral, medial, center)
        canvas.polygon(outline, d["stem_width"] * (1.0 if lat else 0.7), material="titanium")
        # Neck and trunnion to the head centre.
        shoulder = (float(medial[0, 0]) - 2.0, float(medial[0, 1]) + 4.0)
        canvas.rod(shoulder, (0.0, 0.0 + d["subsidence_mm"] * 0.5), 6.0, 5.0, material="titanium")
    # Head in the cup (the head follows the stem; the cup is fixed to the pelvis).
    canvas.sphere_shell((0.0, d["subsidence_mm"] * 0.5), d["head_radius"], 0.0, material="cocr")
    open_deg = 90.0 + d["cup_abduction"] if not lat else 60.0
    canvas.sphere_shell(
        (0.0, 0.0), d["cup_radius"], d["cup_radius"] - 3.5, open_deg=open_deg, material="titanium"
    )
    _cup_zones(canvas, d, open_deg)


def _interface(
    canvas: Canvas, d: dict[str, Any], lateral: np.ndarray, medial: np.ndarray, center: np.ndarray
) -> None:
    """Gruen zones: masks for all, lucent bands (with sclerotic margin) where the design says."""
    zone_ranges = {
        1: (0.0, 0.33),
        2: (0.33, 0.66),
        3: (0.66, 0.95),
        5: (0.66, 0.95),
        6: (0.33, 0.66),
        7: (0.0, 0.33),
    }
    lucent = set(d["lucent_zones"])
    band = 3.0
    for zone, (t0, t1) in zone_ranges.items():
        edge, outward = (lateral, -1.0) if zone <= 3 else (medial, 1.0)
        canvas.polygon(_band(edge, outward, band, t0, t1), 1.0, material="none", label=zone)
        if zone in lucent:
            t_end = t0 + (t1 - t0) * d["lucency_extent"]
            width = d["lucency_mm"]
            canvas.polygon(
                _band(edge, outward, width, t0, t_end), 18.0, material="cortical", weight=-1.0
            )
            if width >= 2.0:
                shifted = edge + np.array([outward * width, 0.0])
                canvas.polygon(_band(shifted, outward, 0.8, t0, t_end), 14.0, material="cortical")
    tip = (float(center[-1, 0]), float(center[-1, 1]))
    canvas.arc(tip, 2.0, 2.0 + band, 20.0, 160.0, 1.0, material="none", label=4)
    if 4 in lucent:
        width = d["lucency_mm"]
        canvas.arc(tip, 1.0, 1.0 + width, 20.0, 160.0, 18.0, material="cortical", weight=-1.0)
        if width >= 2.0:
            canvas.arc(tip, 1.0 + width, 1.8 + width, 20.0, 160.0, 14.0, material="cortical")
    for k in range(d["osteolysis"]):
        i = 6 + 8 * k
        x, y = float(lateral[i, 0]) - 4.0, float(lateral[i, 1])
        canvas.ellipsoid((x, y), 5.0, 7.0, 14.0, material="cortical", weight=-1.0)


def _cup_zones(canvas: Canvas, d: dict[str, Any], open_deg: float) -> None:
    """DeLee–Charnley zones I–III: thirds of the band around the cup's closed side."""
    r = d["cup_radius"]
    start = open_deg + 90.0
    lucent = set(d["lucent_zones"])
    for i, zone in enumerate(_ZONES_CUP):
        a0, a1 = start + 60.0 * i, start + 60.0 * (i + 1)
        canvas.arc((0.0, 0.0), r, r + 3.0, a0, a1, 1.0, material="none", label=zone)
        if zone in lucent:
            width = d["lucency_mm"]
            span = (a1 - a0) * d["lucency_extent"]
            canvas.arc(
                (0.0, 0.0), r, r + width, a0, a0 + span, 18.0, material="cortical", weight=-1.0
            )
            if width >= 2.0:
                canvas.arc(
                    (0.0, 0.0), r + width, r + width + 0.8, a0, a0 + span, 14.0, material="cortical"
                )


# -- without the THR: native hips, other hardware -----------------------------------------------

#: Hardware that is not a total hip replacement, one kind per ``other`` phantom.
OTHER_METAL: tuple[str, ...] = ("plate", "nail", "cerclage", "hemiarthroplasty")
_LEAN_PIVOT = (-30.0, 60.0)


def sample_variant(
    rng: np.random.Generator, implant: str, anatomy: dict[str, Any]
) -> dict[str, Any]:
    """Parameters of a hip without the THR (``none``, ``other``) or with it cut off."""
    if implant == "cut":
        return {"implant": "cut", "reach": 300.0, "cut_axis": (0.0, 1.0)}
    s = anatomy["scale"]
    variant: dict[str, Any] = {
        "implant": implant,
        "head_radius_native": float(rng.uniform(22.0, 26.0)) * s,
        "joint_space": float(rng.uniform(3.0, 5.0)),
        "metal": "",
    }
    if implant != "other":
        return variant
    kind = OTHER_METAL[int(rng.integers(0, len(OTHER_METAL)))]
    variant["metal"] = kind
    variant["metal_material"] = "titanium" if rng.random() < 0.5 else "steel"
    if kind == "plate":
        variant["metal_design"] = "sliding-hip-screw" if rng.random() < 0.5 else "locking-plate"
        variant["metal_length"] = float(rng.uniform(50.0, 170.0))
        variant["metal_screws"] = int(rng.integers(2, 6))
    elif kind == "nail":
        variant["metal_length"] = float(rng.choice([180.0, 240.0, 360.0]))
        variant["metal_radius"] = float(rng.uniform(5.0, 6.0))
    elif kind == "cerclage":
        variant["metal_loops"] = int(rng.integers(2, 5))
        variant["metal_tilts"] = [float(t) for t in rng.uniform(-12.0, 12.0, size=4)]
    else:
        variant["metal_design"] = str(rng.choice(STEM_DESIGNS[:3]))
        variant["metal_length"] = float(rng.uniform(120.0, 150.0)) * s
        variant["metal_width"] = float(rng.uniform(16.0, 22.0)) * s
        variant["metal_cemented"] = bool(rng.random() < 0.6)
        variant["metal_material"] = "cocr"
    return variant


def _rotate(
    p: tuple[float, float], degrees: float, about: tuple[float, float]
) -> tuple[float, float]:
    th = np.radians(degrees)
    dx, dy = p[0] - about[0], p[1] - about[1]
    return (
        float(about[0] + dx * np.cos(th) - dy * np.sin(th)),
        float(about[1] + dx * np.sin(th) + dy * np.cos(th)),
    )


def _render_native(canvas: Canvas, view: str, anatomy: dict[str, float], v: dict[str, Any]) -> None:
    s = anatomy["scale"]
    radius = v["head_radius_native"]
    canvas.rod((40.0, -400.0), (40.0, 400.0), anatomy["girth"], material="soft", caps=False)
    lat = view == "LAT"
    depth = 0.5 if lat else 1.0
    with canvas.frame(rotate_deg=anatomy["pelvis_tilt"]):
        canvas.ellipsoid(
            (38.0 * s, -70.0 * s), 75.0 * s, 60.0 * s, 10.0 * depth, material="cancellous"
        )
        canvas.ellipsoid(
            (38.0 * s, -70.0 * s), 76.0 * s, 61.0 * s, 14.0 * depth, material="cortical", shell=0.06
        )
        canvas.ellipsoid(
            (30.0 * s, 48.0 * s), 24.0 * s, 32.0 * s, 22.0 * depth, material="cortical", shell=0.25
        )
        canvas.rod(
            (25.0 * s, 22.0 * s), (100.0 * s, 30.0 * s), 9.0 * s, material="cortical", hollow=0.5
        )
        # The acetabular roof (sourcil) over the joint space, and the teardrop.
        inner = radius + v["joint_space"]
        canvas.arc((0.0, 0.0), inner, inner + 4.5, 200.0, 320.0, 24.0 * depth, material="cortical")
        canvas.ellipsoid((radius + 8.0, 0.55 * radius), 3.0, 8.0, 14.0 * depth, shell=0.4)
    lean = anatomy["shaft_lean"]
    with canvas.frame(rotate_deg=lean, about=_LEAN_PIVOT):
        canvas.ellipsoid((-45.0 * s, 22.0 * s), 17.0 * s, 26.0 * s, 40.0 * s, material="cancellous")
        canvas.ellipsoid(
            (-45.0 * s, 22.0 * s), 18.0 * s, 27.0 * s, 42.0 * s, material="cortical", shell=0.12
        )
        canvas.ellipsoid((-27.0 * s, 55.0 * s), 24.0 * s, 40.0 * s, 40.0 * s, material="cancellous")
        canvas.ellipsoid(
            (-6.0 * s, 78.0 * s), 8.0 * s, 10.0 * s, 18.0 * s, material="cortical", shell=0.4
        )
        canvas.rod(
            (-30.0 * s, 60.0 * s),
            (-40.0 * s, 320.0),
            17.0 * s,
            15.0 * s,
            material="cortical",
            hollow=0.58,
        )
        canvas.rod(
            (-30.0 * s, 60.0 * s), (-40.0 * s, 320.0), 10.0 * s, 9.0 * s, material="cancellous"
        )
        if v["metal"] == "hemiarthroplasty":
            canvas.rod((-18.0 * s, 38.0 * s), (-8.0, 20.0), 13.0 * s, material="cancellous")
    # Neck and head (the head sits in the acetabulum; the neck meets the leaning shaft).
    theta = np.radians(anatomy["neck_angle"])
    length = 42.0 * s
    base = _rotate(
        (-length * float(np.sin(theta)), -length * float(np.cos(theta))), lean, _LEAN_PIVOT
    )
    if v["metal"] != "hemiarthroplasty":
        to_head = np.hypot(*base)
        end = (base[0] * 0.8 * radius / to_head, base[1] * 0.8 * radius / to_head)
        canvas.rod(base, end, 17.0 * s, 14.5 * s, material="cortical", hollow=0.7, caps=False)
        canvas.rod(base, end, 15.5 * s, 13.0 * s, material="cancellous", caps=False)
        canvas.ellipsoid((0.0, 0.0), radius, radius, 2.0 * radius, material="cancellous")
        canvas.ellipsoid((0.0, 0.0), radius, radius, 2.0 * radius, shell=0.07)
    if v["metal"]:
        head = _rotate((0.0, 0.0), -lean, _LEAN_PIVOT)
        with canvas.frame(rotate_deg=lean, about=_LEAN_PIVOT):
            _hardware(canvas, view, s, v, head, radius, anatomy["neck_angle"] - lean)


def _shaft_x(s: float, y: float) -> float:
    """The femoral canal's axis at height ``y`` (the lean frame's x)."""
    y0 = 60.0 * s
    return -30.0 * s - 10.0 * s * (y - y0) / (320.0 - y0)


def _hardware(
    canvas: Canvas,
    view: str,
    s: float,
    v: dict[str, Any],
    head: tuple[float, float],
    radius: float,
    neck_angle: float,
) -> None:
    """The ``other`` hardware, in the femur's (leaning) frame; z follows x, as the hip lateral
    reuses the AP's layout."""
    kind, material = v["metal"], v["metal_material"]
    theta = np.radians(neck_angle)
    axis = (-float(np.sin(theta)), -float(np.cos(theta)))  # from the head down the neck

    def neck_point(t: float) -> hardware.P3:
        x, y = head[0] + t * axis[0], head[1] + t * axis[1]
        return (x, y, x)

    def cortex(y: float, side: float) -> float:
        return _shaft_x(s, y) + side * (16.5 * s if y > 60.0 * s else 24.0 * s)

    if kind == "plate":
        entry_t = (head[0] + 50.0 * s) / -axis[0]  # the lag screw's entry, the lateral cortex
        entry = neck_point(entry_t)
        plate_top = entry[1] - 10.0 if v["metal_design"] == "sliding-hip-screw" else 5.0 * s
        path = [
            (-60.0 * s, plate_top),
            (-50.0 * s, plate_top + 45.0 * s),
            (cortex(110.0 * s, -1.0), 110.0 * s),
        ]
        path.append((cortex(110.0 * s + v["metal_length"], -1.0), 110.0 * s + v["metal_length"]))
        if v["metal_design"] == "sliding-hip-screw":
            path = [(cortex(plate_top, -1.0) - 3.0, plate_top), path[-1]]
        for (x0, y0), (x1, y1) in pairwise(path):
            a: hardware.P3 = (x0 - 2.5, y0, _shaft_x(s, y0))
            b: hardware.P3 = (x1 - 2.5, y1, _shaft_x(s, y1))
            _plate_segment(canvas, view, a, b, 16.0, 5.0, material)
        if v["metal_design"] == "sliding-hip-screw":
            lag_tip = neck_point(0.25 * radius)
            hardware.screw(
                canvas, view, neck_point(entry_t * 0.55), lag_tip, 6.5, material, pitch=3.0
            )
            hardware.rod(
                canvas,
                view,
                neck_point(entry_t + 3.0),
                neck_point(entry_t - 38.0),
                6.5,
                material=material,
                hollow=0.6,
            )
            hardware.rod(
                canvas,
                view,
                neck_point(entry_t),
                neck_point(entry_t * 0.55),
                4.0,
                material=material,
            )
        else:
            for spread in (-9.0, 0.0, 9.0):
                start = neck_point(entry_t)
                end = neck_point(0.3 * radius)
                hardware.screw(
                    canvas,
                    view,
                    (start[0], start[1] + spread * 1.5, start[2]),
                    (end[0], end[1] + spread, end[2] + spread * 0.5),
                    2.6,
                    material,
                )
        y_start = 120.0 * s
        for i in range(v["metal_screws"]):
            y = y_start + (i + 0.5) * v["metal_length"] / v["metal_screws"]
            z = _shaft_x(s, y)
            hardware.screw(
                canvas,
                view,
                (cortex(y, -1.0) - 5.0, y, z),
                (cortex(y, 1.0) + 2.0, y, z),
                2.2,
                material,
            )
    elif kind == "nail":
        top: hardware.P3 = (-42.0 * s, -8.0 * s, -42.0 * s)
        bend: hardware.P3 = (_shaft_x(s, 75.0 * s), 75.0 * s, _shaft_x(s, 75.0 * s))
        tip_y = 75.0 * s + v["metal_length"] - 80.0
        tip: hardware.P3 = (_shaft_x(s, tip_y), tip_y, _shaft_x(s, tip_y))
        hardware.rod(canvas, view, top, bend, 8.0 * s, 7.0 * s, material="titanium", caps=False)
        hardware.rod(canvas, view, bend, tip, v["metal_radius"] * s, material="titanium")
        entry_t = (head[0] + 52.0 * s) / -axis[0]
        hardware.screw(
            canvas, view, neck_point(entry_t), neck_point(0.25 * radius), 5.5, material, pitch=3.0
        )
        for y in (tip_y - 35.0, tip_y - 20.0):
            z = _shaft_x(s, y)
            hardware.screw(
                canvas,
                view,
                (cortex(y, -1.0) - 3.0, y, z),
                (cortex(y, 1.0) + 2.0, y, z),
                2.5,
                material,
            )
    elif kind == "cerclage":
        for i in range(v["metal_loops"]):
            y = 100.0 * s + 32.0 * i
            x = _shaft_x(s, y)
            hardware.wire_loop(
                canvas, view, (x, y, x), 17.5 * s, 17.5 * s, tilt_deg=v["metal_tilts"][i]
            )
    else:  # hemiarthroplasty: a stem with a large head, and no acetabular cup
        stem = {
            "stem_design": v["metal_design"],
            "stem_length": v["metal_length"],
            "stem_width": v["metal_width"],
            "subsidence_mm": 0.0,
        }
        center, lateral, medial = _stem_edges(stem, view)
        outline = [(float(x), float(y)) for x, y in lateral]
        outline += [(float(x), float(y)) for x, y in medial[::-1]]
        if v["metal_cemented"]:
            mantle = [(x - 2.5, y) for x, y in lateral] + [(x + 2.5, y) for x, y in medial[::-1]]
            mantle.append((float(center[-1, 0]), float(center[-1, 1]) + 8.0))
            canvas.polygon(mantle, 14.0 * s, material="cortical")
        canvas.polygon(outline, v["metal_width"] * (1.0 if view == "LAT" else 0.7), material="cocr")
        shoulder = (float(medial[0, 0]) - 2.0, float(medial[0, 1]) + 4.0)
        canvas.rod(shoulder, head, 6.0, 5.0, material="cocr")
        canvas.sphere_shell(head, radius, 0.0, material="cocr")


def _plate_segment(
    canvas: Canvas,
    view: str,
    p0: hardware.P3,
    p1: hardware.P3,
    width: float,
    thickness: float,
    material: str,
) -> None:
    """A straight piece of a lateral plate (normal x): edge-on in the AP view."""
    a, b = hardware.project(view, p0), hardware.project(view, p1)
    c = (0.5 * (a[0] + b[0]), 0.5 * (a[1] + b[1]))
    length = float(np.hypot(b[0] - a[0], b[1] - a[1]))
    angle = float(np.degrees(np.arctan2(-(b[0] - a[0]), b[1] - a[1])))
    if view == "AP":
        canvas.plate(c, thickness, length + thickness, width, angle, 0.4 * thickness, material)
    else:
        canvas.plate(c, width, length + 2.0, thickness, angle, 0.45 * width, material)
