"""Saving the serving copy of a trained model: architecture and weights, without optimizer state."""

from __future__ import annotations

import os
from pathlib import Path

import keras

from emassist.core.atomic import atomic_path


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
