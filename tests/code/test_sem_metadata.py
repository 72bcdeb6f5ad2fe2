"""emassist.data.sem_metadata: vendor tags of real microscope files, synthetic tags, and garbage that must not raise."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin

from emassist.data.sem_metadata import (
    METADATA_KEYS,
    parse_fei,
    parse_sidecar_text,
    parse_zeiss,
    read_sem_metadata,
)

# Values read out of the files' own tags (see ../shared/real_sem/SOURCES.md):
# - Zeiss: AP_WIDTH / image width for the pixel size (AP_PIXEL_SIZE is per scan-store pixel: the 512-pixel file
#   was saved from a 1024 scan, "Pixel Size = 5.825 nm", "Width = 5.965 µm"), AP_MAG, AP_ACTUALKV, AP_WD, DP_SEM or
#   the serial number.
# - FEI Helios: [Scan] PixelWidth=3.3724e-006 m, [Beam] HV=5000 V, [EBeam] WD=0.00403466 m, mag =
#   [Image] MagCanvasRealWidth 0.2072 / HFW 0.00172667 = 120 (the data bar shows "120 x").
# - FEI/Philips XL: [DatabarData] flAccV=5000.000, flWD=4.828 (mm), [Vector] Magnification=12000.
REAL: dict[str, dict[str, Any]] = {
    "rsciio__test_tiff_Zeiss_SEM_512pix.tif": {
        "instrument": "Zeiss ULTRA 55", "pixel_size_nm": 5965.0 / 512, "magnification": 50000.0,
        "hv_kv": 5.0, "wd_mm": 3.9,
    },
    "rsciio__test_tiff_Zeiss_SEM_1k.tif": {
        "instrument": "Zeiss Merlin", "pixel_size_nm": 2.677e6 / 1024, "magnification": 105.0,
        "hv_kv": 25.0, "wd_mm": 14.808,
    },
    "rsciio__ZEISS_SEM_multipage.tif": {
        "instrument": "Zeiss Auriga 60", "pixel_size_nm": 25240.0 / 2048, "magnification": 4530.0,
        "hv_kv": 1.8, "wd_mm": 4.5,
    },
    "rsciio__FEI-Helios-Ebeam-8bits.tif": {
        "instrument": "FEI Helios NanoLab 660", "pixel_size_nm": 3372.4, "magnification": 120.0,
        "hv_kv": 5.0, "wd_mm": 4.03466,
    },
    "rsciio__FEI-Helios-Ebeam-16bits.tif": {
        "instrument": "FEI Helios NanoLab 660", "pixel_size_nm": 3372.4, "magnification": 120.0,
        "hv_kv": 5.0, "wd_mm": 4.03466,
    },
    "openfibsem__detection_test_image_2.tif": {
        "instrument": "FEI Helios G4 PFIB UNSPE", "pixel_size_nm": 97.6562, "magnification": None,
        "hv_kv": 30.0, "wd_mm": 16.5,
    },
    "nanoballs__TestBlur.TIF": {
        "instrument": "FEI/Philips XL", "pixel_size_nm": None, "magnification": 12000.0,
        "hv_kv": 5.0, "wd_mm": 4.828,
    },
    # Malformed tag: HV=notafloat and empty beam values -> None, never an exception.
    "rsciio__FEI-Helios-navcam-with-no-IRBeam-bad-floats.tif": {
        "instrument": "FEI Helios NanoLab 660", "pixel_size_nm": None, "magnification": None,
        "hv_kv": None, "wd_mm": None,
    },
    # Re-saved with tifffile: no vendor tags at all.
    "openfibsem__detection_test_image.tif": dict.fromkeys(METADATA_KEYS),
    "saemi__demo_img.jpg": dict.fromkeys(METADATA_KEYS),
}  # fmt: skip


def assert_metadata(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert set(got) == set(METADATA_KEYS)
    for key, value in expected.items():
        if value is None or isinstance(value, str):
            assert got[key] == value, (key, got[key], value)
        else:
            assert got[key] == pytest.approx(value, rel=2e-3), (key, got[key], value)


@pytest.mark.real_sem
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_files(real_sem_dir: Path, name: str) -> None:
    with Image.open(real_sem_dir / name) as im:
        assert_metadata(read_sem_metadata(im), REAL[name])


@pytest.mark.real_sem
def test_every_real_file_reads_without_error(real_sem_dir: Path) -> None:
    for path in sorted(real_sem_dir.iterdir()):
        if path.suffix.lower() not in (".tif", ".jpg"):
            continue
        with Image.open(path) as im:
            meta = read_sem_metadata(im)
        assert set(meta) == set(METADATA_KEYS)
        for key in ("pixel_size_nm", "magnification", "hv_kv", "wd_mm"):
            assert meta[key] is None or (isinstance(meta[key], float) and meta[key] > 0)


# --------------------------------------------------------------------------------------------------- synthetic


def tiff_with_tags(tags: dict[int, str]) -> Image.Image:
    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    for tag, text in tags.items():
        ifd[tag] = text
        ifd.tagtype[tag] = 2  # ASCII
    buf = io.BytesIO()
    Image.fromarray(np.zeros((20, 40), np.uint8)).save(buf, format="TIFF", tiffinfo=ifd)
    return Image.open(io.BytesIO(buf.getvalue()))


ZEISS = (
    "0\r\n0\r\nDP_SEM\r\nSem = Sigma\r\nAP_PIXEL_SIZE\r\nPixel Size = 1.5 µm\r\nAP_MAG\r\nMag =  4.53 K X\r\n"
    "AP_ACTUALKV\r\nEHT =  15.00 kV\r\nAP_WD\r\nWD =  8.5 mm\r\n"
)
FEI = """[System]
SystemType=Quanta 250 FEG
[Beam]
HV=20000
Beam=EBeam
[EBeam]
HV=20000
HFW=0.000512
WD=0.0101
[Scan]
PixelWidth=5e-010
[Image]
MagCanvasRealWidth=0.128
"""


JEOL = (
    "$CM_FORMAT JEOL/SEM\n$CM_INSTRUMENT JSM-7600F\n$CM_MAG 20000\n$CM_ACCEL_VOLT 15.00\n"
    "$SM_WD 8.0\n$$SM_MICRON_BAR 120\n$$SM_MICRON_MARKER 1um\n"
)
HITACHI = (
    "[SemImageFile]\nInstructName=S-4800\nMagnification=50000\nAcceleratingVoltage=15000 Volt\n"
    "WorkingDistance=8100 um\nPixelSize=2.480469\n"
)
# vendor -> (TIFF tag, its text, what read_sem_metadata makes of it)
SYNTHETIC: dict[str, tuple[int, str, dict[str, Any]]] = {
    "zeiss": (34118, ZEISS, {"instrument": "Zeiss Sigma", "pixel_size_nm": 1500.0, "magnification": 4530.0,
                             "hv_kv": 15.0, "wd_mm": 8.5}),
    "fei": (34682, FEI, {"instrument": "FEI Quanta 250 FEG", "pixel_size_nm": 0.5, "magnification": 250.0,
                         "hv_kv": 20.0, "wd_mm": 10.1}),
    "jeol": (270, JEOL, {"instrument": "JEOL JSM-7600F", "magnification": 20000.0, "hv_kv": 15.0, "wd_mm": 8.0,
                         "pixel_size_nm": 1000.0 / 120}),  # the description tag
    "hitachi": (270, HITACHI, {"instrument": "Hitachi S-4800", "magnification": 50000.0, "hv_kv": 15.0,
                               "wd_mm": 8.1, "pixel_size_nm": 2.480469}),  # the description tag
}  # fmt: skip


@pytest.mark.parametrize("vendor", sorted(SYNTHETIC))
def test_vendor_tag(vendor: str) -> None:
    tag, text, expected = SYNTHETIC[vendor]
    assert_metadata(read_sem_metadata(tiff_with_tags({tag: text})), expected)


def test_zeiss_width_over_pixels_wins() -> None:
    meta = parse_zeiss(ZEISS + "AP_WIDTH\r\nWidth = 60.00 µm\r\n", image_width=1024)
    assert meta["pixel_size_nm"] == pytest.approx(60000 / 1024)


def test_zeiss_manual_kv_and_serial_number_fallbacks() -> None:
    meta = parse_zeiss("AP_MANUALKV\nEHT Target = 3.00 kV\nSV_SERIAL_NUMBER\nSerial No. = SUPRA 40-12-34\n")
    assert meta["hv_kv"] == 3.0 and meta["instrument"] == "Zeiss SUPRA 40"


def test_fei_sfeg_tag_number_is_read_too() -> None:
    assert read_sem_metadata(tiff_with_tags({34680: FEI}))["hv_kv"] == 20.0


@pytest.mark.parametrize("garbage", ["notafloat", "", "nan", "inf", "-5", "1e999", "0x1F", "None"])
def test_garbage_values_become_none(garbage: str) -> None:
    text = FEI.replace("HV=20000", f"HV={garbage}").replace("PixelWidth=5e-010", f"PixelWidth={garbage}")
    parsed = parse_fei(text)  # the raw parser may keep e.g. a negative number ...
    assert parsed["hv_kv"] is None or parsed["hv_kv"] <= 0
    meta = read_sem_metadata(tiff_with_tags({34682: text}))  # ... the public reader never does
    assert meta["hv_kv"] is None and meta["pixel_size_nm"] is None
    assert meta["instrument"] == "FEI Quanta 250 FEG"


@pytest.mark.parametrize(
    "text",
    ["", "[", "=", "\x00\x01\x02", "[Scan]\nPixelWidth", "AP_MAG", "AP_MAG\nMag = K X", "$CM_MAG", "$$$$"],
)
def test_malformed_text_never_raises(text: str) -> None:
    for tag in (34118, 34680, 34682, 270):
        meta = read_sem_metadata(tiff_with_tags({tag: text}) if text else tiff_with_tags({tag: " "}))
        assert set(meta) == set(METADATA_KEYS)


def test_generic_keys_in_a_png_text_chunk() -> None:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Description", "PixelSize=3.2 nm\nMagnification=10 kX\nAcceleratingVoltage=2 kV\n")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(buf, format="PNG", pnginfo=info)
    meta = read_sem_metadata(Image.open(io.BytesIO(buf.getvalue())))
    assert meta["pixel_size_nm"] == 3.2 and meta["magnification"] == 10000.0 and meta["hv_kv"] == 2.0


def test_sidecar_parser_alone() -> None:
    meta = parse_sidecar_text("$CM_MAG 1500\n$CM_ACCEL_VOLT 5000\n")
    assert meta["magnification"] == 1500.0 and meta["hv_kv"] == 5.0  # volts recognised by size


def test_plain_image_has_no_metadata() -> None:
    assert read_sem_metadata(Image.new("L", (8, 8))) == dict.fromkeys(METADATA_KEYS)
