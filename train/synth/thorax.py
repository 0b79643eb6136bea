"""Thoracic anatomy shared by the chest phantom and the thoracolumbar field of a cut-off spine:
thoracic vertebrae, ribs and lungs, in either view.

Coordinates: millimetres, y towards the feet; in the AP view +x is the patient's left, in the
lateral view +x is anterior. Every helper draws at a given level position, so callers choose
where the spine runs.
"""

from __future__ import annotations

import math
from itertools import pairwise

from train.synth.xray import Canvas

__all__ = ["lungs", "rib_ap", "rib_lateral", "tube", "vertebra_ap", "vertebra_lateral"]


def tube(
    canvas: Canvas,
    points: list[tuple[float, float]],
    r: float,
    hollow: float = 0.55,
    weight: float = 1.0,
    fill: bool = True,
) -> None:
    """A bone tube (a rib, a clavicle) along a polyline: cortex, and cancellous bone inside it
    unless ``fill`` is False (thin ribs, where the cortex is what shows)."""
    for a, b in pairwise(points):
        canvas.rod(a, b, r, material="cortical", hollow=hollow, caps=False, weight=weight)
        if fill:
            canvas.rod(a, b, r * hollow, material="cancellous", caps=False, weight=weight)


def vertebra_ap(
    canvas: Canvas, x: float, y: float, half_width: float, height: float, s: float
) -> None:
    """A vertebra seen from the front: body, pedicles, spinous and transverse processes."""
    canvas.ellipsoid((x, y), half_width, height / 2, 32.0 * s, material="cancellous", power=4.0)
    canvas.ellipsoid(
        (x, y),
        half_width + 1.0,
        height / 2 + 1.0,
        34.0 * s,
        material="cortical",
        power=4.0,
        shell=0.08,
    )
    canvas.ellipsoid(
        (x, y + 0.45 * height), 4.0 * s, 9.0 * s, 22.0 * s, material="cortical", shell=0.35
    )
    for side in (-1.0, 1.0):
        canvas.ellipsoid(
            (x + side * 0.68 * half_width, y - 0.2 * height),
            4.5 * s,
            6.0 * s,
            18.0 * s,
            material="cortical",
            shell=0.4,
        )
        canvas.rod(
            (x + side * 0.9 * half_width, y - 0.15 * height),
            (x + side * (half_width + 12.0 * s), y - 0.25 * height),
            4.0 * s,
            material="cortical",
            hollow=0.4,
        )


def vertebra_lateral(
    canvas: Canvas, x: float, y: float, depth: float, height: float, s: float, tilt: float
) -> None:
    """A thoracic vertebra from the side: body (anterior at +x), pedicle and a long, steep
    spinous process."""
    with canvas.frame(rotate_deg=tilt, about=(x, y)):
        body = (x + depth / 2, y)
        canvas.ellipsoid(body, depth / 2, height / 2, 40.0 * s, material="cancellous", power=4.0)
        canvas.ellipsoid(
            body,
            depth / 2 + 1.0,
            height / 2 + 1.0,
            42.0 * s,
            material="cortical",
            power=4.0,
            shell=0.08,
        )
        canvas.rod(
            (x - 2.0 * s, y - 0.2 * height),
            (x - 16.0 * s, y - 0.1 * height),
            4.5 * s,
            material="cortical",
            hollow=0.4,
            weight=2.0,
        )
        canvas.ellipsoid(
            (x - 22.0 * s, y + 0.1 * height),
            7.0 * s,
            10.0 * s,
            26.0 * s,
            material="cortical",
            shell=0.3,
        )
        canvas.rod(
            (x - 26.0 * s, y + 0.2 * height),
            (x - 44.0 * s, y + 0.9 * height),
            4.0 * s,
            3.0 * s,
            material="cortical",
            hollow=0.4,
        )


def rib_ap(
    canvas: Canvas,
    origin: tuple[float, float],
    side: float,
    reach: float,
    drop: float,
    s: float,
    anterior: bool = True,
) -> None:
    """One rib in the AP view: the posterior arc from the costovertebral joint out to the
    chest wall (``reach`` mm lateral, ``drop`` mm lower), then the fainter anterior arc back
    towards the sternum."""
    x0, y0 = origin
    n = 6
    posterior = []
    for i in range(n + 1):
        t = i / n
        x = x0 + side * reach * math.sin(0.5 * math.pi * t)
        y = y0 - 7.0 * s * math.sin(math.pi * t) + drop * t * t
        posterior.append((x, y))
    tube(canvas, posterior, 4.8 * s, fill=False)
    if not anterior:
        return
    xl, yl = posterior[-1]
    front = []
    for i in range(n):
        u = i / (n - 1)
        x = xl - side * 0.62 * reach * (1.0 - math.cos(0.5 * math.pi * u))
        y = yl + 0.55 * drop * u + 4.0 * s * math.sin(math.pi * u)
        front.append((x, y))
    tube(canvas, front, 3.6 * s, weight=0.6, fill=False)


def rib_lateral(
    canvas: Canvas, origin: tuple[float, float], span: float, drop: float, s: float
) -> None:
    """One pair of ribs in the lateral view (left and right nearly superimposed): from the
    spine backwards, round the back of the chest and obliquely down to the front."""
    x0, y0 = origin
    for offset in (0.0, 3.0 * s):
        points = []
        n = 7
        for i in range(n + 1):
            t = i / n
            angle = math.pi * (0.15 + 0.85 * t)
            x = (
                x0
                + offset
                - 18.0 * s
                + span * 0.5 * (1.0 - math.cos(angle))
                - 12.0 * s * math.sin(angle)
            )
            y = y0 + offset + drop * t * t - 10.0 * s * math.sin(angle)
            points.append((x, y))
        tube(canvas, points, 4.0 * s, weight=0.8, fill=False)


def lungs(
    canvas: Canvas,
    view: str,
    center: tuple[float, float],
    half_width: float,
    height: float,
    depth: float,
    s: float,
    heart: bool = True,
) -> None:
    """Air in the lungs (less tissue than the body around them), the heart in front of them."""
    cx, cy = center
    if view == "AP":
        for side, dome in ((-1.0, 0.0), (1.0, 8.0 * s)):
            canvas.ellipsoid(
                (cx + side * 0.58 * half_width, cy + dome),
                0.5 * half_width,
                height / 2,
                depth,
                material="soft",
                power=2.3,
                weight=-0.95,
            )
        if heart:
            canvas.ellipsoid(
                (cx + 0.2 * half_width, cy + 0.3 * height),
                0.5 * half_width,
                0.24 * height,
                0.62 * depth,
                angle_deg=-18.0,
                material="soft",
            )
        return
    for offset in (-4.0 * s, 4.0 * s):
        canvas.ellipsoid(
            (cx + offset, cy + offset),
            0.42 * half_width,
            height / 2,
            0.72 * depth,
            material="soft",
            power=2.3,
            weight=-0.95,
        )
    if heart:
        canvas.ellipsoid(
            (cx + 0.16 * half_width, cy + 0.3 * height),
            0.3 * half_width,
            0.23 * height,
            0.9 * depth,
            material="soft",
        )
