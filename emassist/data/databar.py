"""The instrument data bar at the bottom of SEM images: ``find_databar`` says how many rows it takes (0: none).

A heuristic on per-row grey-level histograms (see :func:`find_databar`); cropping and resizing are the
preprocessor's (:class:`emassist.data.preprocess.Preprocessor`).
"""

from __future__ import annotations

import numpy as np

# The bar's top edge must lie in the bottom _BAR_SEARCH_FRAC of the image.
_BAR_SEARCH_FRAC = 0.40
_BAR_MIN_FRAC = 0.02  # a bar is at least this share of the height ...
_BAR_MIN_ROWS = 6
_BAR_MAX_FRAC = 0.35  # ... and at most this share
_BELOW_MAX_FRAC = 0.08  # image rows allowed under the bar (old FEI/Philips XL overlays the image)
_TOL = 8  # grey levels around the bar background (JPEG ringing)
_EXACT = 2  # a rendered background is constant to within this ...
_EXACT_SHARE = 0.45  # ... for this share of its ±_TOL pixels (SEM noise, σ ≥ 4 grey levels, stays below)
_CONTRAST = 64  # text/scale-bar pixels differ from the background by at least this
_MAX_GAP = 3  # rows inside a bar that may fail the per-row test (JPEG smear around text)
_BAND_PIXELS = 1 << 18  # pixels per band of rows in _row_hist (2 MB of int64 indices)
_RUN_SHARE = 0.15  # least share of the band in runs of 6 identical pixels


def _row_hist(region: np.ndarray) -> np.ndarray:
    """Cumulative per-row histograms with a leading zero column: shape (rows, 257).

    Computed in bands of rows small enough (~2 MB of indices) to stay in the CPU cache: the same counts as one
    ``bincount`` over the whole region, ~2x faster on a large overview (a 9984-pixel-wide scan), as fast on 1024 px.
    """
    n, cols = region.shape
    band = max(1, _BAND_PIXELS // max(1, cols))
    offsets = (np.arange(min(band, n), dtype=np.intp) * 256)[:, None]
    hist = np.empty((n, 256), dtype=np.int64)
    for start in range(0, n, band):
        part = region[start : start + band]
        m = part.shape[0]
        idx = part.astype(np.intp)
        idx += offsets[:m]  # in place: 5x faster than a broadcast add
        hist[start : start + m] = np.bincount(idx.ravel(), minlength=256 * m).reshape(m, 256)
    cum = np.zeros((n, 257), dtype=np.int64)
    np.cumsum(hist, axis=1, out=cum[:, 1:])
    return cum


def _near(cum: np.ndarray, value: np.ndarray | int, tol: int) -> np.ndarray:
    """Per row: number of pixels within ±tol of value (scalar or per-row)."""
    v = np.broadcast_to(np.asarray(value, dtype=np.intp), (cum.shape[0],))
    lo = np.clip(v - tol, 0, 255)
    hi = np.clip(v + tol, 0, 255) + 1
    rows = np.arange(cum.shape[0])
    return cum[rows, hi] - cum[rows, lo]


def find_databar(gray: np.ndarray) -> int:
    """Height in rows of the instrument data bar at the bottom of ``gray`` (0 if there is none).

    A data bar is a band of rows whose background is one rendered, near-constant grey level (black for
    FEI/JEOL, white for Zeiss, any level is accepted) carrying high-contrast text or a scale bar, with a sharp
    top edge (or a full-width border line) against the micrograph above. Up to 8% of image rows may lie under
    the bar (older FEI/Philips XL files overlay it on the image); they are cropped with it.
    """
    g = np.asarray(gray)
    if g.ndim != 2:
        raise ValueError(f"find_databar expects a 2-D grayscale array, got shape {g.shape}")
    if g.dtype != np.uint8:
        g = np.clip(g, 0, 255).astype(np.uint8)
    height, width = g.shape
    if height < 40 or width < 40:
        return 0
    start = int(height * (1 - _BAR_SEARCH_FRAC))
    # Row statistics from every other column on wide images: the same fractions at half the cost.
    region = g[start:, :: 2 if width >= 512 else 1]
    n, cols = region.shape
    cum = _row_hist(region)
    mode = np.diff(cum, axis=1).argmax(axis=1)
    flat = _near(cum, mode, 3) >= 0.98 * cols

    def barlike(bg: int) -> np.ndarray:
        near_bg = _near(cum, bg, _TOL)
        exact = _near(cum, bg, _EXACT)
        return (near_bg >= 0.4 * cols) & (exact >= _EXACT_SHARE * near_bg)

    # Candidate background levels: the commonest row modes near the bottom among bar-like rows.
    tail = slice(max(0, n - max(_BAR_MIN_ROWS, int(0.25 * height))), n)
    own = _near(cum, mode, _TOL)
    own_exact = _near(cum, mode, _EXACT)
    ok = (own[tail] >= 0.4 * cols) & (own_exact[tail] >= _EXACT_SHARE * own[tail]) & ~flat[tail]
    values, counts = np.unique(mode[tail][ok], return_counts=True)
    candidates = [int(v) for v in values[np.argsort(-counts, kind="stable")][:3]]

    best = 0
    for bg in candidates:
        rows = _bar_for_background(g, start, cum, mode, flat, barlike(bg), bg)
        best = max(best, rows)
    return best


def _bar_for_background(
    g: np.ndarray, start: int, cum: np.ndarray, mode: np.ndarray, flat: np.ndarray, bar: np.ndarray, bg: int
) -> int:
    height = g.shape[0]
    n = cum.shape[0]
    cols = int(cum[0, -1])  # pixels per row in the (column-subsampled) statistics
    below_max = max(2, int(_BELOW_MAX_FRAC * height))
    contrast = cols - _near(cum, bg, _CONTRAST - 1)
    text = contrast >= max(2, int(0.003 * cols))

    near_bg = _near(cum, bg, _TOL)
    some_bg = near_bg >= 0.2 * cols
    y = n - 1
    while y >= 0 and not bar[y] and n - 1 - y <= below_max:
        y -= 1
    if y < 0 or not bar[y]:
        return 0
    bottom = y
    top = bottom
    border = False
    y = bottom - 1
    while y >= 0:
        if bar[y]:
            top = y
            y -= 1
            continue
        # A few rows of dense or JPEG-smeared text, or a thick scale bar, with bar rows above them again.
        gap = 0
        while gap < _MAX_GAP and y - gap >= 0 and some_bg[y - gap] and not bar[y - gap]:
            gap += 1
        if gap > 0 and y - gap >= 0 and bar[y - gap]:
            y -= gap
            continue
        if flat[y] and abs(int(mode[y]) - bg) > 48:
            # A full-width line in another grey: the bar's top border, or a rule inside the bar when more bar
            # rows with text follow above it (and do not run off the search region).
            j = y - 1
            while j >= 0 and bar[j]:
                j -= 1
            if j >= 0 and j < y - 1 and bool(text[j + 1 : y].any()):
                top = j + 1
                y = j
                continue
            top = y
            border = True
        break
    else:
        return 0  # the band runs off the top of the search region: not a bar

    if not border:
        # JPEG blocks straddling the bar's top edge ring into its first rows: take up to one 8-row block of rows
        # that are mostly background, even if not "exact".
        k = top
        while k > 0 and top - (k - 1) <= 8 and near_bg[k - 1] >= 0.6 * cols:
            k -= 1
        top = k
    crop = height - (start + top)
    if crop < max(_BAR_MIN_ROWS, _BAR_MIN_FRAC * height) or crop > _BAR_MAX_FRAC * height:
        return 0
    band = slice(top, bottom + 1)
    if int(text[band].sum()) < 2:  # text lines and/or a scale bar
        return 0
    band_cover = float(near_bg[band].mean()) / cols
    if band_cover < 0.5:
        return 0
    if not border:
        if top == 0:
            return 0
        above = near_bg[max(0, top - 2) : top].max() / cols
        if above > 0.5 or band_cover - above < 0.25:
            return 0
    # The background must span (nearly) the full width, not be a dark blob in one corner.
    rows = g[start + top : start + bottom + 1]
    column_cover = (np.abs(rows.astype(np.int16) - bg) <= _TOL).mean(axis=0)
    if float((column_cover >= 0.5).mean()) < 0.6:
        return 0
    # A rendered (even JPEG-compressed) background has long runs of identical pixels; a dark, noisy image
    # region - even one clipped at 0 - almost never does (measured: bars >= 0.19 even as small JPEGs,
    # micrograph regions <= 0.03 and at most 0.16 on a flat, posterised one).
    if _run_share(rows) < _RUN_SHARE:
        return 0
    return int(crop)


def _run_share(rows: np.ndarray, run: int = 6) -> float:
    """Share of positions that start a horizontal run of ``run`` identical pixels."""
    if rows.shape[1] <= run:
        return 0.0
    eq = rows[:, 1:] == rows[:, :-1]
    starts = eq[:, : eq.shape[1] - run + 2].copy()
    for k in range(1, run - 1):
        starts &= eq[:, k : eq.shape[1] - run + 2 + k]
    return float(starts.mean())
