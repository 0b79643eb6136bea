"""Projection-radiography physics for the phantoms.

Anatomy and implants are described as 3-D primitives in millimetres (the *anatomy frame*: x to
the image right before any patient transform, y towards the feet). Each primitive contributes its
projected thickness along the beam, times its material's linear attenuation coefficient, to a
line-integral map. The detector then sees ``exp(-line integral)`` (Beer–Lambert) plus scatter,
quantum noise, blur, the anode heel effect and collimation; the processed "for presentation"
image is the log signal through a tone curve, as a DX system writes it.

Primitives are evaluated only inside their own pixel bounding box and antialiased from their
signed distance, which keeps a 1024 × 1024 image at tens of milliseconds.

It is one file because the primitives, the canvas and the exposure share one pixel grid and
one physics model; split, each module would need the others' conventions.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

__all__ = ["MATERIALS", "Acquisition", "Canvas", "draw_family", "expose"]

#: Linear attenuation per millimetre at a typical 60–70 kVp effective energy. The values are
#: chosen for realistic relative contrast (metal ≫ cortical bone > cancellous bone > soft tissue
#: ≈ polyethylene), not as tabulated physics.
MATERIALS: dict[str, float] = {
    "none": 0.0,  # marks a mask region without attenuating
    "soft": 0.020,
    "fat": 0.017,
    "cancellous": 0.026,
    "cortical": 0.050,
    "polyethylene": 0.018,
    "peek": 0.022,  # radiolucent interbody cages, a little denser than soft tissue
    "titanium": 0.25,
    "steel": 0.50,  # stainless steel: plates, screws, nails, wires, clips
    "cocr": 0.55,
    "lead": 2.0,
}

METALS = frozenset({"titanium", "steel", "cocr", "lead"})


def draw_family(rng: np.random.Generator, family: dict[str, Any]) -> dict[str, Any]:
    """One member of a design family: (low, high) tuples are drawn uniformly, others kept."""
    return {
        key: float(rng.uniform(spec[0], spec[1])) if isinstance(spec, tuple) else spec
        for key, spec in family.items()
    }


@dataclass(frozen=True)
class Acquisition:
    """Per-image acquisition parameters (detector and exposure)."""

    exposure: float = 1.0  # relative dose; quantum noise scales with 1/sqrt(exposure)
    noise: float = 1.0  # extra multiplier on quantum noise (acquisition-shift option)
    blur_mm: float = 0.25  # detector point-spread sigma at the detector plane
    heel: float = 0.12  # fractional intensity change across the field along the anode axis
    heel_angle_deg: float = 90.0  # direction of the anode-cathode axis in the image
    scatter: float = 0.005  # residual scatter fraction after the system's scatter correction
    contrast: float = 1.0  # tone-curve gain (acquisition-shift option)
    detail: float = 1.0  # unsharp-mask gain of the system's detail enhancement
    collimation: tuple[float, float, float, float] = (0.03, 0.03, 0.03, 0.03)  # t, b, l, r


class _Grid:
    """Pixels of a bounding box; anatomy-frame coordinates are affine in (column, row), so any
    linear combination of x and y costs one broadcast add instead of full-array arithmetic."""

    def __init__(
        self, box: tuple[slice, slice], cols: np.ndarray, rows: np.ndarray, inverse: np.ndarray
    ) -> None:
        self.box = box
        self._cols = cols
        self._rows = rows
        self._inverse = inverse

    def linear(self, a: float, b: float, k: float = 0.0) -> np.ndarray:
        """``a * x + b * y + k`` over the box (x, y in the current frame's millimetres)."""
        inv = self._inverse
        along_cols = np.float32(a * inv[0, 0] + b * inv[1, 0])
        along_rows = np.float32(a * inv[0, 1] + b * inv[1, 1])
        return (along_cols * self._cols + np.float32(k))[None, :] + (along_rows * self._rows)[
            :, None
        ]

    @property
    def x(self) -> np.ndarray:
        return self.linear(1.0, 0.0)

    @property
    def y(self) -> np.ndarray:
        return self.linear(0.0, 1.0)


class Canvas:
    """A line-integral map plus a label mask, with a stack of anatomy-frame transforms.

    Parameters
    ----------
    rows, cols
        Image matrix.
    spacing_mm
        Pixel size at the patient plane (detector pitch divided by magnification).
    center_px
        Where the anatomy-frame origin lands, as (column, row) in pixels.
    rotation_deg
        In-plane rotation of the whole patient (positive is counter-clockwise on screen).
    mirror
        Mirror the anatomy frame left-right (the other side of the body).
    """

    def __init__(
        self,
        rows: int,
        cols: int,
        spacing_mm: float,
        center_px: tuple[float, float],
        rotation_deg: float = 0.0,
        mirror: bool = False,
    ) -> None:
        self.rows = rows
        self.cols = cols
        self.spacing_mm = spacing_mm
        self.line_integral = np.zeros((rows, cols), dtype=np.float32)
        #: The part of ``line_integral`` due to metal (implants, lead), kept so that exposure
        #: recognition can look at the anatomy alone, as DX systems segment metal out.
        self.metal_integral = np.zeros((rows, cols), dtype=np.float32)
        self.mask = np.zeros((rows, cols), dtype=np.uint8)
        # Affine anatomy(mm) -> pixel: p = A @ x + b
        scale = 1.0 / spacing_mm
        theta = math.radians(-rotation_deg)  # image rows point down, so negate for on-screen CCW
        c, s = math.cos(theta), math.sin(theta)
        flip = -1.0 if mirror else 1.0
        self._matrix = np.array([[c * scale * flip, -s * scale], [s * scale * flip, c * scale]])
        self._offset = np.array(center_px, dtype=float)

    # -- transforms -------------------------------------------------------------------------
    @contextmanager
    def frame(
        self,
        rotate_deg: float = 0.0,
        about: tuple[float, float] = (0.0, 0.0),
        translate: tuple[float, float] = (0.0, 0.0),
    ) -> Iterator[None]:
        """Draw inside a sub-frame rotated about ``about`` then translated (anatomy mm)."""
        saved = self._matrix.copy(), self._offset.copy()
        theta = math.radians(rotate_deg)
        c, s = math.cos(theta), math.sin(theta)
        rot = np.array([[c, -s], [s, c]])
        pivot = np.asarray(about, dtype=float)
        # x_parent = rot @ (x - pivot) + pivot + translate
        local_offset = pivot + np.asarray(translate, dtype=float) - rot @ pivot
        self._offset = self._matrix @ local_offset + self._offset
        self._matrix = self._matrix @ rot
        try:
            yield
        finally:
            self._matrix, self._offset = saved

    @contextmanager
    def detector_frame(self) -> Iterator[None]:
        """Draw in detector millimetres from the image's top-left corner (markers, labels)."""
        saved = self._matrix.copy(), self._offset.copy()
        self._matrix = np.eye(2) / self.spacing_mm
        self._offset = np.zeros(2)
        try:
            yield
        finally:
            self._matrix, self._offset = saved

    def to_pixel(self, x: float, y: float) -> tuple[float, float]:
        """Anatomy-frame mm -> (column, row) pixel coordinates."""
        p = self._matrix @ np.array([x, y]) + self._offset
        return float(p[0]), float(p[1])

    def _grid(self, xmin: float, xmax: float, ymin: float, ymax: float) -> _Grid | None:
        """The pixel bounding box of an anatomy-frame box, with its coordinate maps."""
        corners = np.array([[xmin, ymin], [xmin, ymax], [xmax, ymin], [xmax, ymax]]).T
        pix = self._matrix @ corners + self._offset[:, None]
        c0 = max(math.floor(pix[0].min()) - 1, 0)
        c1 = min(math.ceil(pix[0].max()) + 2, self.cols)
        r0 = max(math.floor(pix[1].min()) - 1, 0)
        r1 = min(math.ceil(pix[1].max()) + 2, self.rows)
        if c0 >= c1 or r0 >= r1:
            return None
        cols = np.arange(c0, c1, dtype=np.float32) + np.float32(0.5 - self._offset[0])
        rows = np.arange(r0, r1, dtype=np.float32) + np.float32(0.5 - self._offset[1])
        return _Grid((slice(r0, r1), slice(c0, c1)), cols, rows, np.linalg.inv(self._matrix))

    @property
    def _pixel_mm(self) -> float:
        """Size of one pixel in the current frame's millimetres (for antialiasing)."""
        return float(1.0 / math.sqrt(abs(np.linalg.det(self._matrix))))

    def _deposit(
        self,
        box: tuple[slice, slice],
        thickness: np.ndarray,
        material: str,
        label: int,
        weight: float = 1.0,
    ) -> None:
        mu = MATERIALS[material] * weight
        contribution = np.float32(mu) * thickness
        self.line_integral[box] += contribution
        if material in METALS:
            self.metal_integral[box] += contribution
        if label:
            region = self.mask[box]
            region[thickness > 0.2] = label

    # -- primitives ---------------------------------------------------------------------------
    def rod(
        self,
        p0: tuple[float, float],
        p1: tuple[float, float],
        r0: float,
        r1: float | None = None,
        material: str = "cortical",
        label: int = 0,
        hollow: float = 0.0,
        caps: bool = True,
        weight: float = 1.0,
        thread_pitch: float = 0.0,
        thread_depth: float = 0.0,
    ) -> None:
        """A (tapered) cylinder from p0 to p1 lying in the image plane.

        ``hollow`` is the wall fraction removed from the inside (a cortical tube has
        ``hollow`` ≈ 0.6); ``caps`` adds hemispherical ends, otherwise the ends are flat.
        ``weight`` multiplies the attenuation (negative removes material; > 1 stands for a path
        longer than the in-plane chord, as for a screw seen obliquely). ``thread_pitch`` and
        ``thread_depth`` add a triangular thread profile to the radius.
        """
        r1 = r0 if r1 is None else r1
        rmax = max(r0, r1) + thread_depth
        xmin, xmax = min(p0[0], p1[0]) - rmax, max(p0[0], p1[0]) + rmax
        ymin, ymax = min(p0[1], p1[1]) - rmax, max(p0[1], p1[1]) + rmax
        grid = self._grid(xmin, xmax, ymin, ymax)
        if grid is None:
            return
        box = grid.box
        dx, dy = p1[0] - p0[0], p1[1] - p0[1]
        length2 = dx * dx + dy * dy or 1e-9
        length = math.sqrt(length2)
        # Position along the axis (0 at p0, 1 at p1) and signed distance from it: both affine.
        t = grid.linear(dx / length2, dy / length2, -(p0[0] * dx + p0[1] * dy) / length2)
        across = grid.linear(-dy / length, dx / length, (p0[0] * dy - p0[1] * dx) / length)
        tc = np.clip(t, 0.0, 1.0)
        d2 = across * across
        if caps:
            beyond = (t - tc) * np.float32(length)
            d2 += beyond * beyond
        r = np.float32(r0) + np.float32(r1 - r0) * tc
        if thread_pitch > 0:
            turns = tc * (math.sqrt(length2) / thread_pitch)
            r = r + thread_depth * (1.0 - 2.0 * np.abs(turns % 1.0 - 0.5))
        thick = 2.0 * np.sqrt(np.maximum(r * r - d2, 0.0))
        if hollow > 0:
            ri = r * hollow
            thick -= 2.0 * np.sqrt(np.maximum(ri * ri - d2, 0.0))
        if not caps:
            edge = self._pixel_mm
            inside = np.minimum(t * length, (1.0 - t) * length) / edge + 0.5
            thick *= np.clip(inside, 0.0, 1.0)
        self._deposit(box, thick, material, label, weight)

    def ellipsoid(
        self,
        center: tuple[float, float],
        a: float,
        b: float,
        depth: float,
        angle_deg: float = 0.0,
        material: str = "cortical",
        label: int = 0,
        power: float = 2.0,
        shell: float = 0.0,
        weight: float = 1.0,
    ) -> None:
        """Projection of a (super-)ellipsoid with semi-axes a, b in plane and ``depth`` through.

        ``power`` > 2 gives box-like vertebral bodies; ``shell`` > 0 keeps only an outer shell of
        that fraction (cortex around cancellous bone).
        """
        extent = max(a, b)
        grid = self._grid(
            center[0] - extent, center[0] + extent, center[1] - extent, center[1] + extent
        )
        if grid is None:
            return
        box = grid.box
        th = math.radians(angle_deg)
        c, s = math.cos(th), math.sin(th)
        u = grid.linear(c / a, s / a, -(center[0] * c + center[1] * s) / a)
        v = grid.linear(-s / b, c / b, (center[0] * s - center[1] * c) / b)
        if power == 2.0:
            q = u * u + v * v
        else:
            q = np.abs(u) ** power + np.abs(v) ** power
        thick = depth * np.sqrt(np.maximum(1.0 - q, 0.0))
        if shell > 0:
            k = 1.0 - shell
            inner = np.maximum(1.0 - q / (k**2 if power == 2.0 else k**power), 0.0)
            thick -= depth * k * np.sqrt(inner)
        self._deposit(box, thick, material, label, weight)

    def plate(
        self,
        center: tuple[float, float],
        width: float,
        height: float,
        depth: float,
        angle_deg: float = 0.0,
        corner: float = 0.0,
        material: str = "cocr",
        label: int = 0,
        weight: float = 1.0,
    ) -> None:
        """A rounded rectangle of uniform thickness ``depth`` (a plate seen face-on)."""
        extent = 0.5 * math.hypot(width, height) + 1.0
        grid = self._grid(
            center[0] - extent, center[0] + extent, center[1] - extent, center[1] + extent
        )
        if grid is None:
            return
        box = grid.box
        th = math.radians(angle_deg)
        c, s = math.cos(th), math.sin(th)
        u = np.abs(grid.linear(c, s, -(center[0] * c + center[1] * s))) - (0.5 * width - corner)
        v = np.abs(grid.linear(-s, c, center[0] * s - center[1] * c)) - (0.5 * height - corner)
        outside = np.hypot(np.maximum(u, 0.0), np.maximum(v, 0.0))
        sdf = outside + np.minimum(np.maximum(u, v), 0.0) - corner
        coverage = np.clip(0.5 - sdf / self._pixel_mm, 0.0, 1.0)
        self._deposit(box, depth * coverage, material, label, weight)

    def arc(
        self,
        center: tuple[float, float],
        r_inner: float,
        r_outer: float,
        start_deg: float,
        end_deg: float,
        depth: float,
        material: str = "cocr",
        label: int = 0,
        weight: float = 1.0,
    ) -> None:
        """An annular sector of uniform thickness (angles counter-clockwise from +x, y down)."""
        grid = self._grid(
            center[0] - r_outer, center[0] + r_outer, center[1] - r_outer, center[1] + r_outer
        )
        if grid is None:
            return
        box = grid.box
        dx, dy = grid.linear(1.0, 0.0, -center[0]), grid.linear(0.0, 1.0, -center[1])
        r = np.sqrt(dx * dx + dy * dy)
        edge = self._pixel_mm
        radial = np.minimum(r - r_inner, r_outer - r) / edge + 0.5
        angle = np.degrees(np.arctan2(dy, dx))
        mid = 0.5 * (start_deg + end_deg)
        half = 0.5 * (end_deg - start_deg)
        off = np.abs((angle - mid + 180.0) % 360.0 - 180.0)
        angular = (half - off) * np.radians(1.0) * np.maximum(r, 1e-3) / edge + 0.5
        coverage = np.clip(np.minimum(radial, angular), 0.0, 1.0)
        self._deposit(box, depth * coverage, material, label, weight)

    def sphere_shell(
        self,
        center: tuple[float, float],
        r_outer: float,
        r_inner: float,
        open_deg: float | None = None,
        material: str = "titanium",
        label: int = 0,
    ) -> None:
        """A sphere (``r_inner`` = 0) or a hemispherical shell opening towards ``open_deg``."""
        grid = self._grid(
            center[0] - r_outer, center[0] + r_outer, center[1] - r_outer, center[1] + r_outer
        )
        if grid is None:
            return
        box = grid.box
        dx, dy = grid.linear(1.0, 0.0, -center[0]), grid.linear(0.0, 1.0, -center[1])
        d2 = dx * dx + dy * dy
        outer = np.sqrt(np.maximum(r_outer * r_outer - d2, 0.0))
        inner = np.sqrt(np.maximum(r_inner * r_inner - d2, 0.0))
        if open_deg is None:
            thick = 2.0 * (outer - inner)
        else:
            # A hemisphere whose rim plane contains the beam: the projection is the half-disc
            # on the closed side, full chord through the shell.
            th = math.radians(open_deg)
            along = dx * math.cos(th) + dy * math.sin(th)
            closed = np.clip(0.5 - along / self._pixel_mm, 0.0, 1.0)
            thick = 2.0 * (outer - inner) * closed
        self._deposit(box, thick, material, label)

    def polygon(
        self,
        points: list[tuple[float, float]],
        depth: float,
        material: str = "cocr",
        label: int = 0,
        weight: float = 1.0,
    ) -> None:
        """A filled polygon of uniform thickness, antialiased by 4 × 4 supersampling."""
        coverage = self._polygon_coverage(points, 1 if material == "none" else 4)
        if coverage is None:
            return
        box, fraction = coverage
        if material == "none":
            region = self.mask[box]
            region[fraction > 0] = label
            return
        self._deposit(box, np.float32(depth) * fraction, material, label, weight)

    def _polygon_coverage(
        self, points: list[tuple[float, float]], supersample: int
    ) -> tuple[tuple[slice, slice], np.ndarray] | None:
        """Per-pixel area fraction covered by a polygon, rasterised by Pillow."""
        pixels = self._matrix @ np.asarray(points, dtype=float).T + self._offset[:, None]
        c0, r0 = (max(math.floor(v) - 1, 0) for v in pixels.min(axis=1))
        c1 = min(math.ceil(pixels[0].max()) + 2, self.cols)
        r1 = min(math.ceil(pixels[1].max()) + 2, self.rows)
        if c0 >= c1 or r0 >= r1:
            return None
        k = supersample
        layer = Image.new("L", ((c1 - c0) * k, (r1 - r0) * k), 0)
        outline = [((c - c0) * k - 0.5, (r - r0) * k - 0.5) for c, r in pixels.T]
        ImageDraw.Draw(layer).polygon(outline, fill=255)
        covered = np.asarray(layer, dtype=np.float32)
        if k > 1:
            covered = covered.reshape(r1 - r0, k, c1 - c0, k).mean(axis=(1, 3))
        return (slice(r0, r1), slice(c0, c1)), covered * np.float32(1.0 / 255.0)

    def letter(self, char: str, corner: tuple[float, float], height: float) -> None:
        """A lead positioning marker ("L" or "R") drawn in plain strokes, upright on screen."""
        w, stroke, depth = 0.65 * height, 0.17 * height, 4.0
        x0, y0 = corner
        self.plate((x0 + stroke / 2, y0 + height / 2), stroke, height, depth, material="lead")
        if char == "L":
            self.plate((x0 + w / 2, y0 + height - stroke / 2), w, stroke, depth, material="lead")
        else:
            bowl = 0.55 * height
            self.arc(
                (x0 + w - bowl / 2, y0 + bowl / 2),
                bowl / 2 - stroke,
                bowl / 2,
                -90,
                90,
                depth,
                material="lead",
            )
            self.plate(
                (x0 + (w - bowl / 2) / 2, y0 + stroke / 2),
                w - bowl / 2,
                stroke,
                depth,
                material="lead",
            )
            self.plate(
                (x0 + (w - bowl / 2) / 2, y0 + bowl - stroke / 2),
                w - bowl / 2,
                stroke,
                depth,
                material="lead",
            )
            self.rod(
                (x0 + 0.35 * w, y0 + bowl),
                (x0 + w, y0 + height - stroke / 3),
                stroke / 2,
                material="lead",
                caps=False,
            )


def _upsampler(size: int, coarse: int) -> np.ndarray:
    """Matrix (size × coarse) of linear-interpolation weights from a coarse grid to pixels."""
    position = (np.arange(size, dtype=np.float32) + 0.5) * (coarse / size) - 0.5
    position = np.clip(position, 0.0, coarse - 1.0)
    low = (
        np.minimum(position.astype(np.int64), coarse - 2)
        if coarse > 1
        else np.zeros(size, dtype=np.int64)
    )
    frac = (position - low).astype(np.float32)
    weights = np.zeros((size, coarse), dtype=np.float32)
    weights[np.arange(size), low] = 1.0 - frac
    if coarse > 1:
        weights[np.arange(size), low + 1] = frac
    return weights


def expose(
    canvas: Canvas,
    acquisition: Acquisition,
    rng: np.random.Generator,
    bits_stored: int,
) -> np.ndarray:
    """Turn the line-integral map into a processed "for presentation" image (MONOCHROME2).

    Returns an unsigned integer array with values in ``[0, 2**bits_stored - 1]``; dense
    structures are bright.
    """
    rows, cols = canvas.rows, canvas.cols
    spacing = canvas.spacing_mm
    line = canvas.line_integral
    # Anode heel effect: a smooth exposure gradient along the anode-cathode axis.
    th = math.radians(acquisition.heel_angle_deg)
    ramp_c = np.linspace(-0.5, 0.5, cols, dtype=np.float32) * np.float32(math.cos(th))
    ramp_r = np.linspace(-0.5, 0.5, rows, dtype=np.float32) * np.float32(math.sin(th))
    heel = np.float32(acquisition.heel)
    # Collimation: the shutter blocks the beam outside the field (blurred penumbra).
    top, bottom, left, right = acquisition.collimation
    field_r = np.zeros(rows, dtype=np.float32)
    field_c = np.zeros(cols, dtype=np.float32)
    field_r[int(top * rows) : rows - int(bottom * rows)] = 1.0
    field_c[int(left * cols) : cols - int(right * cols)] = 1.0
    penumbra = max(1.5 / spacing, 0.5)
    field_r = ndimage.gaussian_filter1d(field_r, penumbra)
    field_c = ndimage.gaussian_filter1d(field_c, penumbra)
    # Heel gradient times shutter, in one pass: (1 + h·(ramp_r + ramp_c)) · field_r · field_c.
    beam = (field_r * (1.0 + heel * ramp_r))[:, None] * field_c[None, :] + (
        field_r[:, None] * (heel * ramp_c * field_c)[None, :]
    )
    primary = np.exp(-line)
    primary *= beam
    # Scatter: a heavily low-passed copy of the primary, computed on a coarse grid.
    factor = max(max(rows, cols) // 32, 1)
    coarse = primary[: rows - rows % factor, : cols - cols % factor]
    coarse = coarse.reshape(rows // factor, factor, cols // factor, factor).mean(axis=(1, 3))
    coarse = ndimage.gaussian_filter(coarse, 40.0 / (spacing * factor), mode="nearest")
    # Bilinear upsampling as two small matrix products (much cheaper than ndimage.zoom).
    scatter = _upsampler(rows, coarse.shape[0]) @ coarse @ _upsampler(cols, coarse.shape[1]).T
    signal = primary + np.float32(acquisition.scatter) * scatter
    # Quantum noise: Poisson counts approximated as Gaussian, per pixel area.
    counts = np.float32(1500.0 * acquisition.exposure * (spacing / 0.2) ** 2)
    sigma = np.sqrt(np.maximum(signal, 1e-4) / counts) * np.float32(acquisition.noise)
    signal = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    # Detector blur (scintillator spread), then electronic floor.
    blur_px = acquisition.blur_mm / spacing
    if blur_px > 0.3:
        signal = ndimage.gaussian_filter(signal, blur_px, mode="nearest", truncate=3.0)
    signal = np.maximum(signal, np.float32(2e-4))
    # Image processing, as DX systems apply it: log transform, then a tone curve placed on the
    # anatomy's own range (exposure recognition on the collimated field with metal excluded):
    # the anatomy spans 0.05–0.8 of the output, metal rolls off above it towards white.
    log_signal = -np.log(signal)
    if acquisition.detail > 0:
        # Detail enhancement (unsharp masking against a ~1 cm background), as every DR
        # system's multiscale processing does: cortices and lucent lines stand out.
        factor = max(max(rows, cols) // 64, 1)
        coarse = log_signal[: rows - rows % factor, : cols - cols % factor]
        coarse = coarse.reshape(rows // factor, factor, cols // factor, factor).mean(axis=(1, 3))
        coarse = ndimage.gaussian_filter(coarse, 6.0 / (spacing * factor), mode="nearest")
        background = (
            _upsampler(rows, coarse.shape[0]) @ coarse @ _upsampler(cols, coarse.shape[1]).T
        )
        log_signal = background + np.float32(1.0 + acquisition.detail) * (log_signal - background)
    tissue = (canvas.line_integral - canvas.metal_integral)[::8, ::8]
    in_field = (field_r[::8, None] * field_c[None, ::8]) > 0.99
    sample = tissue[in_field]
    low, high = np.percentile(sample, [1.0, 99.5]) if sample.size > 64 else (0.0, 6.0)
    span = np.float32(max(float(high - low), 0.5) / acquisition.contrast)
    low32, high32 = np.float32(low), np.float32(low) + span
    # Piecewise tone: linear over the anatomy, a toe below it and a shoulder above it. The
    # toe and shoulder are evaluated only where they apply (most pixels are linear).
    tone = (log_signal - low32) * (np.float32(0.75) / span) + np.float32(0.05)
    below = log_signal < low32
    above = log_signal > high32
    tone[below] = np.float32(0.05) * np.exp((log_signal[below] - low32) / span * 15)
    tone[above] = np.float32(0.8) + np.float32(0.2) * np.tanh(
        (log_signal[above] - high32) / span * 3
    )
    top_value = np.float32((1 << bits_stored) - 1)
    np.clip(tone, 0.0, 1.0, out=tone)
    tone *= top_value
    tone += np.float32(0.5)
    return tone.astype(np.uint16)
