"""The model architectures: ``simple_cnn`` (the study's baseline), ``compact_cnn`` (the CPU default) and ``xception``
(transfer learning). This module only builds them; training phases are in :mod:`emassist.model.phases`, the loss in
:mod:`emassist.model.losses`, the online augmentation in :mod:`emassist.model.online_augment` and the saved serving
copy in :mod:`emassist.model.saving`.

Every model takes ``"image"``: float32 ``[B, S, S, 3]`` in 0..255, exactly what
:func:`emassist.data.preprocess.to_model_input` returns, and answers ``"probabilities"``: float32 softmax ``[B, C]``.
With ``scale_input`` (``train.scale_input``) it also takes ``"scale"``: float32 ``[B, 2]`` (log10 of the model
input's pixel size in nm, known flag; :mod:`emassist.model.scale`), passed through a small ReLU Dense
(``scale_dense``, :data:`~emassist.model.scale.SCALE_UNITS` units: size-class relations need not be monotonic) and
joined to the pooled features (``scale_join``) right before the classifier.
Scaling to the backbone's range is the model's first layer (a ``Rescaling``), so it ships inside the saved file
and training, evaluation and serving can never disagree about it.

The arguments are the settings :class:`emassist.config.settings.TrainParams` has already validated (model name,
size against :data:`emassist.config.choices.MIN_IMAGE_SIZE`, weights, dropout): they are not checked again here.
"""

from __future__ import annotations

import os
from pathlib import Path

import keras

from emassist.model.scale import SCALE_DIM, SCALE_INPUT, SCALE_UNITS

XCEPTION_BASE = "xception_base"  # the name of the Xception sub-model (emassist.model.phases unfreezes its blocks)
COMPACT_CNN_FILTERS = (32, 64, 128, 256)
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"


def build_model(
    name: str,
    *,
    num_classes: int,
    image_size: int,
    weights: str | os.PathLike[str] | None = None,
    dropout: float = 0.3,
    seed: int = 42,
    scale_input: bool = False,
) -> keras.Model:
    """A fresh, uncompiled classifier: ``"image"`` float32 [B, S, S, 3] in 0..255 → ``"probabilities"`` [B, C].

    ``name``, ``image_size``, ``weights`` and ``dropout`` are ``train.*`` values checked by ``load_params``;
    ``num_classes`` is ``len(data.classes)``. ``weights`` (xception only): ``"imagenet"`` (downloaded by Keras),
    ``None`` (random) or a local ``.h5`` / ``.weights.h5`` file holding weights of the Xception base
    (``include_top=False``), e.g. the ImageNet file copied to a machine without internet. ``dropout`` is the rate
    before the classifier of compact_cnn and xception (simple_cnn keeps the baseline's fixed 0.25 and 0.5). ``seed``
    fixes the initializers and dropouts of the layers built here; a random (``weights=None``) Xception base follows
    Keras' global seed (``keras.utils.set_random_seed``). ``scale_input``: the second input ``"scale"`` (above).
    """
    if name == "simple_cnn":
        return _simple_cnn(num_classes, image_size, seed, scale_input)
    if name == "compact_cnn":
        return _compact_cnn(num_classes, image_size, dropout, seed, scale_input)
    return _xception(num_classes, image_size, _resolve_weights(weights), dropout, seed, scale_input)


def _scale_join(features: keras.KerasTensor, seed: int, scale_input: bool) -> tuple[keras.KerasTensor, list]:
    """``(features, extra inputs)``: the pooled ``features`` alone, or joined to the scale branch."""
    if not scale_input:
        return features, []
    scale = keras.Input((SCALE_DIM,), dtype="float32", name=SCALE_INPUT)
    s = keras.layers.Dense(SCALE_UNITS, activation="relu", kernel_initializer=_init(seed), name="scale_dense")(scale)
    joined = keras.layers.Concatenate(name="scale_join")([features, s])
    return joined, [scale]


def _model(inputs: keras.KerasTensor, extra: list, outputs: keras.KerasTensor, name: str) -> keras.Model:
    return keras.Model([inputs, *extra] if extra else inputs, outputs, name=name)


def _resolve_weights(weights: str | os.PathLike[str] | None) -> str | None:
    """``None`` | ``"imagenet"`` | the path of the local weights file (as a string).

    ``load_params`` checked that the file exists; it is looked at again only because it may have gone since.
    """
    if weights is None or weights == "imagenet":
        return weights
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"train.weights: no weights file at {str(path)!r} any more (use imagenet, null or the path of a local "
            ".h5 / .weights.h5 file of the Xception base)"
        )
    return str(path)


def _init(seed: int) -> keras.initializers.Initializer:
    return keras.initializers.GlorotUniform(seed=seed)


def _output_layer(num_classes: int, seed: int) -> keras.layers.Dense:
    # float32 even under a mixed_float16 policy: a float16 softmax is not numerically safe.
    return keras.layers.Dense(
        num_classes, activation="softmax", kernel_initializer=_init(seed), dtype="float32", name=OUTPUT_NAME
    )


def _simple_cnn(num_classes: int, image_size: int, seed: int, scale_input: bool = False) -> keras.Model:
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
    x, extra = _scale_join(x, seed + 6, scale_input)
    outputs = _output_layer(num_classes, seed + 5)(x)
    return _model(inputs, extra, outputs, "simple_cnn")


def _compact_cnn(
    num_classes: int, image_size: int, dropout: float, seed: int, scale_input: bool = False
) -> keras.Model:
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
    x, extra = _scale_join(x, seed + 12, scale_input)
    outputs = _output_layer(num_classes, seed + 11)(x)
    return _model(inputs, extra, outputs, "compact_cnn")


def _xception(
    num_classes: int, image_size: int, weights: str | None, dropout: float, seed: int, scale_input: bool = False
) -> keras.Model:
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
    x, extra = _scale_join(x, seed + 2, scale_input)
    outputs = _output_layer(num_classes, seed + 1)(x)
    return _model(inputs, extra, outputs, "xception")
