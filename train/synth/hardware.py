"""Hardware that is not a task's implant (plates, screws, nails, wires, clips, leads), in 3-D.

A part is described once in a task's 3-D frame — x as the task's AP view draws it, y towards the
feet, z as its lateral view draws x (anterior) — and projected into either view, so a screw seen
along its length in the AP view is a long rod, and a disc, denser, in the lateral.

Nothing here draws a mask label: this metal is never the target implant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

from train.synth.xray import Canvas

__all__ = ["P3", "plate", "polyline", "project", "rod", "screw", "sphere", "wire_loop"]

P3 = tuple[float, float, float]


def project(view: str, p: P3) -> tuple[float, float]:
    """The in-plane position of a 3-D point in the AP (x, y) or lateral (z, y) view."""
    return (p[0], p[1]) if view == "AP" else (p[2], p[1])


def rod(
    canvas: Canvas,
    view: str,
    p0: P3,
    p1: P3,
    r: float,
    r1: float | None = None,
    material: str = "steel",
    hollow: float = 0.0,
    caps: bool = True,
    thread_pitch: float = 0.0,
    thread_depth: float = 0.0,
    weight: float = 1.0,
) -> None:
    """A cylinder between two 3-D points: foreshortened, and denser where it runs along the
    beam (seen end-on it is a disc as thick as the rod is long)."""
    a, b = project(view, p0), project(view, p1)
    length = math.dist(p0, p1)
    inplane = math.dist(a, b)
    rmax = max(r, r1 if r1 is not None else r) + thread_depth
    if inplane < 0.5 * rmax:
        # End-on: a disc of the rod's length (a ring for a cannulated one).
        center = (0.5 * (a[0] + b[0]), 0.5 * (a[1] + b[1]))
        inner = rmax * hollow if hollow > 0 else -1.0
        canvas.arc(center, inner, rmax, -180.0, 180.0, length, material=material, weight=weight)
        return
    oblique = min(length / inplane, max(length / (2.0 * rmax), 1.0))
    pitch = thread_pitch * inplane / length if thread_pitch > 0 else 0.0
    canvas.rod(
        a,
        b,
        r,
        r1,
        material=material,
        hollow=hollow,
        caps=caps,
        weight=weight * oblique,
        thread_pitch=pitch,
        thread_depth=thread_depth,
    )


def screw(
    canvas: Canvas,
    view: str,
    head: P3,
    tip: P3,
    r: float,
    material: str = "steel",
    head_radius: float | None = None,
    pitch: float = 2.0,
) -> None:
    """A bone screw: threaded shaft from ``head`` to ``tip`` and a head (a short wide rod)."""
    rod(
        canvas,
        view,
        head,
        tip,
        0.72 * r,
        0.6 * r,
        material=material,
        thread_pitch=pitch,
        thread_depth=0.28 * r,
    )
    length = math.dist(head, tip) or 1.0
    unit = tuple((t - h) / length for h, t in zip(head, tip, strict=True))
    back: P3 = (head[0] - 2.5 * unit[0], head[1] - 2.5 * unit[1], head[2] - 2.5 * unit[2])
    rod(canvas, view, back, head, head_radius or 1.8 * r, material=material, caps=False)


def sphere(canvas: Canvas, view: str, center: P3, r: float, material: str = "steel") -> None:
    canvas.sphere_shell(project(view, center), r, 0.0, material=material)


def polyline(
    canvas: Canvas,
    view: str,
    points: Sequence[P3],
    r: float,
    material: str = "steel",
    weight: float = 1.0,
) -> None:
    """A wire or lead through ``points`` (flat-ended segments, so joints are not doubled)."""
    for p0, p1 in pairwise(points):
        rod(canvas, view, p0, p1, r, material=material, caps=False, weight=weight)


def wire_loop(
    canvas: Canvas,
    view: str,
    center: P3,
    radius_x: float,
    radius_z: float,
    r: float = 0.6,
    tilt_deg: float = 0.0,
    material: str = "steel",
    twist: bool = True,
) -> None:
    """A cerclage wire around a bone (a loop in the transverse plane, tilted by ``tilt_deg``
    towards the feet across x), with its twisted knot at the front."""
    n = 40
    tilt = math.tan(math.radians(tilt_deg))
    points: list[P3] = []
    for i in range(n + 1):
        angle = 2.0 * math.pi * i / n
        dx, dz = radius_x * math.cos(angle), radius_z * math.sin(angle)
        points.append((center[0] + dx, center[1] + tilt * dx, center[2] + dz))
    polyline(canvas, view, points, r, material=material)
    if twist:
        knot: P3 = (center[0], center[1], center[2] + radius_z)
        tip: P3 = (center[0] + 1.0, center[1] + 1.5, center[2] + radius_z + 6.0)
        rod(canvas, view, knot, tip, 1.2 * r, material=material, thread_pitch=1.2, thread_depth=r)


def plate(
    canvas: Canvas,
    view: str,
    center: P3,
    length: float,
    width: float,
    thickness: float,
    normal: str,
    tilt_deg: float = 0.0,
    material: str = "steel",
) -> None:
    """A bone plate along y, lying on a surface whose normal is x (a lateral or medial plate)
    or z (anterior or posterior): edge-on and dense in one view, face-on in the other.
    ``tilt_deg`` turns its long axis in the plane of the face-on view."""
    face_on = (normal == "z") == (view == "AP")
    c = project(view, center)
    if face_on:
        canvas.plate(
            c,
            width,
            length,
            thickness,
            angle_deg=tilt_deg,
            corner=0.45 * width,
            material=material,
        )
    else:
        canvas.plate(c, thickness, length, width, corner=0.4 * thickness, material=material)
