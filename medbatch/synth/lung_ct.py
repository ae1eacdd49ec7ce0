"""Deterministic synthetic chest CT with (or without) nodule-like lesions, and a DICOM writer.

:func:`synth_volume` draws one axial chest CT from a seed: air around an elliptical body (skin
contour with a subcutaneous fat layer and a soft-tissue chest wall), two lungs whose cross-section
shrinks towards the apices and whose bases are domed by the diaphragm, a heart and mediastinum,
trachea and main bronchi, branching vessel trees (tapering tubes from each hilum, ~+40 HU), ribs,
sternum and a segmented spine (+250..+1000 HU), a scanner table and Gaussian noise. Positive cases
add 1–3 lesions inside the lungs: solid (−100..+100 HU), part-solid or ground-glass (≈ −500 HU)
lobulated ellipsoids of 5–25 mm. Nodules must be told from vessels by shape: a vessel cut across
is a round blob on one slice too, but it continues on the neighbouring slices; a nodule is
compact in 3D.

Body size, field of view (pixel spacing), slice count and slice thickness vary with the seed and
the arguments. The whole scan covers the chest (slice 0 is the most inferior, the order of a
series sorted feet → head), so the slice thickness follows from ``n_slices``.

Everything is numpy with :class:`numpy.random.Generator` (PCG64) seeded by ``seed``: one seed and
one set of arguments give the same volume on every platform. :func:`write_series` writes a volume
as a CT Image Storage series with pydicom.

This is synthetic data for testing the pipeline and training the *reference* model; it is not a
model of human anatomy or disease.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = ["Lesion", "SynthCT", "synth_volume", "write_series"]

HU_AIR = -1000.0
HU_MIN, HU_MAX = -1024, 3071
#: Slice thicknesses (mm) a scanner reconstructs; the one closest to the coverage is chosen.
THICKNESSES_MM = (0.625, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.5, 10.0)
#: Lesion diameter range (mm).
LESION_DIAMETER_MM = (5.0, 25.0)

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Lesion:
    """One nodule-like lesion; ``center_mm`` is (z, y, x) in volume millimetres: z from the
    centre of slice 0, y and x from the centre of the image."""

    center_mm: tuple[float, float, float]
    diameter_mm: float
    kind: str  # "solid", "part-solid" or "ground-glass"
    hu: float


@dataclass(frozen=True, eq=False)
class SynthCT:
    """A synthetic CT volume.

    ``hu``: int16 (slices, rows, columns) in Hounsfield units, slice 0 most inferior.
    ``spacing_mm``: (slice thickness = slice spacing, row spacing, column spacing).
    ``nodule_slices``: indices of the slices holding lesion voxels (lesion occupancy ≥ 0.5).
    ``label``: 1 if any lesion is in the volume, else 0.
    """

    hu: npt.NDArray[np.int16]
    spacing_mm: tuple[float, float, float]
    nodule_slices: frozenset[int]
    label: int
    lesions: tuple[Lesion, ...] = ()
    seed: int = 0


# ------------------------------------------------------------------------------------ helpers
def _snap_thickness(mm: float) -> float:
    return min(THICKNESSES_MM, key=lambda t: abs(math.log(t / mm)))


def _interp_axis(a: FloatArray, axis: int, size: int) -> FloatArray:
    """Linear interpolation along one axis to ``size`` samples (end points aligned)."""
    n = a.shape[axis]
    if n == size:
        return a
    pos = np.linspace(0.0, n - 1, size)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, n - 1)
    shape = [1] * a.ndim
    shape[axis] = size
    w = (pos - lo).astype(np.float32).reshape(shape)
    out: FloatArray = np.take(a, lo, axis=axis) * (1 - w) + np.take(a, hi, axis=axis) * w
    return out


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, ...], spacing: tuple[float, ...], scale_mm: float
) -> FloatArray:
    """Zero-mean, roughly unit-variance noise that is smooth over ``scale_mm``."""
    coarse = tuple(
        max(2, math.ceil(n * s / scale_mm) + 1) for n, s in zip(shape, spacing, strict=True)
    )
    field = rng.standard_normal(coarse, dtype=np.float32)
    for axis in reversed(range(len(shape))):
        field = _interp_axis(field, axis, shape[axis])
    return field


class _Grid:
    """Millimetre coordinates of the voxel centres (z up from slice 0; y, x from the centre)."""

    def __init__(self, n: int, rows: int, cols: int, thickness: float, pixel: float) -> None:
        self.shape = (n, rows, cols)
        self.z = (np.arange(n) * thickness).astype(np.float32)
        self.y = ((np.arange(rows) - (rows - 1) / 2) * pixel).astype(np.float32)
        self.x = ((np.arange(cols) - (cols - 1) / 2) * pixel).astype(np.float32)
        self.spacing = (thickness, pixel, pixel)
        self.origin = (0.0, -(rows - 1) / 2 * pixel, -(cols - 1) / 2 * pixel)

    def box(
        self, lo: npt.ArrayLike, hi: npt.ArrayLike
    ) -> tuple[tuple[slice, slice, slice], FloatArray, FloatArray, FloatArray] | None:
        """Index box of the voxels inside [lo, hi] (z, y, x mm) and their broadcast coords."""
        lo_a = np.asarray(lo, dtype=np.float64).reshape(3)
        hi_a = np.asarray(hi, dtype=np.float64).reshape(3)
        idx = []
        for axis in range(3):
            origin, step, n = self.origin[axis], self.spacing[axis], self.shape[axis]
            i0 = max(0, math.ceil((float(lo_a[axis]) - origin) / step))
            i1 = min(n, math.floor((float(hi_a[axis]) - origin) / step) + 1)
            if i0 >= i1:
                return None
            idx.append((i0, i1))
        (z0, z1), (y0, y1), (x0, x1) = idx
        return (
            (slice(z0, z1), slice(y0, y1), slice(x0, x1)),
            self.z[z0:z1, None, None],
            self.y[None, y0:y1, None],
            self.x[None, None, x0:x1],
        )

    def paint_capsule(
        self,
        occ: FloatArray,
        p0: npt.NDArray[np.float64],
        p1: npt.NDArray[np.float64],
        r0: float,
        r1: float,
        edge: float,
        inner: tuple[FloatArray, float] | None = None,
    ) -> None:
        """Max-blend the soft occupancy of a tapered capsule p0 → p1 (mm, radii r0 → r1) into
        ``occ``; ``inner`` = (array, radius fraction) also paints a concentric thinner capsule."""
        pad = max(r0, r1) + edge
        found = self.box(np.minimum(p0, p1) - pad, np.maximum(p0, p1) + pad)
        if found is None:
            return
        sl, z, y, x = found
        d = (p1 - p0).astype(np.float32)
        length2 = float(d @ d)
        pz, py, px = z - np.float32(p0[0]), y - np.float32(p0[1]), x - np.float32(p0[2])
        if length2 > 0:
            t = (pz * d[0] + py * d[1] + px * d[2]) * np.float32(1.0 / length2)
            np.clip(t, 0.0, 1.0, out=t)
            dist = np.sqrt((pz - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + (px - t * d[2]) ** 2)
            radius = np.float32(r0) + t * np.float32(r1 - r0)
        else:
            dist = np.sqrt(pz**2 + py**2 + px**2)
            radius = np.float32(r0)
        inv = np.float32(1.0 / edge)
        w = np.clip(0.5 + (radius - dist) * inv, 0.0, 1.0)
        np.maximum(occ[sl], w, out=occ[sl])
        if inner is not None:
            arr, frac = inner
            w = np.clip(0.5 + (radius * np.float32(frac) - dist) * inv, 0.0, 1.0)
            np.maximum(arr[sl], w, out=arr[sl])


# ----------------------------------------------------------------------------------- anatomy
class _Anatomy:
    """Random patient geometry (millimetres) and the analytic lung shape."""

    def __init__(self, rng: np.random.Generator) -> None:
        u = rng.uniform
        self.a = u(135.0, 185.0)  # skin half-width (lateral)
        self.b = self.a * u(0.62, 0.76)  # skin half-depth (antero-posterior)
        self.fat = u(5.0, 25.0)
        self.wall = u(8.0, 16.0)  # muscle + ribs inside the fat
        self.aw = self.a - self.fat - self.wall  # inner chest wall ellipse
        self.bw = self.b - self.fat - self.wall
        self.ox, self.oy = u(-12.0, 12.0), u(-8.0, 15.0)  # patient centre in the image
        self.lung_height = u(190.0, 270.0)
        self.below, self.above = u(25.0, 70.0), u(10.0, 35.0)  # scan margins
        self.wobble = (u(0.0, 0.03), u(0, 2 * math.pi), u(0.0, 0.025), u(0, 2 * math.pi))
        self.taper = u(-0.06, 0.06)  # body widens or narrows cranially
        self.mediastinum = u(14.0, 28.0)
        self.lungs = []
        for side in (-1.0, 1.0):  # -x is the patient's right (DICOM LPS)
            self.lungs.append(
                {
                    "side": side,
                    "cx": side * self.aw * u(0.52, 0.56),
                    "cy": self.bw * u(0.0, 0.08),
                    "ax": self.aw * u(0.56, 0.62),
                    "ay": self.bw * u(0.9, 1.0),
                    "dome": u(25.0, 55.0),
                    "lift": u(5.0, 20.0) if side < 0 else 0.0,  # right dome sits higher
                }
            )
        self.heart = (
            self.aw * u(0.08, 0.18),
            -self.bw * u(0.15, 0.28),
            self.aw * u(0.36, 0.46),
            self.bw * u(0.42, 0.55),
            u(0.14, 0.22),  # centre height (fraction of the lung height): on the diaphragm
            u(0.17, 0.23),  # half height (fraction)
        )
        self.hu_fat = u(-115.0, -85.0)
        self.hu_soft = u(30.0, 55.0)
        self.hu_lung = u(-880.0, -820.0)
        self.lung_gradient = u(10.0, 45.0)
        self.lung_texture = u(10.0, 25.0)
        self.hu_vessel = u(20.0, 60.0)
        self.hu_cortex = u(600.0, 1000.0)
        self.hu_marrow = u(200.0, 380.0)
        self.noise = u(15.0, 40.0)
        self.z_base = 0.0  # set by place()

    def place(self, extent: float) -> None:
        """Put the lung bases inside a scan of ``extent`` mm (slice 0 at z = 0)."""
        spare = extent - self.lung_height
        self.z_base = spare * self.below / (self.below + self.above)

    def rel(self, z: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Height as a fraction of the lung height (0 at the lowest lung point)."""
        return (np.asarray(z, dtype=np.float64) - self.z_base) / self.lung_height

    def body_scale(self, z: npt.ArrayLike) -> npt.NDArray[np.float64]:
        return 1.0 + self.taper * (self.rel(z) - 0.5)

    def lung_mask(self, z: npt.ArrayLike, y: npt.ArrayLike, x: npt.ArrayLike) -> BoolArray:
        """Inside a lung? Broadcasts (z, y, x) in patient millimetres (centre at 0, 0)."""
        z_a = np.asarray(z, dtype=np.float32)
        y_a = np.asarray(y, dtype=np.float32)
        x_a = np.asarray(x, dtype=np.float32)
        u = self.rel(z_a).astype(np.float32)
        prof2 = np.clip(1.0 - np.clip(u, 0.0, None) ** 1.5, 0.0, 1.0)  # squared radius profile
        out: BoolArray | None = None
        for lung in self.lungs:
            rl2 = ((x_a - lung["cx"]) / lung["ax"]) ** 2 + ((y_a - lung["cy"]) / lung["ay"]) ** 2
            floor = self.z_base + lung["lift"] + lung["dome"] * np.clip(1.0 - rl2, 0.0, 1.0)
            inside = (rl2 <= prof2) & (z_a >= floor) & (lung["side"] * x_a >= self.mediastinum)
            out = inside if out is None else out | inside
        assert out is not None
        hx, hy, hax, hay, hz, hh = self.heart
        hz_mm = self.z_base + hz * self.lung_height
        hh_mm = hh * self.lung_height
        heart = ((x_a - hx) / hax) ** 2 + ((y_a - hy) / hay) ** 2 + ((z_a - hz_mm) / hh_mm) ** 2
        wall = (x_a / self.aw) ** 2 + (y_a / self.bw) ** 2
        scale = self.body_scale(z_a).astype(np.float32)
        return out & (heart > 1.0) & (wall <= scale**2)


def _point_in_lung(anat: _Anatomy, z: float, y: float, x: float) -> bool:
    """Scalar :meth:`_Anatomy.lung_mask` (pure Python: the vessel trees ask thousands of times)."""
    u = (z - anat.z_base) / anat.lung_height
    prof2 = min(1.0, max(0.0, 1.0 - max(u, 0.0) ** 1.5))
    hit = False
    for lung in anat.lungs:
        rl2 = ((x - lung["cx"]) / lung["ax"]) ** 2 + ((y - lung["cy"]) / lung["ay"]) ** 2
        floor = anat.z_base + lung["lift"] + lung["dome"] * min(1.0, max(0.0, 1.0 - rl2))
        if rl2 <= prof2 and z >= floor and lung["side"] * x >= anat.mediastinum:
            hit = True
            break
    if not hit:
        return False
    hx, hy, hax, hay, hz, hh = anat.heart
    hz_mm = anat.z_base + hz * anat.lung_height
    hh_mm = hh * anat.lung_height
    if ((x - hx) / hax) ** 2 + ((y - hy) / hay) ** 2 + ((z - hz_mm) / hh_mm) ** 2 <= 1.0:
        return False
    scale = 1.0 + anat.taper * (u - 0.5)
    return (x / anat.aw) ** 2 + (y / anat.bw) ** 2 <= scale**2


def _vessel_trees(
    rng: np.random.Generator, anat: _Anatomy
) -> list[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], float, float]]:
    """Tapering branching segments (p0, p1, r0, r1) from each hilum, in patient mm (z, y, x)."""

    def inside(p: npt.NDArray[np.float64]) -> bool:
        return _point_in_lung(anat, float(p[0]), float(p[1]), float(p[2]))

    segments = []
    h = anat.lung_height
    for lung in anat.lungs:
        side = lung["side"]
        hilum = np.array(
            [
                anat.z_base + h * rng.uniform(0.48, 0.58),
                lung["cy"] - anat.bw * 0.1,
                side * (anat.mediastinum + rng.uniform(4.0, 12.0)),
            ]
        )
        # upper lobe (cranial), middle/lingula (lateral-anterior), lower lobe (caudal-posterior)
        lobes = [
            (1.0, -0.1, 0.35),
            (0.6, 0.5, 0.5),
            (-0.15, -0.6, 0.8),
            (0.0, 0.3, 1.0),
            (-1.0, 0.35, 0.3),
            (-0.6, 0.2, 0.7),
            (-0.7, -0.5, 0.4),
        ]
        for dz, dy, dx in lobes:
            direction = np.array([dz, dy, side * dx]) + rng.normal(0.0, 0.15, 3)
            stack = [
                (
                    hilum,
                    direction / np.linalg.norm(direction),
                    rng.uniform(3.5, 5.5),
                    rng.uniform(28.0, 40.0),
                    0,
                )
            ]
            while stack:
                p, d, r, length, gen = stack.pop()
                end = p
                for step in (0.2, 0.4, 0.6, 0.8, 1.0):  # stop at the pleura
                    q = p + d * (length * step)
                    if not inside(q) and gen > 0:
                        break
                    end = q
                else:
                    step = 1.1
                r_end = r * rng.uniform(0.86, 0.94)
                if end is not p:
                    segments.append((p, end, r, r_end))
                if step <= 1.0 or gen >= 8 or r_end < 0.7:
                    continue
                outward = end - hilum
                outward /= np.linalg.norm(outward) + 1e-9
                for _ in range(2):
                    child_r = r_end * rng.uniform(0.76, 0.92)
                    child_len = length * rng.uniform(0.7, 0.9)
                    for _try in range(6):  # head for a random point of the lung further out
                        target = end + outward * child_len + rng.normal(0.0, child_len, 3)
                        if not inside(target):
                            continue
                        to = target - end
                        nd = 0.5 * d + to / (np.linalg.norm(to) + 1e-9) + rng.normal(0, 0.2, 3)
                        nd /= np.linalg.norm(nd)
                        stack.append((end, nd, child_r, child_len, gen + 1))
                        break
    return segments


def _place_lesion(
    rng: np.random.Generator, lung3d: BoolArray, grid: _Grid, anat: _Anatomy, radius: float
) -> npt.NDArray[np.float64] | None:
    """A lesion centre (volume mm) well inside a lung, or None if the scan holds no lung."""
    n, rows, cols = lung3d.shape
    for attempt in range(4000):
        i, r, c = int(rng.integers(n)), int(rng.integers(rows)), int(rng.integers(cols))
        if not lung3d[i, r, c]:
            continue
        center = np.array([grid.z[i], grid.y[r], grid.x[c]], dtype=np.float64)
        clearance = 0.75 * radius if attempt < 3000 else 0.0
        probes = [center + sign * clearance * e for e in np.eye(3) for sign in (-1.0, 1.0)]
        ok = sum(bool(anat.lung_mask(p[0], p[1] - anat.oy, p[2] - anat.ox)) for p in probes)
        if ok == 6:
            return center
    return None


def _paint_lesion(
    rng: np.random.Generator,
    grid: _Grid,
    center: npt.NDArray[np.float64],
    diameter: float,
    kind: str,
    hu_solid: float,
) -> tuple[tuple[slice, slice, slice], FloatArray, FloatArray] | None:
    """(box, occupancy, HU field) of one lobulated ellipsoid lesion."""
    radius = diameter / 2
    axes = radius * rng.uniform(0.8, 1.2, 3)
    axes *= radius / float(np.prod(axes)) ** (1 / 3)  # keep the equivalent diameter
    lobes = (
        rng.uniform(0.0, 0.12),
        int(rng.integers(2, 5)),
        int(rng.integers(1, 4)),
        rng.uniform(0, 2 * math.pi),
        rng.uniform(0, 2 * math.pi),
    )
    core = rng.uniform(0.3, 0.6)
    hu_ggo = rng.uniform(-600.0, -400.0)
    texture = rng.uniform(5.0, 20.0)
    reach = float(axes.max()) * (1 + lobes[0]) + 2.0
    found = grid.box(center - reach, center + reach)
    if found is None:
        return None
    sl, z, y, x = found
    dz, dy, dx = z - center[0], y - center[1], x - center[2]
    rho = np.sqrt((dz / axes[0]) ** 2 + (dy / axes[1]) ** 2 + (dx / axes[2]) ** 2)
    theta = np.arctan2(dy, dx)
    phi = np.arctan2(dz, np.sqrt(dx**2 + dy**2) + 1e-6)
    amp, k1, k2, a1, a2 = lobes
    bump = 1.0 + amp * np.sin(k1 * theta + a1) * np.cos(k2 * phi + a2)
    edge = 0.8 / radius  # soft edge of ~0.8 mm
    occ = np.clip(0.5 + (bump - rho) / edge, 0.0, 1.0).astype(np.float32)
    noise = rng.standard_normal(occ.shape, dtype=np.float32) * np.float32(texture)
    if kind == "solid":
        hu = np.float32(hu_solid) + noise
    else:
        hu = np.float32(hu_ggo) + 2 * noise
        if kind == "part-solid":
            solid = np.clip(0.5 + (core * bump - rho) / edge, 0.0, 1.0)
            hu = hu + solid * np.float32(hu_solid - hu_ggo)
    return sl, occ, hu.astype(np.float32)


# -------------------------------------------------------------------------------- generator
def synth_volume(
    seed: int, n_slices: int, rows: int = 256, cols: int = 256, nodules: int | None = None
) -> SynthCT:
    """One synthetic chest CT (see the module docstring).

    ``nodules``: number of lesions; ``None`` draws it from the seed (about half of the seeds get
    1–3 lesions, the rest none). A lesion that finds no lung in the scanned range (only possible
    for very short scans) is dropped, so ``label`` says what is actually in the volume.
    """
    if seed < 0:
        raise ValueError("seed must be non-negative")
    if n_slices < 1 or rows < 32 or cols < 32:
        raise ValueError("need n_slices >= 1 and rows, cols >= 32")
    if nodules is not None and nodules < 0:
        raise ValueError("nodules must be >= 0")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x4C554E47]))
    anat = _Anatomy(rng)
    if nodules is None:
        nodules = int(rng.choice([1, 1, 1, 2, 2, 3])) if rng.random() < 0.5 else 0

    coverage = anat.lung_height + anat.below + anat.above
    thickness = _snap_thickness(coverage / n_slices)
    fov = 2 * anat.a * rng.uniform(1.08, 1.3)
    pixel = round(fov / cols, 4)
    grid = _Grid(n_slices, rows, cols, thickness, pixel)
    anat.place(n_slices * thickness)
    shape = grid.shape

    # patient-centred coordinates
    zc = grid.z[:, None, None]
    yp = (grid.y - np.float32(anat.oy))[:, None]  # (rows, 1)
    xp = (grid.x - np.float32(anat.ox))[None, :]  # (1, cols)
    scale = anat.body_scale(grid.z).astype(np.float32)[:, None, None]

    # body: skin contour with a wobble, subcutaneous fat, soft-tissue interior
    theta = np.arctan2(yp / anat.b, xp / anat.a)
    w2, p2, w3, p3 = anat.wobble
    wobble = 1.0 + w2 * np.cos(2 * theta + p2) + w3 * np.cos(3 * theta + p3)
    r_skin = (np.sqrt((xp / anat.a) ** 2 + (yp / anat.b) ** 2) / wobble).astype(np.float32)
    a_in, b_in = anat.a - anat.fat, anat.b - anat.fat
    r_in = (np.sqrt((xp / a_in) ** 2 + (yp / b_in) ** 2) / wobble).astype(np.float32)
    vol = np.where(r_skin[None] <= scale, np.float32(anat.hu_fat), np.float32(HU_AIR))
    soft = r_in[None] <= scale
    vol = np.where(soft, np.float32(anat.hu_soft), vol).astype(np.float32)

    # scanner table below the patient (posterior = +y)
    y_table = anat.b + anat.oy + rng.uniform(8.0, 25.0)
    table = (grid.y[:, None] >= y_table) & (grid.y[:, None] <= y_table + 6.0)
    table = table & (np.abs(grid.x)[None, :] <= 0.42 * fov)
    vol[:, table] = np.float32(rng.uniform(50.0, 250.0))

    # lungs: parenchyma with a dependent (posterior) density gradient and smooth texture
    lung3d = anat.lung_mask(zc, yp[None], xp[None])
    lung_hu = np.float32(anat.hu_lung) + np.float32(anat.lung_gradient) * (yp / anat.bw)[None]
    lung_hu = lung_hu + _smooth_noise(rng, shape, grid.spacing, 7.0) * np.float32(anat.lung_texture)
    vol = np.where(lung3d, lung_hu, vol).astype(np.float32)

    offset = np.array([0.0, anat.oy, anat.ox])  # patient mm → volume mm
    edge = max(0.7, 0.6 * pixel)

    # airways: trachea down to the carina, main bronchi towards the hila
    airway = np.zeros(shape, dtype=np.float32)
    h = anat.lung_height
    carina = np.array([anat.z_base + h * rng.uniform(0.58, 0.66), anat.bw * 0.05, 0.0])
    top = np.array([n_slices * thickness + 50.0, anat.bw * 0.02, 0.0])
    r_trachea = rng.uniform(7.0, 10.0)
    grid.paint_capsule(airway, top + offset, carina + offset, r_trachea, r_trachea, edge)
    for side in (-1.0, 1.0):
        hilum = np.array(
            [carina[0] - rng.uniform(15, 30), anat.bw * 0.02, side * (anat.mediastinum + 8.0)]
        )
        grid.paint_capsule(
            airway, carina + offset, hilum + offset, r_trachea * 0.75, r_trachea * 0.55, edge
        )
    vol += airway * (np.float32(HU_AIR) - vol)

    # vessels: soft occupancy of tapering tubes, only inside the lungs (partial volume at edges)
    vessels = np.zeros(shape, dtype=np.float32)
    for p0, p1, r0, r1 in _vessel_trees(rng, anat):
        grid.paint_capsule(vessels, p0 + offset, p1 + offset, r0, r1, edge)
    vessels *= lung3d
    vol += vessels * (np.float32(anat.hu_vessel) - vol)

    # bone: spine (vertebral bodies with discs, canal, spinous process), ribs, sternum
    cortex = np.zeros(shape, dtype=np.float32)
    marrow = np.zeros(shape, dtype=np.float32)
    y_vert = anat.b - anat.fat - rng.uniform(42.0, 55.0)
    r_vert = rng.uniform(14.0, 19.0)
    period, phase = rng.uniform(24.0, 30.0), rng.uniform(0.0, 30.0)
    disc = ((grid.z + phase) % period) < 5.0
    zlo, zhi = -50.0, n_slices * thickness + 50.0
    body_top, body_bottom = np.array([zhi, y_vert, 0.0]), np.array([zlo, y_vert, 0.0])
    grid.paint_capsule(
        cortex,
        body_bottom + offset,
        body_top + offset,
        r_vert,
        r_vert,
        edge,
        inner=(marrow, 1.0 - 2.5 / r_vert),
    )
    y_canal = y_vert + r_vert + 8.0
    for dx in (-1.0, 1.0):  # neural arch around the canal, then the spinous process
        a = np.array([zlo, y_canal - 4.0, dx * 10.0])
        b = np.array([zhi, y_canal + 6.0, dx * 4.0])
        grid.paint_capsule(cortex, a + offset, np.array([zhi, a[1], a[2]]) + offset, 3.0, 3.0, edge)
        grid.paint_capsule(cortex, b + offset, np.array([zlo, b[1], b[2]]) + offset, 3.0, 3.0, edge)
    y_spinous = min(anat.b - anat.fat - 6.0, y_canal + 30.0)
    for yy in np.arange(y_canal + 9.0, y_spinous, 3.0):
        p = np.array([zlo, yy, 0.0])
        grid.paint_capsule(cortex, p + offset, np.array([zhi, yy, 0.0]) + offset, 2.5, 2.5, edge)
    n_ribs = int(rng.integers(10, 13))
    rib_gap = h * rng.uniform(0.085, 0.1)
    rib_r = rng.uniform(3.0, 4.5)
    descent = rng.uniform(30.0, 55.0)
    ar, br = anat.aw + anat.wall * 0.5, anat.bw + anat.wall * 0.5
    angles = np.radians(np.arange(80.0, -56.0, -8.5))
    for k in range(n_ribs):
        z_rib = anat.z_base + h * 0.98 - k * rib_gap
        for side in (-1.0, 1.0):
            pts = [
                np.array(
                    [
                        z_rib - descent * (math.radians(80.0) - t) / math.radians(135.0),
                        br * math.sin(t),
                        side * ar * math.cos(t),
                    ]
                )
                + offset
                for t in angles
            ]
            for p0, p1 in itertools.pairwise(pts):
                grid.paint_capsule(cortex, p0, p1, rib_r, rib_r, edge, inner=(marrow, 0.5))
    y_sternum = -(anat.bw + anat.wall * 0.45)
    for xx in np.arange(-12.0, 12.1, 4.0):
        p0 = np.array([anat.z_base + 0.38 * h, y_sternum, xx]) + offset
        p1 = np.array([anat.z_base + 0.92 * h, y_sternum, xx]) + offset
        grid.paint_capsule(cortex, p0, p1, 5.0, 5.0, edge)
    marrow *= cortex  # marrow never outside the bone
    disc_mask = disc[:, None, None] & (marrow > 0.5)
    vol += cortex * (np.float32(anat.hu_cortex) - vol)
    vol += marrow * (np.float32(anat.hu_marrow) - vol)
    vol[disc_mask] = np.float32(80.0)

    # lesions
    lesions: list[Lesion] = []
    lesion_slices: set[int] = set()
    kinds = ("solid", "part-solid", "ground-glass")
    for _ in range(nodules):
        diameter = float(rng.uniform(*LESION_DIAMETER_MM))
        kind = kinds[int(rng.choice(3, p=[0.7, 0.15, 0.15]))]
        hu_solid = float(rng.uniform(-100.0, 100.0))
        center = _place_lesion(rng, lung3d, grid, anat, diameter / 2)
        if center is None:
            continue
        painted = _paint_lesion(rng, grid, center, diameter, kind, hu_solid)
        if painted is None:
            continue
        sl, occ, hu = painted
        occ *= lung3d[sl]
        if not (occ >= 0.5).any():
            continue
        region = vol[sl]
        region += occ * (hu - region)
        hit = np.flatnonzero((occ >= 0.5).any(axis=(1, 2))) + sl[0].start
        lesion_slices.update(int(i) for i in hit)
        hu_center = hu_solid if kind != "ground-glass" else float(np.median(hu[occ >= 0.5]))
        lesions.append(
            Lesion(
                center_mm=(float(center[0]), float(center[1]), float(center[2])),
                diameter_mm=round(diameter, 3),
                kind=kind,
                hu=round(hu_center, 1),
            )
        )

    vol += rng.standard_normal(shape, dtype=np.float32) * np.float32(anat.noise)
    hu_out = np.clip(np.rint(vol), HU_MIN, HU_MAX).astype(np.int16)
    return SynthCT(
        hu=hu_out,
        spacing_mm=(float(thickness), float(pixel), float(pixel)),
        nodule_slices=frozenset(lesion_slices),
        label=int(bool(lesions)),
        lesions=tuple(lesions),
        seed=seed,
    )


# ------------------------------------------------------------------------------------ DICOM
def _ds(value: float) -> str:
    """A decimal string (DS) of at most 16 characters."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if len(text) <= 16 else f"{value:.8g}"


def write_series(
    ct: SynthCT,
    out_dir: Path,
    *,
    patient_id: str,
    patient_name: str,
    study_uid: str | None = None,
    series_uid: str | None = None,
    rescale_intercept: float = -1024.0,
    accession_number: str | None = None,
    study_datetime: datetime | None = None,
) -> list[Path]:
    """Write ``ct`` as a CT Image Storage series, one file per slice (``0001.dcm`` … in slice
    order), explicit VR little endian, unsigned 16-bit stored values with RescaleSlope 1 and
    ``rescale_intercept``. Returns the paths in slice order (slice 0 = most inferior, lowest z).
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import (
        PYDICOM_IMPLEMENTATION_UID,
        CTImageStorage,
        ExplicitVRLittleEndian,
        generate_uid,
    )

    hu = np.asarray(ct.hu)
    if hu.ndim != 3:
        raise ValueError(f"ct.hu must be (slices, rows, columns), got shape {hu.shape}")
    stored = np.rint(hu.astype(np.float64) - rescale_intercept)
    if stored.min() < 0 or stored.max() > 65535:
        raise ValueError(
            f"HU range [{hu.min()}, {hu.max()}] does not fit unsigned 16-bit stored values "
            f"with RescaleIntercept {rescale_intercept}"
        )
    stored_u16 = stored.astype(np.uint16)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    when = study_datetime or datetime.now().replace(microsecond=0)
    accession = accession_number or hashlib.sha1(study_uid.encode()).hexdigest()[:16].upper()
    n, rows, cols = hu.shape
    thickness, row_mm, col_mm = ct.spacing_mm
    x0 = -(cols - 1) / 2 * col_mm
    y0 = -(rows - 1) / 2 * row_mm
    z_top = 0.0  # the most superior slice at table position 0, feet-first slices below
    paths = []
    for i in range(n):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "MEDBATCH_SYNTH"
        path = out_dir / f"{i + 1:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = when.strftime("%Y%m%d")
        ds.StudyTime = when.strftime("%H%M%S")
        ds.SeriesDate = ds.StudyDate
        ds.SeriesTime = ds.StudyTime
        ds.ContentDate = ds.StudyDate
        ds.ContentTime = ds.StudyTime
        ds.AccessionNumber = accession
        ds.Modality = "CT"
        ds.Manufacturer = "medbatch synthetic"
        ds.ManufacturerModelName = "synth_volume"
        ds.InstitutionName = "medbatch"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Synthetic chest CT"
        ds.SeriesDescription = f"Synthetic chest CT {_ds(thickness)} mm (seed {ct.seed})"
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = _ds(thickness)
        ds.SpacingBetweenSlices = _ds(thickness)
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = i + 1
        z = z_top - (n - 1 - i) * thickness
        ds.ImagePositionPatient = [_ds(x0), _ds(y0), _ds(z)]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(z)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.PixelSpacing = [_ds(row_mm), _ds(col_mm)]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.WindowCenter = "-600"
        ds.WindowWidth = "1500"
        ds.RescaleIntercept = _ds(rescale_intercept)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = np.ascontiguousarray(stored_u16[i]).tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
