"""Grouped convolutions as one plain convolution per group, for TensorFlow's int8 graph.

TensorFlow's int8 convolution has no groups, so Neural Compressor leaves a grouped Conv2D in float
(B1g4: 13 of its 22 3x3 convolutions), each between a Dequantize and a QuantizeV2. Written as a
split, one Conv2D + ReLU per group and a concatenation, it quantizes: each group's convolution
with its ReLU in int8, the concatenation as `QuantizedConcatV2`. A ReLU commutes with the
concatenation, so the ReLU that followed the grouped convolution becomes the identity and the
function is the same. Used only to trace the int8 SavedModel's graph (savedmodel.int8_function).
"""

import keras


class GroupsAsConvs(keras.layers.Layer):
    """A grouped Conv2D followed by a ReLU, computed as a plain Conv2D + ReLU per group."""

    def __init__(self, conv):
        super().__init__(name=conv.name, dtype=conv.dtype_policy)
        self.groups = conv.groups
        kernel, bias = conv.get_weights()
        width = kernel.shape[-1] // self.groups
        self.convs = []
        for group in range(self.groups):
            plain = keras.layers.Conv2D(
                width,
                conv.kernel_size,
                strides=conv.strides,
                padding=conv.padding,
                dilation_rate=conv.dilation_rate,
                name=f"{conv.name}_group{group}",
                dtype=conv.dtype_policy,
            )
            plain.build((None, None, None, kernel.shape[2]))
            part = slice(group * width, (group + 1) * width)
            plain.set_weights([kernel[..., part], bias[part]])
            self.convs.append(plain)

    def call(self, inputs):
        parts = keras.ops.split(inputs, self.groups, axis=-1)
        outputs = [keras.ops.relu(conv(part)) for conv, part in zip(self.convs, parts, strict=True)]
        return keras.ops.concatenate(outputs, axis=-1)


def _splittable(layer):
    """The ReLU after `layer` when `layer` is a grouped channels-last Conv2D with a bias whose only
    consumer is a plain ReLU; None otherwise."""
    if not (
        type(layer) is keras.layers.Conv2D
        and layer.groups > 1
        and layer.use_bias
        and layer.data_format == "channels_last"
        and layer.activation is keras.activations.linear
    ):
        return None
    after = [node.operation for node in layer._outbound_nodes]
    if len(after) != 1 or type(after[0]) is not keras.layers.ReLU:
        return None
    relu = after[0]
    plain = relu.max_value is None and not relu.negative_slope and not relu.threshold
    return relu if plain else None


def split_grouped_convs(model):
    """A copy of `model` (a functional deploy model) in which every grouped Conv2D followed by a
    ReLU is a `GroupsAsConvs` and that ReLU the identity; `model` itself when it has none."""
    pairs = {layer.name: _splittable(layer) for layer in model.layers}
    pairs = {name: relu for name, relu in pairs.items() if relu is not None}
    if not pairs:
        return model
    relus = {relu.name for relu in pairs.values()}

    def clone(layer):
        if layer.name in pairs:
            return GroupsAsConvs(layer)
        if layer.name in relus:
            return keras.layers.Identity(name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=clone)
    for layer in copy.layers:
        if layer.name not in pairs and layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    return copy
