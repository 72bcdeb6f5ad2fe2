"""THE model-input function, shared by training, evaluation and serving.

Pipeline for every image, wherever it comes from:
``imaging.decode_image`` → ``imaging.standardize`` (data bar cropped, 8-bit grayscale, cache size;
ingest stores exactly this as PNG) → :func:`to_model_input` (resize to the model's size, 3 channels).
Scaling to the backbone's range happens inside the model (a Rescaling layer), so it ships with it.
"""

from __future__ import annotations

from typing import Any


def to_model_input(gray: Any, image_size: int) -> Any:
    """uint8 grayscale ``[..., H, W, 1]`` (one image or a batch) → float32 ``[..., S, S, 3]`` in 0..255.

    Works on NumPy arrays and on tensors inside a ``tf.data`` graph alike.
    """
    import tensorflow as tf

    x = tf.convert_to_tensor(gray)
    if x.shape.rank is not None and x.shape.rank == 2:
        x = x[..., None]
    x = tf.cast(x, tf.float32)
    x = tf.image.resize(x, (image_size, image_size), method="bilinear", antialias=True)
    x = tf.clip_by_value(x, 0.0, 255.0)
    return tf.image.grayscale_to_rgb(x)
