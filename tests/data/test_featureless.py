"""Featureless frames (ingest.min_contrast) on real and demo data: the blank frames of ../shared/real_sem are refused,
every real micrograph and every demo image is kept, and the validate stage counts the refused ones as rejects.

The check itself (constant, just below / above the limit, a data bar as the only structure) is unit-tested in
tests/code/test_imaging.py; ingest's quarantine row in tests/data/test_ingest.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emassist.config.classes import CLASSES
from emassist.config.settings import DemoParams, IngestParams
from emassist.data.decode import ImageRejected
from emassist.data.demo.generate import generate_demo
from emassist.data.ingest import run_ingest
from emassist.data.preprocess import DEFAULT_MIN_CONTRAST, Preprocessor, gray_contrast
from emassist.data.validation import build_tables, load_ingest_outputs, validate_tables
from tests.helpers import encode, texture

#: The files of ../shared/real_sem with nothing to classify (see its SOURCES.md): the two navigation-camera frames
#: (every pixel 0) and the two FEI "metadata-only" e-beam files (a black image area; only the data bar has content).
BLANK_REAL = {
    "rsciio__FEI-Helios-navcam.tif",
    "rsciio__FEI-Helios-navcam-with-no-IRBeam-bad-floats.tif",
    "rsciio__FEI-Helios-Ebeam-8bits.tif",
    "rsciio__FEI-Helios-Ebeam-16bits.tif",
}


def _default_preprocessor() -> Preprocessor:
    """The pipeline's preprocessing with params.yaml's defaults (the dataclass defaults equal params.yaml's)."""
    i = IngestParams()
    return Preprocessor(i.cache_size, i.crop_databar, i.max_pixels, i.min_side, min_contrast=i.min_contrast)


@pytest.mark.real_sem
def test_real_blank_frames_are_refused_and_every_real_micrograph_is_kept(real_sem_dir: Path) -> None:
    pre = _default_preprocessor()
    files = sorted(p for p in real_sem_dir.iterdir() if p.suffix.lower() in (".tif", ".jpg"))
    assert {p.name for p in files} >= BLANK_REAL and len(files) >= 10
    refused: dict[str, str] = {}
    kept: dict[str, float] = {}
    for path in files:
        try:
            gray, _ = pre.standardize_file(path)
        except ImageRejected as exc:
            refused[path.name] = exc.reason
        else:
            kept[path.name] = gray_contrast(gray)
    assert set(refused) == BLANK_REAL, refused
    assert all(r.startswith("featureless image: gray levels vary by 0.00 (std)") for r in refused.values()), refused
    # The least varied real micrograph (a SAEMI JPEG, about 7) is well clear of the limit.
    assert min(kept.values()) > 3 * DEFAULT_MIN_CONTRAST, kept


def test_the_demo_generator_never_makes_a_featureless_image(tmp_path: Path) -> None:
    """The demo pipeline must not lose images: none is refused, at the smallest size and at the default one, and the
    least varied is far above the limit (on 1,000 default demo images the minimum was 18)."""
    contrasts: list[float] = []
    for side in (32, 256):
        raw = tmp_path / f"raw{side}"
        demo = DemoParams(seed=3, n_images=20, width=side, height=side, min_per_class=2)
        generate_demo(raw, demo, workers=1, progress=False)
        i = IngestParams()
        summary = run_ingest(raw, tmp_path / f"interim{side}", classes=CLASSES, cache_size=i.cache_size,
                             max_pixels=i.max_pixels, min_side=i.min_side, crop_databar=i.crop_databar,
                             min_contrast=i.min_contrast, workers=1, progress=False)  # fmt: skip
        assert summary.n_rejected == 0 and summary.n_accepted == 20, summary.reasons
        manifest, _ = load_ingest_outputs(tmp_path / f"interim{side}")
        for rel in manifest["image_path"]:
            with Image.open(tmp_path / f"interim{side}" / rel) as im:
                contrasts.append(gray_contrast(np.asarray(im)))
    assert min(contrasts) > 5 * DEFAULT_MIN_CONTRAST, min(contrasts)


def test_featureless_rejects_count_in_the_validate_stage(tmp_path: Path) -> None:
    """rejected.csv's featureless rows are rejects like any other for validate's max_rejected_fraction."""
    raw = tmp_path / "raw"
    for k, cls in enumerate(CLASSES):
        (raw / cls).mkdir(parents=True)
        for j in range(3):
            (raw / cls / f"img{j}.png").write_bytes(encode(texture(40, 40, seed=10 * k + j), "PNG"))
    (raw / "Tips" / "navcam.png").write_bytes(encode(np.zeros((40, 48), np.uint8), "PNG"))
    (raw / "Powder" / "flat.png").write_bytes(encode(np.full((40, 48), 128, np.uint8), "PNG"))
    run_ingest(raw, tmp_path / "interim", classes=CLASSES, cache_size=32, max_pixels=10**6, min_side=16,
               crop_databar=True, workers=1, progress=False)  # fmt: skip
    manifest, rejected = load_ingest_outputs(tmp_path / "interim")
    assert len(manifest) == 3 * len(CLASSES)
    assert sorted(rejected["source_path"]) == ["Powder/flat.png", "Tips/navcam.png"]
    assert rejected["reason"].str.startswith("featureless image: ").all()
    tables = build_tables(manifest, rejected, CLASSES)
    assert tables["ingest_summary"]["rejected_fraction"].iloc[0] == pytest.approx(2 / 32)
    limits = {"min_per_class": 3, "min_side": 16, "max_side": 20000}
    assert validate_tables(tables, CLASSES, max_rejected_fraction=0.1, **limits).success
    failed = validate_tables(tables, CLASSES, max_rejected_fraction=0.05, **limits)
    assert [o.column for o in failed.critical_failures] == ["rejected_fraction"], failed.summary()
