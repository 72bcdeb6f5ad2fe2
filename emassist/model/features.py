"""The model's penultimate features beside its probabilities: the input of its classifier layer.

For every builder (:mod:`emassist.model.builders`) that is the global-pooled (or, for ``simple_cnn``, the last
hidden) representation, taken at inference (dropout is off). The evaluate stage fits the familiarity score on these
(:mod:`emassist.model.familiarity`) and the pyfunc computes them in the same forward pass as the probabilities.
"""

from __future__ import annotations

from typing import Any


def with_features(model: Any) -> Any:
    """A Keras model with the same input and two outputs: ``[probabilities, features]`` (features in float32).

    The classifier layer is the one named ``OUTPUT_NAME`` (every builder names it so), else the model's last layer.
    """
    import keras  # lazy: importing Keras takes seconds (so is builders, which imports it at the top)

    from emassist.model.builders import OUTPUT_NAME

    names = [layer.name for layer in model.layers]
    head = model.get_layer(OUTPUT_NAME) if OUTPUT_NAME in names else model.layers[-1]
    features = keras.ops.cast(head.input, "float32")
    return keras.Model(model.input, [model.outputs[0], features], name=f"{model.name}_with_features")
