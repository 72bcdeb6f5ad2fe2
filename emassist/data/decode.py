"""Decoding SEM image files: bytes or a path → full-resolution 8-bit grayscale, or a short reason why not.

``decode_image`` decides the format by content, checks the declared size against ``max_pixels``/``min_side``
before any pixel is decoded, and raises :class:`ImageRejected` (with a human-readable ``reason``) for anything
that is not a sane image. ``probe_image`` reads only the header (format and declared size), for a caller's own
limit before decoding (the web page's upload limit). The data bar is :mod:`emassist.data.databar`, the cache-size
image and the model input are :class:`emassist.data.preprocess.Preprocessor`.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from emassist.data.sem_metadata import read_sem_metadata

# Truncated files must fail loudly, never be padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# ``max_pixels`` (checked on the declared size before decoding) is the limit here. Pillow's own soft limit
# (~89 Mpx) would only warn; its hard limit (2x) still raises DecompressionBombError, which becomes a rejection.
# A module-level filter rather than warnings.catch_warnings(), which is not thread-safe (serving decodes on
# threads).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

#: Formats we decode. Decided by content (magic bytes), never by file extension.
ALLOWED_FORMATS: tuple[str, ...] = ("TIFF", "JPEG", "PNG", "BMP", "DIB", "GIF", "WEBP")

#: Percentiles of the contrast stretch applied to data with more than 8 bits per sample.
STRETCH_PERCENTILES: tuple[float, float] = (0.5, 99.5)

_BIT_DEPTH = {"1": 1, "I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16, "I": 32, "F": 32}
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})

#: What the decoders read: file bytes or a path.
ImageSource = bytes | bytearray | memoryview | str | os.PathLike[str]


class ImageRejected(Exception):
    """The input cannot be used as an image; ``reason`` says why in a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class DecodedImage:
    gray: np.ndarray  # uint8, H×W, full resolution
    width: int  # of the source image
    height: int
    mode: str  # PIL mode of the source, e.g. "L", "I;16", "RGB", "P"
    bit_depth: int
    format: str  # PIL format name, e.g. "TIFF", "JPEG", "PNG"
    n_frames: int
    notes: str = ""
    #: Instrument metadata read from the file (see :func:`emassist.data.sem_metadata.read_sem_metadata`).
    metadata: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------- decode


def _describe_non_image(head: bytes) -> str:
    """A short guess at what a file that is not an image contains."""
    stripped = head.lstrip()
    signatures: tuple[tuple[bytes, str], ...] = (
        (b"%PDF", "PDF"),
        (b"PK\x03\x04", "ZIP archive"),
        (b"\x1f\x8b", "gzip data"),
        (b"7z\xbc\xaf", "7z archive"),
        (b"\x89HDF", "HDF5"),
        (b"{\\rtf", "RTF"),
    )
    for magic, name in signatures:
        if head.startswith(magic):
            return f"not an image (content is {name})"
    lowered = stripped[:64].lower()
    if lowered.startswith((b"<!doctype html", b"<html")):
        return "not an image (content is HTML)"
    if lowered.startswith(b"<?xml") or lowered.startswith(b"<svg"):
        return "not an image (content is XML/SVG)"
    if head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            # A multi-byte character may be cut at the end of the sample.
            text = head[:-4].decode("utf-8", errors="replace") if len(head) > 4 else ""
        printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
        if text and "\x00" not in text and printable >= 0.95 * len(text):
            return "not an image (content is text)"
    return f"not an image (unrecognised content starting {head[:8]!r})"


def _open_source(source: ImageSource) -> tuple[Any, int]:
    """A file object PIL can read plus the size in bytes; raises ImageRejected for unreadable input."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        return io.BytesIO(data), len(data)
    path = Path(source)
    try:
        if not stat.S_ISREG(path.stat().st_mode) and not path.is_dir():
            # Opening a FIFO would block forever; devices and sockets are no images either.
            raise ImageRejected("not a regular file")
        fh = open(path, "rb")  # noqa: SIM115 - handed to PIL, closed by the caller
    except PermissionError as exc:
        raise ImageRejected("unreadable: permission denied") from exc
    except FileNotFoundError as exc:
        raise ImageRejected("unreadable: file not found") from exc
    except IsADirectoryError as exc:
        raise ImageRejected("not a regular file (directory)") from exc
    except OSError as exc:
        raise ImageRejected(f"unreadable: {exc.strerror or exc}") from exc
    return fh, os.fstat(fh.fileno()).st_size


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """The whole file, for callers that hash and decode the same bytes; ``ImageRejected`` with ingest's reasons
    (``unreadable: permission denied``, ``not a regular file``, ...) instead of an ``OSError``."""
    fh, _ = _open_source(os.fspath(path))
    with fh:
        try:
            return fh.read()
        except OSError as exc:
            raise ImageRejected(f"unreadable: {exc.strerror or exc}") from exc


def _stretch_uint16(a: np.ndarray) -> np.ndarray:
    """The percentile stretch for 16-bit data, exactly, through a histogram and a lookup table."""
    hist = np.bincount(a.ravel(), minlength=65536)
    cdf = np.cumsum(hist)
    total = int(cdf[-1])
    lo_rank = int(STRETCH_PERCENTILES[0] / 100 * (total - 1))
    hi_rank = int(np.ceil(STRETCH_PERCENTILES[1] / 100 * (total - 1)))
    lo = int(np.searchsorted(cdf, lo_rank + 1))
    hi = int(np.searchsorted(cdf, hi_rank + 1))
    if not hi > lo:  # almost constant image with a few outliers: fall back to the full range
        present = np.flatnonzero(hist)
        lo, hi = int(present[0]), int(present[-1])
    if not hi > lo:
        return np.zeros(a.shape, dtype=np.uint8)
    levels = (np.arange(65536, dtype=np.float32) - lo) * np.float32(255.0 / (hi - lo)) + np.float32(0.5)
    lut = np.clip(levels, 0, 255).astype(np.uint8)
    return lut[a]


def _stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    """Contrast-preserving percentile stretch of >8-bit (or float) data to 0..255."""
    a = np.asarray(values)
    if a.dtype.byteorder not in ("=", "|"):
        a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype == np.uint16:
        return _stretch_uint16(a)
    finite = np.isfinite(a) if a.dtype.kind == "f" else None
    # Percentiles from a strided sample: exact enough and fast on big frames.
    step = max(1, int(np.sqrt(a.size / 1_000_000)))
    sample = a[::step, ::step]
    if finite is not None:
        sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return np.zeros(a.shape, dtype=np.uint8)
    lo, hi = np.percentile(sample, STRETCH_PERCENTILES)
    if not hi > lo:  # almost constant image with a few outliers: fall back to the full range
        lo, hi = float(np.min(sample)), float(np.max(sample))
    if not hi > lo:
        return np.zeros(a.shape, dtype=np.uint8)
    scaled = (a.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    if finite is not None:
        scaled = np.where(finite, scaled, 0.0)
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


def _to_gray(im: Image.Image, notes: list[str]) -> np.ndarray:
    """8-bit grayscale array of a loaded PIL image of any mode."""
    mode = im.mode
    if mode in _HIGH_DEPTH_MODES:
        return _stretch_to_uint8(np.asarray(im))
    if mode == "L":
        return np.asarray(im)
    if mode == "P":
        if "transparency" in im.info:
            notes.append("palette with transparency flattened on black")
            return _flatten_alpha(im.convert("LA"))
        return np.asarray(im.convert("L"))
    if mode in _ALPHA_MODES:
        notes.append("alpha flattened on black")
        return _flatten_alpha(im.convert("LA"))
    if mode == "CMYK":
        notes.append("CMYK converted")
        return np.asarray(im.convert("RGB").convert("L"))
    if mode in ("1", "RGB", "RGBX", "YCbCr"):
        return np.asarray(im.convert("L"))
    # LAB, HSV, I;16 variants PIL cannot convert directly, ...: try the generic route.
    notes.append(f"{mode} converted")
    try:
        return np.asarray(im.convert("RGB").convert("L"))
    except (ValueError, OSError):
        return _stretch_to_uint8(np.asarray(im, dtype=np.float32))


def _flatten_alpha(la: Image.Image) -> np.ndarray:
    arr = np.asarray(la, dtype=np.uint16)
    return ((arr[..., 0] * arr[..., 1] + 127) // 255).astype(np.uint8)


@contextlib.contextmanager
def _opened(source: ImageSource, max_pixels: int) -> Iterator[tuple[Image.Image, int]]:
    """The opened (not yet decoded) PIL image and the size of its file in bytes; ImageRejected for non-images."""
    fh, size = _open_source(source)
    try:
        if size == 0:
            raise ImageRejected("zero-byte file")
        try:
            im = Image.open(fh, formats=ALLOWED_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            # (the warning arrives as an exception only where warnings are turned into errors, e.g. -W error)
            raise ImageRejected(_bomb_reason(exc, max_pixels)) from exc
        except UnidentifiedImageError as exc:
            fh.seek(0)
            raise ImageRejected(_describe_non_image(fh.read(512))) from exc
        except Exception as exc:  # a broken header can raise nearly anything inside a plugin
            raise ImageRejected(f"corrupt image header: {type(exc).__name__}: {exc}") from exc
        with im:
            yield im, size
    finally:
        fh.close()


@dataclass(frozen=True)
class ImageHeader:
    format: str  # PIL format name
    width: int  # declared
    height: int


def probe_image(source: ImageSource, *, max_pixels: int) -> ImageHeader:
    """Format and declared size from the header alone (no pixel decoded); ImageRejected for non-images.

    ``max_pixels`` only words the reason when Pillow itself refuses an absurd header; checking a limit is the
    caller's, with :func:`check_pixels`.
    """
    with _opened(source, max_pixels) as (im, _):
        width, height = im.size
        return ImageHeader(str(im.format or "unknown"), int(width), int(height))


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """ImageRejected when a declared ``width``×``height`` exceeds ``max_pixels`` (a decompression bomb)."""
    if width * height > max_pixels:
        raise ImageRejected(f"decompression bomb: {width}x{height} exceeds max_pixels={max_pixels}")


def decode_image(source: ImageSource, *, max_pixels: int, min_side: int) -> DecodedImage:
    """Decode an image file into full-resolution 8-bit grayscale.

    The format is decided by content. The declared size is checked against ``max_pixels`` and ``min_side``
    before any pixel is decoded. Multi-page files use the first page. Data with more than 8 bits per sample is
    contrast-stretched (0.5–99.5 percentile), not shifted. Any failure raises :class:`ImageRejected`.
    """
    with _opened(source, max_pixels) as (im, size):
        return _decode_opened(im, size=size, max_pixels=max_pixels, min_side=min_side)


def _bomb_reason(exc: Exception, max_pixels: int) -> str:
    """Pillow refused the header itself (beyond twice its own limit, or beyond it with warnings as errors); it
    reports the pixel count only."""
    match = re.search(r"\((\d+) pixels\)", str(exc))
    if match:
        return f"decompression bomb: {int(match.group(1))} pixels declared exceeds max_pixels={max_pixels}"
    return f"decompression bomb: {exc}"


def _decode_opened(im: Image.Image, *, size: int, max_pixels: int, min_side: int) -> DecodedImage:
    fmt = str(im.format or "unknown")
    width, height = im.size
    check_pixels(width, height, max_pixels)
    if width < min_side or height < min_side:
        raise ImageRejected(f"too small: {width}x{height} (min_side={min_side})")
    mode = im.mode
    n_frames = int(getattr(im, "n_frames", 1) or 1)
    notes: list[str] = []
    if n_frames > 1:
        kind = "multi-page TIFF" if fmt == "TIFF" else f"multi-frame {fmt}"
        notes.append(f"{kind}: first of {n_frames} pages used")
    try:
        metadata = read_sem_metadata(im)
    except Exception:  # metadata must never cost us the image
        metadata = {}
    bit_depth = _BIT_DEPTH.get(mode, 8)
    if fmt == "TIFF" and mode not in _HIGH_DEPTH_MODES:
        bits = im.tag_v2.get(258)  # type: ignore[attr-defined]
        if isinstance(bits, tuple) and bits and isinstance(bits[0], int) and bits[0] in (1, 2, 4):
            bit_depth = bits[0]
    try:
        if fmt in ("JPEG", "MPO") and mode in ("RGB", "YCbCr"):
            # Decode only the luma plane: the same grey values as convert("L"), at a fraction of the cost.
            im.draft("L", im.size)
        im.load()
        gray = _to_gray(im, notes)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(_bomb_reason(exc, max_pixels)) from exc
    except MemoryError as exc:
        raise ImageRejected(f"out of memory decoding {width}x{height} {fmt}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        message = str(exc) or type(exc).__name__
        if "truncated" in message.lower() or isinstance(exc, EOFError):
            raise ImageRejected(f"truncated {fmt}: {message}") from exc
        raise ImageRejected(f"corrupt {fmt}: {message}") from exc
    except Exception as exc:
        raise ImageRejected(f"cannot decode {fmt}: {type(exc).__name__}: {exc}") from exc
    gray = np.ascontiguousarray(gray, dtype=np.uint8)
    if gray.shape != (height, width):
        raise ImageRejected(f"corrupt {fmt}: decoded shape {gray.shape} differs from declared {width}x{height}")
    return DecodedImage(
        gray=gray,
        width=width,
        height=height,
        mode=mode,
        bit_depth=bit_depth,
        format=fmt,
        n_frames=n_frames,
        notes="; ".join(notes),
        metadata=metadata,
    )
