"""Raster primitives shared by the scene renderers.

Scenes are *height maps* in pixel units plus an *albedo* (secondary-electron yield) map; the SEM
appearance (edge brightening, shading, noise) is computed from them later in :mod:`sem_look`, the
same way for every class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

Array = np.ndarray
Point = tuple[float, float]


def log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def orientation(rng: np.random.Generator) -> float:
    """Main in-plane angle (radians) of a scene; the same distribution for every class.

    Microscopists often align structures with the frame, so 40 % are near a multiple of 90°.
    """
    if rng.random() < 0.4:
        return float(rng.integers(4) * math.pi / 2 + rng.normal(0.0, math.radians(3.0)))
    return float(rng.uniform(0.0, 2 * math.pi))


def smooth_noise(rng: np.random.Generator, h: int, w: int, scale: float) -> Array:
    """Zero-mean, unit-variance random field with correlation length ``scale`` pixels."""
    if scale <= 1.0:
        return rng.standard_normal((h, w)).astype(np.float32)
    lh, lw = int(h / scale) + 4, int(w / scale) + 4
    small = rng.standard_normal((lh, lw)).astype(np.float32)
    big = Image.fromarray(small).resize((round(lw * scale), round(lh * scale)), Image.Resampling.BICUBIC)
    oy, ox = (int(v) for v in rng.integers(0, max(1, int(scale)), size=2))
    arr = np.asarray(big, dtype=np.float32)[oy : oy + h, ox : ox + w]
    arr = arr - arr.mean()
    return arr / (arr.std() + 1e-6)


def fractal_noise(rng: np.random.Generator, h: int, w: int, scale: float, octaves: int = 3, gain: float = 0.5) -> Array:
    out = np.zeros((h, w), np.float32)
    amp, total = 1.0, 0.0
    for _ in range(octaves):
        out += amp * smooth_noise(rng, h, w, scale)
        total += amp
        amp *= gain
        scale /= 2.0
    return out / total


def smoothstep(x: Array) -> Array:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def bbox(cx: float, cy: float, rad: float, h: int, w: int) -> tuple[int, int, int, int] | None:
    x0, x1 = max(0, int(cx - rad) - 1), min(w, int(cx + rad) + 2)
    y0, y1 = max(0, int(cy - rad) - 1), min(h, int(cy + rad) + 2)
    if x0 >= x1 or y0 >= y1:
        return None
    return y0, y1, x0, x1


def blob_into(
    height: Array,
    albedo: Array,
    cx: float,
    cy: float,
    r: float,
    z: float,
    alb: float,
    *,
    aspect: float = 1.0,
    angle: float = 0.0,
    facets: int = 0,
) -> None:
    """Composite a sphere / ellipsoid (or a faceted crystal if ``facets``) into the maps (z-buffer)."""
    h, w = height.shape
    box = bbox(cx, cy, r * aspect, h, w)
    if box is None:
        return
    y0, y1, x0, x1 = box
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
    c, s = math.cos(angle), math.sin(angle)
    px = (dx * c + dy * s) / aspect
    py = -dx * s + dy * c
    if facets:
        d = np.zeros(np.broadcast_shapes(px.shape, py.shape), np.float32)
        for k in range(facets):
            phi = math.pi * k / facets
            d = np.maximum(d, np.abs(px * math.cos(phi) + py * math.sin(phi)))
        hh = z + np.minimum((r - d) * 1.2, 0.55 * r)
        inside = d < r
    else:
        d2 = px * px + py * py
        inside = d2 < r * r
        hh = z + np.sqrt(np.maximum(r * r - d2, 0.0))
    sub_h = height[y0:y1, x0:x1]
    upd = inside & (hh > sub_h)
    sub_h[upd] = hh[upd]
    albedo[y0:y1, x0:x1][upd] = alb


def polygon_mask(pts: Sequence[Point], h: int, w: int) -> tuple[Array, tuple[int, int]] | None:
    """Rasterise a polygon into a tight boolean mask (with a 1-pixel margin) and its top-left corner."""
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    x0, x1 = max(0, int(min(xs)) - 2), min(w, int(max(xs)) + 3)
    y0, y1 = max(0, int(min(ys)) - 2), min(h, int(max(ys)) + 3)
    if x0 >= x1 or y0 >= y1:
        return None
    im = Image.new("L", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(im).polygon([(x - x0, y - y0) for x, y in pts], fill=255)
    return np.asarray(im) > 0, (y0, x0)


def roof_into(
    height: Array,
    albedo: Array,
    pts: Sequence[Point],
    z: float,
    slope: float,
    cap: float,
    alb: float,
    *,
    rounded: bool = False,
    tilt: Point = (0.0, 0.0),
) -> None:
    """Composite a faceted solid over a polygon: the distance transform gives planar facets (a hip roof)."""
    from scipy import ndimage  # lazy: SciPy costs ~0.3 s at every `emassist` start

    h, w = height.shape
    got = polygon_mask(pts, h, w)
    if got is None:
        return
    mask, (y0, x0) = got
    if not mask.any():
        return
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1].astype(np.float32)
    prof = np.sqrt(dist * cap) if rounded else np.minimum(dist, cap)
    mh, mw = mask.shape
    ty = np.arange(mh, dtype=np.float32)[:, None] - mh / 2
    tx = np.arange(mw, dtype=np.float32)[None, :] - mw / 2
    hh = z + slope * prof + tilt[0] * tx + tilt[1] * ty
    sub_h = height[y0 : y0 + mh, x0 : x0 + mw]
    upd = mask & (hh > sub_h)
    sub_h[upd] = hh[upd]
    albedo[y0 : y0 + mh, x0 : x0 + mw][upd] = alb


# x, y, pie-slice start and end (degrees), cosine and sine of the two gap lines' directions
Joint = tuple[float, float, float, float, float, float, float, float]


def curve_joints(flat: Sequence[Point]) -> list[Joint]:
    """The round joints Pillow's ``ImageDraw.line(..., joint="curve")`` draws at the bends of a polyline.

    They depend on the points only, not on the width: computed once for all the strokes of a tube (Pillow computes
    them again in Python for every stroke, most of the demo's fibre-rendering time). The arithmetic is Pillow's
    (13.x), step for step, so :func:`curve_line` draws the same pixels (``tests/code/test_demo.py`` checks it).
    """
    joints: list[Joint] = []
    for i in range(1, len(flat) - 1):
        (xa, ya), (x, y), (xb, yb) = flat[i - 1], flat[i], flat[i + 1]
        a0 = math.degrees(math.atan2(x - xa, ya - y)) % 360
        a1 = math.degrees(math.atan2(xb - x, y - yb)) % 360
        if a0 == a1:  # straight on: no joint
            continue
        if (a1 > a0 and a1 - 180 > a0) or (a1 < a0 and a1 + 180 > a0):  # flipped
            start, end, g0, g1 = a1 + 90, a0 + 90, a0 + 90, a1 + 90
        else:
            start, end, g0, g1 = a0 - 90, a1 - 90, a0 - 90, a1 - 90
        r0, r1 = math.radians(g0 - 90), math.radians(g1 - 90)
        joints.append((x, y, start - 90, end - 90, math.cos(r0), math.sin(r0), math.cos(r1), math.sin(r1)))
    return joints


def _gap_end(x: float, y: float, cos: float, sin: float, distance: float) -> tuple[float, float]:
    dx, dy = distance * cos, distance * sin
    return x + (math.floor(dx) if dx > 0 else math.ceil(dx)), y + (math.floor(dy) if dy > 0 else math.ceil(dy))


def curve_line(draw: ImageDraw.ImageDraw, flat: list[Point], fill: float, width: int, joints: list[Joint]) -> None:
    """``draw.line(flat, fill, width, joint="curve")`` with the joints of :func:`curve_joints`: the same pixels."""
    core = draw.draw
    ink = core.draw_ink(fill)
    core.draw_lines(flat, ink, width)
    if width <= 4:
        return
    half = width / 2
    distance = half - 1
    for x, y, start, end, c0, s0, c1, s1 in joints:
        core.draw_pieslice([(x - half + 1, y - half + 1), (x + half - 1, y + half - 1)], start, end, ink, 1)
        if width > 8:  # cover potential gaps between the line and the joint
            core.draw_lines([_gap_end(x, y, c0, s0, distance), (x, y), _gap_end(x, y, c1, s1, distance)], ink, 3)


class Canvas:
    """PIL float images for painter's-order drawing of a height map and an albedo map."""

    def __init__(self, height: Array, albedo: Array) -> None:
        self.h_img = Image.fromarray(np.ascontiguousarray(height, dtype=np.float32))
        self.a_img = Image.fromarray(np.ascontiguousarray(albedo, dtype=np.float32))
        self.dh = ImageDraw.Draw(self.h_img)
        self.da = ImageDraw.Draw(self.a_img)

    def arrays(self) -> tuple[Array, Array]:
        return np.array(self.h_img, dtype=np.float32), np.array(self.a_img, dtype=np.float32)

    def tube(self, pts: Sequence[Point], r: float, z: float, alb: float, *, caps: bool = True) -> None:
        """A cylinder of radius ``r`` along a polyline, drawn as stacked strokes approximating its profile."""
        if len(pts) < 2:
            return
        n_pass = int(min(8, max(3, r)))
        fracs = np.linspace(1.0, 0.2, n_pass)
        flat = [(float(x), float(y)) for x, y in pts]
        joints = curve_joints(flat) if round(2 * r) > 4 else []
        last = -1
        for k, f in enumerate(fracs):
            width = max(1, round(2 * r * f))
            if width == last and k:
                continue
            last = width
            val = z + r * (0.15 + 0.85 * math.sqrt(max(0.0, 1.0 - f * f)))
            curve_line(self.dh, flat, val, width, joints)
            if k == 0:
                curve_line(self.da, flat, alb, width, joints)
            if caps and width >= 3:
                rr = width / 2
                for x, y in (flat[0], flat[-1]):
                    self.dh.ellipse((x - rr, y - rr, x + rr, y + rr), fill=val)
                    if k == 0:
                        self.da.ellipse((x - rr, y - rr, x + rr, y + rr), fill=alb)

    def polygon(self, pts: Sequence[Point], z: float, alb: float | None) -> None:
        flat = [(float(x), float(y)) for x, y in pts]
        self.dh.polygon(flat, fill=z)
        if alb is not None:
            self.da.polygon(flat, fill=alb)


def random_path(
    rng: np.random.Generator,
    start: Point,
    angle: float,
    length: float,
    *,
    step: float,
    wiggle: float,
    curvature: float = 0.0,
    kink_prob: float = 0.0,
) -> list[Point]:
    """A smooth random polyline: heading = angle + constant curvature + random walk (+ rare kinks)."""
    n = max(2, int(length / step) + 1)
    turns = rng.normal(0.0, wiggle, n) + curvature * step
    if kink_prob > 0:
        kinks = rng.random(n) < kink_prob
        turns = turns + kinks * rng.normal(0.0, 0.6, n)
    heading = angle + np.cumsum(turns)
    xs = start[0] + np.concatenate([[0.0], np.cumsum(step * np.cos(heading[:-1]))])
    ys = start[1] + np.concatenate([[0.0], np.cumsum(step * np.sin(heading[:-1]))])
    return list(zip(xs.tolist(), ys.tolist(), strict=True))


def view_matrix(rng: np.random.Generator, h: int, w: int, u: float, tilt_prob: float = 0.5) -> Array:
    """World (units) → pixel homography: scale ``u``, in-plane rotation, optional perspective tilt, centring.

    The tilt (as on a tilted SEM stage) is about the screen x axis and foreshortens the y direction.
    """
    ang = orientation(rng)
    c, s = math.cos(ang), math.sin(ang)
    rot = np.array([[c * u, -s * u, 0.0], [s * u, c * u, 0.0], [0.0, 0.0, 1.0]])
    if rng.random() < tilt_prob:
        tau = math.radians(rng.uniform(15.0, 55.0))
        dist = rng.uniform(1.2, 4.0) * max(h, w)
        tilt = np.array([[1.0, 0.0, 0.0], [0.0, math.cos(tau), 0.0], [0.0, math.sin(tau) / dist, 1.0]])
    else:
        tilt = np.eye(3)
    shift = np.array([[1.0, 0.0, w / 2 + rng.normal(0, w / 10)], [0.0, 1.0, h / 2 + rng.normal(0, h / 10)], [0, 0, 1]])
    return shift @ tilt @ rot


def tilt_sin(mat: Array) -> float:
    """Sine-like amount of perspective foreshortening of ``view_matrix`` (0 for a top view)."""
    col = mat[:2, 1]
    row = mat[:2, 0]
    ratio = float(np.hypot(*col) / max(np.hypot(*row), 1e-9))
    return math.sqrt(max(0.0, 1.0 - min(1.0, ratio) ** 2))


def project(mat: Array, pts: Sequence[Point]) -> list[Point]:
    arr = np.asarray(pts, dtype=np.float64)
    hom = arr @ mat[:, :2].T + mat[:, 2]
    return list(zip((hom[:, 0] / hom[:, 2]).tolist(), (hom[:, 1] / hom[:, 2]).tolist(), strict=True))


def pixel_to_world(mat: Array, h: int, w: int) -> tuple[Array, Array]:
    """World coordinates of every pixel centre under the inverse of ``mat``."""
    inv = np.linalg.inv(mat).astype(np.float32)
    ys = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(w, dtype=np.float32)[None, :] + 0.5
    den = inv[2, 0] * xs + inv[2, 1] * ys + inv[2, 2]
    wx = (inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]) / den
    wy = (inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]) / den
    return wx, wy


def voronoi(
    rng: np.random.Generator, h: int, w: int, spacing: float, warp: float = 0.0, max_factor: int = 4
) -> tuple[Array, Array, Array]:
    """Distances to the nearest and second-nearest random seed (F1, F2) and the nearest seed's index.

    Computed at up to ``max_factor``× reduced resolution for large cells, then upsampled (which blunts
    the V-shaped minimum of F2 − F1 at cell borders to about the reduction factor).
    """
    from scipy.spatial import cKDTree

    f = int(min(max_factor, max(1, spacing // 8)))
    hh, ww = (h + f - 1) // f, (w + f - 1) // f
    sp = spacing / f
    n = int(min(6000, max(4, (hh + 2 * sp) * (ww + 2 * sp) / (sp * sp))))
    seeds = np.column_stack([rng.uniform(-sp, ww + sp, n), rng.uniform(-sp, hh + sp, n)])
    yy, xx = np.mgrid[0:hh, 0:ww].astype(np.float32)
    if warp > 0:
        xx = xx + warp / f * smooth_noise(rng, hh, ww, sp * 0.7)
        yy = yy + warp / f * smooth_noise(rng, hh, ww, sp * 0.7)
    dist, idx = cKDTree(seeds).query(np.column_stack([xx.ravel(), yy.ravel()]), k=2)
    f1 = dist[:, 0].reshape(hh, ww).astype(np.float32) * f
    f2 = dist[:, 1].reshape(hh, ww).astype(np.float32) * f
    nearest = idx[:, 0].reshape(hh, ww)
    if f > 1:
        f1 = upsample(f1, h, w)
        f2 = upsample(f2, h, w)
        nearest = np.repeat(np.repeat(nearest, f, axis=0), f, axis=1)[:h, :w]
    return f1, f2, nearest


def upsample(arr: Array, h: int, w: int) -> Array:
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32))
    return np.asarray(img.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
