"""Pixel size end to end: real microscope bars against their tags, 200 demo bars against the generator's truth,
ingest without an OCR engine, and the validation warning when tags and bar disagree."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from emassist.config.classes import CLASSES
from emassist.config.settings import DemoParams
from emassist.data import ingest as ingest_mod
from emassist.data import scalebar
from emassist.data.databar import find_databar
from emassist.data.decode import decode_image
from emassist.data.demo.generate import generate_demo, plan
from emassist.data.demo.sem_look import draw_databar, scale_bar_choice
from emassist.data.ingest import run_ingest
from emassist.data.scalebar import read_databar

needs_tesseract = pytest.mark.skipif(scalebar.tessdata_dir() is None, reason="Tesseract's English model not installed")

REAL_WITH_TAGS_AND_BAR = (
    "rsciio__FEI-Helios-Ebeam-8bits.tif",
    "rsciio__test_tiff_Zeiss_SEM_512pix.tif",
    "rsciio__test_tiff_Zeiss_SEM_1k.tif",
)
DEMO = DemoParams(n_images=200, width=256, height=256, seed=11, min_per_class=20, tif_fraction=0.1,
                  databar_fraction=1.0)  # fmt: skip


def _ingest(raw: Path, out: Path, **kwargs: object) -> pd.DataFrame:
    summary = run_ingest(raw, out, classes=CLASSES, cache_size=64, max_pixels=10**8, min_side=16,
                         crop_databar=True, progress=False, read_databar=True, **kwargs)  # type: ignore[arg-type]  # fmt: skip
    frame = pd.read_parquet(out / ingest_mod.MANIFEST_FILE)
    frame.attrs["summary"] = summary
    return frame


@needs_tesseract
@pytest.mark.parametrize("name", REAL_WITH_TAGS_AND_BAR)
def test_real_bars_agree_with_their_tags(real_sem_dir: Path, name: str) -> None:
    decoded = decode_image(real_sem_dir / name, max_pixels=10**8, min_side=16)
    rows = find_databar(decoded.gray)
    tags = decoded.metadata["pixel_size_nm"]
    for label_first in (True, False):
        reading = read_databar(decoded.gray[decoded.height - rows :], decoded.width, label_first=label_first)
        assert reading.pixel_size_nm is not None, reading.reason
        assert reading.pixel_size_nm == pytest.approx(tags, rel=0.05), (label_first, reading.source, reading.text)


@needs_tesseract
def test_real_fei_xl_bar_reads_the_tags_magnification(real_sem_dir: Path) -> None:
    """The FEI/Philips XL file's tags hold no pixel size: its bar's magnification (read with the whole bar) must match
    the tags', and its scale bar (5 µm) gives the pixel size, whether its label is read alone first or not."""
    decoded = decode_image(real_sem_dir / "nanoballs__TestBlur.TIF", max_pixels=10**8, min_side=16)
    rows = find_databar(decoded.gray)
    bar = decoded.gray[decoded.height - rows :]
    whole = read_databar(bar, decoded.width, label_first=False)
    assert whole.magnification == pytest.approx(decoded.metadata["magnification"], rel=0.05)
    quick = read_databar(bar, decoded.width)
    for reading in (whole, quick):
        assert reading.source == "databar_scalebar" and reading.label_nm == 5000
    assert quick.pixel_size_nm == pytest.approx(whole.pixel_size_nm)


@needs_tesseract
@pytest.mark.parametrize("width", [256, 512])
def test_every_demo_scale_bar_label_is_read(width: int) -> None:
    """Every label the demo draws (20 nm … 500 µm, the 1-2-5 series over its pixel sizes) is read off the bar,
    at bar heights across the generator's range (eight random streams per label)."""
    misses = []
    for nm in (20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000):
        pixel_nm = nm / (0.25 * width)
        assert scale_bar_choice(pixel_nm, width)[0] == nm
        for seed in range(8):
            img = draw_databar(np.full((width, width), 0.5, np.float32), np.random.default_rng(seed), pixel_nm)
            g = (img * 255 + 0.5).astype(np.uint8)
            rows = find_databar(g)
            reading = read_databar(g[width - rows :], width)
            if reading.pixel_size_nm is None or abs(reading.pixel_size_nm / pixel_nm - 1) > 0.05:
                misses.append((nm, seed, reading.text, reading.pixel_size_nm))
    assert not misses


@pytest.fixture(scope="module")
def demo_ingested(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    if scalebar.tessdata_dir() is None:
        pytest.skip("Tesseract's English model not installed (apt-get install tesseract-ocr)")
    root = tmp_path_factory.mktemp("pixelsize")
    generate_demo(root / "raw", DEMO, progress=False)
    return root, _ingest(root / "raw", root / "out")


def test_demo_bars_give_the_true_pixel_size(demo_ingested: tuple[Path, pd.DataFrame]) -> None:
    root, manifest = demo_ingested
    counts = {c: len(list((root / "raw" / c).iterdir())) for c in CLASSES}
    jobs = plan(root / "raw", counts, width=256, height=256, seed=DEMO.seed, tif_fraction=DEMO.tif_fraction,
                databar_fraction=DEMO.databar_fraction)  # fmt: skip
    truth = {f"{j.class_name}/{j.name}": j.pixel_size_nm for j in jobs}
    assert len(manifest) == 200
    ratio = manifest["databar_pixel_size_nm"] / manifest["source_path"].map(truth)
    within = ((ratio - 1).abs() <= 0.05).mean()
    assert within >= 0.95, manifest.loc[(ratio - 1).abs() > 0.05, ["source_path", "databar_text"]]
    tif = manifest["format"] == "TIFF"
    assert (manifest.loc[tif, "pixel_size_source"] == "tags").all()  # the TIFF share carries the truth in tags
    assert ((manifest.loc[tif, "pixel_size_nm"] / manifest.loc[tif, "source_path"].map(truth) - 1).abs() < 1e-4).all()
    assert set(manifest.loc[~tif, "pixel_size_source"]) <= {"databar_scalebar", "databar_mag", "unknown"}
    assert (manifest["databar_text"].str.len() > 0).all()


def test_tags_and_bar_disagreeing_is_a_validation_warning(demo_ingested: tuple[Path, pd.DataFrame]) -> None:
    from emassist.data.validation import CONFLICT_COLUMN, build_tables, validate_tables

    _, manifest = demo_ingested
    empty = pd.DataFrame(columns=["source_path", "label", "reason"])
    before = int(build_tables(manifest, empty, CLASSES)["manifest"][CONFLICT_COLUMN].notna().sum())
    manifest = manifest.copy()
    tags = manifest["pixel_size_source"] == "tags"
    agree = tags & ((manifest["databar_pixel_size_nm"] / manifest["pixel_size_nm"] - 1).abs() < 0.05)
    tif = manifest.index[agree][0]
    manifest.loc[tif, "databar_pixel_size_nm"] = manifest.loc[tif, "pixel_size_nm"] * 3
    tables = build_tables(manifest, empty, CLASSES)
    assert tables["manifest"][CONFLICT_COLUMN].notna().sum() == before + 1
    report = validate_tables(tables, CLASSES, min_per_class=1, max_rejected_fraction=0.5, min_side=16, max_side=10**4)
    assert report.success  # a warning, never fatal
    warned = " ".join(o.describe() for o in report.warnings if o.column == CONFLICT_COLUMN)
    assert manifest.loc[tif, "source_path"] in warned and "tags used" in warned


def test_ingest_without_the_engine_completes_with_one_notice(
    demo_ingested: tuple[Path, pd.DataFrame], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = demo_ingested
    raw = tmp_path / "raw"
    for cls in CLASSES[:2]:
        shutil.copytree(root / "raw" / cls, raw / cls)
    monkeypatch.setenv("TESSDATA_PREFIX", str(tmp_path / "no-tessdata"))  # no model: no engine
    manifest = _ingest(raw, tmp_path / "out", workers=1)
    summary = manifest.attrs["summary"]
    assert summary.n_rejected == 0 and summary.n_accepted == len(manifest) > 0
    assert len(summary.notices) == 1 and "not read" in summary.notices[0] and "note:" in str(summary)
    no_tags = manifest["format"] != "TIFF"
    assert (manifest.loc[no_tags, "pixel_size_source"] == "unknown").all()
    assert manifest.loc[no_tags, "pixel_size_reason"].str.contains("not read").all()
