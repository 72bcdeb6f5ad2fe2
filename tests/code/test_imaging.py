"""Image jobs of emassist.data: decoding every kind of input (decode), data-bar detection (databar),
standardisation (the Preprocessor's crop and resize) and hashing (hashing)."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFile, ImageFont

from emassist.config.settings import IngestParams
from emassist.data.databar import find_databar
from emassist.data.decode import DecodedImage, ImageRejected, check_pixels, decode_image, probe_image
from emassist.data.hashing import dhash, hamming
from emassist.data.preprocess import DEFAULT_MIN_CONTRAST, Preprocessor, featureless_reason, gray_contrast
from tests.helpers import encode, png_header_only, texture

LIMITS = {"max_pixels": 100_000_000, "min_side": 16}


# --------------------------------------------------------------------------------------------------- helpers


def with_databar(arr: np.ndarray, frac: float = 0.1, bg: int = 0, fg: int = 255) -> tuple[np.ndarray, int]:
    """Paint an instrument data bar (text and a scale bar) over the bottom ``frac`` of ``arr``."""
    h, w = arr.shape
    bar_h = round(h * frac)
    im = Image.fromarray(arr.copy())
    draw = ImageDraw.Draw(im)
    draw.rectangle([0, h - bar_h, w, h], fill=bg)
    font = ImageFont.load_default(size=max(8, bar_h // 3))
    draw.text((10, h - bar_h + bar_h // 6), "HV 5.00 kV  mag 50 000x  WD 4.1 mm", fill=fg, font=font)
    draw.line([w * 0.65, h - bar_h // 3, w * 0.9, h - bar_h // 3], fill=fg, width=max(1, bar_h // 12))
    draw.text((w * 0.7, h - bar_h + bar_h // 8), "500 nm", fill=fg, font=font)
    return np.asarray(im), bar_h


def roundtrip(arr: np.ndarray, fmt: str = "PNG", **params: object) -> np.ndarray:
    return decode_image(encode(arr, fmt, **params), **LIMITS).gray


def rejected_reason(source: bytes | Path, **limits: int) -> str:
    with pytest.raises(ImageRejected) as info:
        decode_image(source, **{**LIMITS, **limits})
    assert isinstance(info.value.reason, str) and info.value.reason
    return info.value.reason


# --------------------------------------------------------------------------------------------------- decode: good


def test_truncated_images_are_never_loaded_silently() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decode_8bit_png_is_lossless() -> None:
    arr = texture(40, 50)
    out = decode_image(encode(arr, "PNG"), **LIMITS)
    assert isinstance(out, DecodedImage)
    assert (out.width, out.height, out.mode, out.bit_depth, out.format, out.n_frames) == (50, 40, "L", 8, "PNG", 1)
    assert out.gray.dtype == np.uint8 and out.gray.shape == (40, 50)
    np.testing.assert_array_equal(out.gray, arr)
    assert out.notes == ""


def test_decode_from_path_without_extension(tmp_path: Path) -> None:
    path = tmp_path / "no_extension"
    path.write_bytes(encode(texture(32, 32), "PNG"))
    assert decode_image(path, **LIMITS).format == "PNG"
    assert decode_image(str(path), **LIMITS).format == "PNG"


def test_content_decides_not_extension(tmp_path: Path) -> None:
    path = tmp_path / "actually_a_png.jpg"
    path.write_bytes(encode(texture(32, 32), "PNG"))
    assert decode_image(path, **LIMITS).format == "PNG"


def test_rgb_jpeg_decodes_to_luma() -> None:
    rng = np.random.default_rng(1)
    rgb = np.clip(rng.normal(128, 50, (48, 64, 3)), 0, 255).astype(np.uint8)
    data = encode(rgb, "JPEG", quality=95)
    out = decode_image(data, **LIMITS)
    assert (out.mode, out.format, out.bit_depth) == ("RGB", "JPEG", 8)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.int16)
    assert np.abs(out.gray.astype(np.int16) - reference).max() <= 2


def test_16bit_tiff_is_contrast_stretched_not_shifted() -> None:
    ramp = np.linspace(1000, 1200, 64 * 64).reshape(64, 64).astype(np.uint16)
    out = decode_image(encode(Image.fromarray(ramp), "TIFF"), **LIMITS)
    assert out.mode.startswith("I;16") and out.bit_depth == 16 and out.format == "TIFF"
    # A plain >>8 would give a flat image of 3s and 4s; the stretch uses the whole range.
    assert out.gray.min() == 0 and out.gray.max() == 255
    assert np.all(np.diff(out.gray.ravel().astype(int)) >= 0)  # order (contrast) is preserved
    assert len(np.unique(out.gray)) >= 190  # ~all of the 201 input levels stay distinct


def test_float_tiff_with_nan_decodes() -> None:
    arr = np.linspace(-1.0, 3.0, 40 * 40, dtype=np.float32).reshape(40, 40)
    arr[0, :5] = np.nan
    out = decode_image(encode(Image.fromarray(arr, mode="F"), "TIFF"), **LIMITS)
    assert out.mode == "F" and out.bit_depth == 32
    assert out.gray.max() == 255 and out.gray[0, 0] == 0


def test_constant_16bit_image_decodes_to_black() -> None:
    arr = np.full((20, 20), 777, dtype=np.uint16)
    out = decode_image(encode(Image.fromarray(arr), "TIFF"), **LIMITS)
    assert out.gray.max() == 0


def test_multipage_tiff_uses_first_page_and_says_so() -> None:
    pages = [Image.fromarray(np.full((32, 40), v, dtype=np.uint8)) for v in (10, 200, 90)]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    out = decode_image(data, **LIMITS)
    assert out.n_frames == 3
    assert np.all(out.gray == 10)
    assert "multi-page TIFF: first of 3 pages used" in out.notes


def test_cmyk_jpeg_is_converted() -> None:
    white = decode_image(encode(Image.new("CMYK", (32, 32), (0, 0, 0, 0)), "JPEG"), **LIMITS)
    black = decode_image(encode(Image.new("CMYK", (32, 32), (0, 0, 0, 255)), "JPEG"), **LIMITS)
    assert white.mode == "CMYK" and "CMYK converted" in white.notes
    assert white.gray.mean() > 250 and black.gray.mean() < 5


def test_palette_png_with_transparency_is_flattened_on_black() -> None:
    im = Image.new("P", (32, 32), 1)
    im.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    ImageDraw.Draw(im).rectangle([0, 0, 15, 31], fill=0)
    data = encode(im, "PNG", transparency=1)  # palette index 1 (white) is transparent
    out = decode_image(data, **LIMITS)
    assert out.mode == "P"
    assert "palette with transparency flattened on black" in out.notes
    assert out.gray.max() == 0  # the white but transparent half became black


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_is_flattened_on_black(mode: str) -> None:
    im = Image.new(mode, (20, 20), (255, 0) if mode == "LA" else (255, 255, 255, 0))
    ImageDraw.Draw(im).rectangle([0, 0, 9, 19], fill=(255, 255) if mode == "LA" else (255, 255, 255, 255))
    out = decode_image(encode(im, "PNG"), **LIMITS)
    assert out.mode == mode and "alpha flattened on black" in out.notes
    assert out.gray[:, :10].min() == 255 and out.gray[:, 10:].max() == 0


def test_bmp_and_1bit_decode() -> None:
    assert decode_image(encode(texture(20, 30), "BMP"), **LIMITS).format == "BMP"
    one_bit = Image.fromarray(texture(20, 30) > 128)
    out = decode_image(encode(one_bit, "PNG"), **LIMITS)
    assert out.bit_depth == 1 and set(np.unique(out.gray)) <= {0, 255}


def test_metadata_is_attached() -> None:
    out = decode_image(encode(texture(20, 20), "PNG"), **LIMITS)
    assert set(out.metadata) == {"instrument", "pixel_size_nm", "magnification", "hv_kv", "wd_mm"}


# --------------------------------------------------------------------------------------------------- decode: bad


def test_zero_byte_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert rejected_reason(empty) == "zero-byte file"
    assert rejected_reason(b"") == "zero-byte file"


def test_truncated_jpeg() -> None:
    data = encode(texture(120, 160), "JPEG", quality=90)
    reason = rejected_reason(data[: len(data) // 2])
    assert reason.startswith("truncated JPEG")


def test_truncated_png() -> None:
    data = encode(texture(120, 160), "PNG")
    reason = rejected_reason(data[: len(data) // 2])
    assert "PNG" in reason and ("truncated" in reason or "corrupt" in reason)


def test_corrupt_png_crc() -> None:
    data = bytearray(encode(texture(64, 64), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0xFF  # flip bits inside the compressed pixel data
    reason = rejected_reason(bytes(data))
    assert "PNG" in reason


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("Sample 4, 5 kV, tilted 52 degrees\nsecond line\n", encoding="utf-8")
    assert rejected_reason(path) == "not an image (content is text)"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"<!DOCTYPE html><html><body>404</body></html>", "not an image (content is HTML)"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "not an image (content is PDF)"),
        (b"PK\x03\x04\x14\x00\x00\x00", "not an image (content is ZIP archive)"),
    ],
)
def test_other_non_images(content: bytes, expected: str) -> None:
    assert rejected_reason(content) == expected


def test_random_bytes_are_not_an_image() -> None:
    blob = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert rejected_reason(blob).startswith("not an image")


def test_decompression_bomb_rejected_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = png_header_only(100_000, 100_000)  # 10^10 pixels declared, a few bytes of data
    decoded: list[int] = []

    def no_decoding(self: ImageFile.ImageFile) -> None:  # the pixels must never be read
        decoded.append(1)
        raise AssertionError("the bomb's pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    reason = rejected_reason(bomb)
    assert not decoded
    assert reason.startswith("decompression bomb")


def test_bomb_limit_is_max_pixels() -> None:
    reason = rejected_reason(png_header_only(9000, 9000), max_pixels=80_000_000)  # 81 Mpx
    assert reason == "decompression bomb: 9000x9000 exceeds max_pixels=80000000"
    small = encode(texture(32, 32), "PNG")
    assert rejected_reason(small, max_pixels=1000) == "decompression bomb: 32x32 exceeds max_pixels=1000"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # pytest resets the module's filter
def test_pillow_soft_limit_does_not_override_max_pixels() -> None:
    """9500x9500 = 90 Mpx is above Pillow's warning threshold (~89 Mpx) but below max_pixels=100 M: it gets as
    far as decoding (and fails there, having almost no data) instead of being called a bomb."""
    reason = rejected_reason(png_header_only(9500, 9500), max_pixels=100_000_000)
    assert not reason.startswith("decompression bomb") and "PNG" in reason


def test_bomb_warning_raised_as_error_is_a_rejection() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as under python -W error
        reason = rejected_reason(png_header_only(9500, 9500), max_pixels=100_000_000)
    assert reason == "decompression bomb: 90250000 pixels declared exceeds max_pixels=100000000"


def test_tiny_image_rejected() -> None:
    assert rejected_reason(encode(Image.new("L", (1, 1)), "PNG")) == "too small: 1x1 (min_side=16)"
    assert rejected_reason(encode(Image.new("L", (100, 8)), "PNG")) == "too small: 100x8 (min_side=16)"


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert rejected_reason(tmp_path / "nope.png") == "unreadable: file not found"
    assert rejected_reason(tmp_path).startswith("not a regular file")


# --------------------------------------------------------------------------------------------------- data bar


@pytest.mark.parametrize("size", [(256, 256), (480, 640), (768, 1024)])
@pytest.mark.parametrize("frac", [0.08, 0.10, 0.12])
@pytest.mark.parametrize(("bg", "fg"), [(0, 255), (255, 0), (40, 230)])
def test_databar_found_on_synthetic_bars(size: tuple[int, int], frac: float, bg: int, fg: int) -> None:
    arr, bar_h = with_databar(texture(*size, seed=int(frac * 100)), frac, bg, fg)
    assert find_databar(arr) == bar_h
    assert find_databar(roundtrip(arr, "JPEG", quality=85)) == bar_h


def test_databar_with_image_rows_below_it() -> None:
    """Older FEI/Philips XL files overlay the bar a little above the bottom edge: crop from its top down."""
    base = texture(480, 640, seed=3)
    arr, bar_h = with_databar(base, 0.1)
    arr = arr.copy()
    arr[-15:] = base[-15:]
    assert find_databar(arr) == bar_h


def test_databar_with_border_line_above_black_image() -> None:
    """FEI style: a full-width light rule on top of the bar; the image area above may be black too."""
    arr, bar_h = with_databar(np.zeros((471, 512), dtype=np.uint8), 29 / 471)
    arr = arr.copy()
    arr[471 - bar_h] = 252
    assert find_databar(arr) == bar_h


def _dark_bottom_cases() -> dict[str, np.ndarray]:
    h, w = 480, 640
    rng = np.random.default_rng(5)
    base = texture(h, w, seed=5)
    ramp = np.clip((np.arange(h) - h * 0.6) / (h * 0.3), 0, 1)[:, None]
    fading = np.clip(base * (1 - ramp), 0, 255).astype(np.uint8)
    padded = base.copy()
    padded[int(h * 0.8) :] = 0
    noisy = base.copy()
    noisy[int(h * 0.8) :] = np.clip(rng.normal(5, 6, (h - int(h * 0.8), w)), 0, 255)
    speckled = Image.fromarray(noisy)
    draw = ImageDraw.Draw(speckled)
    for _ in range(12):
        x, y, r = int(rng.integers(0, w)), int(rng.integers(int(h * 0.8), h)), int(rng.integers(3, 10))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=220)
    speckled_arr = np.clip(np.asarray(speckled) + rng.normal(0, 6, (h, w)), 0, 255).astype(np.uint8)
    return {
        "plain": base,
        "dark micrograph": texture(h, w, seed=6, mean=40, noise=10),
        "low-noise micrograph": texture(h, w, seed=7, noise=3),
        "fading to black": fading,
        "black padding without text": padded,
        "dark noisy bottom": noisy,
        "dark bottom with bright particles": speckled_arr,
        "horizontal gradient": np.tile(np.linspace(60, 200, w).astype(np.uint8), (h, 1)),
        "uniform grey": np.full((h, w), 128, np.uint8),
        "all black": np.zeros((h, w), np.uint8),
    }


@pytest.mark.parametrize("name", list(_dark_bottom_cases()))
def test_no_databar_no_crop(name: str) -> None:
    arr = _dark_bottom_cases()[name]
    assert find_databar(arr) == 0
    assert find_databar(roundtrip(arr, "JPEG", quality=85)) == 0


def test_databar_on_tiny_or_odd_input() -> None:
    assert find_databar(np.zeros((10, 10), np.uint8)) == 0
    assert find_databar(texture(39, 500)) == 0
    with pytest.raises(ValueError):
        find_databar(np.zeros((10, 10, 3), np.uint8))


# Bar heights checked by eye; the FEI ones equal the file's own [PrivateFei] DatabarHeight=29
# (471 rows - ResolutionY 442). The Zeiss bars include their black border lines; the XL bar is overlaid
# 21 rows above the bottom edge, and those rows are cropped with it.
REAL_BARS = {
    "rsciio__FEI-Helios-Ebeam-8bits.tif": 29,
    "rsciio__FEI-Helios-Ebeam-16bits.tif": 29,
    "rsciio__test_tiff_Zeiss_SEM_512pix.tif": 34,
    "rsciio__test_tiff_Zeiss_SEM_1k.tif": 77,
    "nanoballs__TestBlur.TIF": 61,
}


@pytest.mark.real_sem
def test_databar_on_real_files(real_sem_dir: Path) -> None:
    files = sorted(p for p in real_sem_dir.iterdir() if p.suffix.lower() in (".tif", ".jpg"))
    assert len(files) >= 10
    for path in files:
        decoded = decode_image(path, **LIMITS)
        rows = find_databar(decoded.gray)
        expected = REAL_BARS.get(path.name, 0)
        if expected:
            assert abs(rows - expected) <= 2, (path.name, rows, expected)
            assert rows < 0.15 * decoded.height
        else:
            assert rows == 0, (path.name, rows)


# --------------------------------------------------------------------------------------------------- standardize


def _pre(cache_size: int, crop_databar: bool) -> Preprocessor:
    return Preprocessor(cache_size, crop_databar, LIMITS["max_pixels"], LIMITS["min_side"])


def test_standardize_crops_and_squashes() -> None:
    arr, bar_h = with_databar(texture(300, 500, seed=2), 0.1)
    out, rows = _pre(64, True).standardize(arr)
    assert rows == bar_h
    assert out.shape == (64, 64) and out.dtype == np.uint8
    assert out[-3:].mean() > 60  # the black bar is gone from the bottom
    kept, none = _pre(64, False).standardize(arr)
    assert none == 0 and kept[-2:].mean() < 40
    cropped, again = _pre(64, True).crop(arr)
    assert again == bar_h and cropped.shape == (300 - bar_h, 500)
    np.testing.assert_array_equal(_pre(64, True).resize(cropped), out)


def test_standardize_upsamples_small_and_keeps_exact_size() -> None:
    arr = texture(20, 30)
    out, rows = _pre(256, True).standardize(arr)
    assert out.shape == (256, 256) and rows == 0
    same, _ = _pre(64, False).standardize(texture(64, 64))
    np.testing.assert_array_equal(same, texture(64, 64))


def test_tiles_are_cut_from_the_cropped_image_without_their_own_databar_search() -> None:
    arr, bar_h = with_databar(texture(300, 500, seed=3), 0.1)
    pre = _pre(32, True)
    full, rows = pre.crop(arr)
    assert rows == bar_h
    bottom = full.shape[0] - 128
    tiles = pre.tiles(full, [(0, 0), (bottom, 372)], 128)
    assert tiles.shape == (2, 32, 32) and tiles.dtype == np.uint8
    np.testing.assert_array_equal(tiles[1], pre.resize(full[bottom:, 372:]))
    # A tile holding a data bar of its own keeps it: a tile never gets a data-bar search.
    barred, _ = with_databar(texture(128, 128, seed=4), 0.15)
    np.testing.assert_array_equal(pre.tiles(barred, [(0, 0)], 128)[0], pre.resize(barred))
    assert pre.standardize(barred)[1] > 0


def test_preprocessor_config_round_trip() -> None:
    pre = Preprocessor(cache_size=128, crop_databar=False, max_pixels=5_000, min_side=20, image_size=64)
    config = pre.config()
    assert config == {"cache_size": 128, "crop_databar": False, "max_pixels": 5_000, "min_side": 20, "image_size": 64,
                      "min_contrast": IngestParams.min_contrast}  # fmt: skip
    assert Preprocessor.from_config({**config, "classes": ["A"], "chunk_size": 32}) == pre
    with pytest.raises(ImageRejected, match="max_pixels=5000"):
        pre.decode(encode(texture(100, 100), "PNG"))
    with pytest.raises(ValueError, match="no image_size"):
        Preprocessor(64, True, 10**6, 16).to_model_input(np.zeros((8, 8), np.uint8))


# ------------------------------------------------------------------------------------------ featureless frames


def _noisy(level: int, sigma: float, side: int = 64, seed: int = 0) -> np.ndarray:
    """A flat ``side``² frame at ``level`` with Gaussian noise of about ``sigma`` gray levels (already cache size)."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(level + rng.normal(0.0, sigma, (side, side))), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("level", [0, 128, 255])
def test_a_constant_frame_is_featureless(level: int) -> None:
    with pytest.raises(ImageRejected) as err:
        _pre(64, True).standardize(np.full((48, 64), level, np.uint8))
    assert err.value.reason == featureless_reason(0.0, DEFAULT_MIN_CONTRAST)
    assert err.value.reason.startswith("featureless image: gray levels vary by 0.00 (std) after the data-bar crop")
    assert "ingest.min_contrast=2;" in err.value.reason and "navigation-camera" in err.value.reason


def test_the_threshold_is_the_std_of_the_standardized_image() -> None:
    pre = _pre(64, False)  # 64² frames at cache size: the measured image is the frame itself
    below, above = _noisy(100, 1.5), _noisy(100, 2.6)
    assert 1.0 < gray_contrast(below) < DEFAULT_MIN_CONTRAST < gray_contrast(above) < 3.0
    with pytest.raises(ImageRejected, match=r"^featureless image: gray levels vary by 1\.\d\d \(std\)"):
        pre.standardize(below)
    out, _ = pre.standardize(above)
    np.testing.assert_array_equal(out, above)
    # The limit is the preprocessor's own: stricter refuses the noisier frame too, 0 turns the check off.
    with pytest.raises(ImageRejected, match="min_contrast=5;"):
        Preprocessor(64, False, 10**6, 16, min_contrast=5.0).standardize(above)
    blank = np.zeros((40, 40), np.uint8)
    assert Preprocessor(64, False, 10**6, 16, min_contrast=0.0).standardize(blank)[0].shape == (64, 64)


def test_a_reason_never_shows_the_limit_itself() -> None:
    """A value just below the limit is rounded down in the message, never up to the limit it failed."""
    assert "vary by 1.99 (std)" in featureless_reason(1.9999, 2.0)


def test_a_flat_frame_whose_only_structure_was_the_data_bar_is_refused_after_the_crop() -> None:
    """The FEI-Helios "metadata-only" files of ../shared/real_sem: a black image area and a data bar with text."""
    arr, bar_h = with_databar(np.full((300, 400), 40, np.uint8), 0.1)
    assert gray_contrast(arr) > 5 * DEFAULT_MIN_CONTRAST  # the bar alone makes the whole frame look varied
    assert _pre(64, True).crop(arr)[1] == bar_h
    with pytest.raises(ImageRejected, match=r"^featureless image: gray levels vary by 0\.00"):
        _pre(64, True).standardize(arr)
    with pytest.raises(ImageRejected, match=r"^featureless image"):
        _pre(64, True).standardize_file(encode(arr, "PNG"))
    assert _pre(64, False).standardize(arr)[1] == 0  # without the crop the bar is image content: accepted


def test_tiles_are_never_checked_for_features() -> None:
    """A flat background region of a real overview is still a tile to score (resize/tiles: no check)."""
    pre = _pre(32, True)
    flat = np.full((128, 128), 90, np.uint8)
    assert pre.resize(flat).std() == 0
    assert pre.tiles(flat, [(0, 0)], 128).shape == (1, 32, 32)


@pytest.mark.parametrize(
    "value",
    [-1.0, float("nan"), float("inf"), "2.0", None, True],
    ids=["negative", "nan", "inf", "str", "none", "bool"],
)
def test_a_bad_min_contrast_is_refused_naming_the_key(value: object) -> None:
    config = {**_pre(64, True).config(), "min_contrast": value}
    with pytest.raises(ValueError, match=r"min_contrast must be a finite number >= 0"):
        Preprocessor.from_config(config)


def test_min_contrast_travels_in_the_serving_config() -> None:
    pre = Preprocessor(64, True, 10**6, 16, image_size=32, min_contrast=3.5)
    assert pre.config()["min_contrast"] == 3.5
    assert Preprocessor.from_config(pre.config()) == pre
    older = {k: v for k, v in pre.config().items() if k != "min_contrast"}  # a model registered before the check
    assert Preprocessor.from_config(older).min_contrast == DEFAULT_MIN_CONTRAST == IngestParams.min_contrast == 2.0
    assert Preprocessor.from_config({**older, "min_contrast": 3}).min_contrast == 3  # JSON may carry an int


def test_probe_reads_the_header_only() -> None:
    header = probe_image(encode(texture(40, 70), "PNG"), max_pixels=10)
    assert (header.format, header.width, header.height) == ("PNG", 70, 40)
    big = probe_image(png_header_only(12_000, 10_000), max_pixels=10)  # no pixel decoded: no memory spent
    assert (big.width, big.height) == (12_000, 10_000)
    with pytest.raises(ImageRejected, match="decompression bomb"):  # beyond what Pillow opens at all
        probe_image(png_header_only(50_000, 40_000), max_pixels=10)
    with pytest.raises(ImageRejected, match="content is text"):
        probe_image(b"hello, a text file\n" * 4, max_pixels=10)
    with pytest.raises(ImageRejected, match=r"decompression bomb: 70x40 exceeds max_pixels=2799"):
        check_pixels(70, 40, 2799)
    check_pixels(70, 40, 2800)


# --------------------------------------------------------------------------------------------------- hashing


def test_dhash_format_and_hamming() -> None:
    h = dhash(texture(100, 100))
    assert len(h) == 16 and int(h, 16) >= 0 and h == h.lower()
    assert hamming(h, h) == 0
    assert hamming("0" * 16, "f" * 16) == 64
    assert hamming("0" * 15 + "1", "0" * 16) == 1


def test_dhash_is_robust_to_noise_and_brightness_but_tells_images_apart() -> None:
    a = texture(256, 256, seed=10)
    rng = np.random.default_rng(0)
    noisy = np.clip(a.astype(float) * 1.05 + 12 + rng.normal(0, 4, a.shape), 0, 255).astype(np.uint8)
    jpeg = roundtrip(a, "JPEG", quality=70)
    smaller = np.asarray(Image.fromarray(a).resize((128, 128), Image.Resampling.LANCZOS))
    other = texture(256, 256, seed=11)
    assert hamming(dhash(a), dhash(a.copy())) == 0
    assert hamming(dhash(a), dhash(noisy)) <= 6
    assert hamming(dhash(a), dhash(jpeg)) <= 6
    assert hamming(dhash(a), dhash(smaller)) <= 6
    assert hamming(dhash(a), dhash(other)) >= 16


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    assert rejected_reason(fifo) == "not a regular file"


@pytest.mark.parametrize("shape", [(7, 5), (300, 512), (1500, 4992)])
def test_row_histograms_in_bands_equal_one_bincount_per_row(shape: tuple[int, int]) -> None:
    # find_databar's per-row histograms are counted in cache-sized bands of rows (several bands for the widest
    # shape here): every row's counts must be exactly its own histogram, wherever the band edges fall.
    from emassist.data.databar import _BAND_PIXELS, _row_hist

    rows, cols = shape
    region = np.random.default_rng(3).integers(0, 256, (rows, 2 * cols), dtype=np.uint8)[:, ::2]  # as searched
    cum = _row_hist(region)
    expected = np.stack([np.bincount(row, minlength=256) for row in region])
    assert cum.shape == (shape[0], 257) and (cum[:, 0] == 0).all()
    assert (np.diff(cum, axis=1) == expected).all()
    if shape[1] == 4992:
        assert shape[0] * shape[1] > 2 * _BAND_PIXELS  # the case really spans several bands
