"""emassist.data.ingest: every file lands in exactly one of manifest.parquet / rejected.csv, atomically."""

from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

import emassist.data.ingest as ingest_mod
from emassist.config.classes import CLASSES
from emassist.data.ingest import IngestSummary, run_ingest
from emassist.data.preprocess import Preprocessor
from tests import helpers
from tests.helpers import encode, png_header_only

SETTINGS: dict[str, Any] = {
    "classes": CLASSES,
    "cache_size": 32,
    "max_pixels": 1_000_000,
    "min_side": 16,
    "crop_databar": True,
    "progress": False,
}


# --------------------------------------------------------------------------------------------------- fixtures


def texture(h: int, w: int, seed: int) -> np.ndarray:
    """The shared SEM-like micrograph (:func:`tests.helpers.texture`) with this file's pixel noise."""
    return helpers.texture(h, w, seed, noise=15.0)


def write(root: Path, rel: str, data: bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


ACCEPTED = {
    "Particles/good_1.png",
    "Particles/good_2.jpg",
    "Particles/with_bar.png",
    "Particles/dup_a.png",
    "Fibres/dup_b.png",
    "Fibres/no_extension",
    "Nanowires/sixteen.tif",
    "Nanowires/pages.tif",
    "Powder/cmyk.jpg",
    "Powder/palette.png",
    "Biological/sub dir/é ü 名前 with spaces.png",
    "Tips/link_inside.png",
}
REJECTED = {
    "Fibres/empty.jpg": "zero-byte file",
    "Fibres/truncated.jpg": "truncated JPEG",
    "Fibres/notes.png": "not an image (content is text)",
    "Powder/bomb.png": "decompression bomb: 10000000000 pixels declared exceeds max_pixels=1000000",
    "Powder/small_bomb.png": "decompression bomb: 9000x9000 exceeds max_pixels=1000000",
    "Powder/tiny.png": "too small: 1x1 (min_side=16)",
    "Foo/stray.png": "unknown class folder 'Foo' (known: Biological, Fibres,",
    "Tips/link_outside.png": "symlink pointing outside raw_dir",
    "Tips/broken_link.png": "broken symlink",
    "Tips/linked_folder": "symlink to a folder (not followed)",
    "Biological/.DS_Store": "hidden file or folder '.DS_Store'",
    "Biological/.thumbs/x.png": "hidden file or folder '.thumbs'",
    "top_level.png": "not inside a class folder",
    "Porous_Sponge/pipe": "not a regular file (fifo)",
    "Powder/blank.png": "featureless image: gray levels vary by 0.00 (std) after the data-bar crop",
    "Tips/bar_only.png": "featureless image: gray levels vary by 0.00 (std) after the data-bar crop",
}


def build_raw(root: Path) -> Path:
    raw = root / "raw"
    good = encode(texture(48, 64, 1), "PNG")
    write(raw, "Particles/good_1.png", good)
    write(raw, "Particles/good_2.jpg", encode(texture(60, 80, 2), "JPEG", quality=90))
    bar = texture(200, 240, 3)
    bar[-20:] = 0
    img = Image.fromarray(bar)
    ImageDraw.Draw(img).text((5, 183), "HV 5.00 kV  mag 50 000x  200 nm", fill=255)
    ImageDraw.Draw(img).rectangle([150, 192, 220, 194], fill=255)
    write(raw, "Particles/with_bar.png", encode(img, "PNG"))
    dup = encode(texture(40, 40, 4), "PNG")
    write(raw, "Particles/dup_a.png", dup)
    write(raw, "Fibres/dup_b.png", dup)
    write(raw, "Fibres/no_extension", encode(texture(32, 32, 5), "PNG"))
    ramp = np.linspace(1000, 1200, 64 * 48).reshape(48, 64).astype(np.uint16)
    write(raw, "Nanowires/sixteen.tif", encode(Image.fromarray(ramp), "TIFF"))
    pages = [Image.fromarray(texture(32, 32, s)) for s in (6, 7, 8)]
    write(raw, "Nanowires/pages.tif", encode(pages[0], "TIFF", save_all=True, append_images=pages[1:]))
    write(raw, "Powder/cmyk.jpg", encode(Image.fromarray(texture(40, 40, 12)).convert("CMYK"), "JPEG"))
    pal = Image.fromarray(texture(32, 32, 9)).convert("P")
    write(raw, "Powder/palette.png", encode(pal, "PNG", transparency=0))
    write(raw, "Biological/sub dir/é ü 名前 with spaces.png", encode(texture(30, 40, 10), "PNG"))
    (raw / "Tips").mkdir()
    os.symlink(raw / "Particles/good_1.png", raw / "Tips/link_inside.png")

    write(raw, "Fibres/empty.jpg", b"")
    jpeg = encode(texture(120, 160, 11), "JPEG", quality=90)
    write(raw, "Fibres/truncated.jpg", jpeg[: len(jpeg) // 2])
    write(raw, "Fibres/notes.png", b"operator notes: sample 3 charged badly\n")
    write(raw, "Powder/bomb.png", png_header_only(100_000, 100_000))  # beyond Pillow's own hard limit
    write(raw, "Powder/small_bomb.png", png_header_only(9_000, 9_000))  # only beyond our max_pixels
    write(raw, "Powder/tiny.png", encode(Image.new("L", (1, 1)), "PNG"))
    write(raw, "Foo/stray.png", good)
    outside = write(root, "outside/secret.png", good)
    os.symlink(outside, raw / "Tips/link_outside.png")
    os.symlink(raw / "Tips/missing.png", raw / "Tips/broken_link.png")
    os.symlink(raw / "Particles", raw / "Tips/linked_folder")
    write(raw, "Biological/.DS_Store", b"\x00\x00\x00\x01Bud1")
    write(raw, "Biological/.thumbs/x.png", good)
    write(raw, "top_level.png", good)
    (raw / "Porous_Sponge").mkdir()
    os.mkfifo(raw / "Porous_Sponge/pipe")
    write(raw, "Powder/blank.png", encode(np.zeros((40, 48), np.uint8), "PNG"))  # a navigation-camera frame
    flat, _ = helpers.with_databar(np.full((180, 240), 30, np.uint8))  # nothing to see but the data bar
    write(raw, "Tips/bar_only.png", encode(flat, "PNG"))
    return raw


def all_entries(raw: Path) -> set[str]:
    """What a plain walk sees: files, links, fifos (and linked folders as single entries)."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(raw):
        for name in filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
            found.add((Path(dirpath) / name).relative_to(raw).as_posix())
    return found


def load(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.read_parquet(out / "manifest.parquet"), pd.read_csv(out / "rejected.csv", keep_default_na=False)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, IngestSummary]:
    root = tmp_path_factory.mktemp("ingest")
    raw = build_raw(root)
    out = root / "interim"
    summary = run_ingest(raw, out, workers=2, **SETTINGS)
    return raw, out, summary


# --------------------------------------------------------------------------------------------------- outcomes


def test_every_file_lands_in_exactly_one_table(ingested: tuple[Path, Path, IngestSummary]) -> None:
    raw, out, summary = ingested
    manifest, rejected = load(out)
    accepted, refused = set(manifest["source_path"]), set(rejected["source_path"])
    assert accepted.isdisjoint(refused)
    assert accepted | refused == all_entries(raw)
    assert len(manifest) == len(accepted) and len(rejected) == len(refused)  # no duplicates either
    assert summary.n_files == len(all_entries(raw)) == summary.n_accepted + summary.n_rejected


def test_expected_files_accepted(ingested: tuple[Path, Path, IngestSummary]) -> None:
    _, out, _ = ingested
    manifest, _ = load(out)
    assert set(manifest["source_path"]) == ACCEPTED


@pytest.mark.parametrize("source_path", sorted(REJECTED))
def test_bad_inputs_rejected_with_reason(ingested: tuple[Path, Path, IngestSummary], source_path: str) -> None:
    _, out, _ = ingested
    _, rejected = load(out)
    row = rejected[rejected["source_path"] == source_path]
    assert len(row) == 1, f"{source_path} not in rejected.csv"
    assert row["reason"].iloc[0].startswith(REJECTED[source_path])
    expected_label = source_path.split("/")[0] if "/" in source_path else ""
    assert row["label"].iloc[0] == expected_label


def test_manifest_schema_and_order(ingested: tuple[Path, Path, IngestSummary]) -> None:
    from emassist.data.validation import MANIFEST_COLUMNS, load_ingest_outputs

    _, out, _ = ingested
    manifest, rejected = load_ingest_outputs(out)
    assert tuple(manifest.columns) == MANIFEST_COLUMNS == ingest_mod.MANIFEST_COLUMNS
    assert list(rejected.columns) == ["source_path", "label", "reason"]
    assert list(manifest["source_path"]) == sorted(manifest["source_path"])
    assert list(rejected["source_path"]) == sorted(rejected["source_path"])
    for col in ("width", "height", "bit_depth", "file_size", "n_frames", "databar_rows"):
        assert manifest[col].dtype == "int64"
    for col in ("pixel_size_nm", "magnification", "hv_kv", "wd_mm"):
        assert manifest[col].dtype == "float64"
    assert manifest["sha256"].str.fullmatch(r"[0-9a-f]{64}").all()
    assert manifest["dhash"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert (manifest["image_path"] == "images/" + manifest["sha256"] + ".png").all()
    assert (manifest["label"] == manifest["source_path"].str.split("/").str[0]).all()


def test_cached_pngs(ingested: tuple[Path, Path, IngestSummary]) -> None:
    raw, out, _ = ingested
    manifest, _ = load(out)
    for row in manifest.itertuples():
        with Image.open(out / row.image_path) as im:
            assert im.mode == "L" and im.size == (32, 32)
        assert row.file_size == (raw / row.source_path).stat().st_size
    pngs = {p.name for p in (out / "images").iterdir()}
    assert pngs == {f"{sha}.png" for sha in manifest["sha256"]}  # nothing else, no temp files


def test_row_details(ingested: tuple[Path, Path, IngestSummary]) -> None:
    _, out, summary = ingested
    manifest, _ = load(out)
    rows = manifest.set_index("source_path")
    assert rows.loc["Particles/dup_a.png", "image_path"] == rows.loc["Fibres/dup_b.png", "image_path"]
    assert summary.n_unique == manifest["sha256"].nunique() < len(manifest)
    assert rows.loc["Particles/with_bar.png", "databar_rows"] == 20
    assert rows.loc["Particles/good_1.png", "databar_rows"] == 0
    sixteen = rows.loc["Nanowires/sixteen.tif"]
    assert (sixteen["bit_depth"], sixteen["mode"], sixteen["format"]) == (16, "I;16", "TIFF")
    with Image.open(out / sixteen["image_path"]) as im:
        cached = np.asarray(im)
    assert cached.min() <= 5 and cached.max() >= 250  # contrast preserved through the cache
    pages = rows.loc["Nanowires/pages.tif"]
    assert pages["n_frames"] == 3 and "first of 3 pages" in pages["notes"]
    assert "CMYK converted" in rows.loc["Powder/cmyk.jpg", "notes"]
    assert "flattened on black" in rows.loc["Powder/palette.png", "notes"]
    assert rows.loc["Fibres/no_extension", "format"] == "PNG"
    assert rows.loc["Tips/link_inside.png", "sha256"] == rows.loc["Particles/good_1.png", "sha256"]


def test_summary(ingested: tuple[Path, Path, IngestSummary]) -> None:
    _, out, summary = ingested
    manifest, rejected = load(out)
    assert summary.n_accepted == len(manifest) and summary.n_rejected == len(rejected)
    assert list(summary.per_class) == list(CLASSES)
    assert summary.per_class["Particles"] == 4 and summary.per_class["Fibres"] == 2
    assert summary.seconds > 0
    text = str(summary)
    assert "accepted" in text and "Particles" in text and "(other folders)" in text
    assert "zero-byte file" in text
    assert summary.reasons["featureless image"] == 2  # its own kind in the summary (and in the validate report)


def test_serial_and_parallel_runs_agree(ingested: tuple[Path, Path, IngestSummary], tmp_path: Path) -> None:
    raw, out, _ = ingested
    run_ingest(raw, tmp_path / "serial", workers=1, **SETTINGS)
    for a, b in zip(load(out), load(tmp_path / "serial"), strict=True):
        pd.testing.assert_frame_equal(a, b)
    assert sorted(os.listdir(out / "images")) == sorted(os.listdir(tmp_path / "serial" / "images"))


# --------------------------------------------------------------------------------------------------- failures


def small_raw(root: Path, n: int = 6) -> Path:
    raw = root / "raw"
    for i in range(n):
        write(raw, f"{CLASSES[i % 3]}/img_{i}.png", encode(texture(24, 24, 100 + i), "PNG"))
    return raw


def test_unreadable_file_real_permissions(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root from reading (see the simulated test)")
    raw = small_raw(tmp_path)
    locked = raw / "Fibres/img_1.png"
    locked_dir = raw / "Fibres/locked"
    write(raw, "Fibres/locked/inside.png", encode(texture(24, 24, 1), "PNG"))
    locked.chmod(0)
    locked_dir.chmod(0)
    try:
        run_ingest(raw, tmp_path / "out", workers=1, **SETTINGS)
    finally:
        locked.chmod(0o644)
        locked_dir.chmod(0o755)
    _, rejected = load(tmp_path / "out")
    reasons = rejected.set_index("source_path")["reason"]
    assert reasons["Fibres/img_1.png"] == "unreadable: permission denied"
    assert reasons["Fibres/locked"] == "unreadable folder: permission denied"  # its files cannot even be listed


def test_unreadable_file_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = small_raw(tmp_path)
    locked = str(raw / "Fibres/img_1.png")
    real_open = open

    def fake_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file) == locked:
            raise PermissionError(13, "Permission denied", file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(ingest_mod, "open", fake_open, raising=False)
    summary = run_ingest(raw, tmp_path / "out", workers=1, **SETTINGS)
    manifest, rejected = load(tmp_path / "out")
    assert rejected.set_index("source_path").loc["Fibres/img_1.png", "reason"] == "unreadable: permission denied"
    assert len(manifest) == 5 and summary.n_rejected == 1


def test_unexpected_error_in_one_image_is_quarantined(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = small_raw(tmp_path)
    real = Preprocessor.standardize
    calls = {"n": 0}

    def flaky(self: Preprocessor, gray: np.ndarray) -> tuple[np.ndarray, int]:
        calls["n"] += 1
        if calls["n"] == 2:
            raise ValueError("boom")
        return real(self, gray)

    monkeypatch.setattr(Preprocessor, "standardize", flaky)
    summary = run_ingest(raw, tmp_path / "out", workers=1, **SETTINGS)
    _, rejected = load(tmp_path / "out")
    assert summary.n_accepted == 5
    assert list(rejected["reason"]) == ["unexpected error: ValueError: boom"]


def test_worker_process_crash_is_quarantined(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoder that kills its process (segfault) costs only that file, not the run."""
    raw = small_raw(tmp_path, n=12)
    write(raw, "Tips/crash.png", encode(texture(24, 24, 99), "PNG"))
    real = ingest_mod._ingest_one

    def deadly(task: Any, settings: Any) -> Any:
        if task.source_path.endswith("crash.png"):
            os._exit(3)
        return real(task, settings)

    # fork, so the children inherit the patched function
    monkeypatch.setattr(ingest_mod, "_mp_context", lambda: multiprocessing.get_context("fork"))
    monkeypatch.setattr(ingest_mod, "_ingest_one", deadly)
    summary = run_ingest(raw, tmp_path / "out", workers=2, **SETTINGS)
    manifest, rejected = load(tmp_path / "out")
    assert summary.n_accepted == 12 and len(manifest) == 12
    assert list(rejected["source_path"]) == ["Tips/crash.png"]
    assert "worker process died" in rejected["reason"].iloc[0]


def test_parallel_run_with_other_threads_alive(tmp_path: Path) -> None:
    """With other threads running, workers come from a fork server instead of a plain fork."""
    import threading

    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    try:
        assert ingest_mod._mp_context().get_start_method() != "fork"
        summary = run_ingest(small_raw(tmp_path, n=8), tmp_path / "out", workers=2, **SETTINGS)
    finally:
        stop.set()
        thread.join()
    assert summary.n_accepted == 8


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_interrupted_run_leaves_previous_output_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = small_raw(tmp_path)
    out = tmp_path / "data" / "interim"
    run_ingest(raw, out, workers=1, **SETTINGS)
    before = snapshot(out)
    write(raw, "Powder/new.png", encode(texture(24, 24, 55), "PNG"))  # the new run would change the output
    real = ingest_mod._ingest_one
    calls = {"n": 0}

    def interrupted(task: Any, settings: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # like Ctrl-C midway: not a per-file error
        return real(task, settings)

    monkeypatch.setattr(ingest_mod, "_ingest_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_ingest(raw, out, workers=1, **SETTINGS)
    assert snapshot(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["interim"]  # no temp folders left behind


def test_failure_while_writing_tables_leaves_previous_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = small_raw(tmp_path)
    out = tmp_path / "interim"
    run_ingest(raw, out, workers=1, **SETTINGS)
    before = snapshot(out)

    def disk_full(folder: Path, manifest: pd.DataFrame, rejected: pd.DataFrame) -> None:
        manifest.to_parquet(folder / "manifest.parquet")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ingest_mod, "_write_outputs", disk_full)
    with pytest.raises(OSError, match="No space left"):
        run_ingest(raw, out, workers=1, **SETTINGS)
    assert snapshot(out) == before


def test_failed_first_run_creates_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = small_raw(tmp_path)
    monkeypatch.setattr(ingest_mod, "_write_outputs", lambda *a: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        run_ingest(raw, tmp_path / "interim", workers=1, **SETTINGS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_rerun_replaces_output(tmp_path: Path) -> None:
    raw = small_raw(tmp_path)
    out = tmp_path / "interim"
    run_ingest(raw, out, workers=1, **SETTINGS)
    (raw / "Fibres/img_1.png").unlink()
    summary = run_ingest(raw, out, workers=1, **SETTINGS)
    manifest, _ = load(out)
    assert summary.n_accepted == len(manifest) == 5
    assert len(list((out / "images").iterdir())) == 5


def test_non_utf8_file_name(tmp_path: Path) -> None:
    raw = small_raw(tmp_path)
    bad = os.fsencode(raw / "Fibres") + b"/bad\xff name.png"
    with open(bad, "wb") as fh:
        fh.write(encode(texture(24, 24, 1), "PNG"))
    run_ingest(raw, tmp_path / "out", workers=1, **SETTINGS)
    _, rejected = load(tmp_path / "out")
    assert list(rejected["source_path"]) == ["Fibres/bad\\xff name.png"]
    assert list(rejected["reason"]) == ["file name is not valid UTF-8"]


def test_empty_and_missing_raw_dir(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    summary = run_ingest(tmp_path / "raw", tmp_path / "out", workers=1, **SETTINGS)
    manifest, rejected = load(tmp_path / "out")
    assert summary.n_files == 0 and manifest.empty and rejected.empty
    assert list(manifest.columns) == list(ingest_mod.MANIFEST_COLUMNS)
    with pytest.raises(FileNotFoundError):
        run_ingest(tmp_path / "nope", tmp_path / "out2", **SETTINGS)
    with pytest.raises(ValueError, match="inside raw_dir"):
        run_ingest(tmp_path / "raw", tmp_path / "raw" / "out", **SETTINGS)


# --------------------------------------------------------------------------------------------------- real files


@pytest.mark.real_sem
def test_real_microscope_files(real_sem_dir: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw" / "Particles"
    raw.mkdir(parents=True)
    names = [p.name for p in real_sem_dir.iterdir() if p.suffix.lower() in (".tif", ".jpg")]
    for name in names:
        shutil.copyfile(real_sem_dir / name, raw / name)  # a temporary copy, outside the repository
    # The featureless check is off here (min_contrast 0): this test reads every file's metadata and data bar, the
    # blank FEI frames included; tests/data/test_featureless.py checks which real files the default refuses.
    settings = {**SETTINGS, "max_pixels": 100_000_000, "min_contrast": 0.0}
    summary = run_ingest(tmp_path / "raw", tmp_path / "out", workers=2, **settings)
    manifest, rejected = load(tmp_path / "out")
    assert rejected.empty and summary.n_accepted == len(names) >= 10
    rows = manifest.set_index("source_path")
    fei = rows.loc["Particles/rsciio__FEI-Helios-Ebeam-16bits.tif"]
    assert (fei["bit_depth"], fei["databar_rows"], fei["hv_kv"]) == (16, 29, 5.0)
    assert fei["instrument"] == "FEI Helios NanoLab 660"
    zeiss = rows.loc["Particles/rsciio__test_tiff_Zeiss_SEM_512pix.tif"]
    assert zeiss["instrument"] == "Zeiss ULTRA 55" and zeiss["magnification"] == 50000.0
    assert rows.loc["Particles/rsciio__ZEISS_SEM_multipage.tif", "n_frames"] == 2
    assert rows.loc["Particles/saemi__demo_img.jpg", "databar_rows"] == 0
