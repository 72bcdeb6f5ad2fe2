"""Training and serving see the same pixels: one decode → standardize → to_model_input path."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from emassist.data import dataset, preprocess
from emassist.data.imaging import decode_image, standardize
from emassist.data.ingest import run_ingest

CACHE, SIZE = 64, 48


def _sem_like(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.normal(120, 40, (90, 120)).clip(0, 255).astype(np.uint8)
    img[-10:] = 0  # a dark data bar with some text-like pixels
    img[-6:-4, 10:60:3] = 255
    return img


def test_training_input_equals_serving_input(tmp_path: Path) -> None:
    raw = tmp_path / "raw" / "Particles"
    raw.mkdir(parents=True)
    images = {}
    for i, fmt in enumerate(["PNG", "JPEG", "TIFF"]):
        buf = io.BytesIO()
        Image.fromarray(_sem_like(i)).save(buf, format=fmt)
        path = raw / f"img{i}.{fmt.lower()}"
        path.write_bytes(buf.getvalue())
        images[path.name] = buf.getvalue()
    run_ingest(tmp_path / "raw", tmp_path / "interim", classes=["Particles"], cache_size=CACHE,
               max_pixels=10**8, min_side=16, crop_databar=True, workers=1, progress=False)  # fmt: skip
    import pandas as pd

    manifest = pd.read_parquet(tmp_path / "interim" / "manifest.parquet")
    assert len(manifest) == 3
    split = dataset.SplitData(
        "test",
        [str(tmp_path / "interim" / p) for p in manifest["image_path"]],
        np.zeros(len(manifest), dtype=np.int32),
    )
    batch, _ = next(iter(dataset.make_dataset(split, image_size=SIZE, batch_size=8, training=False)))
    for row, trained_on in zip(manifest.itertuples(), batch.numpy(), strict=True):
        # What serving does with the uploaded bytes:
        decoded = decode_image(images[Path(row.source_path).name], max_pixels=10**8, min_side=16)
        cached, rows = standardize(decoded.gray, cache_size=CACHE, crop_databar=True)
        served = np.asarray(preprocess.to_model_input(cached[..., None], SIZE))
        assert rows > 0  # the data bar was found and cropped on both paths
        np.testing.assert_array_equal(served, trained_on)
    assert served.shape == (SIZE, SIZE, 3)


def test_dataset_uses_the_shared_function(monkeypatch) -> None:
    calls = []
    original = preprocess.to_model_input

    def spy(gray, image_size):
        calls.append(image_size)
        return original(gray, image_size)

    monkeypatch.setattr(dataset, "to_model_input", spy)
    split = dataset.SplitData("x", ["never-read.png"], np.zeros(1, dtype=np.int32))
    dataset.make_dataset(split, image_size=40, batch_size=2, training=False)
    assert calls == [40]
