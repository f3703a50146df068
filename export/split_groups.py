"""Grouped convolutions as one plain convolution per group, for TensorFlow's int8 graph.

TensorFlow's int8 convolution has no groups, so Neural Compressor leaves a grouped Conv2D in float
(B1g4: 13 of its 22 3x3 convolutions), each between a Dequantize and a QuantizeV2. Written as one
Conv2D + ReLU per group and a concatenation, it quantizes: each group's convolution with its ReLU
in int8, the concatenation as `QuantizedConcatV2`. A ReLU commutes with the concatenation, so the
ReLU that followed the grouped convolution becomes the identity and the function is the same.
Each group needs its slice of the input: where a plain Conv2D + ReLU makes that input for the
grouped convolution alone (every grouped block of B1g4), that convolution is split by output
channel as well; otherwise the input is split, in float (TensorFlow's Split has no int8 kernel).
Used only to trace the int8 SavedModel's graph (savedmodel.int8_function).
"""

import keras

from export import compat
from repvgg_keras import compat as library_compat


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
    input), the producer is split by output channel too and this layer takes its place."""

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


def _biased_conv(layer):
    """Whether `layer` is a channels-last Conv2D with a bias and no activation of its own."""
    return (
        type(layer) is keras.layers.Conv2D
        and layer.use_bias
        and layer.data_format == "channels_last"
        and layer.activation is keras.activations.linear
    )


def _plain_relu(layer):
    return (
        type(layer) is keras.layers.ReLU
        and layer.max_value is None
        and not layer.negative_slope
        and not layer.threshold
    )


def _only_consumer(layer):
    after = library_compat.consumers(layer)
    return after[0] if len(after) == 1 else None


def _only_parent(layer):
    parents = compat.parents(layer)
    return parents[0] if len(parents) == 1 else None


def _splittable(layer):
    """The ReLU after `layer` when `layer` is a grouped convolution whose only consumer is a plain
    ReLU; None otherwise."""
    if not (_biased_conv(layer) and layer.groups > 1):
        return None
    relu = _only_consumer(layer)
    return relu if _plain_relu(relu) else None


def _producer(conv):
    """(producer Conv2D, its ReLU, pad or None) when `conv`'s input is made only for it by a plain
    convolution, then a ReLU (and a ZeroPadding2D); None otherwise."""
    relu, pad = _only_parent(conv), None
    if type(relu) is keras.layers.ZeroPadding2D and _only_consumer(relu) is conv:
        relu, pad = _only_parent(relu), relu
    if not _plain_relu(relu) or _only_consumer(relu) is not (pad or conv):
        return None
    producer = _only_parent(relu)
    if _biased_conv(producer) and producer.groups == 1 and _only_consumer(producer) is relu:
        return producer, relu, pad
    return None


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
