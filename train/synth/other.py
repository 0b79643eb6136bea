"""Phantoms of anatomy that is none of the tasks' (knee, hip, lumbar spine): "other" for the
anatomy classifier. Two regions, one per patient:

* chest (PA or AP, and a left lateral): lungs, ribs, clavicles, scapulae, the heart shadow and
  the thoracic spine; in some, sternotomy wires, a pacemaker or ECG electrodes;
* ankle (AP mortise and lateral): distal tibia and fibula with the malleoli, talus and
  calcaneus; in some, a lateral fibular plate, medial malleolar screws or syndesmotic screws.

No classes: every image is labelled "" (label index -1) and has an all-zero mask. Hardware, where
drawn, is never a task's implant.

Anatomy frames: millimetres, y towards the feet. Chest: origin mid-thorax; AP +x is the patient's
left, lateral +x anterior. Ankle: origin at the centre of the tibial plafond; AP +x is medial for
a right ankle (as the knee's), lateral +x anterior.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from train.synth import hardware, thorax
from train.synth.xray import Canvas

__all__ = [
    "CLASSES",
    "FIELD_OF_VIEW_MM",
    "OTHER_METAL",
    "REGIONS",
    "SUPPORTED_VIEWS",
    "VIEWS",
    "field_of_view",
    "kvp_range",
    "paired",
    "render",
    "sample_anatomy",
    "sample_design",
    "sample_variant",
    "view_position",
]

CLASSES: tuple[str, ...] = ()
VIEWS: tuple[str, ...] = ("AP", "LAT")
SUPPORTED_VIEWS = VIEWS
REGIONS: tuple[str, ...] = ("chest", "ankle")
#: Detector field per region (mm); FIELD_OF_VIEW_MM is the chest's.
_FIELDS = {"chest": 430.0, "ankle": 250.0}
FIELD_OF_VIEW_MM = _FIELDS["chest"]
_KVP = {"chest": (100.0, 125.0), "ankle": (52.0, 62.0)}
OTHER_METAL: dict[str, tuple[str, ...]] = {
    "chest": ("sternotomy", "pacemaker", "ecg"),
    "ankle": ("plate", "malleolar-screws", "syndesmosis"),
}
#: Share of patients with hardware when ``--implant`` does not say (present or mixed).
METAL_SHARE = 0.2


def field_of_view(anatomy: dict[str, Any]) -> float:
    return _FIELDS[anatomy["region"]]


def kvp_range(anatomy: dict[str, Any]) -> tuple[float, float]:
    return _KVP[anatomy["region"]]


def paired(anatomy: dict[str, Any]) -> bool:
    """Whether the region has a side (the ankle) or not (the chest)."""
    return bool(anatomy["region"] == "ankle")


def view_position(rng: np.random.Generator, view: str, anatomy: dict[str, Any]) -> str:
    """ViewPosition as a modality writes it: chests are mostly PA, laterals LL or LAT."""
    if view == "AP":
        if anatomy["region"] == "chest":
            return "PA" if rng.random() < 0.7 else "AP"
        return "AP"
    return str(rng.choice(["LL", "LAT"]))


def sample_anatomy(rng: np.random.Generator, scale: float) -> dict[str, Any]:
    region = REGIONS[int(rng.integers(0, len(REGIONS)))]
    anatomy: dict[str, Any] = {"region": region, "scale": scale}
    if region == "chest":
        anatomy.update(
            chest_width=float(rng.uniform(150.0, 175.0)) * scale,
            chest_depth=float(rng.uniform(95.0, 120.0)) * scale,
            lung_height=float(rng.uniform(230.0, 275.0)) * scale,
            inspiration=float(rng.uniform(-12.0, 12.0)),
            vessels=int(rng.integers(0, 2**31)),
        )
    else:
        anatomy.update(
            leg=float(rng.uniform(36.0, 48.0)) * scale,
            joint_space=float(rng.uniform(2.5, 4.0)),
            plantarflexion=float(rng.uniform(0.0, 15.0)),
            fibula_offset=float(rng.uniform(-2.0, 2.0)),
            talar_tilt=float(rng.uniform(-2.0, 2.0)),
        )
    return anatomy


def sample_design(rng: np.random.Generator, label: str, scale: float) -> dict[str, Any]:
    """No implant classes: nothing to draw (kept so every task has the same steps)."""
    return {}


def sample_variant(
    rng: np.random.Generator, implant: str, anatomy: dict[str, Any]
) -> dict[str, Any]:
    """Hardware or none: ``none`` never, ``other`` always, otherwise in METAL_SHARE of patients."""
    if implant == "cut":
        raise ValueError("--task other has no implant to cut off")
    wants = implant == "other" or (implant not in ("none", "other") and rng.random() < METAL_SHARE)
    variant: dict[str, Any] = {"implant": "other" if wants else "none", "metal": ""}
    if not wants:
        return variant
    kinds = OTHER_METAL[anatomy["region"]]
    kind = kinds[int(rng.integers(0, len(kinds)))]
    variant["metal"] = kind
    if kind == "sternotomy":
        variant["metal_count"] = int(rng.integers(5, 8))
    elif kind == "pacemaker":
        variant["metal_leads"] = int(rng.integers(1, 3))
        variant["metal_side"] = "left" if rng.random() < 0.85 else "right"
    elif kind == "ecg":
        variant["metal_count"] = int(rng.integers(3, 6))
    elif kind == "plate":
        variant["metal_length"] = float(rng.uniform(70.0, 130.0))
        variant["metal_screws"] = int(rng.integers(3, 6))
    elif kind == "malleolar-screws":
        variant["metal_count"] = int(rng.integers(1, 3))
    else:
        variant["metal_count"] = int(rng.integers(1, 3))
    return variant


def render(
    canvas: Canvas,
    view: str,
    anatomy: dict[str, Any],
    design: dict[str, Any],
    variant: dict[str, Any] | None = None,
) -> None:
    """Draw the region for one view, and its hardware where the variant has some."""
    variant = variant or {"implant": "none", "metal": ""}
    if anatomy["region"] == "chest":
        if view == "AP":
            _chest_ap(canvas, anatomy)
        else:
            _chest_lateral(canvas, anatomy)
        if variant["metal"]:
            _chest_hardware(canvas, view, anatomy, variant)
    else:
        if view == "AP":
            _ankle_ap(canvas, anatomy)
        else:
            _ankle_lateral(canvas, anatomy)
        if variant["metal"]:
            _ankle_hardware(canvas, view, anatomy, variant)


# -- chest ----------------------------------------------------------------------------------------


def _spine_levels(a: dict[str, Any]) -> list[tuple[int, float, float]]:
    """T1–T12: (level, y, body height)."""
    s = a["scale"]
    levels = []
    y = -165.0 * s + 0.3 * a["inspiration"]
    for j in range(1, 13):
        height = (16.5 + 0.8 * (j - 1)) * s
        levels.append((j, y, height))
        y += height + 6.5 * s
    return levels


def _chest_ap(canvas: Canvas, a: dict[str, Any]) -> None:
    s, w, d = a["scale"], a["chest_width"], a["chest_depth"]
    canvas.rod((0.0, -330.0 * s), (0.0, 450.0), w, material="soft", caps=False, weight=d / w)
    canvas.rod((0.0, -500.0), (0.0, -260.0 * s), 55.0 * s, material="soft", caps=False)
    for side in (-1.0, 1.0):
        canvas.ellipsoid(
            (side * (w - 5.0 * s), -215.0 * s), 70.0 * s, 48.0 * s, 110.0 * s, material="soft"
        )
    lung_center = (0.0, -165.0 * s + 0.5 * a["lung_height"] - 15.0 * s + a["inspiration"])
    thorax.lungs(canvas, "AP", lung_center, 0.9 * w, a["lung_height"], 1.56 * d, s)
    canvas.ellipsoid((0.18 * w, -70.0 * s), 17.0 * s, 15.0 * s, 40.0 * s, material="soft")
    _vessels(canvas, a, lung_center)
    for j, y, h in _spine_levels(a):
        half = (13.0 + 0.6 * j) * s
        thorax.vertebra_ap(canvas, 0.0, y, half, h, s)
        if j > 10:
            continue
        reach = min(0.9 * w, (45.0 + 22.0 * j) * s)
        for side in (-1.0, 1.0):
            thorax.rib_ap(
                canvas,
                (side * (half + 9.0 * s), y - 0.25 * h),
                side,
                reach,
                (22.0 + 3.5 * j) * s,
                s,
                anterior=j > 1,
            )
    for side in (-1.0, 1.0):
        thorax.tube(
            canvas,
            [
                (side * 18.0 * s, -188.0 * s),
                (side * 0.35 * w, -200.0 * s),
                (side * 0.6 * w, -196.0 * s),
                (side * 0.82 * w, -212.0 * s),
            ],
            7.0 * s,
            hollow=0.5,
        )
        canvas.polygon(
            [
                (side * 0.58 * w, -200.0 * s),
                (side * 0.92 * w, -195.0 * s),
                (side * 0.86 * w, -70.0 * s),
            ],
            5.0 * s,
            material="cortical",
        )
        canvas.ellipsoid(
            (side * (w + 12.0 * s), -205.0 * s), 26.0 * s, 28.0 * s, 50.0 * s, material="cancellous"
        )
        canvas.ellipsoid(
            (side * (w + 12.0 * s), -205.0 * s), 27.0 * s, 29.0 * s, 52.0 * s, shell=0.1
        )
    canvas.ellipsoid(
        (0.45 * w, lung_center[1] + 0.5 * a["lung_height"] + 30.0 * s),
        28.0 * s,
        17.0 * s,
        45.0 * s,
        material="soft",
        weight=-1.0,
    )


def _vessels(canvas: Canvas, a: dict[str, Any], lung_center: tuple[float, float]) -> None:
    """Pulmonary vessels: faint branching lines fanning out from the hila."""
    s, w = a["scale"], a["chest_width"]
    rng = np.random.default_rng(a["vessels"])
    for side in (-1.0, 1.0):
        hilum = (side * 0.22 * w, lung_center[1] + 0.05 * a["lung_height"])
        for angle in np.linspace(-75.0, 80.0, 13):
            th = np.radians(angle + float(rng.uniform(-8.0, 8.0)))
            length = float(rng.uniform(45.0, 105.0)) * s
            end = (hilum[0] + side * length * np.cos(th), hilum[1] + length * np.sin(th))
            canvas.rod(hilum, end, 2.8 * s, 0.8 * s, material="soft", weight=1.2)


def _chest_lateral(canvas: Canvas, a: dict[str, Any]) -> None:
    s, w, d = a["scale"], a["chest_width"], a["chest_depth"]
    canvas.rod((0.0, -330.0 * s), (0.0, 450.0), d, material="soft", caps=False, weight=w / d)
    canvas.rod((-10.0 * s, -500.0), (-10.0 * s, -260.0 * s), 50.0 * s, material="soft", caps=False)
    lung_center = (0.12 * d, -165.0 * s + 0.5 * a["lung_height"] - 15.0 * s + a["inspiration"])
    thorax.lungs(canvas, "LAT", lung_center, 1.55 * d, a["lung_height"], 1.05 * w, s)
    levels = _spine_levels(a)
    mid = levels[6][1]
    for j, y, h in levels:
        x = -0.62 * d - 12.0 * s * (1.0 - ((y - mid) / (180.0 * s)) ** 2)
        thorax.vertebra_lateral(canvas, x, y, (24.0 + 0.8 * j) * s, h, s, 0.06 * (y - mid))
        if 1 < j <= 10:
            thorax.rib_lateral(canvas, (x - 6.0 * s, y - 0.2 * h), 1.5 * d, (55.0 + 2.0 * j) * s, s)
    canvas.rod(
        (0.86 * d, -150.0 * s),
        (0.95 * d, 40.0 * s),
        7.0 * s,
        material="cortical",
        hollow=0.5,
        weight=2.5,
    )
    canvas.polygon(
        [(-0.7 * d, -200.0 * s), (-0.45 * d, -195.0 * s), (-0.6 * d, -60.0 * s)],
        30.0 * s,
        material="cortical",
        weight=0.25,
    )


def _chest_hardware(canvas: Canvas, view: str, a: dict[str, Any], v: dict[str, Any]) -> None:
    s, w, d = a["scale"], a["chest_width"], a["chest_depth"]
    kind = v["metal"]
    if kind == "sternotomy":
        for i in range(v["metal_count"]):
            y = -135.0 * s + i * 175.0 * s / max(v["metal_count"] - 1, 1)
            z = 0.87 * d + 0.09 * d * (y + 150.0 * s) / (190.0 * s)
            hardware.wire_loop(canvas, view, (0.0, y, z), 15.0 * s, 7.0 * s, r=0.7)
    elif kind == "pacemaker":
        side = 1.0 if v["metal_side"] == "left" else -1.0
        generator: hardware.P3 = (side * 0.55 * w, -160.0 * s, 0.9 * d)
        hardware.plate(canvas, view, generator, 50.0, 46.0, 7.0, "z", material="titanium")
        hardware.plate(canvas, view, generator, 30.0, 30.0, 3.0, "z", material="steel")
        leads = [
            [
                (side * 0.5 * w, -180.0 * s, 0.85 * d),
                (side * 0.3 * w, -195.0 * s, 0.55 * d),
                (-0.06 * w, -125.0 * s, 0.3 * d),
                (-0.1 * w, 5.0 * s, 0.2 * d),
                (0.05 * w, 60.0 * s, 0.35 * d),
                (0.28 * w, 95.0 * s, 0.5 * d),
            ],
            [
                (side * 0.5 * w, -178.0 * s, 0.85 * d),
                (side * 0.3 * w, -192.0 * s, 0.55 * d),
                (-0.07 * w, -120.0 * s, 0.3 * d),
                (-0.08 * w, -20.0 * s, 0.3 * d),
                (0.0, -5.0 * s, 0.42 * d),
            ],
        ]
        for lead in leads[: v["metal_leads"]]:
            hardware.polyline(canvas, view, lead, 1.0, material="cocr")
            tip = lead[-1]
            hardware.rod(
                canvas, view, tip, (tip[0] + 4.0, tip[1] + 6.0, tip[2]), 1.4, material="cocr"
            )
    else:  # ECG electrodes: metal snaps on the skin, with thin leads
        spots = [(-0.75, -0.95), (0.75, -0.95), (0.7, 0.75), (-0.7, 0.75), (0.35, 0.55)]
        for fx, fy in spots[: v["metal_count"]]:
            center: hardware.P3 = (fx * w, fy * 200.0 * s, d)
            hardware.rod(
                canvas,
                view,
                center,
                (center[0], center[1], center[2] + 3.0),
                3.5,
                material="steel",
            )
            cable = [
                (center[0], center[1], center[2] + 3.0),
                (center[0] * 1.1, center[1] + 60.0 * s, center[2] + 10.0),
                (center[0] * 1.2, center[1] + 200.0 * s, center[2] + 12.0),
            ]
            hardware.polyline(canvas, view, cable, 0.35, material="cocr", weight=0.6)


# -- ankle ----------------------------------------------------------------------------------------


def _ankle_ap(canvas: Canvas, a: dict[str, Any]) -> None:
    s, leg, js = a["scale"], a["leg"], a["joint_space"]
    canvas.rod((0.0, -400.0), (0.0, 40.0 * s), leg, material="soft")
    # The foot, upright on the table: the beam runs along it, a long path below the ankle.
    canvas.ellipsoid((-3.0 * s, 75.0 * s), 1.15 * leg, 48.0 * s, 2.6 * leg, material="soft")
    # Tibia: shaft, metaphysis down to the plafond, medial malleolus.
    canvas.rod((2.0, -300.0), (0.0, -45.0 * s), 13.0 * s, 14.0 * s, material="cortical", hollow=0.6)
    canvas.rod((2.0, -300.0), (0.0, -45.0 * s), 8.0 * s, 9.0 * s, material="cancellous")
    canvas.ellipsoid(
        (0.0, -22.0 * s), 25.0 * s, 22.0 * s, 30.0 * s, material="cancellous", power=2.6
    )
    canvas.ellipsoid((0.0, -22.0 * s), 26.0 * s, 22.5 * s, 32.0 * s, shell=0.07, power=2.6)
    canvas.ellipsoid((21.0 * s, 9.0 * s), 7.0 * s, 16.0 * s, 22.0 * s, material="cancellous")
    canvas.ellipsoid((21.0 * s, 9.0 * s), 7.5 * s, 16.5 * s, 23.0 * s, shell=0.2)
    # Fibula and lateral malleolus.
    fx = -25.0 * s + a["fibula_offset"]
    canvas.rod(
        (fx + 1.0, -300.0), (fx, -28.0 * s), 7.0 * s, 7.5 * s, material="cortical", hollow=0.55
    )
    canvas.ellipsoid((fx - 2.0 * s, 9.0 * s), 9.0 * s, 24.0 * s, 20.0 * s, material="cancellous")
    canvas.ellipsoid((fx - 2.0 * s, 9.0 * s), 9.5 * s, 24.5 * s, 21.0 * s, shell=0.18)
    # Talus in the mortise, the calcaneus behind and below it.
    with canvas.frame(rotate_deg=a["talar_tilt"], about=(0.0, js)):
        talus = (0.0, js + 16.0 * s)
        canvas.ellipsoid(talus, 20.0 * s, 16.0 * s, 40.0 * s, material="cancellous", power=2.3)
        canvas.ellipsoid(talus, 20.5 * s, 16.5 * s, 42.0 * s, shell=0.08, power=2.3)
        canvas.ellipsoid(
            (-4.0 * s, js + 46.0 * s), 20.0 * s, 16.0 * s, 45.0 * s, material="cancellous"
        )
        canvas.ellipsoid((-4.0 * s, js + 46.0 * s), 20.5 * s, 16.5 * s, 46.0 * s, shell=0.1)


def _ankle_lateral(canvas: Canvas, a: dict[str, Any]) -> None:
    s, leg, js = a["scale"], a["leg"], a["joint_space"]
    canvas.rod((0.0, -400.0), (0.0, 25.0 * s), 0.92 * leg, material="soft", weight=1.1)
    dome = (0.0, js + 19.0 * s)
    with canvas.frame(rotate_deg=-a["plantarflexion"], about=dome):
        canvas.rod(
            (-45.0 * s, 45.0 * s), (175.0 * s, 75.0 * s), 32.0 * s, material="soft", weight=1.3
        )
        canvas.ellipsoid((-40.0 * s, 62.0 * s), 30.0 * s, 22.0 * s, 60.0 * s, material="soft")
        canvas.ellipsoid(dome, 19.0 * s, 19.0 * s, 32.0 * s, material="cancellous")
        canvas.ellipsoid(dome, 19.5 * s, 19.5 * s, 34.0 * s, shell=0.08)
        neck = (28.0 * s, js + 27.0 * s)
        canvas.ellipsoid(neck, 16.0 * s, 10.0 * s, 30.0 * s, angle_deg=22.0, material="cancellous")
        canvas.ellipsoid(neck, 16.5 * s, 10.5 * s, 31.0 * s, angle_deg=22.0, shell=0.12)
        calcaneus = (-18.0 * s, js + 50.0 * s)
        canvas.ellipsoid(
            calcaneus,
            40.0 * s,
            19.0 * s,
            40.0 * s,
            angle_deg=-10.0,
            material="cancellous",
            power=2.4,
        )
        canvas.ellipsoid(
            calcaneus, 40.5 * s, 19.5 * s, 41.0 * s, angle_deg=-10.0, shell=0.07, power=2.4
        )
        for center, ax, ay in (
            ((48.0 * s, js + 31.0 * s), 8.0, 13.0),
            ((36.0 * s, js + 52.0 * s), 14.0, 11.0),
        ):
            canvas.ellipsoid(center, ax * s, ay * s, 30.0 * s, material="cancellous")
            canvas.ellipsoid(center, (ax + 0.5) * s, (ay + 0.5) * s, 31.0 * s, shell=0.12)
    canvas.rod(
        (-4.0, -300.0), (0.0, -45.0 * s), 14.0 * s, 15.0 * s, material="cortical", hollow=0.6
    )
    canvas.rod((-4.0, -300.0), (0.0, -45.0 * s), 9.0 * s, 10.0 * s, material="cancellous")
    canvas.ellipsoid(
        (0.0, -22.0 * s), 23.0 * s, 22.0 * s, 40.0 * s, material="cancellous", power=2.6
    )
    canvas.ellipsoid((0.0, -22.0 * s), 24.0 * s, 22.5 * s, 42.0 * s, shell=0.07, power=2.6)
    fx = -10.0 * s + a["fibula_offset"]
    canvas.rod(
        (fx - 2.0, -300.0), (fx, -25.0 * s), 7.0 * s, 7.5 * s, material="cortical", hollow=0.55
    )
    canvas.ellipsoid((fx - 2.0 * s, 10.0 * s), 10.0 * s, 22.0 * s, 18.0 * s, material="cancellous")
    canvas.ellipsoid((fx - 2.0 * s, 10.0 * s), 10.5 * s, 22.5 * s, 19.0 * s, shell=0.18)


def _ankle_hardware(canvas: Canvas, view: str, a: dict[str, Any], v: dict[str, Any]) -> None:
    s, kind = a["scale"], v["metal"]
    fx = -25.0 * s + a["fibula_offset"]
    fz = -10.0 * s + a["fibula_offset"]
    if kind == "plate":
        length = v["metal_length"]
        bottom = 22.0 * s
        lateral = fx - 11.5 * s
        segments = [
            ((lateral, bottom, fz), (lateral + 1.0 * s, -20.0 * s, fz)),
            ((lateral + 1.0 * s, -20.0 * s, fz), (fx - 9.5 * s, -20.0 * s - length, fz)),
        ]
        for p0, p1 in segments:
            mid: hardware.P3 = (0.5 * (p0[0] + p1[0]), 0.5 * (p0[1] + p1[1]), fz)
            hardware.plate(
                canvas,
                view,
                mid,
                abs(p1[1] - p0[1]) + 3.0,
                11.0,
                3.0,
                "x",
                material="steel" if v["metal_screws"] % 2 else "titanium",
            )
        for k in range(3):
            y = 14.0 * s - 11.0 * k * s
            hardware.screw(canvas, view, (lateral - 3.0, y, fz), (fx + 4.0 * s, y, fz + 2.0), 1.75)
        for k in range(v["metal_screws"]):
            y = -32.0 * s - (k + 0.5) * (length - 10.0) / v["metal_screws"]
            hardware.screw(canvas, view, (fx - 12.0 * s, y, fz), (fx + 8.5 * s, y, fz), 1.75)
    elif kind == "malleolar-screws":
        for k in range(v["metal_count"]):
            dz = (k - 0.5 * (v["metal_count"] - 1)) * 12.0 * s
            head: hardware.P3 = (22.0 * s, 25.0 * s, dz)
            tip: hardware.P3 = (8.0 * s, -28.0 * s, dz * 0.8)
            hardware.screw(canvas, view, head, tip, 2.0, head_radius=4.0, pitch=2.5)
    else:
        for k in range(v["metal_count"]):
            y = -32.0 * s - 13.0 * k * s
            hardware.screw(
                canvas, view, (fx - 11.0 * s, y, fz - 4.0 * s), (19.0 * s, y, 6.0 * s), 1.75
            )
