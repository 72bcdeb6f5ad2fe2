"""The online augmentation: Keras preprocessing layers applied to training batches inside ``tf.data``.

:func:`build_augmentation` turns an ``augment.online_policy`` (:class:`emassist.config.settings.PolicyParams`,
validated at load) into a ``keras.Sequential``; :class:`RandomRot90` and :class:`ClipToRange` are its two custom
layers (Keras-serializable, package ``emassist``). The offline copies of the augment stage are
:mod:`emassist.data.augment`; both read the same policy keys and fractions.
"""

from __future__ import annotations

from typing import Any

import keras

from emassist.config.settings import PolicyParams


@keras.saving.register_keras_serializable(package="emassist")
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


@keras.saving.register_keras_serializable(package="emassist")
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


def build_augmentation(policy: PolicyParams, seed: int) -> keras.Sequential:
    """Keras preprocessing layers for training batches (float32 [B, S, S, 3] in 0..255, inside ``tf.data``).

    Same keys and fractions as the offline augmentation (``augment.policy``): rotation (of a full turn),
    height/width shift, shear (along x, as offline), zoom, flip (horizontal and vertical), rot90 (a random number
    of quarter turns per image), brightness (of 255), contrast. A 0 / false value leaves its layer out. Geometric
    layers fill with mirrored content (``fill_mode="reflect"``, as offline). Identity when called with
    ``training=False``; output clipped to 0..255. ``policy`` was validated by ``load_params``.
    """
    p = policy
    layers: list[keras.layers.Layer] = []
    n = 0

    def s() -> int:  # a distinct seed per layer, so their random draws are not correlated
        nonlocal n
        n += 1
        return seed + n

    if p.rotation:
        layers.append(keras.layers.RandomRotation(p.rotation, fill_mode="reflect", seed=s(), name="rotation"))
    if p.height_shift or p.width_shift:
        layers.append(
            keras.layers.RandomTranslation(
                p.height_shift, p.width_shift, fill_mode="reflect", seed=s(), name="translation"
            )
        )
    if p.shear:
        layers.append(
            keras.layers.RandomShear(x_factor=p.shear, y_factor=0.0, fill_mode="reflect", seed=s(), name="shear")
        )
    if p.zoom:
        layers.append(keras.layers.RandomZoom(p.zoom, fill_mode="reflect", seed=s(), name="zoom"))
    if p.flip:
        layers.append(keras.layers.RandomFlip("horizontal_and_vertical", seed=s(), name="flip"))
    if p.rot90:
        layers.append(RandomRot90(seed=s(), name="rot90"))
    if p.brightness:
        layers.append(keras.layers.RandomBrightness(p.brightness, value_range=(0, 255), seed=s(), name="brightness"))
    if p.contrast:
        layers.append(keras.layers.RandomContrast(p.contrast, value_range=(0, 255), seed=s(), name="contrast"))
    layers.append(ClipToRange(0.0, 255.0, name="clip"))
    return keras.Sequential(layers, name="augmentation")
