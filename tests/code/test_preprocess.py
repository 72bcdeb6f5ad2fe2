"""Training and serving see the same pixels: the served model's own Preprocessor equals ingest + tf.data.

The parity test goes through ``SemClassifier`` itself (built from the serving config the registry writes), with
files that carry a data bar as an 8-bit PNG, a 16-bit TIFF and a JPEG, and compares with the training pipeline's
tensor: ingest's cached PNG → ``dataset.make_dataset`` (``to_model_input``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from emassist.data import dataset, preprocess
from emassist.data.ingest import run_ingest
from tests.helpers import BRIGHTNESS_CLASSES as CLASSES
from tests.helpers import b64, brightness_model, encode

pytest.importorskip("keras")

CACHE, SIZE = 64, 32  # SIZE: the input side of tests.helpers.brightness_model


def _sem_like(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.normal(120, 40, (90, 120)).clip(0, 255).astype(np.uint8)
    img[-10:] = 0  # a dark data bar with some text-like pixels
    img[-6:-4, 10:60:3] = 255
    return img


def _encode(gray: np.ndarray, kind: str) -> bytes:
    """``gray`` as a ``kind`` file; ``tiff16``: the same picture as a 16-bit TIFF (×257)."""
    return encode(gray.astype(np.uint16) * 257, "TIFF") if kind == "tiff16" else encode(gray, kind)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from emassist.config.settings import params_from_dict
    from emassist.model.registry import serving_config
    from emassist.serve.pyfunc import SemClassifier

    tmp = tmp_path_factory.mktemp("parity")
    params = params_from_dict(
        {
            "data": {"classes": CLASSES},
            "ingest": {"cache_size": CACHE, "max_pixels": 10**8, "min_side": 16, "crop_databar": True},
            "train": {"image_size": SIZE},
        }
    )
    return SemClassifier.from_files(brightness_model(tmp / "model.keras", conv=True), serving_config(params))


def test_serving_config_is_the_preprocessor_config(classifier: Any) -> None:
    pre = classifier.preprocessor
    assert pre == preprocess.Preprocessor(cache_size=CACHE, crop_databar=True, max_pixels=10**8, min_side=16,
                                          image_size=SIZE)  # fmt: skip


def test_min_contrast_goes_from_params_into_the_serving_config() -> None:
    """ingest.min_contrast is part of the preprocessing a registered model carries (and serves with)."""
    from emassist.config.settings import params_from_dict
    from emassist.model.registry import serving_config

    params = params_from_dict({"data": {"classes": CLASSES}, "ingest": {"min_contrast": 3.5}})
    assert preprocess.Preprocessor.from_params(params).min_contrast == 3.5
    config = serving_config(params)
    assert config["min_contrast"] == 3.5
    assert preprocess.Preprocessor.from_config(config) == preprocess.Preprocessor.from_params(params)


def test_training_input_equals_serving_input(tmp_path: Path, classifier: Any) -> None:
    raw = tmp_path / "raw" / "Particles"
    raw.mkdir(parents=True)
    images = {}
    for i, kind in enumerate(["PNG", "JPEG", "tiff16"]):
        data = _encode(_sem_like(i), kind)
        path = raw / f"img{i}.{kind.lower()}"
        path.write_bytes(data)
        images[path.name] = data
    pre = classifier.preprocessor  # ingest with the model's own settings, as the pipeline does
    run_ingest(tmp_path / "raw", tmp_path / "interim", classes=["Particles"], cache_size=pre.cache_size,
               max_pixels=pre.max_pixels, min_side=pre.min_side, crop_databar=pre.crop_databar, workers=1,
               progress=False)  # fmt: skip
    manifest = pd.read_parquet(tmp_path / "interim" / "manifest.parquet")
    assert len(manifest) == 3
    assert sorted(manifest["format"]) == ["JPEG", "PNG", "TIFF"]
    assert (manifest["databar_rows"] > 0).all()  # the data bar was found and cropped on the training path
    split = dataset.SplitData(
        "test",
        [str(tmp_path / "interim" / p) for p in manifest["image_path"]],
        np.zeros(len(manifest), dtype=np.int32),
    )
    batch, _ = next(iter(dataset.make_dataset(split, image_size=SIZE, batch_size=8, training=False)))
    trained_on = batch.numpy()
    encoded = [b64(images[Path(p).name]) for p in manifest["source_path"]]
    for value, expected in zip(encoded, trained_on, strict=True):
        # What the served model does with the uploaded bytes, through SemClassifier's own building blocks:
        gray = classifier.standardized(value)
        assert gray.shape == (CACHE, CACHE)
        served = np.asarray(classifier.preprocessor.to_model_input(gray[..., None]))
        np.testing.assert_array_equal(served, expected)
    assert served.shape == (SIZE, SIZE, 3)
    # ... and the whole predict() scores what the model scores on the training tensor.
    rows = classifier.predict(None, pd.DataFrame({"image": encoded}))
    assert (rows["error"] == "").all()
    expected_proba = classifier.model.predict(trained_on, verbose=0)
    np.testing.assert_allclose(rows[CLASSES].to_numpy(), expected_proba, rtol=1e-5, atol=1e-6)


def test_standardized_images_get_no_databar_search(classifier: Any) -> None:
    """The inference parameter ``standardized``: a tile is only resized, its own "data bar" stays."""
    gray = _sem_like(7)
    value = b64(_encode(gray, "PNG"))
    pre = classifier.preprocessor
    np.testing.assert_array_equal(classifier.standardized(value), pre.standardize(gray)[0])
    np.testing.assert_array_equal(classifier.standardized(value, standardized=True), pre.resize(gray))
    assert pre.standardize(gray)[1] > 0
    frame = pd.DataFrame({"image": [value]})
    as_tile = classifier.predict(None, frame, params={preprocess.STANDARDIZED_PARAM: True})
    as_file = classifier.predict(None, frame, params={preprocess.STANDARDIZED_PARAM: False})
    direct = classifier.probabilities(pre.resize(gray)[None])
    np.testing.assert_allclose(as_tile[CLASSES].to_numpy(), direct, rtol=1e-6)
    assert not np.allclose(as_tile[CLASSES].to_numpy(), as_file[CLASSES].to_numpy())
    np.testing.assert_allclose(as_file[CLASSES].to_numpy(), classifier.predict(None, frame)[CLASSES].to_numpy())


def test_standardized_param_of_the_wrong_type_is_a_bad_request(classifier: Any) -> None:
    from emassist.serve.pyfunc import BadRequest

    value = b64(_encode(_sem_like(1), "PNG"))
    with pytest.raises(BadRequest, match="parameter 'standardized': expected true or false"):
        classifier.predict(None, pd.DataFrame({"image": [value]}), params={"standardized": "yes"})


def test_dataset_uses_the_shared_function(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = preprocess.to_model_input

    def spy(gray: Any, image_size: int) -> Any:
        calls.append(image_size)
        return original(gray, image_size)

    monkeypatch.setattr(dataset, "to_model_input", spy)
    split = dataset.SplitData("x", ["never-read.png"], np.zeros(1, dtype=np.int32))
    dataset.make_dataset(split, image_size=40, batch_size=2, training=False)
    assert calls == [40]
