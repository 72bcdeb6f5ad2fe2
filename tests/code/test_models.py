"""The model layer's Keras modules: architectures (builders), phases and compiling (phases), the loss (losses), the
online augmentation (online_augment) and the serving copy (saving); tiny, CPU, no downloads."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from emassist.config.choices import MODEL_NAMES  # noqa: E402
from emassist.config.settings import ParamsError, PolicyParams, TrainParams  # noqa: E402
from emassist.model.builders import build_model  # noqa: E402
from emassist.model.losses import SmoothedSparseCrossentropy  # noqa: E402
from emassist.model.online_augment import ClipToRange, RandomRot90, build_augmentation  # noqa: E402
from emassist.model.phases import compile_model, count_params, set_phase  # noqa: E402
from emassist.model.saving import save_serving_copy  # noqa: E402
from tests.helpers import POLICY  # noqa: E402

SIZES = {"simple_cnn": 32, "compact_cnn": 32, "xception": 71}  # the smallest sizes worth building


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """float32 [n, size, size, 3] in 0..255, gray replicated into 3 channels like to_model_input's output."""
    gray = np.random.default_rng(seed).uniform(0.0, 255.0, (n, size, size, 1)).astype(np.float32)
    return np.repeat(gray, 3, axis=-1)


def build(name: str, **kwargs: Any) -> Any:
    return build_model(name, num_classes=kwargs.pop("num_classes", 5), image_size=SIZES[name], **kwargs)


def predict(model: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(model(x, training=False))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_io_names_shapes_and_softmax(name: str) -> None:
    model = build(name, num_classes=7)
    assert model.inputs[0].shape == (None, SIZES[name], SIZES[name], 3)
    assert model.inputs[0].name == "image"
    assert model.output_names == ["probabilities"]
    assert model.layers[-1].name == "probabilities"
    proba = predict(model, images(3, SIZES[name]))
    assert proba.shape == (3, 7)
    assert proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    assert (proba >= 0).all()


def test_same_seed_same_simple_cnn() -> None:
    a, b, c = build("simple_cnn", seed=1), build("simple_cnn", seed=1), build("simple_cnn", seed=2)
    x = images(2, SIZES["simple_cnn"])
    np.testing.assert_array_equal(predict(a, x), predict(b, x))
    assert not np.allclose(predict(a, x), predict(c, x))


def test_output_stays_float32_under_mixed_precision() -> None:
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build("simple_cnn")
        assert model.get_layer("conv1").compute_dtype == "float16"
        proba = model(images(2, SIZES["simple_cnn"]), training=False)
        assert keras.backend.standardize_dtype(proba.dtype) == "float32"
    finally:
        keras.mixed_precision.set_global_policy(previous)


def test_simple_cnn_phases_train_everything() -> None:
    model = build("simple_cnn")
    counts = count_params(model)
    assert counts[0] > 0 and counts[1] == 0
    for phase in ("head", "finetune", "head"):
        set_phase(model, phase, finetune_blocks=2)
        assert count_params(model) == counts


def test_xception_phases() -> None:
    model = build("xception", num_classes=5)
    total = sum(count_params(model))
    base = model.get_layer("xception_base")
    bn = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]

    set_phase(model, "head")
    trainable, frozen = count_params(model)
    head = model.get_layer("probabilities").count_params()
    assert trainable == head == 2048 * 5 + 5  # only the classifier trains
    assert trainable + frozen == total
    assert not base.trainable_weights

    set_phase(model, "finetune", finetune_blocks=2)  # right after "head", as in training
    assert base.trainable
    ft2, frozen2 = count_params(model)
    assert ft2 + frozen2 == total
    assert ft2 > trainable
    names = {layer.name for layer in base.layers if layer.trainable_weights}
    assert {"block13_sepconv1", "block13_sepconv2", "block14_sepconv1", "block14_sepconv2"} <= names
    assert not any(n.startswith(("block12_", "block1_")) for n in names)
    assert not any(layer.trainable for layer in bn)  # BatchNormalization stays frozen (inference mode)
    assert frozen2 >= sum(layer.count_params() for layer in bn)

    set_phase(model, "finetune", finetune_blocks=3)
    assert count_params(model)[0] > ft2
    assert "block12_sepconv1" in {layer.name for layer in base.layers if layer.trainable_weights}

    set_phase(model, "head")  # back again
    assert count_params(model) == (trainable, frozen)
    assert not base.trainable_weights
    set_phase(model, "finetune", finetune_blocks=2)
    assert count_params(model) == (ft2, frozen2)


def test_short_fit_lowers_loss() -> None:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    n, size = 48, SIZES["simple_cnn"]
    y = np.arange(n) % 4
    x = rng.uniform(0.0, 60.0, (n, size, size, 1)).astype(np.float32)
    for i, c in enumerate(y):
        x[i, :, 8 * c : 8 * c + 8] += 150.0  # a bright vertical band whose position is the class
    x = np.repeat(x, 3, axis=-1)
    model = build("simple_cnn", num_classes=4)
    compile_model(model, optimizer="adam", learning_rate=1e-3)
    before = model.evaluate(x, y, verbose=0, return_dict=True)
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0, shuffle=False)
    after = model.evaluate(x, y, verbose=0, return_dict=True)
    assert set(history.history) == {"loss", "accuracy", "top3"}
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] >= 0.9 > before["accuracy"]
    assert after["top3"] >= after["accuracy"]


@pytest.mark.parametrize("optimizer", ["rmsprop", "adam", "sgd"])
def test_compile_model(optimizer: str) -> None:
    model = build("simple_cnn")
    compile_model(model, optimizer=optimizer, learning_rate=0.01, jit_compile=True)
    assert type(model.optimizer).__name__.lower() == optimizer
    assert float(model.optimizer.learning_rate) == pytest.approx(0.01)
    assert model.jit_compile is True
    assert isinstance(model.loss, keras.losses.SparseCategoricalCrossentropy)


def test_cosine_schedule_decays_to_zero_over_decay_steps() -> None:
    model = build("compact_cnn")
    compile_model(model, optimizer="adam", learning_rate=0.01, decay_steps=4)
    schedule = model.optimizer._learning_rate
    assert isinstance(schedule, keras.optimizers.schedules.CosineDecay)
    rates = [float(schedule(step)) for step in range(5)]
    assert rates[0] == pytest.approx(0.01)
    assert all(a > b for a, b in itertools.pairwise(rates)), rates
    assert rates[-1] == pytest.approx(0.0, abs=1e-9)
    x, y = images(8, SIZES["compact_cnn"]), np.arange(8) % 5
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)  # two optimizer steps
    assert float(model.optimizer.learning_rate) == pytest.approx(rates[2], rel=1e-5)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="decay_steps"):
            compile_model(model, optimizer="adam", learning_rate=0.01, decay_steps=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_weights_round_trip(name: str, tmp_path: Path) -> None:
    model = build(name, seed=1)
    if name == "xception":  # random BN statistics, so that loading them has to matter
        for layer in model.get_layer("xception_base").layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.moving_mean.assign(np.full(layer.moving_mean.shape, 0.1, np.float32))
    path = tmp_path / "model.weights.h5"
    model.save_weights(path)
    fresh = build(name, seed=2)
    x = images(3, SIZES[name])
    assert not np.allclose(predict(fresh, x), predict(model, x))
    fresh.load_weights(path)
    np.testing.assert_array_equal(predict(fresh, x), predict(model, x))


@pytest.mark.parametrize("filename", ["base.weights.h5", "base.h5"])  # Keras 3 weights file | legacy HDF5 (ImageNet's)
def test_xception_weights_from_local_file(filename: str, tmp_path: Path) -> None:
    keras.utils.set_random_seed(3)
    donor = keras.applications.Xception(include_top=False, weights=None, input_shape=(71, 71, 3), pooling="avg")
    path = tmp_path / filename
    if filename.endswith(".weights.h5"):
        donor.save_weights(path)
    else:
        keras.saving.save_model(donor, path)  # legacy HDF5: the format of Keras' ImageNet weights files
    keras.utils.set_random_seed(4)
    model = build_model("xception", num_classes=4, image_size=71, weights=str(path))
    base = model.get_layer("xception_base")
    x = images(2, 71)
    donor_features = predict(donor, x / 127.5 - 1.0)  # the donor sees what the model's Rescaling makes of x
    np.testing.assert_allclose(predict(base, x / 127.5 - 1.0), donor_features, rtol=1e-5, atol=1e-6)
    inner = keras.Model(model.inputs[0], model.get_layer("dropout").output)  # through the model's own Rescaling
    np.testing.assert_allclose(predict(inner, x), donor_features, rtol=1e-4, atol=1e-5)


def test_bad_params_name_the_param(tmp_path: Path) -> None:
    """The settings the builders take are checked once, by load_params (TrainParams / PolicyParams.check); the
    builders keep only the guards params cannot express (a weights file gone since load, an unknown phase)."""
    bad_train = [
        ({"model": "resnet"}, r"train\.model.*simple_cnn, compact_cnn, xception"),
        ({"model": "simple_cnn", "image_size": 32, "weights": "imagenet"}, r"train\.weights"),
        ({"model": "xception", "image_size": 70}, r"train\.image_size.*71"),
        ({"model": "simple_cnn", "image_size": 4}, r"train\.image_size"),
        ({"model": "compact_cnn", "image_size": 24}, r"train\.image_size: compact_cnn needs at least 32"),
        ({"model": "xception", "image_size": 71, "dropout": 1.0}, r"train\.dropout"),
        ({"optimizer": "adagrad"}, r"train\.optimizer.*rmsprop, adam, sgd"),
    ]
    for changes, pattern in bad_train:
        with pytest.raises(ParamsError, match=pattern):
            TrainParams(**changes).check()  # type: ignore[arg-type]
    (tmp_path / "w.txt").write_text("not weights")
    with pytest.raises(ParamsError, match=r"train\.weights"):
        TrainParams(model="xception", image_size=71, weights=str(tmp_path / "w.txt")).check()
    with pytest.raises(ParamsError, match=r"augment\.policy\.zoom"):
        PolicyParams(zoom=1.5).check()
    # A weights file that passed load_params but is gone by the time the model is built.
    missing = tmp_path / "nowhere.h5"
    with pytest.raises(FileNotFoundError, match=r"train\.weights") as err:
        build_model("xception", num_classes=3, image_size=71, weights=str(missing))
    assert str(missing) in str(err.value)
    model = build("simple_cnn")
    with pytest.raises(ValueError, match="phase"):
        set_phase(model, "warmup")


def test_rot90_turns_each_image_of_a_batch_on_its_own() -> None:
    import tensorflow as tf

    aug = build_augmentation(PolicyParams(rot90=True), seed=0)
    assert [layer.name for layer in aug.layers] == ["rot90", "clip"]
    x = images(16, 32)
    out = next(iter(tf.data.Dataset.from_tensors(x).map(lambda b: aug(b, training=True)))).numpy()
    turns = []
    for src, got in zip(x, out, strict=True):
        matches = [k for k in range(4) if np.array_equal(got, np.rot90(src, k, axes=(0, 1)))]
        assert len(matches) == 1  # exactly a quarter-turn multiple of its own source (no interpolation)
        turns.append(matches[0])
    assert len(set(turns)) >= 2, turns  # drawn per image, not once per batch
    np.testing.assert_array_equal(aug(x, training=False), x)
    # A non-boolean rot90 stops at load: tests/code/test_settings.py (augment.policy.rot90 / online_policy.rot90).


def test_label_smoothing_loss_matches_keras_categorical() -> None:
    y = np.array([0, 2, 1])
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]], np.float32)
    expected = keras.losses.CategoricalCrossentropy(label_smoothing=0.1)(np.eye(3)[y], p)
    assert float(SmoothedSparseCrossentropy(0.1)(y, p)) == pytest.approx(float(expected), rel=1e-6)
    plain = keras.losses.SparseCategoricalCrossentropy()(y, p)
    assert float(SmoothedSparseCrossentropy(0.1)(y, p)) > float(plain)  # smoothing penalises confident hits
    model = build("compact_cnn")
    compile_model(model, optimizer="adam", learning_rate=0.01, label_smoothing=0.1)
    assert isinstance(model.loss, SmoothedSparseCrossentropy) and model.loss.label_smoothing == 0.1
    with pytest.raises(ParamsError, match=r"train\.label_smoothing"):
        TrainParams(label_smoothing=1.0).check()


def test_finetune_blocks_range() -> None:
    model = build("xception")
    for bad in (0, 15):  # stops at load, before any training (with or without fine-tuning epochs)
        with pytest.raises(ParamsError, match=r"train\.finetune_blocks"):
            TrainParams(model="xception", image_size=71, finetune_epochs=1, finetune_blocks=bad).check()
    set_phase(model, "finetune", finetune_blocks=14)  # all blocks: only BatchNormalization stays frozen
    bn = sum(
        layer.count_params()
        for layer in model.get_layer("xception_base").layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )
    assert count_params(model)[1] == bn


def test_augmentation_in_tf_data() -> None:
    import tensorflow as tf

    aug = build_augmentation(PolicyParams(**POLICY), seed=0)
    assert [layer.name for layer in aug.layers] == [
        "rotation", "translation", "shear", "zoom", "flip", "brightness", "contrast", "clip",
    ]  # fmt: skip
    x = images(4, 32)
    x[:, :4] = 255.0  # saturated rows, so that brightness up must be clipped
    x[:, -4:] = 0.0
    batches = [b.numpy() for b in tf.data.Dataset.from_tensors(x).repeat(3).map(lambda b: aug(b, training=True))]
    for b in batches:
        assert b.shape == x.shape and b.dtype == np.float32
        assert b.min() >= 0.0 and b.max() <= 255.0
        assert np.abs(b - x).mean() > 1.0  # the training batch changed
    assert np.abs(batches[0] - batches[1]).mean() > 1.0  # and differently each time
    np.testing.assert_array_equal(np.asarray(aug(x, training=False)), x)  # identity at inference


def test_augmentation_zero_policy_and_omitted_layers() -> None:
    off = {key: (False if key == "flip" else 0.0) for key in POLICY}
    aug = build_augmentation(PolicyParams(**off), seed=0)
    assert [layer.name for layer in aug.layers] == ["clip"]
    x = images(2, 16)
    np.testing.assert_array_equal(np.asarray(aug(x, training=True)), x)
    only = build_augmentation(PolicyParams(**{**off, "brightness": 0.5}), seed=0)
    assert [layer.name for layer in only.layers] == ["brightness", "clip"]
    out = np.asarray(only(np.full((8, 4, 4, 3), 250.0, np.float32), training=True))
    assert out.max() <= 255.0 and out.min() >= 0.0 and not np.allclose(out, 250.0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_serving_copy_is_smaller_and_equivalent(name: str, tmp_path: Path) -> None:
    model = build(name, num_classes=3)
    set_phase(model, "finetune", finetune_blocks=1)
    compile_model(model, optimizer="adam", learning_rate=1e-4)
    x = images(4, SIZES[name])
    model.train_on_batch(x, np.array([0, 1, 2, 0]))
    full = tmp_path / "full.keras"
    model.save(full)  # with optimizer state
    serving = save_serving_copy(model, tmp_path / "models" / "model.keras")
    assert serving.is_file() and not list(serving.parent.glob(".*.tmp"))
    trainable = count_params(model)[0]
    assert full.stat().st_size - serving.stat().st_size > 4 * trainable  # at least the Adam moments are gone
    loaded = keras.models.load_model(serving, compile=False)
    assert getattr(loaded, "optimizer", None) is None
    assert loaded.inputs[0].name == "image" and loaded.layers[-1].name == "probabilities"
    np.testing.assert_array_equal(predict(loaded, x), predict(model, x))
    assert model.optimizer is not None  # the trained model itself is left as it was
    with pytest.raises(ValueError, match=r"\.keras"):
        save_serving_copy(model, tmp_path / "model.h5")


def test_saved_models_with_the_custom_loss_and_layers_load_again(tmp_path: Path) -> None:
    """The Keras registrations survive the split: a model saved WITH its compile config (the smoothed loss) and a
    model holding the augmentation layers (RandomRot90, ClipToRange) load back as the same classes."""
    model = build("compact_cnn", num_classes=3)
    compile_model(model, optimizer="adam", learning_rate=0.01, label_smoothing=0.2)
    x = images(4, SIZES["compact_cnn"])
    model.train_on_batch(x, np.array([0, 1, 2, 0]))
    path = tmp_path / "compiled.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # compile=True: the loss is rebuilt from its registered name
    assert isinstance(loaded.loss, SmoothedSparseCrossentropy) and loaded.loss.label_smoothing == pytest.approx(0.2)
    np.testing.assert_allclose(predict(loaded, x), predict(model, x), rtol=1e-6)

    aug = build_augmentation(PolicyParams(flip=True, rot90=True, brightness=0.1), seed=3)
    inputs = keras.Input((16, 16, 3))
    wrapped = keras.Model(inputs, aug(inputs))
    path = tmp_path / "augmentation.keras"
    wrapped.save(path)
    again = keras.models.load_model(path)
    layers = {type(layer) for layer in again.get_layer("augmentation").layers}
    assert {RandomRot90, ClipToRange} <= layers
    x = images(2, 16)
    np.testing.assert_array_equal(np.asarray(again(x, training=False)), x)
    assert keras.saving.get_registered_name(RandomRot90) == "emassist>RandomRot90"
    assert keras.saving.get_registered_name(SmoothedSparseCrossentropy) == "emassist>SmoothedSparseCrossentropy"
