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

from typing import Any

import numpy as np

from dicom_node.tasks import builtin_task
from train.synth.xray import Canvas

__all__ = [
    "CLASSES",
    "FIELD_OF_VIEW_MM",
    "SUPPORTED_VIEWS",
    "VIEWS",
    "render",
    "sample_anatomy",
    "sample_design",
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


def render(canvas: Canvas, view: str, anatomy: dict[str, float], design: dict[str, Any]) -> None:
    """Draw pelvis, femur, the THR and the fixation state for one view onto ``canvas``."""
    # Centre the field on the proximal femur and stem, as a THR follow-up film is framed.
    with canvas.frame(translate=(25.0, -70.0)):
        _render(canvas, view, anatomy, design)


def _render(canvas: Canvas, view: str, anatomy: dict[str, float], design: dict[str, Any]) -> None:
    s = anatomy["scale"]
    d = design
    canvas.rod((40.0, -400.0), (40.0, 400.0), anatomy["girth"], material="soft", caps=False)
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
            (-40.0 * s, 320.0),
            17.0 * s,
            15.0 * s,
            material="cortical",
            hollow=0.58,
        )
        canvas.rod(
            (-30.0 * s, 60.0 * s), (-40.0 * s, 320.0), 10.0 * s, 9.0 * s, material="cancellous"
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
