"""The SEM appearance, identical in distribution for every class.

From a height map and an albedo (secondary-electron yield) map: slope-dependent SE yield (bright
edges), detector-side shading, darker cavities, auto brightness/contrast, charging artefacts, beam
blur, scan-line gain and jitter, shot (Poisson) and read noise. Optionally an instrument data bar.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from emassist.data.demo._raster import Array, log_uniform
from emassist.data.scalebar import REFERENCE_DISPLAY_NM


def _box_blur(arr: Array, size: float) -> Array:
    from scipy import ndimage  # lazy: SciPy costs ~0.3 s at every `emassist` start

    k = max(3, int(size) | 1)
    return ndimage.uniform_filter(ndimage.uniform_filter(arr, k, mode="nearest"), k, mode="nearest")


def se_signal(height: Array, albedo: Array, rng: np.random.Generator) -> Array:
    """Secondary-electron signal (arbitrary units) of a scene."""
    from scipy import ndimage  # lazy: SciPy costs ~0.3 s at every `emassist` start

    h, w = height.shape
    res = min(h, w) / 256.0
    hs = ndimage.gaussian_filter(height.astype(np.float32), 0.7 * res, mode="nearest")
    gy, gx = np.gradient(hs)
    inv_cos = np.sqrt(1.0 + gx * gx + gy * gy)
    edge = 1.0 - 1.0 / inv_cos  # 0 on flat ground, → 1 on steep walls: the SEM edge effect
    rel = hs - _box_blur(hs, 16 * res)
    depth = 1.0 + rng.uniform(0.15, 0.45) * np.tanh(rel / (6.0 * res))  # cavities darker, tops brighter
    phi = rng.uniform(0, 2 * math.pi)
    shade = (gx * math.cos(phi) + gy * math.sin(phi)) / inv_cos  # detector-side (Everhart-Thornley) shading
    se = albedo * (rng.uniform(0.45, 0.8) + rng.uniform(0.6, 1.2) * edge) * depth
    se = se + rng.uniform(0.1, 0.4) * shade
    se = se + rng.uniform(0.0, 0.3) * _box_blur(edge, 3 * res)  # SE emitted near edges
    return se.astype(np.float32)


def _auto_contrast(se: Array, rng: np.random.Generator) -> Array:
    """Stretch mean ± a few σ to a random black/white level and gamma, like the SEM's auto brightness/contrast."""
    mean, std = float(se.mean()), float(se.std()) + 1e-6
    lo, hi = mean - rng.uniform(2.0, 3.5) * std, mean + rng.uniform(2.5, 4.0) * std
    x = np.clip((se - lo) / (hi - lo), 0.0, 1.2)
    black, white = rng.uniform(0.03, 0.2), rng.uniform(0.65, 0.98)
    img = black + (white - black) * x ** rng.uniform(0.8, 1.25)
    if rng.random() < 0.3:  # uneven illumination / detector gradient
        h, w = img.shape
        a = rng.uniform(0, 2 * math.pi)
        ramp = (np.arange(w)[None, :] / w - 0.5) * math.cos(a) + (np.arange(h)[:, None] / h - 0.5) * math.sin(a)
        img = img * (1.0 + rng.uniform(0.1, 0.4) * ramp)
    return img.astype(np.float32)


def _charging(img: Array, rng: np.random.Generator) -> Array:
    """Charging artefacts: bright horizontal streaks, blooming around a bright spot, brightened bands."""
    h, w = img.shape
    res = min(h, w) / 256.0
    kinds = rng.random(3) < (0.6, 0.5, 0.3)
    if kinds[0]:
        xs = np.arange(w, dtype=np.float32)
        for _ in range(int(rng.integers(1, 7))):
            y0 = int(rng.integers(0, h))
            t = max(1, int(rng.integers(1, 4) * res))
            x0 = rng.uniform(0, w)
            decay = rng.uniform(0.05, 0.6) * w
            streak = np.where(xs >= x0, np.exp(-(xs - x0) / decay), 0.0)
            img[y0 : y0 + t] += rng.uniform(0.15, 0.7) * streak
    if kinds[1]:
        cand = np.flatnonzero(img.ravel() >= np.percentile(img, 98))
        cy, cx = divmod(int(cand[rng.integers(len(cand))]), w)
        rad = rng.uniform(5, 35) * res
        yy = (np.arange(h, dtype=np.float32)[:, None] - cy) ** 2
        xx = (np.arange(w, dtype=np.float32)[None, :] - cx) ** 2
        img += rng.uniform(0.2, 0.8) * np.exp(-(yy + xx) / (2 * rad * rad))
    if kinds[2]:
        y0 = int(rng.integers(0, h))
        img[y0 : y0 + int(rng.uniform(0.02, 0.25) * h)] += rng.uniform(0.05, 0.2)
    return img


def _scan_lines(img: Array, rng: np.random.Generator) -> Array:
    """Per-line gain noise and horizontal jitter of the raster scan (with occasional bursts)."""
    h, w = img.shape
    res = min(h, w) / 256.0
    shift = rng.normal(0, rng.uniform(0.0, 0.5) * res, h)
    if rng.random() < 0.35:
        y0 = int(rng.integers(0, h))
        shift[y0 : y0 + int(rng.integers(1, 6) * res) + 1] += rng.uniform(1, 4) * res * rng.choice([-1, 1])
    x = np.arange(w, dtype=np.float32)[None, :] + shift[:, None].astype(np.float32)
    x0 = np.floor(x)
    frac = x - x0
    i0 = np.clip(x0, 0, w - 1).astype(np.intp)
    i1 = np.clip(x0 + 1, 0, w - 1).astype(np.intp)
    out = (1 - frac) * np.take_along_axis(img, i0, axis=1) + frac * np.take_along_axis(img, i1, axis=1)
    gain = 1.0 + rng.normal(0, rng.uniform(0.003, 0.03), h)
    offset = rng.normal(0, rng.uniform(0.0, 0.01), h)
    return (out * gain[:, None] + offset[:, None]).astype(np.float32)


def sem_image(height: Array, albedo: Array, rng: np.random.Generator) -> Array:
    """Final grayscale image in [0, 1] (float32) of a scene, with every SEM artefact applied."""
    from scipy import ndimage  # lazy: SciPy costs ~0.3 s at every `emassist` start

    img = _auto_contrast(se_signal(height, albedo, rng), rng)
    res = min(img.shape) / 256.0
    if rng.random() < 0.25:
        img = _charging(img, rng)
    img = ndimage.gaussian_filter(img, rng.uniform(0.3, 0.9) * res, mode="nearest")
    img = _scan_lines(img, rng)
    dose = log_uniform(rng, 20.0, 400.0)  # electrons per pixel at full white
    img = rng.poisson(np.clip(img, 0.0, 1.5) * dose).astype(np.float32) / dose
    img = img + rng.normal(0.0, rng.uniform(0.003, 0.02), img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------- data bar

LABEL_FONT_SHARE = 0.6  # the scale-bar label's font size, in data-bar heights
_NICE = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000, 500000)


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> float:
    return float(draw.textlength(text.replace("µ", "u"), font=font))


def _draw_text(
    draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont
) -> None:
    """Draw text; the bundled font lacks "µ", so it is drawn as a "u" with a descender."""
    x, y = xy
    size = getattr(font, "size", 10)
    for k, part in enumerate(text.split("µ")):
        if k:
            draw.text((x, y), "u", fill=255, font=font)
            top = y + 0.45 * size
            draw.line([(x + 0.5, top), (x + 0.5, y + 1.15 * size)], fill=255, width=max(1, round(size / 10)))
            x += draw.textlength("u", font=font)
        if part:
            draw.text((x, y), part, fill=255, font=font)
            x += draw.textlength(part, font=font)


def _scale_label(nm: int) -> str:
    """'200 nm', '5 um': micrometres spelled 'um', as instruments' ASCII exports do (the bundled font has no µ)."""
    return f"{nm // 1000} um" if nm >= 1000 else f"{nm} nm"


def databar_text(rng: np.random.Generator, magnification: float | None = None) -> tuple[str, str, float]:
    """Random instrument settings: two text lines and the magnification (independent of the class).

    ``magnification``: the image's true magnification (from its pixel size); the random one is drawn all the same
    so that ``rng`` ends in the same state either way (the encoder's later choices stay as they were).
    """
    eht = float(rng.choice([1.0, 2.0, 3.0, 5.0, 10.0, 15.0, 20.0, 30.0]))
    wd = rng.uniform(2.5, 15.0)
    drawn = log_uniform(rng, 500.0, 300_000.0)
    mag = drawn if magnification is None else float(magnification)
    mag_txt = f"{mag / 1000:.2f} K X" if mag >= 1000 else f"{mag:.0f} X"
    signal = str(rng.choice(["SE2", "InLens", "SE1", "BSD", "ESB"]))
    wd_txt = f"{wd:.0f} mm" if rng.random() < 0.5 else f"{wd:.1f} mm"
    return f"EHT = {eht:.2f} kV   WD = {wd_txt}", f"Mag = {mag_txt}   Signal A = {signal}", mag


def scale_bar_choice(nm_per_px: float, width: int) -> tuple[int, int]:
    """(length in nm, length in pixels) of the scale bar of an image ``width`` pixels wide: the largest round
    length (1-2-5 series) between 12 % and 30 % of the width, so the bar is long enough to measure to a few %."""
    fit = [v for v in _NICE if 0.12 * width <= v / nm_per_px <= 0.30 * width]
    # (pixel sizes outside the series' range: the nearest round length)
    nm = fit[-1] if fit else min(_NICE, key=lambda v: abs(math.log(v / nm_per_px / (0.2 * width))))
    return nm, max(1, round(nm / nm_per_px))


def draw_databar(img: Array, rng: np.random.Generator, pixel_size_nm: float | None = None) -> Array:
    """Overwrite the bottom ~8–12 % of ``img`` (floats in [0, 1]) with a black data bar: text and scale bar.

    ``pixel_size_nm``: the image's true pixel size; the magnification printed is then the true one (for a display
    :data:`~emassist.data.scalebar.REFERENCE_DISPLAY_NM` wide) and the scale bar's length (between the centres of
    its end pixels) is its label over the pixel size, to the nearest pixel. ``None``: both follow a random
    magnification.
    """
    h, w = img.shape
    bar_h = max(6, round(h * rng.uniform(0.08, 0.12)))
    true_mag = None if pixel_size_nm is None else REFERENCE_DISPLAY_NM / (pixel_size_nm * w)
    line1, line2, mag = databar_text(rng, true_mag)
    bar = Image.new("L", (w, bar_h), 0)
    draw = ImageDraw.Draw(bar)
    size = max(4, int(bar_h * 0.36))
    while size > 4 and max(_text_width(draw, line1, _font(size)), _text_width(draw, line2, _font(size))) > 0.64 * w:
        size -= 1
    font = _font(size)
    pad = max(1, round(bar_h * 0.08))
    _draw_text(draw, (pad, pad), line1, font)
    _draw_text(draw, (pad, pad + bar_h * 0.46), line2, font)
    if rng.random() < 0.5:
        draw.line([(0, 0), (w, 0)], fill=255, width=1)
    nm_per_px = REFERENCE_DISPLAY_NM / mag / w if pixel_size_nm is None else pixel_size_nm
    nm, length = scale_bar_choice(nm_per_px, w)
    x1 = w - max(2, round(0.04 * w))
    x0 = x1 - length
    label = _scale_label(nm)
    # The label in a larger font than the settings (it is short): readable by OCR even on small images.
    label_font = _font(max(size, int(bar_h * LABEL_FONT_SHARE)))
    lw = _text_width(draw, label, label_font)
    _draw_text(draw, ((x0 + x1) / 2 - lw / 2, max(0, pad - 1)), label, label_font)
    y_bar = round(bar_h * 0.72)
    draw.rectangle([x0, y_bar, x1, y_bar + max(1, round(bar_h * 0.12)) - 1], fill=255)
    img[h - bar_h :] = np.asarray(bar, dtype=np.float32) / 255.0
    return img
