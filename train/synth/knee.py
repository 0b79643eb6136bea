"""Knee phantoms after total knee arthroplasty: six schematic implant design families.

Each class is a *parametric family* named after a class of the knee-implant study. The
parameters are caricatures chosen so that the families differ in the kind of details that tell
real designs apart (posterior-stabilised box or not, femoral pegs, anterior flange height,
posterior condyle shape, tibial stem length, keel and fins, tray shape), with overlapping
within-class variation. They are not the manufacturers' geometry.

Anatomy frame: millimetres, origin at the centre of the joint line, y towards the feet. In the
AP view +x is the medial side of a right knee; in the lateral view +x is anterior.

It is one file because it is one generator of one anatomy: the families, the bones and both
views share one anatomy frame, and splitting the phantom's parts would scatter one geometry.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import numpy as np

from dicom_node.tasks import builtin_task
from train.synth import hardware
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

_SPEC = builtin_task("knee")
#: The task's classes and views, as its spec (dicom_node/tasks.yaml) names them.
CLASSES: tuple[str, ...] = tuple(c.name for c in _SPEC.classes)
VIEWS: tuple[str, ...] = tuple(_SPEC.views)
SUPPORTED_VIEWS = VIEWS
#: Detector field of view (mm) for the default matrix; the patient plane is smaller by the
#: magnification.
FIELD_OF_VIEW_MM = 300.0

FEMORAL_LABEL = 1
TIBIAL_LABEL = 2

# Per family: ranges (low, high) or fixed choices. Units: mm and degrees.
_FAMILIES: dict[str, dict[str, Any]] = {
    "Exactech Optetrak Logic": dict(
        box=(17.0, 21.0),
        box_width=(16.0, 19.0),
        pegs=2,
        peg_length=(9.0, 13.0),
        peg_tilt=(-3.0, 3.0),
        flange=(26.0, 31.0),
        posterior="standard",
        stem=(30.0, 38.0),
        stem_radius=(5.5, 6.5),
        keel="fins",
        fin_angle=(55.0, 65.0),
        fin_length=(18.0, 23.0),
        tray="lipped",
        tray_thickness=(4.0, 5.0),
    ),
    "Maxx Freedom Knee": dict(
        box=None,
        box_width=None,
        pegs=2,
        peg_length=(15.0, 19.0),
        peg_tilt=(16.0, 24.0),
        flange=(38.0, 44.0),
        posterior="round",
        stem=(20.0, 27.0),
        stem_radius=(7.0, 8.0),
        keel="cruciform",
        fin_angle=None,
        fin_length=None,
        tray="flat",
        tray_thickness=(4.0, 5.0),
    ),
    "Smith & Nephew Legion": dict(
        box=(12.0, 15.0),
        box_width=(22.0, 26.0),
        pegs=2,
        peg_length=(9.0, 13.0),
        peg_tilt=(-3.0, 3.0),
        flange=(38.0, 44.0),
        posterior="standard",
        stem=(48.0, 58.0),
        stem_radius=(5.0, 6.0),
        keel="none",
        fin_angle=None,
        fin_length=None,
        tray="flat",
        tray_thickness=(5.5, 6.5),
    ),
    "Stryker NRG": dict(
        box=None,
        box_width=None,
        pegs=0,
        peg_length=None,
        peg_tilt=None,
        flange=(26.0, 31.0),
        posterior="thick",
        stem=None,
        stem_radius=None,
        keel="pegs",
        fin_angle=None,
        fin_length=(10.0, 14.0),
        tray="flat",
        tray_thickness=(4.0, 5.0),
    ),
    "Zimmer LPS": dict(
        box=(20.0, 24.0),
        box_width=(14.0, 17.0),
        pegs=2,
        peg_length=(11.0, 15.0),
        peg_tilt=(-3.0, 3.0),
        flange=(32.0, 37.0),
        posterior="standard",
        stem=(50.0, 62.0),
        stem_radius=(5.0, 6.0),
        keel="fins",
        fin_angle=(20.0, 30.0),
        fin_length=(20.0, 26.0),
        tray="flat",
        tray_thickness=(4.0, 5.0),
    ),
    "Zimmer Persona": dict(
        box=(14.0, 17.0),
        box_width=(17.0, 20.0),
        pegs=2,
        peg_length=(10.0, 14.0),
        peg_tilt=(8.0, 15.0),
        flange=(32.0, 37.0),
        posterior="standard",
        stem=(28.0, 36.0),
        stem_radius=(6.0, 7.0),
        keel="plate",
        fin_angle=None,
        fin_length=(20.0, 26.0),
        tray="asymmetric",
        tray_thickness=(4.0, 5.0),
    ),
}


def sample_design(rng: np.random.Generator, label: str, scale: float) -> dict[str, Any]:
    """Draw one implant of family ``label`` for a patient of body ``scale``."""
    family = _FAMILIES[label]
    design = draw_family(rng, family)
    design["size"] = scale * float(rng.uniform(0.95, 1.05))  # implant size follows the bone
    design["insert"] = float(rng.uniform(8.0, 16.0))
    design["slope"] = float(rng.uniform(0.0, 7.0))
    return design


def sample_anatomy(rng: np.random.Generator, scale: float) -> dict[str, float]:
    """Patient anatomy: bone sizes, soft-tissue girth, valgus, flexion of the lateral view."""
    return {
        "scale": scale,
        "thigh": float(rng.uniform(65.0, 100.0)) * scale,
        "calf": float(rng.uniform(48.0, 70.0)) * scale,
        "valgus": float(rng.uniform(3.0, 8.0)),
        "flexion": float(rng.uniform(0.0, 25.0)),
        "fibula_offset": float(rng.uniform(-3.0, 3.0)),
        "patella": float(rng.uniform(-4.0, 6.0)),
    }


def render(
    canvas: Canvas,
    view: str,
    anatomy: dict[str, float],
    design: dict[str, Any],
    variant: dict[str, Any] | None = None,
) -> None:
    """Draw soft tissue, bones and the implant for one view onto ``canvas``.

    ``variant`` (from :func:`sample_variant`) draws a knee without the implant instead: native
    (``none``), with other hardware (``other``), or the implant with longer bones for a field
    moved off it (``cut``). Without it the output is the present-implant phantom as ever.
    """
    if variant is not None and variant["implant"] in ("none", "other"):
        if view == "AP":
            _native_ap(canvas, anatomy, variant)
        else:
            _native_lateral(canvas, anatomy, variant)
        return
    reach = 0.0 if variant is None else float(variant["reach"])
    if view == "AP":
        _render_ap(canvas, anatomy, design, reach)
    else:
        _render_lateral(canvas, anatomy, design, reach)


def _soft_tissue(canvas: Canvas, anatomy: dict[str, float], reach: float = 0.0) -> None:
    canvas.rod(
        (0.0, -420.0 - reach),
        (0.0, 0.0),
        anatomy["thigh"],
        0.5 * (anatomy["thigh"] + anatomy["calf"]),
        material="soft",
        caps=False,
    )
    canvas.rod(
        (0.0, 0.0),
        (0.0, 420.0 + reach),
        0.5 * (anatomy["thigh"] + anatomy["calf"]),
        anatomy["calf"],
        material="soft",
        caps=False,
    )


def _render_ap(
    canvas: Canvas, anatomy: dict[str, float], d: dict[str, Any], reach: float = 0.0
) -> None:
    s = anatomy["scale"]
    k = d["size"]
    gap = d["insert"]
    _soft_tissue(canvas, anatomy, reach)
    top = -gap / 2
    bottom = gap / 2 + d["tray_thickness"]
    # Femur: shaft in valgus, metaphysis, condyles (cut flat by the component).
    lean = np.tan(np.radians(anatomy["valgus"]))
    shaft_top = (-(200.0 + reach) * lean, -200.0 - reach)
    canvas.rod(
        shaft_top,
        (-45.0 * lean, top - 45.0),
        14.0 * s,
        hollow=0.62,
        material="cortical",
    )
    canvas.rod(shaft_top, (-45.0 * lean, top - 45.0), 9.0 * s, material="cancellous")
    canvas.ellipsoid((0.0, top - 30.0 * s), 37.0 * s, 32.0 * s, 38.0 * s, material="cancellous")
    canvas.ellipsoid(
        (0.0, top - 30.0 * s), 38.0 * s, 33.0 * s, 40.0 * s, material="cortical", shell=0.08
    )
    # Patella, seen through the femur.
    canvas.ellipsoid(
        (0.0, top - 28.0 * s + anatomy["patella"]),
        21.0 * s,
        23.0 * s,
        20.0 * s,
        material="cortical",
        shell=0.15,
    )
    # Tibia and fibula.
    canvas.ellipsoid(
        (0.0, bottom + 18.0 * s), 36.0 * k, 20.0 * s, 40.0 * s, material="cancellous", power=3.0
    )
    canvas.rod(
        (0.0, bottom + 25.0 * s), (2.0, 220.0 + reach), 22.0 * s, 13.0 * s, material="cancellous"
    )
    canvas.rod(
        (0.0, bottom + 30.0 * s),
        (2.0, 220.0 + reach),
        24.0 * s,
        14.0 * s,
        hollow=0.7,
        material="cortical",
    )
    fx = -31.0 * s + anatomy["fibula_offset"]
    canvas.ellipsoid(
        (fx, bottom + 32.0 * s), 9.0 * s, 11.0 * s, 18.0 * s, material="cortical", shell=0.3
    )
    canvas.rod(
        (fx, bottom + 40.0 * s),
        (fx + 6.0, 220.0 + reach),
        7.0 * s,
        6.0 * s,
        hollow=0.5,
        material="cortical",
    )

    # Femoral component, seen through flange, condyles and box.
    width = 68.0 * k
    notch = (d["box_width"] or 16.0) * k
    runner = 0.5 * (width - notch)
    for side in (-1.0, 1.0):
        cx = side * (notch / 2 + runner / 2)
        canvas.plate(
            (cx, top - 12.0 * k),
            runner,
            24.0 * k,
            22.0,
            corner=9.0 * k,
            material="cocr",
            label=FEMORAL_LABEL,
        )
    canvas.plate(
        (0.0, top - 26.0 * k),
        0.86 * width,
        0.55 * d["flange"] * k,
        4.0,
        corner=6.0,
        material="cocr",
        label=FEMORAL_LABEL,
    )
    if d["box"] is not None:
        box_h = d["box"] * k
        for side in (-1.0, 1.0):
            canvas.plate(
                (side * notch / 2, top - box_h / 2),
                2.5,
                box_h,
                26.0,
                material="cocr",
                label=FEMORAL_LABEL,
            )
        canvas.plate(
            (0.0, top - box_h), notch + 2.5, 2.5, 26.0, material="cocr", label=FEMORAL_LABEL
        )
    if d["pegs"]:
        for side in (-1.0, 1.0):
            base = (side * (notch / 2 + runner / 2), top - 22.0 * k)
            canvas.rod(
                base,
                (base[0], base[1] - d["peg_length"]),
                3.5,
                3.0,
                material="cocr",
                label=FEMORAL_LABEL,
            )

    # Tibial component: tray, then keel / stem / pegs.
    tray_w = 70.0 * k
    tt = d["tray_thickness"]
    tray_center = 0.0
    if d["tray"] == "asymmetric":
        tray_center = 4.0 * k  # the medial plateau is larger
    canvas.plate(
        (tray_center, gap / 2 + tt / 2),
        tray_w,
        tt,
        42.0 * k,
        corner=1.5,
        material="titanium",
        label=TIBIAL_LABEL,
    )
    if d["tray"] == "lipped":
        for side in (-1.0, 1.0):
            canvas.plate(
                (side * (tray_w / 2 - 2.0), gap / 2 - 1.5),
                3.0,
                3.5,
                30.0,
                material="titanium",
                label=TIBIAL_LABEL,
            )
    stem_top = (0.0, bottom)
    if d["stem"] is not None:
        tip = (0.0, bottom + d["stem"])
        canvas.rod(
            stem_top,
            tip,
            d["stem_radius"],
            0.7 * d["stem_radius"],
            material="titanium",
            label=TIBIAL_LABEL,
        )
    keel = d["keel"]
    if keel == "fins":
        angle = np.radians(d["fin_angle"])
        for side in (-1.0, 1.0):
            outer = (side * d["fin_length"] * np.sin(angle), bottom + 3.0)
            lower = (side * 3.0, bottom + d["fin_length"] * np.cos(angle) + 8.0)
            canvas.polygon(
                [(side * 3.0, bottom), outer, lower], 3.0, material="titanium", label=TIBIAL_LABEL
            )
    elif keel == "cruciform":
        canvas.plate(
            (0.0, bottom + 9.0),
            34.0 * k,
            18.0,
            3.5,
            corner=3.0,
            material="titanium",
            label=TIBIAL_LABEL,
        )
    elif keel == "plate":
        w = d["fin_length"] * k
        canvas.polygon(
            [(-w / 2, bottom), (w / 2, bottom), (w / 4, bottom + 28.0), (-w / 4, bottom + 28.0)],
            3.0,
            material="titanium",
            label=TIBIAL_LABEL,
        )
    elif keel == "pegs":
        for side in (-1.0, 1.0):
            base = (side * tray_w / 4, bottom)
            canvas.rod(
                base,
                (base[0], bottom + d["fin_length"]),
                3.5,
                3.0,
                material="titanium",
                label=TIBIAL_LABEL,
            )


def _render_lateral(
    canvas: Canvas, anatomy: dict[str, float], d: dict[str, Any], reach: float = 0.0
) -> None:
    s = anatomy["scale"]
    k = d["size"]
    gap = d["insert"]
    top = -gap / 2
    _soft_tissue(canvas, anatomy, reach)
    radius = (24.0 if d["posterior"] != "round" else 28.0) * k
    depth_ap = 58.0 * k  # antero-posterior size of the femoral component
    ant = 0.5 * depth_ap
    center = (ant - radius - 6.0 * k, top - radius)

    # Tibia (fixed), with the posterior slope of the tray.
    with canvas.frame(rotate_deg=-d["slope"], about=(0.0, gap / 2)):
        bottom = gap / 2 + d["tray_thickness"]
        canvas.ellipsoid(
            (0.0, bottom + 17.0 * s), 30.0 * s, 19.0 * s, 70.0 * s, material="cancellous", power=3.0
        )
        canvas.rod(
            (0.0, bottom + 25.0 * s),
            (-4.0, 220.0 + reach),
            20.0 * s,
            12.0 * s,
            material="cancellous",
        )
        canvas.rod(
            (0.0, bottom + 30.0 * s),
            (-4.0, 220.0 + reach),
            22.0 * s,
            13.5 * s,
            hollow=0.7,
            material="cortical",
        )
        canvas.ellipsoid(
            (22.0 * s, bottom + 38.0 * s),
            8.0 * s,
            12.0 * s,
            30.0 * s,
            material="cortical",
            shell=0.3,
        )
        fx = -18.0 * s + anatomy["fibula_offset"]
        canvas.ellipsoid(
            (fx, bottom + 30.0 * s), 9.0 * s, 10.0 * s, 18.0 * s, material="cortical", shell=0.3
        )
        canvas.rod(
            (fx, bottom + 38.0 * s),
            (fx - 2.0, 220.0 + reach),
            7.0 * s,
            6.0 * s,
            hollow=0.5,
            material="cortical",
        )
        tray_len = 48.0 * k
        tt = d["tray_thickness"]
        canvas.plate(
            (0.0, gap / 2 + tt / 2),
            tray_len,
            tt,
            68.0 * k,
            corner=1.5,
            material="titanium",
            label=TIBIAL_LABEL,
        )
        if d["tray"] == "lipped":
            canvas.plate(
                (-tray_len / 2 + 2.0, gap / 2 - 1.5),
                3.0,
                3.5,
                50.0,
                material="titanium",
                label=TIBIAL_LABEL,
            )
        if d["stem"] is not None:
            canvas.rod(
                (0.0, bottom),
                (0.0, bottom + d["stem"]),
                d["stem_radius"],
                0.7 * d["stem_radius"],
                material="titanium",
                label=TIBIAL_LABEL,
            )
        if d["keel"] == "cruciform":
            canvas.plate(
                (0.0, bottom + 9.0),
                22.0 * k,
                18.0,
                3.5,
                corner=3.0,
                material="titanium",
                label=TIBIAL_LABEL,
            )
        elif d["keel"] == "fins":
            # Coronal fins seen edge-on: a slight thickening beside the stem.
            canvas.plate(
                (0.0, bottom + 8.0),
                9.0,
                16.0,
                1.5 * d["fin_length"],
                material="titanium",
                label=TIBIAL_LABEL,
            )
        elif d["keel"] == "pegs":
            for side in (-1.0, 1.0):
                canvas.rod(
                    (side * tray_len / 4, bottom),
                    (side * tray_len / 4, bottom + d["fin_length"]),
                    3.5,
                    3.0,
                    material="titanium",
                    label=TIBIAL_LABEL,
                )

    # Femur and femoral component, flexed about the condylar centre.
    with canvas.frame(rotate_deg=anatomy["flexion"], about=center):
        shaft_top = (6.0, -220.0 - reach)
        canvas.rod(shaft_top, (0.0, top - 40.0), 15.0 * s, hollow=0.62, material="cortical")
        canvas.rod(shaft_top, (0.0, top - 40.0), 9.5 * s, material="cancellous")
        canvas.ellipsoid(
            (center[0] + 4.0, center[1] - 6.0), 32.0 * s, 30.0 * s, 70.0 * s, material="cancellous"
        )
        canvas.ellipsoid(
            (center[0] + 4.0, center[1] - 6.0),
            33.0 * s,
            31.0 * s,
            72.0 * s,
            material="cortical",
            shell=0.07,
        )
        wall = 7.0 if d["posterior"] != "thick" else 10.0
        # Distal and posterior runner: an arc from anterior-inferior round to posterior-superior.
        canvas.arc(
            center,
            radius - wall,
            radius,
            20.0,
            235.0,
            18.0 * k,
            material="cocr",
            label=FEMORAL_LABEL,
        )
        # Anterior chamfer and flange rising in front of the femur.
        flange_h = d["flange"] * k
        fx0, fy0 = ant - 2.0, top - 8.0
        canvas.polygon(
            [
                (fx0 - 6.0, fy0 + 2.0),
                (fx0, fy0),
                (fx0 - 6.0, fy0 - flange_h),
                (fx0 - 11.0, fy0 - flange_h + 3.0),
                (fx0 - 11.0, fy0 - 4.0),
            ],
            60.0 * k,
            material="cocr",
            label=FEMORAL_LABEL,
        )
        canvas.polygon(
            [
                (center[0], top - wall),
                (fx0 - 6.0, fy0 + 2.0),
                (fx0 - 11.0, fy0 - 4.0),
                (center[0], top - wall - 2.0),
            ],
            55.0 * k,
            material="cocr",
            label=FEMORAL_LABEL,
        )
        if d["posterior"] == "round":
            canvas.arc(
                center,
                radius - wall,
                radius,
                235.0,
                265.0,
                18.0 * k,
                material="cocr",
                label=FEMORAL_LABEL,
            )
        if d["box"] is not None:
            box_h = d["box"] * k
            canvas.plate(
                (center[0] + 2.0, top - box_h / 2),
                34.0 * k,
                box_h,
                5.0,
                corner=2.0,
                material="cocr",
                label=FEMORAL_LABEL,
            )
        if d["pegs"]:
            base = (center[0] + 8.0 * k, top - wall - 1.0)
            tilt = np.radians(d["peg_tilt"])
            tip = (
                base[0] + d["peg_length"] * np.sin(tilt),
                base[1] - d["peg_length"] * np.cos(tilt),
            )
            canvas.rod(base, tip, 3.5, 3.0, material="cocr", label=FEMORAL_LABEL)
        # Patella in front of the flange.
        canvas.ellipsoid(
            (ant + 10.0, top - 30.0 * s + anatomy["patella"]),
            9.0 * s,
            21.0 * s,
            40.0 * s,
            material="cortical",
            shell=0.2,
        )


# -- without the implant: native knees, other hardware ------------------------------------------

#: Hardware that is not a total knee arthroplasty, one kind per ``other`` phantom.
OTHER_METAL: tuple[str, ...] = ("plate", "nail", "cerclage", "uka")
#: Where a ``cut`` field moves: along the limb, to the thigh or to the lower leg.
_CUT_AXES = ((0.0, -1.0), (0.0, 1.0))


def sample_variant(
    rng: np.random.Generator, implant: str, anatomy: dict[str, Any]
) -> dict[str, Any]:
    """Parameters of a knee without the implant (``none``, ``other``) or with it cut off."""
    if implant == "cut":
        axis = _CUT_AXES[int(rng.integers(0, len(_CUT_AXES)))]
        return {"implant": "cut", "reach": 260.0, "cut_axis": axis}
    variant: dict[str, Any] = {
        "implant": implant,
        "joint_space": float(rng.uniform(4.0, 7.0)),
        "native_slope": float(rng.uniform(3.0, 10.0)),
        "metal": "",
    }
    if implant != "other":
        return variant
    kind = OTHER_METAL[int(rng.integers(0, len(OTHER_METAL)))]
    variant["metal"] = kind
    variant["metal_material"] = "titanium" if rng.random() < 0.5 else "steel"
    if kind == "plate":
        variant["metal_bone"] = "femur" if rng.random() < 0.5 else "tibia"
        variant["metal_length"] = float(rng.uniform(60.0, 160.0))
        variant["metal_screws"] = int(rng.integers(3, 6))
        variant["metal_width"] = float(rng.uniform(13.0, 17.0))
    elif kind == "nail":
        variant["metal_bone"] = "femur" if rng.random() < 0.5 else "tibia"
        variant["metal_length"] = float(rng.uniform(200.0, 320.0))
        variant["metal_radius"] = float(rng.uniform(4.5, 6.0))
    elif kind == "cerclage":
        variant["metal_bone"] = "patella" if rng.random() < 0.6 else "femur"
        variant["metal_loops"] = int(rng.integers(2, 4))
        variant["metal_tilts"] = [float(t) for t in rng.uniform(-10.0, 10.0, size=3)]
    else:  # unicondylar knee arthroplasty, usually medial
        variant["metal_side"] = "medial" if rng.random() < 0.75 else "lateral"
        variant["joint_space"] = float(rng.uniform(7.0, 10.0))  # room for the insert
        variant["metal_material"] = "cocr"
    return variant


def _native_ap(canvas: Canvas, anatomy: dict[str, float], v: dict[str, Any]) -> None:
    s = anatomy["scale"]
    top, bottom = -0.5 * v["joint_space"], 0.5 * v["joint_space"]
    _soft_tissue(canvas, anatomy)
    lean = np.tan(np.radians(anatomy["valgus"]))
    # Femur: shaft, distal metaphysis and both condyles with the intercondylar notch.
    canvas.rod((-200.0 * lean, -200.0), (-45.0 * lean, top - 50.0 * s), 14.0 * s, hollow=0.62)
    canvas.rod(
        (-200.0 * lean, -200.0), (-45.0 * lean, top - 50.0 * s), 9.0 * s, material="cancellous"
    )
    center = (0.0, top - 29.0 * s)
    canvas.ellipsoid(center, 37.0 * s, 29.0 * s, 40.0 * s, material="cancellous", power=2.6)
    canvas.ellipsoid(center, 38.0 * s, 29.5 * s, 42.0 * s, shell=0.06, power=2.6)
    canvas.ellipsoid(
        (0.0, top - 2.0 * s), 7.0 * s, 11.0 * s, 30.0 * s, material="cancellous", weight=-1.0
    )
    for side in (-1.0, 1.0):
        canvas.ellipsoid(
            (side * 19.0 * s, top - 13.0 * s), 18.0 * s, 13.0 * s, 22.0 * s, shell=0.12
        )
    canvas.ellipsoid(
        (0.0, top - 28.0 * s + anatomy["patella"]), 21.0 * s, 23.0 * s, 20.0 * s, shell=0.15
    )
    # Tibia: plateau with its subchondral plate and the tibial spines; fibula.
    plateau = (0.0, bottom + 20.0 * s)
    canvas.ellipsoid(plateau, 36.0 * s, 20.0 * s, 40.0 * s, material="cancellous", power=3.0)
    canvas.ellipsoid(plateau, 37.0 * s, 20.5 * s, 42.0 * s, shell=0.05, power=3.0)
    for side in (-1.0, 1.0):
        canvas.ellipsoid((side * 5.0 * s, bottom + 1.0 * s), 3.5 * s, 5.0 * s, 10.0 * s)
    canvas.rod((0.0, bottom + 25.0 * s), (2.0, 220.0), 22.0 * s, 13.0 * s, material="cancellous")
    canvas.rod((0.0, bottom + 30.0 * s), (2.0, 220.0), 24.0 * s, 14.0 * s, hollow=0.7)
    fx = -31.0 * s + anatomy["fibula_offset"]
    canvas.ellipsoid((fx, bottom + 32.0 * s), 9.0 * s, 11.0 * s, 18.0 * s, shell=0.3)
    canvas.rod((fx, bottom + 40.0 * s), (fx + 6.0, 220.0), 7.0 * s, 6.0 * s, hollow=0.5)
    if v["metal"]:
        _hardware(canvas, "AP", anatomy, v, top, bottom)


def _native_lateral(canvas: Canvas, anatomy: dict[str, float], v: dict[str, Any]) -> None:
    s = anatomy["scale"]
    top, bottom = -0.5 * v["joint_space"], 0.5 * v["joint_space"]
    radius = 23.0 * s
    center = (-2.0 * s, top - radius)
    _soft_tissue(canvas, anatomy)
    with canvas.frame(rotate_deg=-v["native_slope"], about=(0.0, bottom)):
        plateau = (0.0, bottom + 19.0 * s)
        canvas.ellipsoid(plateau, 30.0 * s, 19.0 * s, 70.0 * s, material="cancellous", power=3.0)
        canvas.ellipsoid(plateau, 31.0 * s, 19.5 * s, 72.0 * s, shell=0.05, power=3.0)
        canvas.rod(
            (0.0, bottom + 25.0 * s), (-4.0, 220.0), 20.0 * s, 12.0 * s, material="cancellous"
        )
        canvas.rod((0.0, bottom + 30.0 * s), (-4.0, 220.0), 22.0 * s, 13.5 * s, hollow=0.7)
        canvas.ellipsoid((22.0 * s, bottom + 38.0 * s), 8.0 * s, 12.0 * s, 30.0 * s, shell=0.3)
        fx = -18.0 * s + anatomy["fibula_offset"]
        canvas.ellipsoid((fx, bottom + 30.0 * s), 9.0 * s, 10.0 * s, 18.0 * s, shell=0.3)
        canvas.rod((fx, bottom + 38.0 * s), (fx - 2.0, 220.0), 7.0 * s, 6.0 * s, hollow=0.5)
        if v["metal"]:
            _hardware(canvas, "LAT", anatomy, v, top, bottom, bone="tibia")
    with canvas.frame(rotate_deg=anatomy["flexion"], about=center):
        canvas.rod((6.0, -220.0), (0.0, top - 40.0), 15.0 * s, hollow=0.62)
        canvas.rod((6.0, -220.0), (0.0, top - 40.0), 9.5 * s, material="cancellous")
        metaphysis = (center[0] + 4.0, center[1] - 6.0)
        b = radius + 6.0  # the condyles reach the joint line
        canvas.ellipsoid(metaphysis, 32.0 * s, b, 70.0 * s, material="cancellous")
        canvas.ellipsoid(metaphysis, 33.0 * s, b + 0.5, 72.0 * s, shell=0.07)
        canvas.ellipsoid(center, radius, radius, 36.0 * s, shell=0.1)
        canvas.ellipsoid(
            (29.0 * s + 10.0, top - 30.0 * s + anatomy["patella"]),
            9.0 * s,
            21.0 * s,
            40.0 * s,
            shell=0.2,
        )
        if v["metal"]:
            _hardware(canvas, "LAT", anatomy, v, top, bottom, bone="femur", center=center)


def _hardware(
    canvas: Canvas,
    view: str,
    anatomy: dict[str, float],
    v: dict[str, Any],
    top: float,
    bottom: float,
    bone: str | None = None,
    center: tuple[float, float] = (0.0, 0.0),
) -> None:
    """The ``other`` hardware of one bone (both in the AP view, whose bones share one frame)."""
    kind, s, material = v["metal"], anatomy["scale"], v["metal_material"]
    on_femur = v.get("metal_bone") in ("femur", "patella") or (kind == "uka" and view == "AP")
    if view == "AP":
        if kind == "uka":
            _uka(canvas, view, s, v, top, bottom, center)
            return
        frame = (-anatomy["valgus"], (0.0, top)) if on_femur else (0.0, (0.0, bottom))
        with canvas.frame(rotate_deg=frame[0], about=frame[1]):
            _hardware_part(canvas, view, anatomy, v, top, bottom, material)
        return
    if kind == "uka":
        _uka(canvas, view, s, v, top, bottom, center, bone=bone)
        return
    if (bone == "femur") == on_femur:
        _hardware_part(canvas, view, anatomy, v, top, bottom, material)


def _hardware_part(
    canvas: Canvas,
    view: str,
    anatomy: dict[str, float],
    v: dict[str, Any],
    top: float,
    bottom: float,
    material: str,
) -> None:
    s, kind, bone = anatomy["scale"], v["metal"], v.get("metal_bone")
    if kind == "plate":
        sign = -1.0 if bone == "femur" else 1.0  # along the bone, away from the joint
        y0 = top - 6.0 if bone == "femur" else bottom + 5.0
        half = (35.0 if bone == "femur" else 36.0) * s
        shaft = (15.0 if bone == "femur" else 14.5) * s
        t = 4.5
        path = [
            (-half - t / 2, y0, 0.0),
            (-half + 2.0 * s - t / 2, y0 + sign * 40.0, 0.0),
            (-shaft - t / 2, y0 + sign * 72.0, 0.0),
            (-shaft - t / 2, y0 + sign * (72.0 + v["metal_length"]), 0.0),
        ]
        for p0, p1 in pairwise(path):
            _plate_segment(canvas, view, p0, p1, v["metal_width"], t, material)
        for i in range(3):  # locking screws in the metaphysis, across the bone
            y = y0 + sign * (8.0 + 12.0 * i)
            z = (i - 1) * 9.0 * s
            head = (-half - t, y, z)
            hardware.screw(
                canvas, view, head, (half * 0.8, y + 2.0 * (i - 1), z * 0.7), 2.5, material
            )
        for i in range(v["metal_screws"]):  # bicortical shaft screws
            y = y0 + sign * (80.0 + (i + 0.5) * v["metal_length"] / v["metal_screws"])
            if abs(y) > 200.0:
                break
            hardware.screw(canvas, view, (-shaft - t, y, 0.0), (shaft + 3.0, y, 0.0), 2.2, material)
    elif kind == "nail":
        r = v["metal_radius"] * s
        if bone == "femur":  # retrograde, from the intercondylar notch up the canal
            tip = top - v["metal_length"]
            points = [(0.0, top - 2.0, 0.0), (0.0, tip, 4.0)]
            locks = [top - 18.0, top - 34.0, tip + 25.0, tip + 45.0]
            span = 34.0 * s
        else:  # antegrade tibial nail with its proximal (Herzog) bend
            tip = bottom + v["metal_length"]
            points = [(0.0, bottom - 2.0, 14.0 * s), (0.0, bottom + 45.0, 4.0), (0.0, tip, -2.0)]
            locks = [bottom + 18.0, bottom + 32.0, tip - 30.0, tip - 15.0]
            span = 30.0 * s
        hardware.polyline(canvas, view, points, r, material="titanium")
        hardware.rod(canvas, view, points[0], points[0], r, material="titanium")
        for i, y in enumerate(locks):
            if abs(y) > 230.0:
                continue
            order = sorted(points, key=lambda p: p[1])
            z = float(np.interp(y, [p[1] for p in order], [p[2] for p in order]))
            if i == 1 and bone == "tibia":  # one proximal screw front to back
                hardware.screw(canvas, view, (0.0, y, 24.0 * s), (0.0, y, -20.0 * s), 2.4, material)
            else:
                hardware.screw(canvas, view, (-span, y, z), (span, y, z), 2.4, material)
    elif kind == "cerclage" and bone == "patella":
        y = top - 29.0 * s + anatomy["patella"]
        z = 29.0 * s + 10.0
        for x in (-8.0 * s, 8.0 * s):
            hardware.rod(
                canvas, view, (x, y - 30.0 * s, z), (x, y + 27.0 * s, z), 1.0, material="steel"
            )
        front = z + 10.0 * s
        yt, yb = y - 25.0 * s, y + 23.0 * s
        eight = [
            (-9.0 * s, yt, front - 4.0),
            (0.0, y, front),
            (9.0 * s, yb, front - 4.0),
            (-9.0 * s, yb, front - 4.0),
            (0.0, y, front),
            (9.0 * s, yt, front - 4.0),
            (-9.0 * s, yt, front - 4.0),
        ]
        hardware.polyline(canvas, view, eight, 0.6, material="steel")
    elif kind == "cerclage":
        for i in range(v["metal_loops"]):
            y = top - 70.0 - 28.0 * i
            radius = 15.0 * s + 0.8
            hardware.wire_loop(
                canvas, view, (0.0, y, 2.0), radius, radius, tilt_deg=v["metal_tilts"][i]
            )


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
    mid = tuple(0.5 * (a + b) for a, b in zip(p0, p1, strict=True))
    a, b = hardware.project(view, p0), hardware.project(view, p1)
    length = float(np.hypot(b[0] - a[0], b[1] - a[1]))
    angle = float(np.degrees(np.arctan2(-(b[0] - a[0]), b[1] - a[1])))
    c = hardware.project(view, mid)  # type: ignore[arg-type]
    if view == "AP":
        canvas.plate(c, thickness, length + thickness, width, angle, 0.4 * thickness, material)
    else:
        canvas.plate(c, width, length + 2.0, thickness, angle, 0.45 * width, material)


def _uka(
    canvas: Canvas,
    view: str,
    s: float,
    v: dict[str, Any],
    top: float,
    bottom: float,
    center: tuple[float, float],
    bone: str | None = None,
) -> None:
    """Unicondylar knee: one half-width femoral runner and a half tibial tray, one side."""
    side = 1.0 if v["metal_side"] == "medial" else -1.0
    if view == "AP":
        x = side * 19.0 * s
        canvas.plate((x, top - 9.0 * s), 19.0 * s, 18.0 * s, 22.0, corner=7.0 * s, material="cocr")
        canvas.rod((x, top - 16.0 * s), (x, top - 16.0 * s - 12.0), 3.2, 2.8, material="cocr")
        canvas.plate((x, bottom + 1.5), 30.0 * s, 3.0, 42.0 * s, corner=1.0, material="cocr")
        canvas.plate((x, bottom + 9.0), 2.5, 13.0, 22.0 * s, material="cocr")
        return
    if bone == "femur":
        radius = 23.0 * s
        canvas.arc(center, radius - 6.0, radius, 20.0, 235.0, 10.0 * s, material="cocr")
        canvas.rod(
            (center[0] + 6.0 * s, top - 6.0),
            (center[0] + 8.0 * s, top - 18.0),
            3.2,
            2.8,
            material="cocr",
        )
    else:
        canvas.plate((0.0, bottom + 1.5), 44.0 * s, 3.0, 15.0 * s, corner=1.0, material="cocr")
        canvas.plate((0.0, bottom + 9.0), 24.0 * s, 13.0, 2.5, corner=1.0, material="cocr")
