"""Grad-CAM (Selvaraju et al., 2017) for the project's Keras classifiers: where in the image the model looked.

The last convolutional feature map is found automatically (the last ``Conv2D`` / ``SeparableConv2D`` /
``DepthwiseConv2D``, followed through the element-wise layers right after it: BatchNormalization, ReLU,
Activation), also inside a nested backbone (``xception`` keeps ``keras.applications.Xception`` as one layer).
The class score differentiated is the pre-softmax logit when the output layer is a softmax ``Dense`` (a
saturated softmax would give vanishing gradients), else the output itself.

Input: the standardized uint8 grayscale image (what :class:`emassist.data.preprocess.Preprocessor` makes, ingest
caches and serving classifies); it takes the same :func:`emassist.data.preprocess.to_model_input` as training.
Output: a float32 map in 0..1 of the same height and width as that image. Drawing it over the image is
:mod:`emassist.serve.drawing`.

A scale-aware model (:mod:`emassist.model.scale`) also gets the image's ``"scale"`` input (the pixel size its answer
used; unknown when none is given): it moves the class scores, and so which class is explained, but not the map of a
given class, since the scale joins the pooled features after the last convolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from emassist.data.preprocess import to_model_input
from emassist.model.scale import SCALE_DIM, has_scale_input, model_inputs, unknown_scale

CONV_TYPES = ("Conv2D", "SeparableConv2D", "DepthwiseConv2D", "Conv2DTranspose")
ELEMENTWISE_TYPES = ("BatchNormalization", "ReLU", "Activation", "LeakyReLU", "ELU", "PReLU")


class GradCamError(ValueError):
    """The model has no convolutional feature map Grad-CAM can use."""


@dataclass(frozen=True)
class _Target:
    path: tuple[str, ...]  # layer names from the top model down to the feature layer
    layer: Any


def _rank4(layer: Any) -> bool:
    try:
        shape = layer.output.shape
    except (AttributeError, ValueError):
        return False
    return len(shape) == 4


def _find_in(model: Any, prefix: tuple[str, ...]) -> _Target | None:
    """The last conv feature layer of ``model`` (searching nested models too), or None."""
    import keras

    layers = list(model.layers)
    for i in range(len(layers) - 1, -1, -1):
        layer = layers[i]
        if isinstance(layer, keras.Model):
            found = _find_in(layer, (*prefix, layer.name))
            if found is not None:
                return found
            continue
        if type(layer).__name__ in CONV_TYPES and _rank4(layer):
            target = layer
            # Follow BN / activation layers that come right after it (the map Grad-CAM papers use).
            for nxt in layers[i + 1 :]:
                if type(nxt).__name__ in ELEMENTWISE_TYPES and _rank4(nxt) and _single_input_from(nxt, target):
                    target = nxt
                else:
                    break
            return _Target((*prefix, target.name), target)
    return None


def _single_input_from(layer: Any, previous: Any) -> bool:
    try:
        return layer.input is previous.output
    except (AttributeError, ValueError):
        return False


def find_target_layer(model: Any) -> str:
    """Name of the feature layer Grad-CAM uses (``"outer/inner"`` when it is inside a nested model)."""
    target = _find_in(model, ())
    if target is None:
        raise GradCamError(f"model {model.name!r} has no convolutional layer with a 4-D output: no Grad-CAM")
    return "/".join(target.path)


class GradCam:
    """Grad-CAM of one Keras classifier; build once, call per image."""

    def __init__(self, model: Any, image_size: int | None = None) -> None:
        import keras

        self.model = model
        self.image_size = int(image_size or model.inputs[0].shape[1])
        target = _find_in(model, ())
        if target is None:
            raise GradCamError(f"model {model.name!r} has no convolutional layer with a 4-D output: no Grad-CAM")
        self.layer_name = "/".join(target.path)
        head = model.layers[-1]
        self._logit_head = (
            isinstance(head, keras.layers.Dense) and getattr(head.activation, "__name__", "") == "softmax"
        )
        self._head = head
        self._cam_fn: Any = None
        self.scale_aware = has_scale_input(model)
        self._inner: Any = None
        self._chain: list[Any] | None = None
        if len(target.path) == 2 and self.scale_aware:  # a nested backbone beside a second input: walk the graph
            inner = model.get_layer(target.path[0])
            self._inner = (inner, keras.Model(inner.inputs, [target.layer.output, inner.outputs[0]]))
            self._fn = None
        elif len(target.path) == 1:
            outputs = [target.layer.output, head.input if self._logit_head else model.outputs[0]]
            self._fn = keras.Model(model.inputs, outputs)
        else:
            self._fn = None
            self._chain = self._nested_chain(model, target)

    @staticmethod
    def _nested_chain(model: Any, target: _Target) -> list[Any]:
        """For a feature layer inside a nested backbone of a linear outer model: the outer layers in order, with
        the backbone replaced by a model returning (features, backbone output)."""
        import keras

        if len(target.path) != 2:
            raise GradCamError(f"Grad-CAM supports one level of nesting, found {'/'.join(target.path)}")
        inner = model.get_layer(target.path[0])
        multi = keras.Model(inner.inputs, [target.layer.output, inner.outputs[0]])
        chain: list[Any] = []
        for layer in model.layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            nodes = getattr(layer, "_inbound_nodes", [])
            if len(nodes) > 1 or (nodes and len(nodes[0].input_tensors) != 1):
                raise GradCamError(f"Grad-CAM over a nested backbone needs a linear model; {layer.name!r} is not")
            chain.append(multi if layer is inner else layer)
        return chain

    def _walk(self, x: Any, scale: Any) -> tuple[Any, Any]:
        """(feature map, the head's input or the output) by running the outer model's graph layer by layer, the nested
        backbone replaced by one returning its feature map too (a scale-aware xception)."""
        import keras

        inner, multi = self._inner
        given = {"image": x, "scale": scale}
        values = {id(t): given[t.name.split(":")[0]] for t in self.model.inputs}
        features = None
        for layer in self.model.layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            node = layer._inbound_nodes[0]
            args, kwargs = node.arguments.fill_in(values)
            if self._logit_head and layer is self._head:
                return features, args[0]
            if layer is inner:
                features, out = multi(*args, training=False)
            else:
                out = layer(*args, **{**kwargs, "training": False})
            for tensor, value in zip(node.output_tensors, keras.tree.flatten(out), strict=True):
                values[id(tensor)] = value
        return features, values[id(self.model.outputs[0])]

    def _features_and_scores(self, x: Any, scale: Any = None) -> tuple[Any, Any]:
        """(feature map, class scores before softmax where possible) for a float input batch (and, for a
        scale-aware model, its scale input)."""
        if self._inner is not None:
            features, pre = self._walk(x, scale)
        elif self._fn is not None:
            features, pre = self._fn(model_inputs(x, scale, scale_aware=self.scale_aware), training=False)
        else:
            assert self._chain is not None
            features = None
            pre = x
            for layer in self._chain:
                if self._logit_head and layer is self._head:
                    break
                out = layer(pre, training=False)
                if isinstance(out, list | tuple):
                    features, pre = out
                else:
                    pre = out
        if self._logit_head:
            import tensorflow as tf

            kernel, bias = self._head.kernel, self._head.bias
            scores = tf.matmul(tf.cast(pre, kernel.dtype), kernel) + (bias if bias is not None else 0.0)
        else:
            scores = pre
        return features, scores

    def _build_cam(self) -> Any:
        import tensorflow as tf

        size = self.image_size

        @tf.function(
            input_signature=[
                tf.TensorSpec([1, size, size, 3], tf.float32),
                tf.TensorSpec([], tf.int32),
                tf.TensorSpec([1, SCALE_DIM], tf.float32),
            ],
            reduce_retracing=True,
        )
        def cam_fn(x: Any, k: Any, scale: Any) -> tuple[Any, Any]:
            with tf.GradientTape() as tape:
                tape.watch(x)  # records the forward pass even where the weights are frozen
                features, scores = self._features_and_scores(x, scale if self.scale_aware else None)
                k = tf.where(k < 0, tf.argmax(scores[0], output_type=tf.int32), k)
                score = tf.gather(scores, k, axis=1)
            grads = tf.cast(tape.gradient(score, features), tf.float32)
            weights = tf.reduce_mean(grads, axis=(1, 2))  # [1, C]: one weight per feature channel
            cam = tf.nn.relu(tf.reduce_sum(tf.cast(features, tf.float32) * weights[:, None, None, :], axis=-1))[0]
            return cam, k

        return cam_fn

    def __call__(
        self, gray: np.ndarray, class_index: int | None = None, scale: np.ndarray | None = None
    ) -> tuple[np.ndarray, int]:
        """Grad-CAM of one standardized uint8 grayscale image ``[H, W]``; returns (map ``[H, W]`` in 0..1, class).

        ``class_index`` None explains the predicted class. ``scale``: float32 ``[2]`` or ``[1, 2]``, the scale input
        of a scale-aware model (None: unknown; ignored by a model without it).
        """
        import tensorflow as tf

        g = np.asarray(gray)
        if g.ndim != 2:
            raise ValueError(f"Grad-CAM expects one 2-D grayscale image, got shape {g.shape}")
        n_classes = int(self.model.outputs[0].shape[-1])
        if class_index is not None and not 0 <= int(class_index) < n_classes:
            raise ValueError(f"class index {class_index} out of range for {n_classes} classes")
        if self._cam_fn is None:
            self._cam_fn = self._build_cam()
        x = to_model_input(g[None, ..., None].astype(np.uint8), self.image_size)
        s = unknown_scale(1) if scale is None else np.asarray(scale, dtype=np.float32).reshape(1, SCALE_DIM)
        cam, k = self._cam_fn(x, tf.constant(-1 if class_index is None else int(class_index), tf.int32), s)
        cam_np = np.asarray(cam, dtype=np.float32)
        peak = float(cam_np.max())
        cam_np = cam_np / peak if peak > 0 else np.zeros_like(cam_np)
        resized = tf.image.resize(cam_np[..., None], g.shape, method="bilinear")[..., 0]
        return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0), int(k)
