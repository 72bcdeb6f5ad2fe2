"""Hashes of images: the sha256 an image is named by (of its file's bytes: ingest, the prediction log and the
corrections must agree), and the perceptual 64-bit difference hash of near-duplicate detection with its Hamming
distance."""

from __future__ import annotations

import hashlib
import os

import numpy as np
from PIL import Image


def sha256_of(data: bytes) -> str:
    """The sha256 of a file's bytes: the name of an image in ingest's cache, the prediction log and the feedback."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """:func:`sha256_of` a file, read in chunks; "" when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError:
        return ""


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
