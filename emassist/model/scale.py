"""The scale input of a scale-aware model (``train.scale_input``): how large a pixel of the MODEL INPUT is.

A scale-aware model (:func:`emassist.model.builders.build_model` with ``scale_input=True``) takes a second input
beside ``"image"``: ``"scale"``, float32 ``[B, 2]`` = ``(log10 of the model input's pixel size in nm, 1)`` when the
size is known and ``(0, 0)`` when it is not (:func:`scale_features`). Unknown is a first-class case: training masks
known sizes at random (``train.scale_dropout``), so an image without tags or a readable data bar still classifies.

The pixel size of the model input is the file's own pixel size (``pixel_size_nm``: ingest's manifest, the TIFF
tags or the data bar, or a request's column) times the resize factor from the file to the model input. The
preprocessing crops the data bar (rows only) and squashes the rest to a square, so the factor is the file's
WIDTH over the model's side: :func:`model_input_pixel_size_nm` ``= pixel_size_nm * width / image_size``. A tile of
``tile`` pixels cut from an overview: ``pixel_size_nm * tile / image_size``.

Every place that runs a model goes through :func:`model_inputs` (training's and evaluation's datasets, the pyfunc's
compiled forward pass, Grad-CAM), so a model without the scale input (every model registered before it) gets
exactly the input it always got: the image tensor alone.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from emassist.config.choices import MAX_PIXEL_SIZE_NM, MIN_PIXEL_SIZE_NM

SCALE_INPUT = "scale"  # the second input's name
SCALE_DIM = 2  # (log10 nm, known flag)
SCALE_UNITS = 16  # the small Dense the scale passes through before it joins the pooled features
#: Where a served answer's pixel size came from: the request's column, else what ingest reads from a file.
SCALE_SOURCES: tuple[str, ...] = ("request", "tags", "databar_scalebar", "databar_mag", "unknown")


def valid_pixel_size(value: Any) -> float | None:
    """``value`` as a pixel size in nm when it is a finite number within the plausible range, else None."""
    try:
        nm = float(value)
    except (TypeError, ValueError):
        return None
    return nm if math.isfinite(nm) and MIN_PIXEL_SIZE_NM <= nm <= MAX_PIXEL_SIZE_NM else None


def pixel_size_problem(value: Any) -> str:
    """Why ``value`` is no usable pixel size ("" when it is one): the words of a 400 answer."""
    if isinstance(value, bool):
        return f"not a number ({value!r})"
    try:
        nm = float(value)
    except (TypeError, ValueError):
        return f"not a number ({str(value)[:40]!r})"
    if math.isnan(nm):
        return "NaN (omit the column to have the pixel size read from the file)"
    if nm <= 0:
        return f"{nm:g} nm is not positive"
    if not math.isfinite(nm) or not MIN_PIXEL_SIZE_NM <= nm <= MAX_PIXEL_SIZE_NM:
        return f"{nm:g} nm is outside the plausible {MIN_PIXEL_SIZE_NM:g}..{MAX_PIXEL_SIZE_NM:g} nm of an SEM pixel"
    return ""


def model_input_pixel_size_nm(pixel_size_nm: float | None, source_width: float | None, image_size: int) -> float | None:
    """The pixel size (nm) of the model input made from a file (or tile) ``source_width`` pixels wide whose own
    pixel size is ``pixel_size_nm``; None when either is unknown."""
    nm = valid_pixel_size(pixel_size_nm)
    try:
        width = float(source_width) if source_width is not None else math.nan
    except (TypeError, ValueError):
        width = math.nan
    if nm is None or not math.isfinite(width) or width <= 0 or image_size <= 0:
        return None
    return nm * width / float(image_size)


def scale_features(model_nm: Sequence[float | None] | np.ndarray) -> np.ndarray:
    """float32 ``[B, 2]``: ``(log10 nm, 1)`` for each known model-input pixel size, ``(0, 0)`` for an unknown one
    (None, NaN or not positive)."""
    values = np.array([np.nan if v is None else float(v) for v in np.asarray(model_nm, dtype=object).ravel()])
    known = np.isfinite(values) & (values > 0)
    out = np.zeros((len(values), SCALE_DIM), dtype=np.float32)
    out[known, 0] = np.log10(values[known])
    out[known, 1] = 1.0
    return out


def unknown_scale(n: int) -> np.ndarray:
    """``n`` rows of 'pixel size unknown'."""
    return np.zeros((n, SCALE_DIM), dtype=np.float32)


def has_scale_input(model: Any) -> bool:
    """Whether a Keras model takes the ``"scale"`` input."""
    return any(getattr(t, "name", "").split(":")[0] == SCALE_INPUT for t in getattr(model, "inputs", None) or [])


def keras_file_has_scale_input(path: str | os.PathLike[str]) -> bool:
    """Whether the ``.keras`` file's model takes the ``"scale"`` input, read from its config (no TensorFlow)."""
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    layers = config.get("config", {}).get("input_layers", [])
    names = [entry[0] for entry in layers if isinstance(entry, list) and entry]
    return SCALE_INPUT in names


def model_inputs(images: Any, scale: Any = None, *, scale_aware: bool) -> Any:
    """THE input of a model: the float image batch alone (a model without the scale input, exactly as before), or
    ``{"image": images, "scale": scale}`` (``scale``: float32 ``[B, 2]`` from :func:`scale_features`; None: every
    size unknown)."""
    if not scale_aware:
        return images
    if scale is None and isinstance(images, np.ndarray):
        scale = unknown_scale(len(images))
    elif scale is None:
        import tensorflow as tf  # lazy: only the scale-aware path needs the batch size of a tensor

        scale = tf.zeros((tf.shape(images)[0], SCALE_DIM), tf.float32)
    return {"image": images, SCALE_INPUT: scale}


@dataclass(frozen=True)
class ScaleUsed:
    """The pixel size one answer used: the file's own (``nm``), the model input's (``model_nm``), and its source."""

    nm: float | None
    model_nm: float | None
    source: str  # one of SCALE_SOURCES
    reason: str = ""  # why it is unknown

    @classmethod
    def unknown(cls, reason: str) -> ScaleUsed:
        return cls(None, None, "unknown", reason)

    @classmethod
    def of(cls, nm: float | None, source: str, width: float, image_size: int, reason: str = "") -> ScaleUsed:
        model_nm = model_input_pixel_size_nm(nm, width, image_size)
        if model_nm is None:
            return cls.unknown(reason or "no pixel size")
        return cls(float(nm), model_nm, source, "")  # type: ignore[arg-type]

    def features(self) -> np.ndarray:
        return scale_features([self.model_nm])[0]

    def as_dict(self) -> dict[str, Any]:
        return {"pixel_size_nm": self.nm, "model_pixel_size_nm": self.model_nm, "pixel_size_source": self.source}


def scale_batch(used: Sequence[ScaleUsed | None]) -> np.ndarray:
    """float32 ``[B, 2]`` of the :class:`ScaleUsed` of a batch (None: unknown)."""
    return scale_features([None if u is None else u.model_nm for u in used])


def split_scale(split: Any, image_size: int, *, withhold: bool = False) -> np.ndarray:
    """float32 ``[N, 2]``: the ``"scale"`` input of every image of a :class:`~emassist.data.dataset.SplitData` read
    with its pixel sizes (all unknown when it has none, or when ``withhold``: the model as it answers images without
    tags or a readable bar)."""
    if withhold or split.pixel_size_nm is None or split.source_width is None:
        return unknown_scale(len(split))
    sizes = [model_input_pixel_size_nm(nm, w, image_size)
             for nm, w in zip(split.pixel_size_nm, split.source_width, strict=True)]  # fmt: skip
    return scale_features(sizes)
