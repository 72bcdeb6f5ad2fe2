"""The training loss: sparse cross-entropy with label smoothing (``train.label_smoothing``).

Registered as Keras-serializable (``emassist>SmoothedSparseCrossentropy``), so a model saved with its compile
config loads again once this module is imported.
"""

from __future__ import annotations

from typing import Any

import keras


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
