"""Perceptual hashes for near-duplicate detection: a 64-bit difference hash and the Hamming distance of two."""

from __future__ import annotations

import numpy as np
from PIL import Image


def dhash(gray: np.ndarray) -> str:
    """64-bit difference hash as 16 hex characters: 9×8 area-average, each pixel compared with its right neighbour."""
    g = np.asarray(gray)
    if g.dtype != np.uint8:
        g = np.clip(g, 0, 255).astype(np.uint8)
    small = np.asarray(Image.fromarray(np.ascontiguousarray(g)).resize((9, 8), Image.Resampling.BOX))
    small = small.astype(np.int16)
    bits = (small[:, 1:] > small[:, :-1]).ravel()
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return f"{value:016x}"


def hamming(a: str, b: str) -> int:
    """Number of differing bits between two hex hashes."""
    return (int(a, 16) ^ int(b, 16)).bit_count()
