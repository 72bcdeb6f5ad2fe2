"""The scale-aware model (``train.scale_input``, issue 15 part 2): the pixel size of the model input as a second input.

The arithmetic (the resize factor from the file to the model input applied exactly), the three builders with the
``"scale"`` input, the datasets (pixel sizes from the manifest, augmented copies by their source, the scale dropout),
training and evaluation end to end (with the pixel size withheld at test time too), the serving config saying
whether a model takes the input. The pyfunc: tests/code/test_scale_serving.py (in-process) and
tests/system/test_serving_scale.py (a real ``mlflow models serve``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from emassist.config.settings import ParamsError
from emassist.data.dataset import make_dataset, read_split
from emassist.model.scale import (
    SCALE_INPUT,
    ScaleUsed,
    model_input_pixel_size_nm,
    pixel_size_problem,
    scale_features,
    split_scale,
)
from tests.code.test_training import CLASSES, make_project, tiny_params

pytest.importorskip("keras")

NM_BY_CLASS = {"Particles": 5.0, "Nanowires": 50.0, "Tips": 500.0}


def _write_manifest(root: Path, *, known: float = 1.0) -> pd.DataFrame:
    """ingest's manifest for make_project's images: a pixel size per class (``known`` share of them) and width."""
    rows = []
    for csv_path in sorted((root / "data/splits").glob("*.csv")):
        for i, record in enumerate(pd.read_csv(csv_path, keep_default_na=False).to_dict("records")):
            nm = NM_BY_CLASS[record["label"]] if (i % 10) < known * 10 else None
            rows.append({"sha256": record["sha256"], "pixel_size_nm": nm, "width": 40, "label": record["label"]})
    manifest = pd.DataFrame(rows)
    manifest.to_parquet(root / "data/interim/manifest.parquet", index=False)
    return manifest


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    make_project(tmp_path)
    _write_manifest(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


# ------------------------------------------------------------------------------------------------ arithmetic


def test_the_resize_factor_is_applied_exactly() -> None:
    # the same field of view at two file sizes: 2 nm pixels over 1024 px, 4 nm over 512 px -> the same model input
    assert model_input_pixel_size_nm(2.0, 1024, 64) == model_input_pixel_size_nm(4.0, 512, 64) == 32.0
    assert model_input_pixel_size_nm(1.5, 300, 100) == pytest.approx(4.5)
    for nm, width in ((None, 512), (float("nan"), 512), (-1.0, 512), (0.0, 512), (2.0, None), (2.0, 0)):
        assert model_input_pixel_size_nm(nm, width, 64) is None, (nm, width)
    features = scale_features([100.0, None, float("nan"), 0.5])
    assert features.dtype == np.float32 and features.shape == (4, 2)
    np.testing.assert_allclose(features, [[2.0, 1.0], [0, 0], [0, 0], [math.log10(0.5), 1.0]], rtol=1e-6)
    used = ScaleUsed.of(3.0, "tags", 640, 64)
    assert used.model_nm == pytest.approx(30.0) and used.source == "tags"
    assert ScaleUsed.of(None, "unknown", 640, 64, "no bar").as_dict() == {
        "pixel_size_nm": None, "model_pixel_size_nm": None, "pixel_size_source": "unknown"}  # fmt: skip


@pytest.mark.parametrize(
    ("value", "words"),
    [(-2.0, "not positive"), (0, "not positive"), (float("nan"), "NaN"), (1e9, "outside the plausible"),
     (1e-5, "outside the plausible"), (float("inf"), "outside"), ("abc", "not a number"), (True, "not a number")],
)  # fmt: skip
def test_bad_pixel_sizes_are_named(value: object, words: str) -> None:
    assert words in pixel_size_problem(value)
    assert pixel_size_problem(2.5) == ""


def test_scale_params_are_checked() -> None:
    assert tiny_params(scale_input=True, scale_dropout=0.3).train.scale_dropout == 0.3
    with pytest.raises(ParamsError, match=r"train\.scale_dropout"):
        tiny_params(scale_input=True, scale_dropout=1.5)


# ------------------------------------------------------------------------------------------------ builders


@pytest.mark.parametrize(("name", "size"), [("simple_cnn", 32), ("compact_cnn", 32), ("xception", 71)])
def test_every_builder_takes_the_scale_input(name: str, size: int, tmp_path: Path) -> None:
    import keras

    from emassist.model.builders import build_model
    from emassist.model.features import with_features
    from emassist.model.saving import save_serving_copy
    from emassist.model.scale import has_scale_input, keras_file_has_scale_input, model_inputs

    model = build_model(name, num_classes=3, image_size=size, scale_input=True, seed=1)
    assert [t.name for t in model.inputs] == ["image", SCALE_INPUT] and model.layers[-1].name == "probabilities"
    assert has_scale_input(model) and model.get_layer("scale_dense").units == 16
    images = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype("float32")
    # the size reaches the head: the same images at different pixel sizes answer differently
    near = model(model_inputs(images, scale_features([1.0, 1.0]), scale_aware=True), training=False)
    far = model(model_inputs(images, scale_features([1e4, 1e4]), scale_aware=True), training=False)
    unknown = model(model_inputs(images, None, scale_aware=True), training=False)
    assert not np.allclose(near, far) and np.allclose(np.sum(unknown, axis=1), 1.0, atol=1e-5)
    _, features = with_features(model)(model_inputs(images, None, scale_aware=True))
    assert features.shape[-1] == model.get_layer("probabilities").input.shape[-1]
    path = save_serving_copy(model, tmp_path / "m.keras")
    assert keras_file_has_scale_input(path)
    again = keras.models.load_model(path, compile=False)
    assert has_scale_input(again)
    np.testing.assert_allclose(again(model_inputs(images, scale_features([1.0, 1.0]), scale_aware=True)), near,
                               atol=1e-5)  # fmt: skip
    plain = build_model(name, num_classes=3, image_size=size, seed=1)
    assert not has_scale_input(plain) and len(plain.inputs) == 1
    assert model_inputs(images, None, scale_aware=False) is images  # exactly the input of before
    assert not keras_file_has_scale_input(save_serving_copy(plain, tmp_path / "plain.keras"))


# ------------------------------------------------------------------------------------------------ datasets


def test_split_pixel_sizes_come_from_the_manifest_and_augmented_copies_from_their_source(project: Path) -> None:
    manifest = Path("data/interim/manifest.parquet")
    train_csv = Path("data/splits/train.csv")
    plain = read_split(train_csv, CLASSES)
    assert plain.pixel_size_nm is None and split_scale(plain, 32).sum() == 0  # not read: every size unknown
    split = read_split(train_csv, CLASSES, manifest=manifest)
    labels = pd.read_csv(train_csv)["label"]
    np.testing.assert_allclose(split.pixel_size_nm, [NM_BY_CLASS[c] for c in labels])
    np.testing.assert_allclose(split_scale(split, 32)[:, 0], np.log10(split.pixel_size_nm * 40 / 32), rtol=1e-6)
    assert (split_scale(split, 32, withhold=True) == 0).all()
    # an augmented copy (its own sha256) has its source's size; an image the manifest does not know: unknown
    frame = pd.read_csv(train_csv, keep_default_na=False).assign(augmented_from="")
    copy = frame.iloc[[0]].assign(sha256="copy-1", augmented_from=frame["sha256"].iloc[0])
    stranger = frame.iloc[[1]].assign(sha256="not-in-the-manifest")
    pd.concat([frame, copy, stranger]).to_csv("aug.csv", index=False)
    grown = read_split(Path("aug.csv"), CLASSES, manifest=manifest)
    assert grown.pixel_size_nm[-2] == split.pixel_size_nm[0] and math.isnan(grown.pixel_size_nm[-1])
    assert grown.n_known_pixel_sizes == len(grown) - 1
    # columns in the split file itself win over the manifest
    frame.assign(pixel_size_nm=7.0, width=80).to_csv("own.csv", index=False)
    own = read_split(Path("own.csv"), CLASSES, manifest=manifest)
    assert (own.pixel_size_nm == 7.0).all() and (own.source_width == 80).all()


def test_the_scale_dropout_masks_known_sizes_in_training_only(project: Path) -> None:
    split = read_split(Path("data/splits/train.csv"), CLASSES, manifest=Path("data/interim/manifest.parquet"))
    scale = split_scale(split, 32)
    common = {"image_size": 32, "batch_size": 64, "scale": scale}

    def flags(ds: object, epochs: int = 20) -> np.ndarray:
        return np.concatenate([np.asarray(x["scale"])[:, 1] for _ in range(epochs) for x, _ in ds])  # type: ignore

    trained = flags(make_dataset(split, training=True, scale_dropout=0.3, **common))
    assert 0.2 < 1 - trained.mean() < 0.4, trained.mean()  # ~30 % masked, drawn anew each epoch
    assert (flags(make_dataset(split, training=False, scale_dropout=0.3, **common), 1) == 1).all()
    assert (flags(make_dataset(split, training=True, scale_dropout=0.0, **common), 2) == 1).all()
    x, _ = next(iter(make_dataset(split, training=False, **common)))
    assert tuple(x["image"].shape) == (len(split), 32, 32, 3) and tuple(x["scale"].shape) == (len(split), 2)


# ------------------------------------------------------------------------------------------------ train/evaluate


@pytest.mark.parametrize("model", ["compact_cnn", "simple_cnn"])
def test_a_scale_aware_model_trains_and_evaluates(project: Path, model: str) -> None:
    import keras

    from emassist.model.files import MODEL_FILE
    from emassist.model.registry import serving_config
    from emassist.model.scale import has_scale_input
    from emassist.model.testset import evaluate
    from emassist.model.training import train

    params = tiny_params(model=model, scale_input=True, scale_dropout=0.2, epochs=3)
    result = train(params)
    assert len(result.history["loss"]) == 3
    assert has_scale_input(keras.models.load_model(MODEL_FILE, compile=False))
    metrics = evaluate(params)
    headline = json.loads(Path("reports/metrics.json").read_text())
    assert headline["macro_f1"] == pytest.approx(metrics["macro_f1"])
    assert 0.0 <= headline["macro_f1_scale_withheld"] <= 1.0 and "accuracy_scale_withheld" in headline
    assert serving_config(params, model_file=MODEL_FILE)["scale_input"] is True
    assert serving_config(params)["scale_input"] is False  # no model file to read: not claimed


def test_a_scale_blind_model_has_no_withheld_figures(project: Path) -> None:
    from emassist.model.testset import evaluate
    from emassist.model.training import train

    params = tiny_params(model="compact_cnn", epochs=1, scale_input=False)
    train(params)
    evaluate(params)
    assert "macro_f1_scale_withheld" not in json.loads(Path("reports/metrics.json").read_text())


def test_xception_with_the_scale_input_fits_in_both_phases(project: Path) -> None:
    """The head phase (base frozen: the scale branch and the head train) and a fine-tuning step, at 71 px."""
    from emassist.model.builders import build_model
    from emassist.model.phases import compile_model, count_params, set_phase

    split = read_split(Path("data/splits/train.csv"), CLASSES, manifest=Path("data/interim/manifest.parquet"))
    ds = make_dataset(split, image_size=71, batch_size=16, training=True, scale=split_scale(split, 71),
                      scale_dropout=0.2)  # fmt: skip
    model = build_model("xception", num_classes=3, image_size=71, scale_input=True)
    for phase in ("head", "finetune"):
        set_phase(model, phase, finetune_blocks=1)
        compile_model(model, optimizer="adam", learning_rate=1e-3)
        trainable, _ = count_params(model)
        scale_weights = sum(int(np.prod(w.shape)) for w in model.get_layer("scale_dense").trainable_weights)
        assert scale_weights == 2 * 16 + 16 and trainable > scale_weights
        history = model.fit(ds.take(1), epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][0])
