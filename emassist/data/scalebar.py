"""Reading an SEM data bar: its text through OCR (Tesseract), and the length of its scale bar in pixels.

:func:`read_databar` takes the data-bar rows cut off a decoded image (full resolution, uint8) and returns a
:class:`BarReading`: the OCR text, the magnification / field width / scale-bar label it found, the scale bar's length
in pixels, and the pixel size they imply (``databar_scalebar``: label over length; ``databar_mag``: field width over
image width, else magnification against :data:`REFERENCE_DISPLAY_NM`), or the reason none could be had.

The OCR engine is Tesseract through ``tesserocr`` (its wheel bundles libtesseract; the English model is Debian's
``tesseract-ocr-eng``, or ``$TESSDATA_PREFIX``), loaded once per worker thread: ~25 ms a bar, where a
``tesseract`` process per bar (pytesseract) cost ~125 ms, most of it loading the model. A missing engine or model
raises :class:`OcrUnavailable`, a failure on one bar :class:`OcrFailed`; the caller decides what that costs (ingest:
that image's pixel size is unknown).

The scale bar is found by geometry: the longest horizontal run of high-contrast pixels close to a length label
("200 nm", "5 µm"), not touching the bar's left/right edge (frame and table lines do), with collinear pieces joined
across the label when it sits inside the bar (FEI). Its length is the distance between the centres of its end
pixels (Zeiss draws tick marks there; the demo generator draws it so).
"""

from __future__ import annotations

import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

#: The display width a magnification refers to when only the magnification is printed (no field width). Vendors
#: differ: measured on the real files here (tags' pixel size x width x magnification) FEI Helios 208 mm, Zeiss
#: 281 and 298 mm, FEI/Philips XL about 312 mm (from its scale bar); the classic Polaroid print was 127 mm. So
#: ``databar_mag`` from a bare magnification is approximate (-26 % .. +11 % on these); the demo generator prints
#: its magnification for this width, so there it is exact.
REFERENCE_DISPLAY_NM = 280e6

#: A scale bar shorter than this (pixels) cannot give the pixel size to a few per cent.
MIN_BAR_PX = 8
#: Pixel sizes outside this range (nm) are misreadings (a 1 pm or 1 mm pixel is no SEM image).
PLAUSIBLE_NM = (0.01, 1e6)
#: Grey levels a bar's text/scale-bar pixels differ from its background by (as in emassist.data.databar).
_CONTRAST = 64
#: OCR works best on text a few tens of pixels high: bars are upscaled to at least this many rows.
_OCR_MIN_ROWS = 60
#: A scale bar's label crop is read at the scale for this many rows, then (when that gives nothing sure) for the next:
#: a lone '1' in a 20-row demo bar can be lost at 3x and read at 4x, while 3x reads more labels overall.
_LABEL_OCR_MIN_ROWS = (60, 80)
_OCR_MAX_SCALE = 4
# Tesseract: sparse text (page segmentation mode 11), the LSTM engine, no inversion of its own (done here).
_TESSERACT_VARIABLES = {"tessedit_do_invert": "0"}
# The first look, at a scale bar's label only: digits and length units, so '5' is no 'S' and '0' no 'o'.
_LABEL_CHARS = "0123456789.nmuµ"
#: Debian's tesseract-ocr-eng (5.x, then 4.x), then the upstream default.
_TESSDATA_DIRS = ("/usr/share/tesseract-ocr/5/tessdata", "/usr/share/tesseract-ocr/4.00/tessdata",
                  "/usr/share/tessdata", "/usr/local/share/tessdata")  # fmt: skip
_LOCAL = threading.local()  # one engine per thread (a Tesseract API object is not thread-safe)

_NUMBER = r"\d+(?:[.,]\d+)?"
_LENGTH_UNITS: dict[str, float] = {"nm": 1.0, "µm": 1e3, "mm": 1e6}
# How the micro sign comes out of OCR, in the unit of a length (never "pm": no SEM scale bar is in picometres),
# or not at all ("5 m": no SEM scale bar is metres long either).
_MICRO = "[µμuUpyjJ]"
# (a stray '.' between number and unit is OCR's: "50. um")
_LENGTH_RE = re.compile(rf"(?<![\d.,])({_NUMBER})[.,]?\s*(nm|mm|{_MICRO}?m)\b")
_SPELLED_RE = re.compile(r"\d[.,]?\s*(?:nm|mm|[uµμ]m)\b")  # a label whose unit OCR read in full
_MAG_RE = re.compile(rf"(?<![\d.,])({_NUMBER})\s*([kK])?\s*[xX×](?![a-wyzA-WYZ])")
_MAG_KEY_RE = re.compile(r"\b(?:mag|magn|magnification)\b", re.IGNORECASE)
_HFW_KEY_RE = re.compile(r"\b(?:HFW|FOV|field\s*width|width)\b", re.IGNORECASE)


class OcrUnavailable(RuntimeError):
    """The OCR engine cannot be run at all (tesseract not installed or not on PATH)."""


class OcrFailed(RuntimeError):
    """The OCR engine ran but failed on this image (a crash, a timeout)."""


@dataclass(frozen=True)
class Word:
    """One OCR word and its box, in the pixels of the bar crop (not of the upscaled image)."""

    text: str
    left: float
    top: float
    width: float
    height: float
    line: tuple[int, int, int]  # (block, paragraph, line) of Tesseract's layout

    @property
    def right(self) -> float:
        return self.left + self.width

    @property
    def bottom(self) -> float:
        return self.top + self.height


@dataclass(frozen=True)
class ScaleBar:
    """A measured scale bar: end pixels ``x0``..``x1`` on row ``row`` of the bar crop."""

    x0: int
    x1: int
    row: int

    @property
    def length_px(self) -> int:
        return self.x1 - self.x0


@dataclass
class BarReading:
    """What a data bar says about the pixel size. ``pixel_size_nm`` None: ``reason`` says why."""

    text: str = ""
    pixel_size_nm: float | None = None
    source: str = "unknown"  # databar_scalebar | databar_mag | unknown
    reason: str = ""
    magnification: float | None = None
    field_width_nm: float | None = None
    label_nm: float | None = None
    label_text: str = ""
    bar: ScaleBar | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------- OCR


def _ocr_scale(rows: int, min_rows: int) -> int:
    """The upscaling factor OCR reads a crop of ``rows`` rows at."""
    return min(_OCR_MAX_SCALE, max(1, round(min_rows / max(1, rows))))


def _ocr_image(bar: np.ndarray, min_rows: int = _OCR_MIN_ROWS) -> tuple[Image.Image, float, bool]:
    """The bar as OCR sees it: dark text on light ground, upscaled; with its scale factor and whether inverted."""
    bg = int(np.bincount(bar.ravel(), minlength=256).argmax())
    inverted = bg < 128
    g = 255 - bar if inverted else bar
    scale = _ocr_scale(bar.shape[0], min_rows)
    im = Image.fromarray(np.ascontiguousarray(g))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.Resampling.BICUBIC)
    return im, float(scale), inverted


def tessdata_dir() -> Path | None:
    """Where Tesseract's English model (``eng.traineddata``) lies: ``$TESSDATA_PREFIX``, else Debian's
    ``tesseract-ocr-eng`` folders; None when there is none."""
    env = os.environ.get("TESSDATA_PREFIX")
    for folder in [Path(env)] if env else [Path(d) for d in _TESSDATA_DIRS]:
        if (folder / "eng.traineddata").is_file():
            return folder
    return None


def _engine(digits_only: bool) -> Any:
    """This thread's Tesseract engine (loaded once: loading the model is most of what a tesseract process costs)."""
    folder = tessdata_dir()
    if folder is None:
        raise OcrUnavailable("OCR language data not found (install tesseract-ocr-eng, or set TESSDATA_PREFIX)")
    key = (str(folder), digits_only)
    engines: dict[tuple[str, bool], Any] = _LOCAL.__dict__.setdefault("engines", {})
    if key not in engines:
        os.environ.setdefault("OMP_THREAD_LIMIT", "1")  # one ingest worker per core already; threads only contend
        try:
            import tesserocr  # lazy: only ingest workers that read bars need it
        except ImportError as exc:
            raise OcrUnavailable(f"OCR engine (tesserocr) not installed: {exc}") from exc
        try:
            api = tesserocr.PyTessBaseAPI(path=str(folder), lang="eng", psm=tesserocr.PSM.SPARSE_TEXT,
                                          oem=tesserocr.OEM.LSTM_ONLY)  # fmt: skip
        except RuntimeError as exc:
            raise OcrUnavailable(f"OCR engine cannot start: {exc}") from exc
        for name, value in _TESSERACT_VARIABLES.items():
            api.SetVariable(name, value)
        if digits_only:
            api.SetVariable("tessedit_char_whitelist", _LABEL_CHARS)
        engines[key] = api
    return engines[key]


def ocr_words(bar: np.ndarray, digits_only: bool = False, *, min_rows: int = _OCR_MIN_ROWS) -> list[Word]:
    """Tesseract's words in a data-bar crop (uint8, H×W), with their boxes and layout lines; ``digits_only``: a scale
    bar's label (digits and length units). Raises OcrUnavailable / OcrFailed."""
    import tesserocr

    api = _engine(digits_only)
    im, scale, _ = _ocr_image(bar, min_rows)
    words: list[Word] = []
    try:
        api.SetImage(im)
        api.Recognize()
        it = api.GetIterator()
        block = para = line = 0
        while it is not None:
            if it.IsAtBeginningOf(tesserocr.RIL.BLOCK):
                block, para = block + 1, 0
            if it.IsAtBeginningOf(tesserocr.RIL.PARA):
                para, line = para + 1, 0
            if it.IsAtBeginningOf(tesserocr.RIL.TEXTLINE):
                line += 1
            try:
                text = (it.GetUTF8Text(tesserocr.RIL.WORD) or "").strip()
            except RuntimeError:  # tesserocr's "No text returned" for a word without text: no word, not a failure
                text = ""
            box = it.BoundingBox(tesserocr.RIL.WORD)
            if text and box:
                x1, y1, x2, y2 = box
                words.append(Word(text, x1 / scale, y1 / scale, (x2 - x1) / scale, (y2 - y1) / scale,
                                  (block, para, line)))  # fmt: skip
            if not it.Next(tesserocr.RIL.WORD):
                break
    except Exception as exc:  # the engine failed on this image: this bar is unread, the others are not
        message = " ".join(str(exc).split())[:160]
        raise OcrFailed(f"OCR engine failed: {type(exc).__name__}: {message}") from exc
    return words


def engine_available() -> str | None:
    """None when the OCR engine runs, else a short reason (checked once per ingest run, not per image)."""
    try:
        _engine(False)
    except OcrUnavailable as exc:
        return str(exc)
    return None


def words_text(words: list[Word]) -> str:
    """The OCR words as text: one line per Tesseract line, in reading order."""
    lines: dict[tuple[int, int, int], list[str]] = {}
    for w in words:
        lines.setdefault(w.line, []).append(w.text)
    return " | ".join(" ".join(parts) for parts in lines.values())


# --------------------------------------------------------------------------------------------------- text


def parse_length_nm(text: str) -> float | None:
    """'200 nm' → 200, '5 µm' / '5 um' / '5 pm' (OCR's µ) → 5000, '1.73 mm' → 1.73e6; None when no length."""
    match = _LENGTH_RE.search(text)
    if not match:
        return None
    return _length_value(match)


def _length_value(match: re.Match[str]) -> float | None:
    value = float(match.group(1).replace(",", "."))
    unit = match.group(2)
    unit = unit if unit in _LENGTH_UNITS else "µm"
    return value * _LENGTH_UNITS[unit]


def parse_magnification(text: str) -> float | None:
    """'Mag = 50.00 K X' → 50000, '120 x' → 120, '12000x' → 12000; None for 'Mag = ????' or no magnification."""
    match = _MAG_RE.search(text)
    if not match:
        return None
    value = float(match.group(1).replace(",", "."))
    return value * (1e3 if match.group(2) else 1.0)


def _labels(words: list[Word]) -> list[tuple[float, str, float, float, float, float]]:
    """Length labels among the words: (nm, text, left, top, right, bottom), a number and its unit joined."""
    out = []
    for i, w in enumerate(words):
        candidates = [(w.text, w.left, w.top, w.right, w.bottom)]
        if i + 1 < len(words) and words[i + 1].line == w.line:
            n = words[i + 1]
            candidates.insert(0, (f"{w.text} {n.text}", w.left, min(w.top, n.top), n.right, max(w.bottom, n.bottom)))
        for text, left, top, right, bottom in candidates:
            match = _LENGTH_RE.fullmatch(text.strip("|-—_[](){}"))
            if match:
                nm = _length_value(match)
                if nm is not None:
                    out.append((nm, text, left, top, right, bottom))
                break
    return out


def _field_width(words: list[Word], text: str) -> float | None:
    """A field width: 'HFW = 1.73 mm' on one line, or an 'HFW' header with the length under it (FEI's table)."""
    for w in words:
        if _HFW_KEY_RE.fullmatch(w.text.strip(":=")):
            same_line = " ".join(x.text for x in words if x.line == w.line and x.left > w.left)
            nm = parse_length_nm(same_line)
            if nm is not None:
                return nm
            below = [
                x for x in words if x.top > w.bottom - 1 and x.left < w.right + w.height and x.right > w.left - w.height
            ]
            below.sort(key=lambda x: x.top)
            if below:
                nm = parse_length_nm(" ".join(x.text for x in below if x.line == below[0].line))
                if nm is not None:
                    return nm
    return None


# --------------------------------------------------------------------------------------------------- geometry


def _runs(mask_row: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) columns of the runs of True in a 1-D mask."""
    padded = np.concatenate(([False], mask_row, [False]))
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return [(int(a), int(b) - 1) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def find_scale_bar(bar: np.ndarray, label: tuple[float, float, float, float]) -> ScaleBar | None:
    """The scale bar next to a length label whose box is (left, top, right, bottom), in a data-bar crop.

    Candidates: horizontal runs of pixels differing from the bar's background by at least 64 grey levels, at
    least 3 px long, on rows within two label heights of the label, not touching the crop's left or right edge and
    not spanning 90 % of it (frames and table lines do). Pieces on one row are joined across the label when it
    sits between them. The bar is the candidate with the longest extent that overlaps the label horizontally or
    ends within two label heights of it.
    """
    g = np.asarray(bar)
    h, w = g.shape
    bg = int(np.bincount(g.ravel(), minlength=256).argmax())
    fg = np.abs(g.astype(np.int16) - bg) >= _CONTRAST
    left, top, right, bottom = label
    lh = max(2.0, bottom - top)
    r0, r1 = max(0, int(top - 2 * lh)), min(h, math.ceil(bottom + 2 * lh) + 1)
    best: ScaleBar | None = None
    for r in range(max(1, r0), min(h - 1, r1)):  # the crop's first and last rows are frame lines, if anything
        runs = [(a, b) for a, b in _runs(fg[r]) if b - a >= 2 and a > 0 and b < w - 1]
        pieces: list[tuple[int, int]] = []
        for a, b in runs:
            if pieces:
                pa, pb = pieces[-1]
                gap_has_label = pb <= left + 2 and a >= right - 2 and a - pb <= (right - left) + 4 * lh
                if gap_has_label and b - a >= 2 * lh and pb - pa >= 2 * lh:
                    pieces[-1] = (pa, b)
                    continue
            pieces.append((a, b))
        for a, b in pieces:
            if b - a + 1 >= 0.9 * w:
                continue
            near = a <= right + 2 * lh and b >= left - 2 * lh
            if near and (best is None or b - a > best.length_px):
                best = ScaleBar(a, b, r)
    return best


def bar_candidates(bar: np.ndarray) -> list[ScaleBar]:
    """Horizontal runs that may be a scale bar, longest first: at least MIN_BAR_PX long, not on the first or last
    row, not touching the left/right edge, under 90 % of the width (the label-free search of the first look)."""
    g = np.asarray(bar)
    h, w = g.shape
    bg = int(np.bincount(g.ravel(), minlength=256).argmax())
    fg = np.abs(g.astype(np.int16) - bg) >= _CONTRAST
    found = [
        ScaleBar(a, b, r)
        for r in range(1, h - 1)
        for a, b in _runs(fg[r])
        if b - a >= MIN_BAR_PX and a > 0 and b < w - 1 and b - a + 1 < 0.9 * w
    ]
    return sorted(found, key=lambda c: -c.length_px)


def _label_window(bar: np.ndarray, candidate: ScaleBar) -> tuple[np.ndarray, int]:
    """The part of the bar crop around a candidate scale bar where its label is (above, inside or beside it)."""
    w = bar.shape[1]
    margin = max(candidate.length_px // 2, bar.shape[0])
    x0, x1 = max(0, candidate.x0 - margin), min(w, candidate.x1 + 2 * margin)
    return bar[:, x0:x1], x0


def _label_look(bar: np.ndarray, image_width: int) -> tuple[BarReading | None, str]:
    """Read the label beside the longest bar-like run with a digits-and-units OCR pass: (reading, its text).

    The reading counts only for a round label (1, 2, 2.5, 3, 4 or 5 times a power of ten) with its unit spelled out
    (nm, um/µm, mm), centred over that same run and measured against it: a length elsewhere in the bar (a working
    distance, a field width) or a run that is one piece of a bar split by its label (FEI) is left to the whole-bar
    reading. The crop is read at a second scale when the first gives no such label (see _LABEL_OCR_MIN_ROWS).
    """
    candidates = bar_candidates(bar)
    if not candidates:
        return None, ""
    run = candidates[0]
    window, x_offset = _label_window(bar, run)
    text, scales = "", set()
    for min_rows in _LABEL_OCR_MIN_ROWS:
        scale = _ocr_scale(window.shape[0], min_rows)
        if scale in scales:
            continue
        scales.add(scale)
        words = [Word(w.text, w.left + x_offset, w.top, w.width, w.height, w.line)
                 for w in ocr_words(window, digits_only=True, min_rows=min_rows)]  # fmt: skip
        reading = interpret(words, bar, image_width, mag_fallback=False)
        text = text or reading.text
        if _sure_label(reading, words, run):
            return reading, reading.text
    return None, text


def _sure_label(reading: BarReading, words: list[Word], run: ScaleBar) -> bool:
    """Whether a label-crop reading is sure enough to skip the whole bar (see :func:`_label_look`)."""
    found, nm = reading.bar, reading.label_nm
    if reading.pixel_size_nm is None or found is None or nm is None or (found.x0, found.x1) != (run.x0, run.x1):
        return False
    boxes = [(left, right, bottom - top) for n, text, left, top, right, bottom in _labels(words)
             if (n, text) == (nm, reading.label_text)]  # fmt: skip
    spelled = _SPELLED_RE.search(reading.label_text) is not None
    centred = any(run.x0 - lh <= (left + right) / 2 <= run.x1 + lh for left, right, lh in boxes)
    return _round(nm) and spelled and centred


# --------------------------------------------------------------------------------------------------- reading


def interpret(words: list[Word], bar: np.ndarray, image_width: int, *, mag_fallback: bool = True) -> BarReading:
    """The pixel size a data bar's OCR words and pixels give (see the module docstring); ``mag_fallback`` False:
    the scale bar only."""
    text = words_text(words)
    reading = BarReading(text=text)
    reading.magnification = None
    for line in text.split(" | "):
        if _MAG_KEY_RE.search(line) or _MAG_RE.search(line):
            mag = parse_magnification(line)
            if mag is not None:
                reading.magnification = mag
                break
    reading.field_width_nm = _field_width(words, text)
    problems: list[str] = []
    ranked: list[tuple[tuple[bool, int, float], float, str, ScaleBar]] = []
    for nm, label_text, left, top, right, bottom in _labels(words):
        scale_bar = find_scale_bar(bar, (left, top, right, bottom))
        # A label that is not a round length (a working distance, a field width) only counts beside a long bar.
        if scale_bar is not None and (_round(nm) or scale_bar.length_px >= 0.05 * bar.shape[1]):
            # Prefer a round label (a scale bar is 1, 2, 5 ... units; a working distance rarely is), then the longer
            # bar (a stroke of a letter beside a length is short), then the bar closest to its label.
            gap = max(0.0, scale_bar.row - bottom, top - scale_bar.row)
            ranked.append(((not _round(nm), -scale_bar.length_px, gap), nm, label_text, scale_bar))
    if ranked:
        _, nm, label_text, scale_bar = min(ranked, key=lambda item: item[0])
        reading.label_nm, reading.label_text, reading.bar = nm, label_text, scale_bar
        if not nm > 0:
            problems.append(f"scale-bar label '{label_text}' is not a positive length")
        elif scale_bar.length_px < MIN_BAR_PX:
            problems.append(f"scale bar of {scale_bar.length_px} px is too short to measure (< {MIN_BAR_PX} px)")
        elif _plausible(nm / scale_bar.length_px):
            reading.pixel_size_nm, reading.source = nm / scale_bar.length_px, "databar_scalebar"
            return reading
        else:
            problems.append(f"scale bar '{label_text}' over {scale_bar.length_px} px is implausible")
    if not mag_fallback:
        reading.reason = "; ".join(problems)
        return reading
    if reading.field_width_nm and image_width > 0 and _plausible(reading.field_width_nm / image_width):
        reading.pixel_size_nm, reading.source = reading.field_width_nm / image_width, "databar_mag"
        return reading
    mag = reading.magnification
    if mag and mag > 0 and image_width > 0 and _plausible(REFERENCE_DISPLAY_NM / (mag * image_width)):
        reading.pixel_size_nm, reading.source = REFERENCE_DISPLAY_NM / (mag * image_width), "databar_mag"
        return reading
    if mag is not None and not mag > 0:
        problems.append(f"magnification {mag:g} is not positive")
    if not problems:
        problems.append("no scale-bar label, field width or magnification read")
    reading.reason = "data bar unreadable: " + "; ".join(problems)
    return reading


def _round(nm: float) -> bool:
    """A length a scale bar is drawn at: 1, 2, 2.5, 3, 4 or 5 times a power of ten (in nm)."""
    if not nm > 0:
        return True  # a zero label is still a label (and is refused as such)
    mantissa = nm / 10 ** math.floor(math.log10(nm) + 1e-9)
    return any(abs(mantissa - m) < 1e-6 for m in (1, 2, 2.5, 3, 4, 5))


def _plausible(nm_per_px: float) -> bool:
    return math.isfinite(nm_per_px) and PLAUSIBLE_NM[0] <= nm_per_px <= PLAUSIBLE_NM[1]


def read_databar(bar: np.ndarray, image_width: int, *, label_first: bool = True) -> BarReading:
    """OCR and measure one data-bar crop (uint8 rows cut off an image ``image_width`` pixels wide).

    ``label_first``: first the label of the longest bar-like run alone (a small crop, digits and units: ~4 ms);
    when that gives no round length centred over and measured against that run, the whole bar (~25 ms: labels
    anywhere, field width, magnification). ``text`` is what was read: that label only, or the whole bar's text.
    ``label_first=False``: the whole bar first (its magnification and field width are read too), the label alone
    as a second look when the whole bar gives neither a scale bar nor a field width.
    Raises OcrUnavailable (no engine) and OcrFailed (the engine failed on this bar); never for odd content.
    """
    g = np.ascontiguousarray(bar, dtype=np.uint8)
    if g.ndim != 2 or g.size == 0:
        return BarReading(reason="no data bar")
    label_text = ""
    if label_first:
        quick, label_text = _label_look(g, image_width)
        if quick is not None:
            return quick
    reading = interpret(ocr_words(g), g, image_width)
    if not label_first and reading.source != "databar_scalebar" and reading.field_width_nm is None:
        second, label_text = _label_look(g, image_width)
        if second is not None:
            second.text = reading.text
            second.magnification, second.field_width_nm = reading.magnification, reading.field_width_nm
            return second
    if label_text and reading.source != "databar_scalebar":
        reading.notes.append(f"label pass: {label_text}")
    return reading
