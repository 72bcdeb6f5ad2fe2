"""Training phases: which weights train in each phase, and compiling the model for it.

Two-phase fine-tuning of ``xception`` (:func:`set_phase`): ``"head"`` trains only the new classifier on a frozen
base; ``"finetune"`` also unfreezes the top ``train.finetune_blocks`` of Xception's 14 blocks, with every
BatchNormalization layer kept frozen (so it stays in inference mode and keeps its ImageNet statistics). The other
models train everything in both phases. Recompile (:func:`compile_model`) after each :func:`set_phase`.

The ``train.*`` values passed here were checked by ``load_params`` (:mod:`emassist.config.settings`).
"""

from __future__ import annotations

from typing import Any

import keras

from emassist.config.choices import XCEPTION_BLOCKS
from emassist.model.builders import XCEPTION_BASE
from emassist.model.losses import SmoothedSparseCrossentropy

PHASES: tuple[str, ...] = ("head", "finetune")
SGD_MOMENTUM = 0.9


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

    ``optimizer``, ``learning_rate`` and ``label_smoothing`` are ``train.*`` values checked by ``load_params``;
    ``decay_steps`` (a positive step count) is computed by the training from them.

    ``optimizer``: ``rmsprop`` | ``adam`` | ``sgd`` (momentum 0.9, no Nesterov). ``decay_steps``: when given, the
    rate follows a cosine decay from ``learning_rate`` to 0 over that many optimizer steps (``train.lr_schedule:
    cosine``); otherwise it stays constant (and ReduceLROnPlateau may lower it). ``label_smoothing`` > 0 mixes
    that share of a uniform distribution into the one-hot targets (:class:`SmoothedSparseCrossentropy`).
    """
    rate: float | keras.optimizers.schedules.LearningRateSchedule = learning_rate
    if decay_steps is not None:  # computed by the caller, not a setting: checked here
        if isinstance(decay_steps, bool) or not isinstance(decay_steps, int) or decay_steps < 1:
            raise ValueError(f"decay_steps must be a positive integer, got {decay_steps!r}")
        rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps)
    if optimizer == "rmsprop":
        opt: keras.optimizers.Optimizer = keras.optimizers.RMSprop(learning_rate=rate)
    elif optimizer == "adam":
        opt = keras.optimizers.Adam(learning_rate=rate)
    else:  # sgd, the last of emassist.config.choices.OPTIMIZERS
        opt = keras.optimizers.SGD(learning_rate=rate, momentum=SGD_MOMENTUM)
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
