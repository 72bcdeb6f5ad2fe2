"""THE preprocessor: one object, built from a model's serving config, that every path uses.

Pipeline for every image, wherever it comes from (ingest, training, evaluation, the pyfunc, the web page, the
tile scan, Grad-CAM, the registry gate's re-evaluation)::

    file bytes / path ─ decode ─► full-resolution uint8 gray ─ crop (data bar) ─► resize (cache size)
        = the standardized image ingest caches as PNG ─ to_model_input ─► float32 [S, S, 3] in 0..255

:class:`Preprocessor` holds the settings (``cache_size``, ``crop_databar``, ``max_pixels``, ``min_side``,
``image_size``, ``min_contrast``); the registry writes exactly :meth:`Preprocessor.config` into the model's serving
config and the pyfunc reads it back with :meth:`Preprocessor.from_config`, so a model carries the preprocessing it
was trained with. :func:`to_model_input` is the one TensorFlow function of training's ``tf.data`` and of serving;
scaling to the backbone's range happens inside the model (a Rescaling layer), so it ships with it.

Featureless frames (a blank or navigation-camera frame, or one whose only structure was the data bar) are refused
by :meth:`Preprocessor.standardize` with ``ImageRejected("featureless image: ...")``: the standard deviation of the
gray levels of the standardized image (data bar cropped, resized to the cache size; :func:`gray_contrast`) must
reach ``min_contrast``. Measured on the resized image, not the full one: it costs nothing there (65k pixels), and the
area averaging removes pixel noise, so a blank frame with sensor noise is featureless too, as the model sees it.
Only whole images are checked: tiles (``resize``/``tiles``, the ``standardized`` path) are not, so a flat background
region of a real overview is still scored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from emassist.config.settings import IngestParams, Params
from emassist.data.databar import find_databar
from emassist.data.decode import DecodedImage, ImageRejected, ImageSource, decode_image

#: The serving model's inference parameter (declared in its signature) saying the images sent are already
#: standardized, e.g. tiles cut from an overview whose data bar was cropped once: they are only resized.
STANDARDIZED_PARAM = "standardized"

#: ``min_contrast`` where a serving config lacks it (a model registered before the check): params.yaml's default.
DEFAULT_MIN_CONTRAST: float = IngestParams.min_contrast


def to_model_input(gray: Any, image_size: int) -> Any:
    """uint8 grayscale ``[..., H, W, 1]`` (one image or a batch) → float32 ``[..., S, S, 3]`` in 0..255.

    Works on NumPy arrays and on tensors inside a ``tf.data`` graph alike.
    """
    import tensorflow as tf  # lazy: ingest and the web page's decoding never need TensorFlow

    x = tf.convert_to_tensor(gray)
    if x.shape.rank is not None and x.shape.rank == 2:
        x = x[..., None]
    x = tf.cast(x, tf.float32)
    x = tf.image.resize(x, (image_size, image_size), method="bilinear", antialias=True)
    x = tf.clip_by_value(x, 0.0, 255.0)
    return tf.image.grayscale_to_rgb(x)


def gray_contrast(gray: np.ndarray) -> float:
    """Standard deviation of the gray levels (0..255) of a uint8 image: how much there is to see."""
    return float(np.asarray(gray).std())


def featureless_reason(contrast: float, min_contrast: float) -> str:
    """The ``ImageRejected`` reason of a frame whose :func:`gray_contrast` is below ``min_contrast``."""
    shown = math.floor(contrast * 100) / 100  # rounded down: a value just below the limit never reads as the limit
    return (
        f"featureless image: gray levels vary by {shown:.2f} (std) after the data-bar crop, below "
        f"ingest.min_contrast={min_contrast:g}; a blank or navigation-camera frame? Send an image with visible "
        "structure"
    )


def _as_uint8_gray(gray: np.ndarray, what: str) -> np.ndarray:
    g = np.asarray(gray)
    if g.ndim != 2:
        raise ValueError(f"{what} expects a 2-D grayscale array, got shape {g.shape}")
    if g.dtype != np.uint8:
        g = np.clip(g, 0, 255).astype(np.uint8)
    return g


@dataclass(frozen=True)
class Preprocessor:
    """Decode → data-bar crop → cache-size resize → model input, with one model's settings."""

    cache_size: int  # side of the standardized (cached) square image
    crop_databar: bool
    max_pixels: int  # decode limit on the declared size (decompression bombs)
    min_side: int  # smaller images (either side) are refused
    image_size: int | None = None  # the model's input side; None where no model input is made (ingest)
    min_contrast: float = DEFAULT_MIN_CONTRAST  # whole images less varied than this are refused; 0: no check

    def __post_init__(self) -> None:
        c = self.min_contrast
        if isinstance(c, bool) or not isinstance(c, int | float) or not math.isfinite(c) or c < 0:
            raise ValueError(f"min_contrast must be a finite number >= 0, got {c!r}")

    # ------------------------------------------------------------------------------------------- config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Preprocessor:
        """From a serving config (extra keys, e.g. ``classes``, are ignored). A config without ``min_contrast`` (a
        model registered before the featureless check) gets :data:`DEFAULT_MIN_CONTRAST`."""
        image_size = config.get("image_size")
        return cls(
            cache_size=int(config["cache_size"]),
            crop_databar=bool(config["crop_databar"]),
            max_pixels=int(config["max_pixels"]),
            min_side=int(config["min_side"]),
            image_size=None if image_size is None else int(image_size),
            min_contrast=config.get("min_contrast", DEFAULT_MIN_CONTRAST),
        )

    @classmethod
    def from_params(cls, params: Params) -> Preprocessor:
        """The settings of the pipeline's ``ingest`` and ``train`` sections (already validated)."""
        i = params.ingest
        return cls(i.cache_size, i.crop_databar, i.max_pixels, i.min_side, params.train.image_size, i.min_contrast)

    def config(self) -> dict[str, Any]:
        """The keys :meth:`from_config` reads, as plain JSON values."""
        return asdict(self)

    # ------------------------------------------------------------------------------------------- steps

    def decode(self, source: ImageSource) -> DecodedImage:
        """Full-resolution 8-bit grayscale with this model's limits; raises ``ImageRejected``."""
        return decode_image(source, max_pixels=self.max_pixels, min_side=self.min_side)

    def crop(self, gray: np.ndarray) -> tuple[np.ndarray, int]:
        """The full-resolution image without its data bar (when ``crop_databar``); returns (image, rows cropped)."""
        g = _as_uint8_gray(gray, "crop")
        rows = find_databar(g) if self.crop_databar else 0
        return (g[: g.shape[0] - rows] if rows else g), rows

    def resize(self, gray: np.ndarray) -> np.ndarray:
        """Squash an (already cropped) image to ``cache_size``² uint8; no data-bar search."""
        g = _as_uint8_gray(gray, "resize")
        size = self.cache_size
        im = Image.fromarray(np.ascontiguousarray(g))
        if im.size != (size, size):
            # Shrinking: area averaging (BOX, like OpenCV's INTER_AREA), ~4x faster than Lanczos on 1024x768 -> 256
            # and alias-free enough at these factors. Enlarging (tiny images): Lanczos, which BOX would make blocky.
            shrink = im.width >= size and im.height >= size
            im = im.resize((size, size), Image.Resampling.BOX if shrink else Image.Resampling.LANCZOS)
        return np.asarray(im, dtype=np.uint8)

    def check_features(self, standardized: np.ndarray) -> None:
        """Raise ``ImageRejected("featureless image: ...")`` when a standardized whole image (data bar cropped,
        resized) is flatter than ``min_contrast``: a blank or navigation-camera frame has nothing to classify."""
        contrast = gray_contrast(standardized)
        if contrast < self.min_contrast:
            raise ImageRejected(featureless_reason(contrast, self.min_contrast))

    def standardize(self, gray: np.ndarray) -> tuple[np.ndarray, int]:
        """Crop the data bar and resize: the image ingest caches; returns (image, rows cropped). Raises
        ``ImageRejected`` for a featureless image (:meth:`check_features`)."""
        cropped, rows = self.crop(gray)
        out = self.resize(cropped)
        self.check_features(out)
        return out, rows

    def standardize_file(self, source: ImageSource) -> tuple[np.ndarray, int]:
        """File bytes (or a path) → (standardized image, data-bar rows cropped); raises ``ImageRejected`` (a bad
        file, or a featureless image)."""
        return self.standardize(self.decode(source).gray)

    def tiles(self, full: np.ndarray, corners: Sequence[tuple[int, int]], tile: int) -> np.ndarray:
        """``tile``×``tile`` windows at ``(y, x)`` corners of an already CROPPED full-resolution image, each
        resized to the cache size (no data-bar search of their own, no featureless check: a flat background
        region of a real overview is still scored): uint8 ``[B, S, S]``."""
        g = _as_uint8_gray(full, "tiles")
        out = np.empty((len(corners), self.cache_size, self.cache_size), dtype=np.uint8)
        same = tile == self.cache_size and tile <= min(g.shape)  # the usual scan: tiles are cut at the cache size
        for k, (y, x) in enumerate(corners):
            window = g[y : y + tile, x : x + tile]
            out[k] = window if same else self.resize(window)  # a copy of the window, no PIL round trip
        return out

    def to_model_input(self, gray: Any) -> Any:
        """Standardized uint8 ``[..., H, W, 1]`` → the model's float32 input (see :func:`to_model_input`)."""
        if self.image_size is None:
            raise ValueError("this preprocessor has no image_size: it makes no model input")
        return to_model_input(gray, self.image_size)
