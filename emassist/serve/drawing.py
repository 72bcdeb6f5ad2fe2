"""Drawing for the page and the tile scan: heat maps in colour, blended over an image, as PNG bytes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def colorize(heat: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """0..1 float map → uint8 RGB through a matplotlib colour map (no pyplot, no figure)."""
    from matplotlib import colormaps  # lazy: matplotlib takes ~0.5 s to import, only heat maps need it

    lut = (colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)
    index = np.clip(np.nan_to_num(heat, nan=0.0) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return lut[index]


def overlay(gray: np.ndarray, heat: np.ndarray, alpha: float = 0.45, cmap: str = "inferno") -> np.ndarray:
    """uint8 RGB: the grayscale image with ``heat`` (0..1, resized to it) blended on top."""
    g = np.asarray(gray, dtype=np.uint8)
    h = np.asarray(heat, dtype=np.float32)
    if h.shape != g.shape:
        h = np.asarray(Image.fromarray(h).resize((g.shape[1], g.shape[0]), Image.Resampling.BILINEAR))
    colour = colorize(h, cmap).astype(np.float32)
    base = np.repeat(g[..., None], 3, axis=-1).astype(np.float32)
    return np.clip((1.0 - alpha) * base + alpha * colour + 0.5, 0, 255).astype(np.uint8)


def png_bytes(rgb_or_gray: np.ndarray) -> bytes:
    """A uint8 gray ``[H, W]`` or RGB ``[H, W, 3]`` array as PNG file bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb_or_gray)).save(buf, format="PNG")
    return buf.getvalue()
