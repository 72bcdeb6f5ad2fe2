"""Global-pooled features of a frozen ``keras.applications`` backbone: the embeddings of the leakage grouping.

The split step (:mod:`emassist.pipeline.split`) calls :func:`embed_images` when ``split.embedding`` is set and hands
the vectors to the data layer (:func:`emassist.data.splitting.split_manifest`), which links images whose cosine
similarity reaches ``split.embedding_threshold``. The backbone is built with ``include_top=False, pooling="avg"`` and
fed through its own ``preprocess_input``; images are the cached grayscale PNGs, resized by
:func:`emassist.data.preprocess.to_model_input` as for the classifier.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from emassist.data.preprocess import to_model_input

#: keras.applications constructor and preprocessing module per backbone, and its smallest input side.
BACKBONES: dict[str, tuple[str, str, int]] = {
    "xception": ("Xception", "xception", 71),
    "mobilenet_v2": ("MobileNetV2", "mobilenet_v2", 32),
}
BATCH = 32


class EmbeddingError(RuntimeError):
    """The backbone cannot be built or its weights cannot be loaded; the message names the setting."""


def check_backbone(backbone: str, image_size: int) -> None:
    """Fail before any work on a backbone / size keras.applications would refuse (a ValueError naming the key)."""
    if backbone not in BACKBONES:
        raise ValueError(f"split.embedding_backbone: unknown backbone {backbone!r} (known: {', '.join(BACKBONES)})")
    smallest = BACKBONES[backbone][2]
    if image_size < smallest:
        raise ValueError(f"split.embedding_image_size: {backbone} needs at least {smallest} px, got {image_size}")


def build_backbone(backbone: str, image_size: int, weights: str | os.PathLike[str] | None) -> Any:
    """The frozen backbone (``include_top=False, pooling="avg"``) as a keras.Model on ``[B, S, S, 3]`` inputs.

    ``weights``: ``None`` (random, for tests), ``"imagenet"`` (downloaded by Keras, or found in
    ``$KERAS_HOME/models/``) or the path of a local ``.h5`` / ``.weights.h5`` file of the same backbone.
    """
    check_backbone(backbone, image_size)
    import keras  # lazy: TensorFlow/Keras take seconds to import; the split step needs them only with embeddings on

    if weights not in (None, "imagenet") and not Path(weights).expanduser().is_file():
        raise EmbeddingError(
            f"split.embedding: weights file {str(weights)!r} does not exist (use imagenet, null, or the path of a "
            f"local .h5 / .weights.h5 file of the {backbone} backbone)"
        )
    constructor = getattr(keras.applications, BACKBONES[backbone][0])
    resolved = weights if weights in (None, "imagenet") else str(Path(weights).expanduser())
    try:
        model = constructor(include_top=False, weights=resolved, input_shape=(image_size, image_size, 3), pooling="avg")
    except Exception as exc:
        where = "downloading the ImageNet weights" if weights == "imagenet" else f"loading {str(weights)!r}"
        raise EmbeddingError(
            f"split.embedding: {where} for the {backbone} backbone failed ({type(exc).__name__}: {exc}). "
            "Offline, copy the weights file here and set split.embedding to its path"
        ) from exc
    model.trainable = False
    return model


def _gray(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"))[..., None]
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"cannot read the cached image {str(path)!r} ({exc}): rerun the ingest stage") from exc


def embed_images(
    paths: Sequence[Path],
    *,
    backbone: str,
    weights: str | os.PathLike[str] | None,
    image_size: int,
    batch_size: int = BATCH,
    model: Any = None,
) -> np.ndarray:
    """float32 ``[N, D]`` pooled features of the grayscale images at ``paths`` (one row per path, in order).

    ``model`` reuses a backbone from :func:`build_backbone` (else one is built from the other arguments).
    """
    import keras  # lazy: see build_backbone
    import tensorflow as tf  # lazy: see build_backbone

    net = model if model is not None else build_backbone(backbone, image_size, weights)
    preprocess = getattr(keras.applications, BACKBONES[backbone][1]).preprocess_input

    @tf.function(reduce_retracing=True)
    def forward(x: Any) -> Any:
        return net(preprocess(to_model_input(x, image_size)), training=False)

    out: list[np.ndarray] = []
    for start in range(0, len(paths), batch_size):
        chunk = [_gray(Path(p)) for p in paths[start : start + batch_size]]
        # Cached images share one size; resize any odd one first so the batch stacks.
        side = chunk[0].shape[:2]
        chunk = [g if g.shape[:2] == side else np.asarray(Image.fromarray(g[..., 0]).resize(side[::-1]))[..., None]
                 for g in chunk]  # fmt: skip
        out.append(np.asarray(forward(tf.constant(np.stack(chunk)))))
    dim = int(net.output_shape[-1])
    return np.concatenate(out).astype(np.float32) if out else np.empty((0, dim), dtype=np.float32)
