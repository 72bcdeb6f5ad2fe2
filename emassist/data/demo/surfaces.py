"""Scene renderers for surfaces and fabricated structures: porous sponge, films, patterned surfaces,
MEMS devices and electrodes, tips. Same ``(rng, h, w, u) -> (height, albedo)`` contract as :mod:`shapes`.
"""

from __future__ import annotations

import math

import numpy as np

from emassist.data.demo._raster import (
    Array,
    Canvas,
    Point,
    blob_into,
    fractal_noise,
    log_uniform,
    orientation,
    pixel_to_world,
    project,
    smooth_noise,
    smoothstep,
    tilt_sin,
    view_matrix,
    voronoi,
)
from emassist.data.demo.shapes import Scene, substrate


def render_porous_sponge(rng: np.random.Generator, h: int, w: int, u: float) -> Scene:
    """Porous sponge: an interconnected network of pores (bicontinuous or foam-like), deep pores dark."""
    base_alb = rng.uniform(0.8, 1.2)
    if rng.random() < 0.55:  # bicontinuous network: two stacked layers of a thresholded random field
        s1 = u * rng.uniform(9, 24)
        t = rng.uniform(-0.4, 0.5)
        depth = u * rng.uniform(8, 25)
        height = np.zeros((h, w), np.float32)
        for layer, scale in ((0, 1.0), (1, 0.45)):
            f = smooth_noise(rng, h, w, s1) + 0.45 * smooth_noise(rng, h, w, s1 / 2.5)
            f += 0.2 * smooth_noise(rng, h, w, s1 / 6)
            solid = smoothstep((f - t - 0.2 * layer) / 0.35)
            height = np.maximum(height, depth * scale * solid)
    else:  # foam: packed spherical cavities that open into each other through windows
        spacing = u * rng.uniform(14, 45)
        f1, f2, idx = voronoi(rng, h, w, spacing, warp=spacing * 0.1)
        rho = f1 / np.maximum((f1 + f2) / 2, 1e-3)  # 0 at a cell's seed, 1 on its border
        wall = rng.uniform(0.03, 0.2)
        bowl = np.sqrt(np.maximum(1.0 - (rho / (1.0 - wall)) ** 2, 0.0))
        height = spacing * rng.uniform(0.3, 0.6) * (1.0 - bowl)
        windows = rng.random(int(idx.max()) + 1) < rng.uniform(0.2, 0.8)
        deep = windows[idx] & (rho < rng.uniform(0.2, 0.45))
        height = np.where(deep, height - spacing, height)
    height = height + 0.4 * u * smooth_noise(rng, h, w, 2 * u)
    albedo = np.full((h, w), base_alb, np.float32)
    return height.astype(np.float32), albedo


def render_films(rng: np.random.Generator, h: int, w: int, u: float) -> Scene:
    """Films and coated surfaces: polycrystalline grains, cracked coatings, nodular or smooth films."""
    base_alb = rng.uniform(0.8, 1.2)
    mode = rng.choice(4, p=[0.35, 0.3, 0.2, 0.15])
    if mode == 0:  # polycrystalline grains with grooved boundaries and grain-to-grain contrast
        spacing = u * rng.uniform(7, 30)
        f1, f2, idx = voronoi(rng, h, w, spacing)
        n_seeds = int(idx.max()) + 1
        dome = smoothstep((f2 - f1) / (spacing * rng.uniform(0.2, 0.6)))
        height = spacing * 0.25 * dome + spacing * 0.1 * rng.random(n_seeds)[idx]
        albedo = base_alb * (1.0 + rng.uniform(0.0, 0.3) * (rng.random(n_seeds)[idx] - 0.5))
    elif mode == 1:  # a coating with a mud-crack network; some plates lifted
        height = 0.6 * u * fractal_noise(rng, h, w, 30 * u, octaves=3)
        spacing = u * rng.uniform(30, 120)
        f1, f2, idx = voronoi(rng, h, w, spacing, warp=spacing * 0.15, max_factor=2)
        crack = 1.0 - smoothstep((f2 - f1) / (u * rng.uniform(2.5, 6.0)))
        lift = rng.uniform(0, 3 * u) * rng.random(int(idx.max()) + 1)[idx]
        height = height + lift * smoothstep((f2 - f1) / spacing * 3) - u * rng.uniform(6, 15) * crack
        albedo = base_alb * (1.0 - 0.3 * crack)
    elif mode == 2:  # nodular ("cauliflower") coating
        scale = u * rng.uniform(4, 14)
        f = fractal_noise(rng, h, w, scale, octaves=2)
        height = u * rng.uniform(4, 10) * np.maximum(f + rng.uniform(0.0, 0.6), 0.0) ** 1.5
        albedo = base_alb * np.ones((h, w), np.float32)
    else:  # smooth film with hillocks, pinholes and a little dust
        height = 0.5 * u * fractal_noise(rng, h, w, 40 * u, octaves=4)
        albedo = base_alb * np.ones((h, w), np.float32)
        for _ in range(int(rng.integers(0, 30))):
            blob_into(
                height,
                albedo,
                rng.uniform(0, w),
                rng.uniform(0, h),
                u * rng.uniform(1.5, 8),
                float(height.min()) - u * rng.uniform(0, 3),
                base_alb,
                aspect=rng.uniform(1.0, 2.5),
                angle=rng.uniform(0, math.pi),
            )
        pits = smooth_noise(rng, h, w, u * 1.5) > rng.uniform(2.5, 4.0)
        height = np.where(pits, height - 5 * u, height)
    return height.astype(np.float32), np.asarray(albedo, np.float32)


def _lattice_distance(wx: Array, wy: Array, pitch: float, hexagonal: bool) -> tuple[Array, Array, Array, Array]:
    """Distance (Euclidean and L∞) from each point to its nearest lattice site, and that site's indices."""
    if not hexagonal:
        a, b = wx / pitch, wy / pitch
        ia, ib = np.round(a), np.round(b)
        fa, fb = (a - ia) * pitch, (b - ib) * pitch
        return np.hypot(fa, fb), np.maximum(np.abs(fa), np.abs(fb)), ia, ib
    row = pitch * math.sqrt(3)
    best = None
    for ox, oy, tag in ((0.0, 0.0, 0), (pitch / 2, row / 2, 1)):
        a, b = (wx - ox) / pitch, (wy - oy) / row
        ia, ib = np.round(a), np.round(b)
        fa, fb = (a - ia) * pitch, (b - ib) * row
        d = np.hypot(fa, fb)
        cand = (d, np.maximum(np.abs(fa), np.abs(fb)), ia * 2 + tag, ib)
        if best is None:
            best = cand
        else:
            closer = d < best[0]
            best = tuple(np.where(closer, c, o) for c, o in zip(cand, best, strict=True))  # type: ignore[assignment]
    assert best is not None
    return best


def render_patterned(rng: np.random.Generator, h: int, w: int, u: float) -> Scene:
    """Patterned surfaces: regular lattices of pillars, holes, lines or grids, often seen in perspective."""
    mat = view_matrix(rng, h, w, u, tilt_prob=0.5)
    wx, wy = pixel_to_world(mat, h, w)
    pitch = rng.uniform(14, 50)
    depth = pitch * rng.uniform(0.1, 0.5) * u
    edge = rng.uniform(0.3, 1.5)
    kind = rng.choice(["pillars", "holes", "lines", "grid", "squares"], p=[0.3, 0.25, 0.2, 0.1, 0.15])
    fill = rng.uniform(0.25, 0.8)
    table = rng.random((64, 64)).astype(np.float32)
    if kind in ("lines", "grid"):
        fa = np.abs(wx / pitch - np.round(wx / pitch)) * pitch
        ridge = smoothstep((fill * pitch / 2 - fa) / edge)
        if kind == "grid":
            fb = np.abs(wy / pitch - np.round(wy / pitch)) * pitch
            ridge = np.maximum(ridge, smoothstep((fill * pitch / 2 - fb) / edge))
        profile = ridge * (1.0 - 0.3 * rng.random() * (1 - ridge))
        height = depth * profile
    else:
        hexagonal = kind != "squares" and rng.random() < 0.5
        d2, dinf, ia, ib = _lattice_distance(wx, wy, pitch, hexagonal)
        site = table[ia.astype(np.int64) % 64, ib.astype(np.int64) % 64]
        rad = fill * pitch / 2 * (1.0 + 0.08 * (site - 0.5))
        d = dinf if kind == "squares" else d2
        feature = smoothstep((rad - d) / edge)
        feature = np.where(site < rng.uniform(0.0, 0.06), 0.0, feature)  # missing features (defects)
        if kind == "pillars" and rng.random() < 0.4:  # domed pillars
            feature = feature * np.sqrt(np.maximum(1.0 - (d / np.maximum(rad, 1e-3)) ** 2, 0.0)) ** 0.5
        height = depth * (-feature if kind == "holes" else feature)
    if rng.random() < 0.3:  # the pattern covers only a field; plain substrate around it
        half_x, half_y = rng.uniform(0.2, 0.5) * w / u, rng.uniform(0.2, 0.5) * h / u
        inside = (np.abs(wx) < half_x) & (np.abs(wy) < half_y)
        height = np.where(inside, height, 0.0)
    height = height + 0.3 * u * smooth_noise(rng, h, w, 3 * u)
    albedo = np.full((h, w), rng.uniform(0.8, 1.2), np.float32)
    if kind == "holes":
        albedo = albedo * (1.0 + 0.4 * np.clip(height / max(depth, 1e-3), -1.0, 0.0))
    return height.astype(np.float32), albedo


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[Point]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


Part = tuple[list[Point], float, float]  # world polygon, height (world units; 0 = etched to substrate), albedo


def _comb(rng: np.random.Generator, cx: float, cy: float, span: float, flat: bool) -> list[Part]:
    """A comb drive (or flat interdigitated electrodes): two backbones with interleaved fingers."""
    fw, gap = rng.uniform(2, 8), rng.uniform(1.5, 8)
    fl = rng.uniform(25, 70) if not flat else rng.uniform(60, 250)
    overlap = fl * rng.uniform(0.3, 0.8)
    bb = rng.uniform(8, 30)
    hgt = rng.uniform(1, 2) if flat else rng.uniform(4, 15)
    alb = 1.3 if flat else 1.0
    pitch = 2 * (fw + gap)
    ya, yb = cy - fl + overlap / 2, cy + fl - overlap / 2
    x0, x1 = cx - span / 2, cx + span / 2
    parts: list[Part] = [(_rect(x0 - 5, ya - bb, x1 + 5, ya), hgt, alb), (_rect(x0 - 5, yb, x1 + 5, yb + bb), hgt, alb)]
    x = x0
    while x < x1:
        parts.append((_rect(x, ya, x + fw, ya + fl), hgt, alb))
        parts.append((_rect(x + pitch / 2, yb - fl, x + pitch / 2 + fw, yb), hgt, alb))
        x += pitch
    return parts


def _pads(rng: np.random.Generator, cx: float, cy: float, span: float) -> list[Part]:
    """A row of bond pads with metal traces routed (Manhattan style) towards a device in the middle."""
    size = rng.uniform(25, 90)
    spacing = size * rng.uniform(1.3, 2.2)
    tw = rng.uniform(2, 10)
    n = max(2, int(span / spacing))
    parts: list[Part] = []
    y_pad = cy - rng.uniform(0.3, 0.6) * span
    y_turn = cy + rng.uniform(-0.2, 0.2) * span
    target_x0 = cx - n * tw * 1.5
    for i in range(n):
        px = cx + (i - (n - 1) / 2) * spacing
        parts.append((_rect(px - size / 2, y_pad - size / 2, px + size / 2, y_pad + size / 2), 2.0, 1.35))
        tx = target_x0 + i * tw * 3
        parts.append((_rect(px - tw / 2, y_pad, px + tw / 2, y_turn + tw / 2), 1.5, 1.25))
        parts.append((_rect(min(px, tx) - tw / 2, y_turn - tw / 2, max(px, tx) + tw / 2, y_turn + tw / 2), 1.5, 1.25))
        parts.append((_rect(tx - tw / 2, y_turn, tx + tw / 2, cy + 0.6 * span), 1.5, 1.25))
    return parts


def _proof_mass(rng: np.random.Generator, cx: float, cy: float, span: float) -> list[Part]:
    """A suspended plate with an array of release holes, held by serpentine springs to anchors."""
    mw, mh = span * rng.uniform(0.4, 0.8), span * rng.uniform(0.3, 0.7)
    hgt = rng.uniform(4, 15)
    parts: list[Part] = [(_rect(cx - mw / 2, cy - mh / 2, cx + mw / 2, cy + mh / 2), hgt, 1.0)]
    hs = rng.uniform(3, 12)
    hp = hs * rng.uniform(1.8, 3.0)
    y = cy - mh / 2 + hp * 0.8
    while y < cy + mh / 2 - hp * 0.5:
        x = cx - mw / 2 + hp * 0.8
        while x < cx + mw / 2 - hp * 0.5:
            parts.append((_rect(x - hs / 2, y - hs / 2, x + hs / 2, y + hs / 2), 0.0, 0.6))
            x += hp
        y += hp
    bw = rng.uniform(2, 5)
    for sx in (-1, 1):
        for sy in (-1, 1):
            x0 = cx + sx * mw / 2
            y0 = cy + sy * (mh / 2 - 10)
            turns = int(rng.integers(2, 6))
            amp = rng.uniform(10, 30)
            step = rng.uniform(5, 10)
            for k in range(turns):
                xa = x0 + sx * (k * step)
                parts.append((_rect(min(xa, xa + sx * bw), y0 - amp, max(xa, xa + sx * bw), y0 + amp), hgt, 1.0))
            xe = x0 + sx * turns * step
            parts.append((_rect(min(xe, xe + sx * 30), y0 - 20, max(xe, xe + sx * 30), y0 + 20), hgt, 1.1))
    return parts


def _cantilevers(rng: np.random.Generator, cx: float, cy: float, span: float) -> list[Part]:
    """An anchor block with an array of parallel beams of different lengths."""
    n = int(rng.integers(3, 12))
    bw = rng.uniform(4, 20)
    pitch = bw * rng.uniform(1.6, 4.0)
    hgt = rng.uniform(2, 10)
    y_anchor = cy - span * 0.4
    width = n * pitch
    parts: list[Part] = [(_rect(cx - width / 2 - 20, y_anchor - 60, cx + width / 2 + 20, y_anchor), hgt * 2, 0.9)]
    lengths = rng.uniform(30, span * 0.8, n)
    if rng.random() < 0.5:
        lengths = np.sort(lengths)
    for i in range(n):
        x = cx - width / 2 + i * pitch
        parts.append((_rect(x, y_anchor, x + bw, y_anchor + lengths[i]), hgt, 1.0))
    return parts


def render_mems(rng: np.random.Generator, h: int, w: int, u: float) -> Scene:
    """MEMS devices and electrodes: comb drives, pads and traces, proof masses, cantilevers, in perspective."""
    height, albedo = substrate(rng, h, w, u)
    height *= 0.5
    mat = view_matrix(rng, h, w, u, tilt_prob=0.5)
    ts = tilt_sin(mat)
    span = max(h, w) / u * rng.uniform(0.6, 1.3)
    builders = ["comb", "ide", "pads", "mass", "cantilever"]
    chosen = rng.choice(builders, size=int(rng.integers(1, 3)), replace=False)
    parts: list[Part] = []
    for k, name in enumerate(chosen):
        cx = 0.0 if k == 0 else rng.uniform(-0.5, 0.5) * span
        cy = 0.0 if k == 0 else rng.uniform(-0.5, 0.5) * span
        if name == "comb":
            parts += _comb(rng, cx, cy, span, flat=False)
        elif name == "ide":
            parts += _comb(rng, cx, cy, span, flat=True)
        elif name == "pads":
            parts += _pads(rng, cx, cy, span)
        elif name == "mass":
            parts += _proof_mass(rng, cx, cy, span)
        else:
            parts += _cantilevers(rng, cx, cy, span)
    canvas = Canvas(height, albedo)
    base = float(height.max())
    wall_alb = rng.uniform(1.1, 1.5)
    margin = 2 * max(h, w)
    for poly, hgt, alb in parts:
        pts = project(mat, poly)
        if all(x < -margin or x > w + margin or y < -margin or y > h + margin for x, y in pts):
            continue
        z = hgt * u
        lift = z * ts
        top = [(x, y - lift) for x, y in pts]
        if hgt > 0:
            if lift >= 1.0:
                canvas.polygon(pts, base + z * 0.5, wall_alb)
            canvas.polygon(top, base + z, alb)
        else:  # etched hole through the structure
            canvas.polygon(top, base - 2 * u, alb)
    return canvas.arrays()


def _tip_side(rng: np.random.Generator, h: int, w: int, u: float) -> Scene:
    """A tip seen from the side: a cone (round section) or pyramid (ridge) tapering to a rounded apex."""
    height, albedo = substrate(rng, h, w, u)
    if rng.random() < 0.4:  # vacuum / far background
        height *= 0.2
        albedo *= 0.5
    ang = orientation(rng)
    d = (math.cos(ang), math.sin(ang))
    apex = (rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h)
    half = math.radians(rng.uniform(6, 28))
    ra = u * rng.uniform(0.5, 5.0)
    ys = np.arange(h, dtype=np.float32)[:, None] + 0.5 - apex[1]
    xs = np.arange(w, dtype=np.float32)[None, :] + 0.5 - apex[0]
    s = -(xs * d[0] + ys * d[1])  # distance behind the apex along the axis
    t = -xs * d[1] + ys * d[0]
    q = np.clip(s / ra, 0.0, 1.0)
    rho = ra * np.sqrt(q * (2.0 - q)) + np.maximum(s - ra, 0.0) * math.tan(half)
    if rng.random() < 0.3:  # the tip sits on a cantilever beam
        length = rng.uniform(0.3, 0.8) * max(h, w)
        rho = np.where(s > length, rng.uniform(0.3, 1.0) * max(h, w), rho)
    pyramid = rng.random() < 0.4
    inside = (s > 0) & (np.abs(t) < rho)
    prof = rho - np.abs(t) if pyramid else np.sqrt(np.maximum(rho * rho - t * t, 0.0))
    prof = prof + 0.3 * u * smooth_noise(rng, h, w, 4 * u) * inside
    top = float(height.max()) + 2 * u
    height = np.where(inside, top + prof, height)
    albedo = np.where(inside, rng.uniform(0.9, 1.3), albedo)
    return height.astype(np.float32), albedo.astype(np.float32)


def _pyramid_height(px: Array, py: Array, base: float, facets: int, angle: float) -> Array:
    """Height (0..1) of a pyramid with ``facets`` faces (0: a cone) of base half-width ``base``."""
    if facets == 0:
        norm = np.sqrt(px * px + py * py)
    else:
        norm = np.zeros(np.broadcast_shapes(px.shape, py.shape), np.float32)
        for k in range(facets):
            phi = angle + 2 * math.pi * k / facets
            norm = np.maximum(norm, px * math.cos(phi) + py * math.sin(phi))
    return np.clip(1.0 - norm / base, 0.0, None)


def _tip_top(rng: np.random.Generator, h: int, w: int, u: float) -> Scene:
    """Tips seen from above: one big pyramid/cone, a random-pyramid texture, or a field-emitter array."""
    height, albedo = substrate(rng, h, w, u)
    mode = rng.choice(3, p=[0.55, 0.2, 0.25])
    facets = int(rng.choice([0, 3, 4, 4]))
    ang = orientation(rng)
    tip_alb = rng.uniform(0.9, 1.3)
    if mode == 0:
        base = u * rng.uniform(40, 150)
        cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
        ys = np.arange(h, dtype=np.float32)[:, None] + 0.5 - cy
        xs = np.arange(w, dtype=np.float32)[None, :] + 0.5 - cx
        sharp = rng.uniform(1.0, 2.5)  # > 1: concave flanks, steepest (brightest) at the apex
        hgt = _pyramid_height(xs, ys, base, facets, ang) ** sharp * base * rng.uniform(0.7, 1.8)
    elif mode == 1:
        hgt = np.zeros((h, w), np.float32)
        n = int(rng.integers(6, 40))
        for _ in range(n):
            base = u * log_uniform(rng, 10, 60)
            cx, cy = rng.uniform(-base, w + base), rng.uniform(-base, h + base)
            ys = np.arange(h, dtype=np.float32)[:, None] + 0.5 - cy
            xs = np.arange(w, dtype=np.float32)[None, :] + 0.5 - cx
            hgt = np.maximum(hgt, _pyramid_height(xs, ys, base, 4, ang + rng.normal(0, 0.05)) * base)
    else:
        mat = view_matrix(rng, h, w, u, tilt_prob=0.6)
        wx, wy = pixel_to_world(mat, h, w)
        pitch = rng.uniform(20, 60)
        p = wx / pitch
        q = wy / pitch
        fx, fy = (p - np.round(p)) * pitch, (q - np.round(q)) * pitch
        base = pitch * rng.uniform(0.25, 0.48)
        facets = int(rng.choice([0, 0, 4]))
        hgt = _pyramid_height(fx, fy, base, facets, 0.0) * base * u * rng.uniform(1.5, 3.0)
    inside = hgt > 0
    height = height + hgt + 0.2 * u * smooth_noise(rng, h, w, 3 * u) * inside
    albedo = np.where(inside, tip_alb, albedo)
    return height.astype(np.float32), albedo.astype(np.float32)


def render_tips(rng: np.random.Generator, h: int, w: int, u: float) -> Scene:
    """Tips: a sharp cone or pyramid apex (AFM/STM probes, emitters), from the side or from above."""
    if rng.random() < 0.55:
        return _tip_side(rng, h, w, u)
    return _tip_top(rng, h, w, u)
