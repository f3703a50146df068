"""Grouped convolutions as one plain convolution per group, for TensorFlow's int8 graph.

TensorFlow's int8 convolution has no groups, so Neural Compressor leaves a grouped Conv2D in float
(B1g4: 13 of its 22 3x3 convolutions), each between a Dequantize and a QuantizeV2. Written as a
split, one Conv2D + ReLU per group and a concatenation, it quantizes: each group's convolution
with its ReLU in int8, the concatenation as `QuantizedConcatV2`. A ReLU commutes with the
concatenation, so the ReLU that followed the grouped convolution becomes the identity and the
function is the same. Used only to trace the int8 SavedModel's graph (savedmodel.int8_function).
"""

import keras


def _per_group(conv, groups, name):
    """`conv` as `groups` plain Conv2D layers, each with its slice of the output channels."""
    kernel, bias = conv.get_weights()
    width = kernel.shape[-1] // groups
    convs = []
    for group in range(groups):
        plain = keras.layers.Conv2D(
            width,
            conv.kernel_size,
            strides=conv.strides,
            padding=conv.padding,
            dilation_rate=conv.dilation_rate,
            name=f"{name}_group{group}",
            dtype=conv.dtype_policy,
        )
        plain.build((None, None, None, kernel.shape[2]))
        part = slice(group * width, (group + 1) * width)
        plain.set_weights([kernel[..., part], bias[part]])
        convs.append(plain)
    return convs


class GroupsAsConvs(keras.layers.Layer):
    """A grouped Conv2D followed by a ReLU, computed as a plain Conv2D + ReLU per group.

    With `producer` (the plain Conv2D + ReLU, and `pad`, that make the grouped convolution's
    input), the producer is split by output channel too, so each group's input is made apart and
    nothing has to split a tensor (TensorFlow's Split has no int8 kernel)."""

    def __init__(self, conv, producer=None, pad=None):
        super().__init__(name=(producer or conv).name, dtype=conv.dtype_policy)
        self.groups = conv.groups
        self.convs = _per_group(conv, self.groups, conv.name)
        self.producers = _per_group(producer, self.groups, producer.name) if producer else None
        self.pad = pad.__class__.from_config(pad.get_config()) if pad is not None else None

    def call(self, inputs):
        if self.producers is None:
            parts = keras.ops.split(inputs, self.groups, axis=-1)
        else:
            parts = [keras.ops.relu(producer(inputs)) for producer in self.producers]
        if self.pad is not None:
            parts = [self.pad(part) for part in parts]
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


def _only_consumer(layer):
    after = [node.operation for node in layer._outbound_nodes]
    return after[0] if len(after) == 1 else None


def _producer(conv):
    """(producer Conv2D, its ReLU, pad or None) when `conv`'s input is made only for it by a plain
    channels-last Conv2D with a bias, then a ReLU (and a ZeroPadding2D); None otherwise."""
    node = conv._inbound_nodes[0]
    layer = node.parent_nodes[0].operation if len(node.parent_nodes) == 1 else None
    pad = None
    if type(layer) is keras.layers.ZeroPadding2D and _only_consumer(layer) is conv:
        pad, parents = layer, layer._inbound_nodes[0].parent_nodes
        layer = parents[0].operation if len(parents) == 1 else None
    relu = layer
    if type(relu) is not keras.layers.ReLU or _only_consumer(relu) is not (pad or conv):
        return None
    if relu.max_value is not None or relu.negative_slope or relu.threshold:
        return None
    parents = relu._inbound_nodes[0].parent_nodes
    producer = parents[0].operation if len(parents) == 1 else None
    if (
        type(producer) is not keras.layers.Conv2D
        or producer.groups != 1
        or not producer.use_bias
        or producer.data_format != "channels_last"
        or producer.activation is not keras.activations.linear
        or _only_consumer(producer) is not relu
    ):
        return None
    return producer, relu, pad


def split_grouped_convs(model):
    """A copy of `model` (a functional deploy model) in which every grouped Conv2D followed by a
    ReLU is computed per group (`GroupsAsConvs`, with its producer where it has one of its own)
    and the layers it takes over are the identity; `model` itself when it has none."""
    replaced, identity = {}, set()
    for layer in model.layers:
        relu = _splittable(layer)
        if relu is None:
            continue
        found = _producer(layer)
        if found is None:
            replaced[layer.name] = GroupsAsConvs(layer)
        else:
            producer, producer_relu, pad = found
            replaced[producer.name] = GroupsAsConvs(layer, producer, pad)
            identity |= {producer_relu.name, layer.name} | ({pad.name} if pad else set())
        identity.add(relu.name)
    if not replaced:
        return model

    def clone(layer):
        if layer.name in replaced:
            return replaced[layer.name]
        if layer.name in identity:
            return keras.layers.Identity(name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=clone)
    for layer in copy.layers:
        if layer.name not in replaced and layer.name not in identity and layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    return copy
