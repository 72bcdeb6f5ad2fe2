"""Data-bar text parsing and scale-bar measurement, without the OCR engine (words are given): bad inputs → unknown."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from emassist.data import scalebar
from emassist.data.pixelsize import resolve_pixel_size
from emassist.data.scalebar import Word, find_scale_bar, interpret, parse_length_nm, parse_magnification


def _bar(length: int, width: int = 256, rows: int = 24) -> np.ndarray:
    """A black bar crop with a white scale bar of ``length`` px between end-pixel centres on rows 16-17."""
    g = np.zeros((rows, width), dtype=np.uint8)
    g[16:18, 180 : 180 + length + 1] = 255
    return g


def _label(text: str, left: float = 185, top: float = 4) -> list[Word]:
    return [Word(part, left + 14 * k, top, 12, 8, (1, 1, 1)) for k, part in enumerate(text.split())]


@pytest.mark.parametrize(
    ("text", "nm"),
    [("200 nm", 200), ("5 µm", 5000), ("5 um", 5000), ("2 pm", 2000), ("1.73 mm", 1.73e6), ("50. um", 50000)],
)
def test_lengths(text: str, nm: float) -> None:
    assert parse_length_nm(text) == pytest.approx(nm)


@pytest.mark.parametrize(
    ("text", "mag"), [("Mag = 50.00 K X", 50000), ("120 x", 120), ("12000x", 12000), ("Mag = ????", None)]
)
def test_magnifications(text: str, mag: float | None) -> None:
    assert parse_magnification(text) == (None if mag is None else pytest.approx(mag))


def test_scale_bar_length_is_between_end_pixel_centres() -> None:
    bar = find_scale_bar(_bar(50), (185, 4, 210, 12))
    assert bar is not None and bar.length_px == 50


def test_label_and_bar_give_the_pixel_size() -> None:
    reading = interpret(_label("200 nm"), _bar(50), 256)
    assert reading.source == "databar_scalebar" and reading.pixel_size_nm == pytest.approx(4.0)


@pytest.mark.parametrize(
    ("words", "length", "reason"),
    [
        ("Mag = ????", 50, "no scale-bar label"),
        ("0 nm", 50, "not a positive length"),
        ("200 nm", 3, "too short"),
    ],
)
def test_nonsense_bars_are_unknown_with_a_reason(words: str, length: int, reason: str) -> None:
    reading = interpret(_label(words), _bar(length), 256)
    assert reading.pixel_size_nm is None and reading.source == "unknown" and reason in reading.reason


def test_a_one_pixel_bar_is_unknown() -> None:
    bar = _bar(0)  # a single pixel column: no run to measure
    reading = interpret(_label("200 nm"), bar, 256)
    assert reading.pixel_size_nm is None and reading.reason


def test_tags_win_and_the_bar_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scalebar, "ocr_words", lambda bar, digits_only=False: _label("200 nm"))
    size = resolve_pixel_size(40.0, _bar(50), 256)
    assert (size.nm, size.source, size.databar_nm) == (40.0, "tags", pytest.approx(4.0))


def test_engine_crash_or_absence_makes_the_image_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(bar: np.ndarray, digits_only: bool = False) -> list[Word]:
        raise scalebar.OcrFailed("OCR engine failed: TesseractError: (-11, 'segfault')")

    monkeypatch.setattr(scalebar, "ocr_words", crash)
    size = resolve_pixel_size(None, _bar(50), 256)
    assert size.nm is None and size.source == "unknown" and "OCR engine failed" in size.reason
    size = resolve_pixel_size(None, _bar(50), 256, bar_not_read="OCR engine (tesseract) not available")
    assert size.nm is None and "not read" in size.reason


def test_missing_ocr_model_is_unavailable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TESSDATA_PREFIX", str(tmp_path / "no-tessdata"))
    assert "language data not found" in (scalebar.engine_available() or "")
    with pytest.raises(scalebar.OcrUnavailable):
        scalebar.ocr_words(_bar(50))
