"""The RepVGG block (training form) and its plain equivalent (deploy form).

`RepVGGBlock` is written with Keras layers and `keras.ops` only, so it runs on the
TensorFlow, JAX and PyTorch backends. `PlainBlock` is the same computation made of
built-in Keras layers only, holding the fused weights that `get_deploy_weights()`
returns: the deploy builder and `deploy=True` builders both use it, so the two
deploy routes give the same layer names and weight layout.
"""

import keras
import numpy as np
from keras import layers, ops

from repvgg_keras import fusion

# PyTorch's BatchNorm defaults, so imported checkpoints give the same outputs.
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9  # PyTorch momentum 0.1 in Keras's convention


def _conv_padding(strides):
    # Stride 1: "same" pads symmetrically for a 3x3 kernel. Stride 2: "same" would pad
    # bottom/right only on even sizes and misalign the 1x1 branch, so pad explicitly.
    return "same" if strides == 1 else "valid"


def _se_convs(filters, se_channels, name, dtype):
    reduce = layers.Conv2D(se_channels, 1, activation="relu", name=f"{name}_se_reduce", dtype=dtype)
    expand = layers.Conv2D(filters, 1, activation="sigmoid", name=f"{name}_se_expand", dtype=dtype)
    return reduce, expand


@keras.saving.register_keras_serializable(package="repvgg_keras")
class RepVGGBlock(layers.Layer):
    """RepVGG training-time block: ReLU(SE(bn(conv3x3(x)) + bn(conv1x1(x)) + bn(x))).

    Args:
        filters: output channels.
        strides: 1 or 2 (both convs).
        groups: groups of the 3x3 and 1x1 convs.
        dilation_rate: dilation of the 3x3 conv (strides must then be 1).
        se_channels: bottleneck channels of squeeze-excitation; 0 disables SE.
        use_identity: add the identity (BN-only) branch where shapes allow it
            (input channels == filters and strides == 1). False for the ablation.
        use_1x1: add the 1x1 conv branch. False for the ablation.
        quant_friendly: QARepVGG's block (Chu et al. 2022): the 1x1 and identity branches
            carry no BatchNorm, one BatchNorm follows their sum. It fuses exactly into the
            same plain 3x3 conv, whose weights then survive int8 quantization much better.
            Not with kernel_l2 (QARepVGG trains with plain weight decay).
        bn_epsilon, bn_momentum: BatchNorm settings (PyTorch-compatible defaults).
        bn_synchronized: batch statistics across replicas (tf.distribute, TF backend).
        kernel_initializer: initializer of the conv kernels.
        kernel_l2: the authors' custom L2 ("custwd") coefficient: while training, adds
            `0.5 * kernel_l2 * equivalent_kernel_l2()` to the loss. Use it instead of
            weight decay on this block's conv kernels (train --custom_l2 does both).
    """

    def __init__(
        self,
        filters,
        strides=1,
        groups=1,
        dilation_rate=1,
        se_channels=0,
        use_identity=True,
        use_1x1=True,
        bn_epsilon=BN_EPSILON,
        bn_momentum=BN_MOMENTUM,
        bn_synchronized=False,
        kernel_initializer="glorot_uniform",
        kernel_l2=0.0,
        quant_friendly=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if quant_friendly and kernel_l2:
            raise ValueError(
                "RepVGGBlock: quant_friendly (QARepVGG) blocks train with plain weight decay; "
                "set kernel_l2=0 (train: drop --custom_l2)."
            )
        if strides not in (1, 2):
            raise ValueError(f"RepVGGBlock strides must be 1 or 2, got {strides!r}.")
        if strides != 1 and dilation_rate != 1:
            raise ValueError("RepVGGBlock: dilation_rate > 1 requires strides=1.")
        if filters % groups:
            raise ValueError(
                f"RepVGGBlock: filters ({filters}) must be divisible by groups ({groups})."
            )
        self.filters = int(filters)
        self.strides = int(strides)
        self.groups = int(groups)
        self.dilation_rate = int(dilation_rate)
        self.se_channels = int(se_channels)
        self.use_identity = bool(use_identity)
        self.use_1x1 = bool(use_1x1)
        self.bn_epsilon = float(bn_epsilon)
        self.bn_momentum = float(bn_momentum)
        self.bn_synchronized = bool(bn_synchronized)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_l2 = float(kernel_l2)
        self.quant_friendly = bool(quant_friendly)

        name, dtype = self.name, self.dtype_policy
        bn = lambda suffix: layers.BatchNormalization(
            epsilon=self.bn_epsilon,
            momentum=self.bn_momentum,
            synchronized=self.bn_synchronized,
            name=f"{name}_{suffix}",
            dtype=dtype,
        )
        conv = lambda size, suffix, strides=self.strides, **kw: layers.Conv2D(
            self.filters,
            size,
            strides=strides,
            groups=self.groups,
            use_bias=False,
            kernel_initializer=self.kernel_initializer,
            name=f"{name}_{suffix}",
            dtype=dtype,
            **kw,
        )
        self.pad = (
            layers.ZeroPadding2D(self.dilation_rate, name=f"{name}_pad", dtype=dtype)
            if self.strides > 1
            else None
        )
        self.dense_conv = conv(
            3, "dense_conv", padding=_conv_padding(self.strides), dilation_rate=self.dilation_rate
        )
        self.dense_bn = bn("dense_bn")
        # Stride-2 1x1 branch as "every other pixel, then a stride-1 1x1 conv": the same sums, and it
        # avoids TF 2.21's oneDNN stride-2 1x1 backward-weights kernel, which corrupts the heap on the
        # 224px RGB stem (tests/test_train.py::test_stem_trains_at_224_without_crashing).
        self.pointwise_conv = (
            conv(1, "1x1_conv", padding="valid", strides=1) if self.use_1x1 else None
        )
        self.pointwise_bn = bn("1x1_bn") if self.use_1x1 and not self.quant_friendly else None
        self.identity_bn = None  # created in build() once the input channels are known
        self.post_bn = bn("post_bn") if self.quant_friendly else None
        self.se_reduce = self.se_expand = None
        if self.se_channels:
            self.se_reduce, self.se_expand = _se_convs(self.filters, self.se_channels, name, dtype)

    @property
    def sublayers(self):
        """The block's own layers (branch convs and BatchNorms, padding, SE), those it has."""
        candidates = (
            self.pad,
            self.dense_conv,
            self.dense_bn,
            self.pointwise_conv,
            self.pointwise_bn,
            self.identity_bn,
            self.post_bn,
            self.se_reduce,
            self.se_expand,
        )
        return [layer for layer in candidates if layer is not None]

    def build(self, input_shape):
        in_channels = input_shape[-1]
        if in_channels is None:
            raise ValueError("RepVGGBlock needs a known number of input channels.")
        if in_channels % self.groups:
            raise ValueError(
                f"RepVGGBlock {self.name}: input channels ({in_channels}) must be divisible "
                f"by groups ({self.groups})."
            )
        self.in_channels = int(in_channels)
        dense_in = input_shape
        if self.pad is not None:
            self.pad.build(input_shape)
            dense_in = self.pad.compute_output_shape(input_shape)
        self.dense_conv.build(dense_in)
        out_shape = self.dense_conv.compute_output_shape(dense_in)
        self.dense_bn.build(out_shape)
        if self.pointwise_conv is not None:
            self.pointwise_conv.build(input_shape)  # a 1x1 kernel: the spatial size does not matter
        if self.pointwise_bn is not None:
            self.pointwise_bn.build(out_shape)
        if self.post_bn is not None:
            self.post_bn.build(out_shape)
        if self.has_identity and not self.quant_friendly:
            self.identity_bn = layers.BatchNormalization(
                epsilon=self.bn_epsilon,
                momentum=self.bn_momentum,
                synchronized=self.bn_synchronized,
                name=f"{self.name}_identity_bn",
                dtype=self.dtype_policy,
            )
            self.identity_bn.build(input_shape)
        if self.se_reduce is not None:
            pooled = (None, 1, 1, self.filters)
            self.se_reduce.build(pooled)
            self.se_expand.build((None, 1, 1, self.se_channels))

    @property
    def has_identity(self):
        return self.use_identity and self.strides == 1 and self.in_channels == self.filters

    @property
    def adds_plain_identity(self):
        """QARepVGG's identity branch: the input itself, no BatchNorm."""
        return self.quant_friendly and self.has_identity

    def call(self, inputs, training=None):
        padded = self.pad(inputs) if self.pad is not None else inputs
        out = self.dense_bn(self.dense_conv(padded), training=training)
        if self.pointwise_conv is not None:
            sampled = inputs[:, :: self.strides, :: self.strides, :] if self.strides > 1 else inputs
            pointwise = self.pointwise_conv(sampled)
            out = out + (
                pointwise
                if self.pointwise_bn is None
                else self.pointwise_bn(pointwise, training=training)
            )
        if self.identity_bn is not None:
            out = out + self.identity_bn(inputs, training=training)
        elif self.adds_plain_identity:
            out = out + inputs
        if self.post_bn is not None:
            out = self.post_bn(out, training=training)
        if self.se_reduce is not None:
            squeezed = ops.mean(out, axis=(1, 2), keepdims=True)
            out = out * self.se_expand(self.se_reduce(squeezed))
        if training and self.kernel_l2:
            self.add_loss(0.5 * self.kernel_l2 * self.equivalent_kernel_l2())
        return ops.relu(out)

    def equivalent_kernel_l2(self):
        """The authors' custom L2: plain L2 on the 3x3 kernel's outer ring, plus L2 on the
        equivalent centre (3x3 centre and 1x1 kernels scaled by their BN gamma/std, which is
        what the fused conv holds), normalised so its coefficient compares with plain L2.
        The BN scales are constants here, as in the authors' code (detached)."""
        dense = self.dense_conv.kernel
        total = ops.sum(ops.square(dense)) - ops.sum(ops.square(dense[1:2, 1:2]))
        dense_scale = ops.stop_gradient(self._bn_scale(self.dense_bn))
        centre = dense[1:2, 1:2] * dense_scale
        scales = ops.square(dense_scale)
        if self.pointwise_conv is not None:
            pointwise_scale = ops.stop_gradient(self._bn_scale(self.pointwise_bn))
            centre = centre + self.pointwise_conv.kernel * pointwise_scale
            scales = scales + ops.square(pointwise_scale)
        return total + ops.sum(ops.square(centre) / scales)

    @staticmethod
    def _bn_scale(bn):
        return bn.gamma / ops.sqrt(bn.moving_variance + bn.epsilon)

    def compute_output_shape(self, input_shape):
        shape = input_shape
        if self.pad is not None:
            shape = self.pad.compute_output_shape(shape)
        return self.dense_conv.compute_output_shape(shape)

    def get_deploy_weights(self):
        """Fused (kernel, bias) of the equivalent single 3x3 conv, float32 numpy arrays.

        Exact in inference mode: BatchNorm uses its moving statistics.
        """
        if not self.built:
            raise ValueError(
                f"RepVGGBlock {self.name} is not built yet: call it on an input first."
            )
        branches = [_folded(self.dense_conv.kernel, self.dense_bn)]
        if self.pointwise_conv is not None:
            kernel = self.pointwise_conv.kernel
            branches.append(
                (_numpy(kernel), 0.0)
                if self.pointwise_bn is None
                else _folded(kernel, self.pointwise_bn)
            )
        identity = fusion.identity_kernel(self.filters, self.groups)
        if self.identity_bn is not None:
            branches.append(_folded(identity, self.identity_bn))
        elif self.adds_plain_identity:
            branches.append((identity, 0.0))
        post = _batchnorm_arrays(self.post_bn) if self.post_bn is not None else None
        return fusion.fuse_branches(branches, post_batchnorm=post)

    def plain_config(self):
        """Arguments of the PlainBlock that computes this block in one conv."""
        return dict(
            filters=self.filters,
            strides=self.strides,
            groups=self.groups,
            dilation_rate=self.dilation_rate,
            se_channels=self.se_channels,
            name=self.name,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters,
            strides=self.strides,
            groups=self.groups,
            dilation_rate=self.dilation_rate,
            se_channels=self.se_channels,
            use_identity=self.use_identity,
            use_1x1=self.use_1x1,
            bn_epsilon=self.bn_epsilon,
            bn_momentum=self.bn_momentum,
            bn_synchronized=self.bn_synchronized,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            kernel_l2=self.kernel_l2,
            quant_friendly=self.quant_friendly,
        )
        return config


def _numpy(value):
    return np.asarray(keras.ops.convert_to_numpy(value))


def _batchnorm_arrays(bn):
    """(gamma, beta, mean, variance, epsilon) of an inference-mode BatchNorm, as numpy."""
    return (
        _numpy(bn.gamma),
        _numpy(bn.beta),
        _numpy(bn.moving_mean),
        _numpy(bn.moving_variance),
        bn.epsilon,
    )


def _folded(kernel, bn):
    return fusion.fold_batchnorm(_numpy(kernel), *_batchnorm_arrays(bn))


def contains_blocks(layer):
    """True when `layer` is, or (for a model) contains, a RepVGGBlock: the training form."""
    return isinstance(layer, RepVGGBlock) or any(
        isinstance(sub, RepVGGBlock) for sub in all_layers(layer)
    )


def all_layers(model):
    """Every layer inside `model`, depth first: nested models and RepVGG blocks opened up.

    Uses only public Keras API (`Model.layers`) plus `RepVGGBlock.sublayers`.
    """
    found = []
    for layer in getattr(model, "layers", ()):
        found.append(layer)
        if isinstance(layer, RepVGGBlock):
            found.extend(layer.sublayers)
        elif isinstance(layer, keras.Model):
            found.extend(all_layers(layer))
    return found


class PlainBlock:
    """A RepVGG block as built-in Keras layers: [pad] -> Conv2D(3x3, bias) -> [SE] -> ReLU.

    Layer names derive from the block name (`stage1_0_reparam`, ...), so a deploy model
    built directly and one converted by `to_deploy` share one weight layout.
    """

    def __init__(
        self, filters, strides=1, groups=1, dilation_rate=1, se_channels=0, name="block", dtype=None
    ):
        self.pad = (
            layers.ZeroPadding2D(dilation_rate, name=f"{name}_pad", dtype=dtype)
            if strides > 1
            else None
        )
        self.conv = layers.Conv2D(
            filters,
            3,
            strides=strides,
            padding=_conv_padding(strides),
            dilation_rate=dilation_rate,
            groups=groups,
            use_bias=True,
            name=f"{name}_reparam",
            dtype=dtype,
        )
        self.se_pool = self.se_reduce = self.se_expand = self.se_scale = None
        if se_channels:
            self.se_pool = layers.GlobalAveragePooling2D(
                keepdims=True, name=f"{name}_se_pool", dtype=dtype
            )
            self.se_reduce, self.se_expand = _se_convs(filters, se_channels, name, dtype)
            self.se_scale = layers.Multiply(name=f"{name}_se_scale", dtype=dtype)
        self.relu = layers.ReLU(name=f"{name}_relu", dtype=dtype)

    def __call__(self, x):
        if self.pad is not None:
            x = self.pad(x)
        x = self.conv(x)
        if self.se_pool is not None:
            x = self.se_scale([x, self.se_expand(self.se_reduce(self.se_pool(x)))])
        return self.relu(x)

    def load_from(self, block):
        """Copy the fused weights (and SE weights) of a built RepVGGBlock."""
        self.conv.set_weights(list(block.get_deploy_weights()))
        if self.se_reduce is not None:
            self.se_reduce.set_weights(block.se_reduce.get_weights())
            self.se_expand.set_weights(block.se_expand.get_weights())
