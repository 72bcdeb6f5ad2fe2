"""The one decode → standardize path for SEM images, shared by ingest and serving.

``decode_image`` turns file bytes (or a path) into full-resolution 8-bit grayscale, refusing anything that is
not a sane image with an :class:`ImageRejected` carrying a short human-readable reason. ``find_databar`` finds
the instrument data bar at the bottom, ``standardize`` crops it and resizes to the cache size, and ``dhash``
gives a 64-bit perceptual hash for near-duplicate detection.
"""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
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


def _open_source(source: bytes | bytearray | memoryview | str | os.PathLike[str]) -> tuple[Any, int]:
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


def decode_image(
    source: bytes | bytearray | memoryview | str | os.PathLike[str], *, max_pixels: int, min_side: int
) -> DecodedImage:
    """Decode an image file into full-resolution 8-bit grayscale.

    The format is decided by content. The declared size is checked against ``max_pixels`` and ``min_side``
    before any pixel is decoded. Multi-page files use the first page. Data with more than 8 bits per sample is
    contrast-stretched (0.5–99.5 percentile), not shifted. Any failure raises :class:`ImageRejected`.
    """
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
            return _decode_opened(im, size=size, max_pixels=max_pixels, min_side=min_side)
    finally:
        fh.close()


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
    if width * height > max_pixels:
        raise ImageRejected(f"decompression bomb: {width}x{height} exceeds max_pixels={max_pixels}")
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


# --------------------------------------------------------------------------------------------------- data bar

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
_RUN_SHARE = 0.15  # least share of the band in runs of 6 identical pixels


def _row_hist(region: np.ndarray) -> np.ndarray:
    """Cumulative per-row histograms with a leading zero column: shape (rows, 257)."""
    n = region.shape[0]
    idx = region.astype(np.intp)
    idx += (np.arange(n, dtype=np.intp) * 256)[:, None]  # in place: 5x faster than a broadcast add
    hist = np.bincount(idx.ravel(), minlength=256 * n).reshape(n, 256)
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


# --------------------------------------------------------------------------------------------------- standardize


def standardize(gray: np.ndarray, *, cache_size: int, crop_databar: bool) -> tuple[np.ndarray, int]:
    """Crop the data bar (if asked) and squash to ``cache_size``×``cache_size`` uint8; returns (image, rows cropped)."""
    g = np.asarray(gray)
    if g.ndim != 2:
        raise ValueError(f"standardize expects a 2-D grayscale array, got shape {g.shape}")
    if g.dtype != np.uint8:
        g = np.clip(g, 0, 255).astype(np.uint8)
    rows = find_databar(g) if crop_databar else 0
    if rows:
        g = g[: g.shape[0] - rows]
    im = Image.fromarray(np.ascontiguousarray(g))
    if im.size != (cache_size, cache_size):
        # Shrinking: area averaging (BOX, like OpenCV's INTER_AREA), ~4x faster than Lanczos on 1024x768 -> 256
        # and alias-free enough at these factors. Enlarging (tiny images): Lanczos, which BOX would make blocky.
        shrink = im.width >= cache_size and im.height >= cache_size
        resample = Image.Resampling.BOX if shrink else Image.Resampling.LANCZOS
        im = im.resize((cache_size, cache_size), resample)
    return np.asarray(im, dtype=np.uint8), rows


# --------------------------------------------------------------------------------------------------- hashing


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
