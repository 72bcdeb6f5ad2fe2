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
    monkeypatch.setattr(scalebar, "ocr_words", lambda bar, digits_only=False, min_rows=0: _label("200 nm"))
    size = resolve_pixel_size(40.0, _bar(50), 256)
    assert (size.nm, size.source, size.databar_nm) == (40.0, "tags", pytest.approx(4.0))


def test_engine_crash_or_absence_makes_the_image_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(bar: np.ndarray, digits_only: bool = False, min_rows: int = 0) -> list[Word]:
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


def _fake_ocr(label_words: list[Word], whole_words: list[Word], calls: list[bool]) -> object:
    """OCR that answers the label crop (digits only) and the whole bar with the given words, noting each call."""

    def ocr(bar: np.ndarray, digits_only: bool = False, min_rows: int = 0) -> list[Word]:
        calls.append(digits_only)
        return label_words if digits_only else whole_words

    return ocr


# _bar's scale bar runs over columns 180-230, so the label crop starts at column 155 (half the run before it)
CROP_LEFT = 155


def test_label_first_reads_a_centred_round_label_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(scalebar, "ocr_words", _fake_ocr(_label("200 nm", left=195 - CROP_LEFT), [], calls))
    reading = scalebar.read_databar(_bar(50), 256)
    assert reading.source == "databar_scalebar" and reading.pixel_size_nm == pytest.approx(4.0)
    assert calls == [True] and reading.text == "200 nm"  # the whole bar was not read


@pytest.mark.parametrize(
    ("text", "left"),
    [
        ("4 mm", 0),  # a round length beside the run, not centred over it (a working distance)
        ("5m", 195 - CROP_LEFT),  # the unit not read in full
        ("150 nm", 195 - CROP_LEFT),  # not a round length
    ],
)
def test_label_first_leaves_doubtful_labels_to_the_whole_bar(
    monkeypatch: pytest.MonkeyPatch, text: str, left: float
) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(scalebar, "ocr_words", _fake_ocr(_label(text, left=left), _label("200 nm"), calls))
    reading = scalebar.read_databar(_bar(50), 256)
    assert calls == [True, True, False]  # the label crop at two scales, then the whole bar
    assert reading.source == "databar_scalebar" and reading.pixel_size_nm == pytest.approx(4.0)
    assert reading.label_text == "200 nm"  # the whole bar's label, not the doubtful one


def test_whole_bar_first_reads_the_magnification(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    whole = _label("200 nm") + [
        Word(t, 10 + 30 * k, 14, 25, 8, (1, 1, 2)) for k, t in enumerate(["Mag", "=", "50.00", "KX"])
    ]
    monkeypatch.setattr(scalebar, "ocr_words", _fake_ocr([], whole, calls))
    reading = scalebar.read_databar(_bar(50), 256, label_first=False)
    assert calls == [False] and reading.magnification == pytest.approx(50000)
    assert reading.source == "databar_scalebar" and reading.pixel_size_nm == pytest.approx(4.0)
