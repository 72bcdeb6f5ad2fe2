"""The classifiers (``simple_cnn`` baseline | ``xception`` transfer learning), their training phases and the
online augmentation.

Every model takes ``"image"``: float32 ``[B, S, S, 3]`` in 0..255, exactly what
:func:`emassist.data.preprocess.to_model_input` returns, and answers ``"probabilities"``: float32 softmax ``[B, C]``.
Scaling to the backbone's range is the model's first layer (a ``Rescaling``), so it ships inside the saved file
and training, evaluation and serving can never disagree about it.

Two-phase fine-tuning of ``xception`` (:func:`set_phase`): ``"head"`` trains only the new classifier on a frozen
base; ``"finetune"`` also unfreezes the top ``finetune_blocks`` of Xception's 14 blocks, with every
BatchNormalization layer kept frozen (so it stays in inference mode and keeps its ImageNet statistics).
Recompile (:func:`compile_model`) after each :func:`set_phase`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import keras

from emassist.core.atomic import atomic_path

MODEL_NAMES: tuple[str, ...] = ("simple_cnn", "compact_cnn", "xception")
PHASES: tuple[str, ...] = ("head", "finetune")
OPTIMIZERS: tuple[str, ...] = ("rmsprop", "adam", "sgd")
XCEPTION_BASE = "xception_base"
XCEPTION_BLOCKS = 14
XCEPTION_MIN_SIZE = 71  # smallest input keras.applications.Xception accepts
SIMPLE_CNN_MIN_SIZE = 8
COMPACT_CNN_FILTERS = (32, 64, 128, 256)
COMPACT_CNN_MIN_SIZE = 32  # a stride-2 stem and four 2× poolings leave 1×1 at 32 px
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
SGD_MOMENTUM = 0.9


# --------------------------------------------------------------------------------------------------- building


def build_model(
    name: str,
    *,
    num_classes: int,
    image_size: int,
    weights: str | os.PathLike[str] | None = None,
    dropout: float = 0.3,
    seed: int = 42,
) -> keras.Model:
    """A fresh, uncompiled classifier: ``"image"`` float32 [B, S, S, 3] in 0..255 → ``"probabilities"`` [B, C].

    ``weights`` (xception only): ``"imagenet"`` (downloaded by Keras), ``None`` (random) or a local ``.h5`` /
    ``.weights.h5`` file holding weights of the Xception base (``include_top=False``), e.g. the ImageNet file
    copied to a machine without internet. ``dropout`` is the rate before xception's classifier (simple_cnn
    keeps the baseline's fixed 0.25 and 0.5). ``seed`` fixes the initializers and dropouts of the layers built
    here; a random (``weights=None``) Xception base follows Keras' global seed (``keras.utils.set_random_seed``).
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"train.model: unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes (the number of data.classes) must be an integer >= 2, got {num_classes!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise ValueError(f"train.image_size must be an integer, got {image_size!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"train.dropout must be in [0, 1), got {dropout!r}")
    if name in ("simple_cnn", "compact_cnn"):
        if weights is not None:
            raise ValueError(f"train.weights must be null for {name} (it has no pretrained weights), got {weights!r}")
        smallest = COMPACT_CNN_MIN_SIZE if name == "compact_cnn" else SIMPLE_CNN_MIN_SIZE
        if image_size < smallest:
            raise ValueError(f"train.image_size must be >= {smallest} for {name}, got {image_size}")
        if name == "compact_cnn":
            return _compact_cnn(num_classes, image_size, dropout, seed)
        return _simple_cnn(num_classes, image_size, seed)
    if image_size < XCEPTION_MIN_SIZE:
        raise ValueError(f"train.image_size must be >= {XCEPTION_MIN_SIZE} for xception, got {image_size}")
    return _xception(num_classes, image_size, _resolve_weights(weights), dropout, seed)


def _resolve_weights(weights: str | os.PathLike[str] | None) -> str | None:
    """``None`` | ``"imagenet"`` | the path of an existing local ``.h5`` file (as a string)."""
    if weights is None or weights == "imagenet":
        return weights
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"train.weights: no weights file at {str(path)!r} (use imagenet, null or the path of a local "
            ".h5 / .weights.h5 file of the Xception base)"
        )
    if path.suffix.lower() not in (".h5", ".hdf5"):
        raise ValueError(f"train.weights: {str(path)!r} is not an .h5 / .weights.h5 file")
    return str(path)


def _init(seed: int) -> keras.initializers.Initializer:
    return keras.initializers.GlorotUniform(seed=seed)


def _output_layer(num_classes: int, seed: int) -> keras.layers.Dense:
    # float32 even under a mixed_float16 policy: a float16 softmax is not numerically safe.
    return keras.layers.Dense(
        num_classes, activation="softmax", kernel_initializer=_init(seed), dtype="float32", name=OUTPUT_NAME
    )


def _simple_cnn(num_classes: int, image_size: int, seed: int) -> keras.Model:
    """The NFFA study's baseline (the classic Keras MNIST CNN), kept faithful: one pooling, then Flatten.

    At 96 px that is ~8.7 M parameters, at 128 px ~15.8 M (almost all in the first Dense); still trainable.
    """
    inputs = keras.Input((image_size, image_size, 3), dtype="float32", name=INPUT_NAME)
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    x = keras.layers.Conv2D(32, 3, activation="relu", kernel_initializer=_init(seed), name="conv1")(x)
    x = keras.layers.Conv2D(32, 3, activation="relu", kernel_initializer=_init(seed + 1), name="conv2")(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Dropout(0.25, seed=seed + 2, name="dropout1")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(128, activation="relu", kernel_initializer=_init(seed + 3), name="dense")(x)
    x = keras.layers.Dropout(0.5, seed=seed + 4, name="dropout2")(x)
    outputs = _output_layer(num_classes, seed + 5)(x)
    return keras.Model(inputs, outputs, name="simple_cnn")


def _compact_cnn(num_classes: int, image_size: int, dropout: float, seed: int) -> keras.Model:
    """A small, fast CNN trained from scratch: a stride-2 stem, four Conv-BN-ReLU-MaxPool stages, global pooling.

    Filters 32 / 32-64-128-256, ~0.4 M parameters. The stride-2 stem and plain 3×3 convolutions (which oneDNN runs
    far faster on a CPU than depthwise-separable ones) make it ~3× faster per image than the earlier
    SeparableConv design at the same size, so the demo can train on more images for more epochs. The CPU default
    for the demo; xception with ImageNet weights is the model for the real data. Needs ``image_size`` >= 32.
    """
    inputs = keras.Input((image_size, image_size, 3), dtype="float32", name=INPUT_NAME)
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, kernel_initializer=_init(seed),
                            name="stem_conv")(x)  # fmt: skip
    x = keras.layers.BatchNormalization(momentum=0.9, name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    for i, filters in enumerate(COMPACT_CNN_FILTERS):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer=_init(seed + 1 + i),
                                name=f"stage{i}_conv")(x)  # fmt: skip
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"stage{i}_bn")(x)
        x = keras.layers.ReLU(name=f"stage{i}_relu")(x)
        x = keras.layers.MaxPooling2D(2, name=f"stage{i}_pool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(dropout, seed=seed + 10, name="dropout")(x)
    outputs = _output_layer(num_classes, seed + 11)(x)
    return keras.Model(inputs, outputs, name="compact_cnn")


def _xception(num_classes: int, image_size: int, weights: str | None, dropout: float, seed: int) -> keras.Model:
    inputs = keras.Input((image_size, image_size, 3), dtype="float32", name=INPUT_NAME)
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="rescale")(inputs)  # Xception expects -1..1
    base = keras.applications.Xception(
        include_top=False,
        weights=weights,
        input_shape=(image_size, image_size, 3),
        pooling="avg",
        name=XCEPTION_BASE,
    )
    x = base(x)
    x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(x)
    outputs = _output_layer(num_classes, seed + 1)(x)
    return keras.Model(inputs, outputs, name="xception")


# ----------------------------------------------------------------------------------------- phases and compiling


def _xception_base(model: keras.Model) -> keras.Model | None:
    try:
        return model.get_layer(XCEPTION_BASE)
    except ValueError:
        return None


def set_phase(model: keras.Model, phase: str, *, finetune_blocks: int = 2) -> None:
    """Set which weights train in ``phase`` (``"head"`` | ``"finetune"``); compile the model afterwards.

    xception: ``"head"`` freezes the whole base. ``"finetune"`` unfreezes Xception's top ``finetune_blocks``
    blocks (``block{15-k}_*`` through ``block14_*``, with the unnamed 1×1 residual projection of block 13, which
    Keras lists among block 13's layers) and keeps every BatchNormalization layer frozen. simple_cnn: everything
    trains in both phases.
    """
    if phase not in PHASES:
        raise ValueError(f"unknown training phase {phase!r}; choose one of {', '.join(PHASES)}")
    base = _xception_base(model)
    if base is None:
        _set_trainable(model, True)
        return
    if phase == "head":
        _set_trainable(model, True)
        _set_trainable(base, False)
        return
    if isinstance(finetune_blocks, bool) or not isinstance(finetune_blocks, int):
        raise ValueError(f"train.finetune_blocks must be an integer, got {finetune_blocks!r}")
    if not 1 <= finetune_blocks <= XCEPTION_BLOCKS:
        raise ValueError(f"train.finetune_blocks must be in 1..{XCEPTION_BLOCKS}, got {finetune_blocks}")
    _set_trainable(model, True)  # every sublayer, recursively; narrowed below
    first = XCEPTION_BLOCKS + 1 - finetune_blocks
    prefixes = tuple(f"block{b}_" for b in range(first, XCEPTION_BLOCKS + 1))
    # Layers come in topological order, so everything from the first layer of block `first` onward belongs to
    # the top blocks (this catches the unnamed residual Conv2D of block 13 too).
    start = next(i for i, layer in enumerate(base.layers) if layer.name.startswith(prefixes))
    for i, layer in enumerate(base.layers):
        unfrozen = i >= start or layer.name.startswith(prefixes)
        _set_trainable(layer, unfrozen and not isinstance(layer, keras.layers.BatchNormalization))


def _set_trainable(layer: keras.layers.Layer, value: bool) -> None:
    """``layer.trainable = value``, applied to its sublayers and variables even when the flag already has that value.

    On the TensorFlow backend ``layer.trainable = True`` is skipped altogether when ``layer.trainable`` is already
    True (``KerasAutoTrackable.__setattr__`` short-circuits ``self.x = self.x``), so it would not reach a frozen
    sub-model (e.g. unfreezing after the head phase). Flipping the flag first makes the setter always run.
    """
    layer.trainable = not value
    layer.trainable = value


def count_params(model: keras.Model) -> tuple[int, int]:
    """(trainable, non-trainable) parameter counts (BatchNormalization moving statistics count as frozen)."""

    def total(variables: list[Any]) -> int:
        unique = {id(v): v for v in variables}.values()
        return int(sum(int(_prod(v.shape)) for v in unique))

    return total(model.trainable_weights), total(model.non_trainable_weights)


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


@keras.saving.register_keras_serializable(package="emassist")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy of integer labels against smoothed one-hot targets (Keras' sparse loss has no smoothing)."""

    def __init__(self, label_smoothing: float = 0.1, name: str = "smoothed_sparse_crossentropy", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        labels = keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32")
        one_hot = keras.ops.one_hot(labels, y_pred.shape[-1], dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(one_hot, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def compile_model(
    model: keras.Model,
    *,
    optimizer: str,
    learning_rate: float,
    jit_compile: bool = False,
    decay_steps: int | None = None,
    label_smoothing: float = 0.0,
) -> None:
    """Compile for integer labels: sparse categorical cross-entropy; metrics ``accuracy`` and ``top3``.

    ``optimizer``: ``rmsprop`` | ``adam`` | ``sgd`` (momentum 0.9, no Nesterov). ``decay_steps``: when given, the
    rate follows a cosine decay from ``learning_rate`` to 0 over that many optimizer steps (``train.lr_schedule:
    cosine``); otherwise it stays constant (and ReduceLROnPlateau may lower it). ``label_smoothing`` > 0 mixes
    that share of a uniform distribution into the one-hot targets (:class:`SmoothedSparseCrossentropy`).
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"train.label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if not learning_rate > 0:
        raise ValueError(f"train.learning_rate must be > 0, got {learning_rate!r}")
    rate: float | keras.optimizers.schedules.LearningRateSchedule = learning_rate
    if decay_steps is not None:
        if isinstance(decay_steps, bool) or not isinstance(decay_steps, int) or decay_steps < 1:
            raise ValueError(f"decay_steps must be a positive integer, got {decay_steps!r}")
        rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps)
    if optimizer == "rmsprop":
        opt: keras.optimizers.Optimizer = keras.optimizers.RMSprop(learning_rate=rate)
    elif optimizer == "adam":
        opt = keras.optimizers.Adam(learning_rate=rate)
    elif optimizer == "sgd":
        opt = keras.optimizers.SGD(learning_rate=rate, momentum=SGD_MOMENTUM)
    else:
        raise ValueError(f"train.optimizer: unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    model.compile(
        optimizer=opt,
        loss=(
            SmoothedSparseCrossentropy(label_smoothing)
            if label_smoothing > 0
            else keras.losses.SparseCategoricalCrossentropy()
        ),
        metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            keras.metrics.SparseTopKCategoricalAccuracy(k=3, name="top3"),
        ],
        jit_compile=bool(jit_compile),
    )


# ------------------------------------------------------------------------------------------------ augmentation


class ClipToRange(keras.layers.Layer):
    """Clip values into ``[low, high]`` (the last augmentation layer: pixels stay in 0..255)."""

    def __init__(self, low: float = 0.0, high: float = 255.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.low = float(low)
        self.high = float(high)

    def call(self, inputs: Any) -> Any:
        return keras.ops.clip(inputs, self.low, self.high)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "low": self.low, "high": self.high}


class RandomRot90(keras.layers.Layer):
    """Turn each image of a square batch ``[B, S, S, C]`` by its own random multiple of 90° (training only).

    Exact (no interpolation, no fill), so it is as cheap as a flip; with flips it covers all eight symmetries of
    the square. TensorFlow ops: it runs inside the ``tf.data`` input pipeline, never inside the saved model.
    """

    def __init__(self, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seed = seed

    def call(self, inputs: Any, training: bool = True) -> Any:
        import tensorflow as tf

        if not training:
            return inputs
        x = tf.convert_to_tensor(inputs)
        turns = tf.random.uniform(tf.shape(x)[:1], 0, 4, dtype=tf.int32, seed=self.seed)
        options = [x]
        for _ in range(3):
            options.append(tf.reverse(tf.transpose(options[-1], (0, 2, 1, 3)), axis=[1]))  # +90° each
        stacked = tf.stack(options, axis=1)  # [B, 4, S, S, C]
        return tf.gather(stacked, turns, axis=1, batch_dims=1)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "seed": self.seed}


def build_augmentation(policy: Mapping[str, float | bool], seed: int) -> keras.Sequential:
    """Keras preprocessing layers for training batches (float32 [B, S, S, 3] in 0..255, inside ``tf.data``).

    Same keys and fractions as the offline augmentation (``augment.policy``): rotation (of a full turn),
    height/width shift, shear (along x, as offline), zoom, flip (horizontal and vertical), rot90 (a random number
    of quarter turns per image), brightness (of 255), contrast. A 0 / false value leaves its layer out. Geometric
    layers fill with mirrored content (``fill_mode="reflect"``, as offline). Identity when called with
    ``training=False``; output clipped to 0..255.
    """
    known = {"rotation", "width_shift", "height_shift", "shear", "zoom", "flip", "rot90", "brightness", "contrast"}
    unknown = sorted(set(policy) - known)
    if unknown:
        raise ValueError(f"augment.policy: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(known))})")

    def value(key: str) -> float:
        v = policy.get(key, 0.0)
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"augment.policy.{key} must be a number in [0, 1], got {v!r}")
        return float(v)

    layers: list[keras.layers.Layer] = []
    n = 0

    def s() -> int:  # a distinct seed per layer, so their random draws are not correlated
        nonlocal n
        n += 1
        return seed + n

    if value("rotation"):
        layers.append(keras.layers.RandomRotation(value("rotation"), fill_mode="reflect", seed=s(), name="rotation"))
    if value("height_shift") or value("width_shift"):
        layers.append(
            keras.layers.RandomTranslation(
                value("height_shift"), value("width_shift"), fill_mode="reflect", seed=s(), name="translation"
            )
        )
    if value("shear"):
        layers.append(
            keras.layers.RandomShear(x_factor=value("shear"), y_factor=0.0, fill_mode="reflect", seed=s(), name="shear")
        )
    if value("zoom"):
        layers.append(keras.layers.RandomZoom(value("zoom"), fill_mode="reflect", seed=s(), name="zoom"))
    switches = {key: policy.get(key, False) for key in ("flip", "rot90")}
    for key, on in switches.items():
        if not isinstance(on, bool):
            raise ValueError(f"augment.policy.{key} must be true or false, got {on!r}")
    if switches["flip"]:
        layers.append(keras.layers.RandomFlip("horizontal_and_vertical", seed=s(), name="flip"))
    if switches["rot90"]:
        layers.append(RandomRot90(seed=s(), name="rot90"))
    if value("brightness"):
        layers.append(
            keras.layers.RandomBrightness(value("brightness"), value_range=(0, 255), seed=s(), name="brightness")
        )
    if value("contrast"):
        layers.append(keras.layers.RandomContrast(value("contrast"), value_range=(0, 255), seed=s(), name="contrast"))
    layers.append(ClipToRange(0.0, 255.0, name="clip"))
    return keras.Sequential(layers, name="augmentation")


# ----------------------------------------------------------------------------------------------------- saving


def save_serving_copy(model: keras.Model, path: str | os.PathLike[str]) -> Path:
    """Save ``model`` as a ``.keras`` file without optimizer state (architecture and weights only), atomically.

    ``keras.saving.save_model`` has no ``include_optimizer`` for ``.keras`` files in Keras 3 (it only applies to
    legacy ``.h5``) and always stores a compiled model's optimizer variables (for Adam twice the weights again),
    and ``keras.models.clone_model`` compiles its clone when the original is compiled (fresh optimizer variables,
    just as large), so the model is rebuilt from its config alone (never compiled) with the same weights and
    saved instead. Load it with
    ``keras.models.load_model(path, compile=False)``.
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"the serving copy must be a .keras file, got {str(path)!r}")
    clone = type(model).from_config(model.get_config())  # architecture only: no compile config, no optimizer
    clone.set_weights(model.get_weights())
    if getattr(clone, "optimizer", None) is not None:  # pragma: no cover - guards against a future Keras compiling it
        raise RuntimeError("the serving copy of the model unexpectedly carries an optimizer")
    with atomic_path(path) as tmp:
        keras.saving.save_model(clone, tmp)
    return path
