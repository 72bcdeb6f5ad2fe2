"""Scene renderers for objects lying on a substrate: particles, powder, nanowires, fibres, biological.

Every renderer has the signature ``(rng, h, w, u) -> (height, albedo)``: ``u`` is pixels per world
unit (resolution × random magnification, drawn the same way for every class), ``height`` is in
pixels and ``albedo`` is a relative secondary-electron yield.
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
    random_path,
    roof_into,
    smooth_noise,
)

Scene = tuple[Array, Array]


def substrate(rng: np.random.Generator, h: int, w: int, u: float) -> Scene:
    """A support (wafer, carbon tape, filter): one of three textures, independent of the class."""
    style = int(rng.integers(3))
    if style == 0:
        height = 0.4 * u * smooth_noise(rng, h, w, 12 * u)
    elif style == 1:
        height = 0.5 * u * smooth_noise(rng, h, w, 1.5 * u) + 1.0 * u * smooth_noise(rng, h, w, 25 * u)
    else:
        height = 2.0 * u * fractal_noise(rng, h, w, 20 * u, octaves=3)
    base = rng.uniform(0.45, 0.8)
    albedo = base * (1.0 + 0.06 * smooth_noise(rng, h, w, 30 * u))
    return height.astype(np.float32), albedo.astype(np.float32)


def _positions(rng: np.random.Generator, n: int, h: int, w: int, r: float, clustered: bool) -> Array:
    """``n`` centres for objects of radius ~``r``: uniform over the frame or grouped in Gaussian clusters."""
    if not clustered:
        return np.column_stack([rng.uniform(-r, w + r, n), rng.uniform(-r, h + r, n)])
    members = rng.uniform(4, 25)
    n_clusters = max(1, int(n / members))
    centres = np.column_stack([rng.uniform(0, w, n_clusters), rng.uniform(0, h, n_clusters)])
    pick = rng.integers(0, n_clusters, n)
    sizes = rng.uniform(0.6, 1.4, n_clusters)[pick]
    return centres[pick] + rng.normal(0, 1, (n, 2)) * (r * math.sqrt(members) * sizes)[:, None]


def render_particles(rng: np.random.Generator, h: int, w: int, u: float) -> Scene:
    """Nanoparticles: shaded spheres (sometimes ellipsoids or faceted crystals), dispersed or clustered."""
    height, albedo = substrate(rng, h, w, u)
    r0 = u * log_uniform(rng, 4.0, 16.0)
    spread = rng.uniform(0.05, 0.5)
    coverage = rng.uniform(0.12, 0.85)
    n = int(np.clip(coverage * h * w / (math.pi * r0 * r0 * math.exp(2 * spread * spread)), 3, 450))
    clustered = rng.random() < 0.5
    pos = _positions(rng, n, h, w, r0, clustered)
    radii = r0 * np.exp(rng.normal(0, spread, n))
    facets = int(rng.choice([4, 6])) if rng.random() < 0.15 else 0
    max_aspect = rng.uniform(1.0, 1.35)
    base_alb = rng.uniform(0.8, 1.3)
    stack = rng.uniform(0.0, 0.7) if clustered else 0.0
    order = np.argsort(radii)[::-1] if rng.random() < 0.5 else np.arange(n)
    for i in order:
        r = float(radii[i])
        blob_into(
            height,
            albedo,
            float(pos[i, 0]),
            float(pos[i, 1]),
            r,
            r * stack * rng.random(),
            base_alb * rng.uniform(0.9, 1.1),
            aspect=rng.uniform(1.0, max_aspect),
            angle=rng.uniform(0, math.pi),
            facets=facets,
        )
    return height, albedo


def _fragment(rng: np.random.Generator, cx: float, cy: float, size: float, elong: float, angle: float) -> list[Point]:
    k = int(rng.integers(4, 9))
    angles = np.sort(rng.uniform(0, 2 * math.pi, k))
    radii = size * rng.uniform(0.45, 1.0, k)
    px, py = radii * np.cos(angles) * elong, radii * np.sin(angles)
    c, s = math.cos(angle), math.sin(angle)
    return list(zip((cx + px * c - py * s).tolist(), (cy + px * s + py * c).tolist(), strict=True))


def render_powder(rng: np.random.Generator, h: int, w: int, u: float) -> Scene:
    """Powder: irregular angular fragments with flat facets, over a wide range of sizes."""
    height, albedo = substrate(rng, h, w, u)
    s_min = u * rng.uniform(3.0, 6.0)
    s_max = u * rng.uniform(15.0, 50.0)
    coverage = rng.uniform(0.3, 0.95)
    sizes: list[float] = []
    area = 0.0
    while area < coverage * h * w and len(sizes) < 350:
        s = s_min * (s_max / s_min) ** (rng.random() ** 1.6)
        sizes.append(s)
        area += 1.6 * s * s
    sizes.sort(reverse=True)
    base_alb = rng.uniform(0.8, 1.3)
    round_prob = rng.uniform(0.0, 0.25)
    for s in sizes:
        cx, cy = rng.uniform(-s, w + s), rng.uniform(-s, h + s)
        pts = _fragment(rng, cx, cy, s, rng.uniform(1.0, 1.9), rng.uniform(0, 2 * math.pi))
        roof_into(
            height,
            albedo,
            pts,
            z=s * rng.uniform(0.0, 0.5),
            slope=rng.uniform(0.5, 1.4),
            cap=s * rng.uniform(0.3, 1.0),
            alb=base_alb * rng.uniform(0.85, 1.15),
            rounded=bool(rng.random() < round_prob),
            tilt=(float(rng.normal(0, 0.25)), float(rng.normal(0, 0.25))),
        )
    return height, albedo


def _edge_start(rng: np.random.Generator, h: int, w: int, margin: float) -> Point:
    return float(rng.uniform(-margin, w + margin)), float(rng.uniform(-margin, h + margin))


def _wire_angles(rng: np.random.Generator, n: int) -> Array:
    """Orientations of a set of wires/fibres: isotropic, or partly aligned (same rule for both classes)."""
    if rng.random() < 0.3:
        return orientation(rng) + rng.normal(0, rng.uniform(0.05, 0.4), n)
    return rng.uniform(0, 2 * math.pi, n)


def render_nanowires(rng: np.random.Generator, h: int, w: int, u: float) -> Scene:
    """Nanowires: thin, fairly straight wires that cross; sometimes a tilted forest with catalyst tips."""
    height, albedo = substrate(rng, h, w, u)
    r_med = u * log_uniform(rng, 1.5, 4.0)
    canvas = Canvas(height, albedo)
    z = float(height.max()) + 0.5 * u
    base_alb = rng.uniform(0.8, 1.3)
    balls: list[tuple[float, float, float, float]] = []
    if rng.random() < 0.25:  # forest of short, roughly parallel wires seen from a tilt
        ang = orientation(rng)
        n = int(np.clip(rng.uniform(0.1, 0.4) * h * w / (2 * r_med * 25 * u), 20, 260))
        starts = np.column_stack([rng.uniform(-20 * u, w + 20 * u, n), rng.uniform(-20 * u, h + 20 * u, n)])
        starts = starts[np.argsort(starts[:, 1])]
        for x, y in starts:
            r = r_med * math.exp(rng.normal(0, 0.2))
            a = ang + rng.normal(0, 0.12)
            length = u * rng.uniform(10, 45)
            pts = [(x, y), (x + length * math.cos(a), y + length * math.sin(a))]
            canvas.tube(pts, r, z, base_alb * rng.uniform(0.6, 1.0))
            z += 0.3 * r
            if rng.random() < 0.7:
                canvas.dh.ellipse(
                    (pts[1][0] - 1.4 * r, pts[1][1] - 1.4 * r, pts[1][0] + 1.4 * r, pts[1][1] + 1.4 * r), fill=z + r
                )
                canvas.da.ellipse(
                    (pts[1][0] - 1.4 * r, pts[1][1] - 1.4 * r, pts[1][0] + 1.4 * r, pts[1][1] + 1.4 * r),
                    fill=base_alb * 1.2,
                )
        return canvas.arrays()
    coverage = rng.uniform(0.1, 0.6)
    mean_len = u * rng.uniform(40, 200)
    n = int(np.clip(coverage * h * w / (2 * r_med * mean_len), 4, 150))
    angles = _wire_angles(rng, n)
    wiggle = rng.uniform(0.0, 0.05)
    tipped = rng.random() < 0.3
    for i in range(n):
        r = r_med * math.exp(rng.normal(0, 0.25))
        length = mean_len * rng.uniform(0.4, 1.6)
        pts = random_path(
            rng,
            _edge_start(rng, h, w, length / 2),
            float(angles[i]),
            length,
            step=max(2.0, 3 * u),
            wiggle=wiggle,
            kink_prob=0.01,
        )
        depth = 0.55 + 0.45 * (i + 1) / n
        canvas.tube(pts, r, z, base_alb * depth)
        if tipped:
            balls.append((pts[-1][0], pts[-1][1], 1.5 * r, z))
        z += 0.8 * r
    height, albedo = canvas.arrays()
    for x, y, r, zb in balls:
        blob_into(height, albedo, x, y, r, zb, base_alb * 1.1)
    return height, albedo


def _woven(rng: np.random.Generator, h: int, w: int, u: float, height: Array, albedo: Array) -> Scene:
    """A woven fabric: two perpendicular sets of threads, each a bundle of parallel fibres, over/under."""
    canvas = Canvas(height, albedo)
    ang = orientation(rng)
    thread = u * rng.uniform(22, 60)
    pitch = thread * rng.uniform(1.0, 1.35)
    m = int(rng.integers(3, 8))
    r = thread / (2 * m) * 1.15
    diag = math.hypot(h, w)
    cx, cy = w / 2, h / 2
    n = int(diag / pitch) + 2
    dirs = [(math.cos(ang), math.sin(ang)), (-math.sin(ang), math.cos(ang))]
    z0 = float(height.max()) + u
    base_alb = rng.uniform(0.8, 1.2)

    def fibre_lines(set_idx: int, k: int, t0: float, t1: float) -> list[list[Point]]:
        d, nrm = dirs[set_idx], dirs[1 - set_idx]
        off = (k - n / 2) * pitch
        lines = []
        for j in range(m):
            o = off + (j - (m - 1) / 2) * (thread / m)
            bx, by = cx + nrm[0] * o, cy + nrm[1] * o
            lines.append([(bx + d[0] * t0, by + d[1] * t0), (bx + d[0] * t1, by + d[1] * t1)])
        return lines

    for set_idx, zz in ((0, z0), (1, z0 + 2 * r)):
        for k in range(n + 1):
            for line in fibre_lines(set_idx, k, -diag, diag):
                canvas.tube(line, r, zz, base_alb * (0.8 + 0.2 * set_idx), caps=False)
    for i in range(n + 1):  # warp threads back on top at every other crossing
        for k in range(n + 1):
            if (i + k) % 2:
                continue
            t = (k - n / 2) * pitch
            for line in fibre_lines(0, i, t - 0.6 * thread, t + 0.6 * thread):
                canvas.tube(line, r, z0 + 4 * r, base_alb, caps=False)
    return canvas.arrays()


def render_fibres(rng: np.random.Generator, h: int, w: int, u: float) -> Scene:
    """Fibres: thick, long, smoothly curving fibres in layered mats, or a woven fabric; some with beads."""
    height, albedo = substrate(rng, h, w, u)
    if rng.random() < 0.25:
        return _woven(rng, h, w, u, height, albedo)
    r_med = u * log_uniform(rng, 3.5, 12.0)
    canvas = Canvas(height, albedo)
    diag = math.hypot(h, w)
    coverage = rng.uniform(0.25, 0.9)
    n = int(np.clip(coverage * h * w / (2 * r_med * diag), 3, 60))
    angles = _wire_angles(rng, n)
    z = float(height.max()) + u
    base_alb = rng.uniform(0.8, 1.3)
    beads = rng.random() < 0.2
    bead_list: list[tuple[float, float, float, float, float]] = []
    for i in range(n):
        r = r_med * math.exp(rng.normal(0, 0.3))
        a = float(angles[i])
        mid = (rng.uniform(0, w), rng.uniform(0, h))
        length = diag * rng.uniform(1.2, 2.0)
        start = (mid[0] - math.cos(a) * length / 2, mid[1] - math.sin(a) * length / 2)
        pts = random_path(
            rng,
            start,
            a,
            length,
            step=max(3.0, 4 * u),
            wiggle=rng.uniform(0.0, 0.02),
            curvature=rng.normal(0, 0.003) / u,
        )
        depth = 0.5 + 0.5 * (i + 1) / n
        canvas.tube(pts, r, z, base_alb * depth, caps=False)
        if beads:
            for j in rng.integers(0, len(pts) - 1, int(rng.integers(0, 4))):
                (x0, y0), (x1, y1) = pts[j], pts[j + 1]
                bead_list.append((x0, y0, 2.2 * r, math.atan2(y1 - y0, x1 - x0), z))
        z += 1.5 * r
    height, albedo = canvas.arrays()
    for x, y, r, a, zb in bead_list:
        blob_into(height, albedo, x, y, r, zb, base_alb, aspect=2.0, angle=a)
    return height, albedo


def _cell(rng: np.random.Generator, height: Array, albedo: Array, cx: float, cy: float, rad: float, alb: float) -> None:
    """One cell: a dome with a wobbly outline; variants: biconcave (red blood cell), textured surface."""
    h, w = height.shape
    x0, x1 = max(0, int(cx - 1.5 * rad)), min(w, int(cx + 1.5 * rad) + 1)
    y0, y1 = max(0, int(cy - 1.5 * rad)), min(h, int(cy + 1.5 * rad) + 1)
    if x0 >= x1 or y0 >= y1:
        return
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
    theta = np.arctan2(dy, dx)
    edge = np.ones_like(theta)
    for k in range(2, 7):
        edge = edge + rng.normal(0, 0.12 / k) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    rho = np.sqrt(dx * dx + dy * dy) / (rad * np.maximum(edge, 0.4))
    inside = rho < 1.0
    dome = np.sqrt(np.maximum(1.0 - rho * rho, 0.0))
    if rng.random() < 0.25:
        dome = dome * (0.35 + rho * rho)
    hh = rad * rng.uniform(0.25, 0.6) * dome
    if rng.random() < 0.6:
        bumps = smooth_noise(rng, y1 - y0, x1 - x0, max(1.0, rad * 0.06))
        hh = hh + rad * 0.07 * np.maximum(bumps, 0) * inside
    sub = height[y0:y1, x0:x1]
    hh = hh + float(sub.min())
    upd = inside & (hh > sub)
    sub[upd] = hh[upd]
    albedo[y0:y1, x0:x1][upd] = alb


def render_biological(rng: np.random.Generator, h: int, w: int, u: float) -> Scene:
    """Biological specimens: cells with filopodia, rod-shaped bacteria, or a wrinkled membrane/tissue."""
    mode = rng.choice(3, p=[0.45, 0.3, 0.25])
    base_alb = rng.uniform(0.8, 1.2)
    if mode == 2:  # membrane / tissue: ridges and folds, a few fenestrations
        ridge = 1.0 - np.abs(fractal_noise(rng, h, w, u * rng.uniform(15, 45), octaves=3))
        height = u * rng.uniform(6, 16) * ridge**2 + u * 2 * smooth_noise(rng, h, w, 60 * u)
        albedo = base_alb * (0.9 + 0.1 * ridge)
        holes = smooth_noise(rng, h, w, u * rng.uniform(3, 8)) > rng.uniform(2.0, 3.5)
        height = np.where(holes, height - 10 * u, height)
        return height.astype(np.float32), albedo.astype(np.float32)
    height, albedo = substrate(rng, h, w, u)
    if mode == 1:  # bacteria: short fat rods with round ends
        canvas = Canvas(height, albedo)
        r_med = u * rng.uniform(2.5, 6.0)
        n = int(np.clip(rng.uniform(0.1, 0.5) * h * w / (2 * r_med * 5 * r_med), 5, 120))
        z = float(height.max()) + u
        clustered = rng.random() < 0.5
        pos = _positions(rng, n, h, w, 3 * r_med, clustered)
        angles = _wire_angles(rng, n)
        for i in range(n):
            r = r_med * math.exp(rng.normal(0, 0.12))
            half = r * rng.uniform(0.8, 3.5)
            a = float(angles[i])
            x, y = float(pos[i, 0]), float(pos[i, 1])
            bend = rng.normal(0, 0.15)
            pts = [
                (x - half * math.cos(a - bend), y - half * math.sin(a - bend)),
                (x, y),
                (x + half * math.cos(a + bend), y + half * math.sin(a + bend)),
            ]
            canvas.tube(pts, r, z, base_alb * rng.uniform(0.9, 1.1))
            z += 0.5 * r
        return canvas.arrays()
    # cells, with filopodia spreading over the substrate
    rad_med = u * log_uniform(rng, 18, 75)
    n = int(np.clip(rng.uniform(0.15, 0.7) * h * w / (math.pi * rad_med**2), 1, 25))
    pos = _positions(rng, n, h, w, rad_med, False)
    if rng.random() < 0.6:
        canvas = Canvas(height, albedo)
        z = float(height.max()) + 0.3 * u
        for i in range(n):
            for _ in range(int(rng.integers(0, 12))):
                a = rng.uniform(0, 2 * math.pi)
                length = rad_med * rng.uniform(1.0, 2.2)
                pts = random_path(rng, (float(pos[i, 0]), float(pos[i, 1])), a, length, step=3 * u, wiggle=0.08)
                canvas.tube(pts, u * rng.uniform(0.6, 1.4), z, base_alb)
        height, albedo = canvas.arrays()
    for i in range(n):
        rad = rad_med * math.exp(rng.normal(0, 0.25))
        _cell(rng, height, albedo, float(pos[i, 0]), float(pos[i, 1]), rad, base_alb * rng.uniform(0.9, 1.1))
    return height, albedo
