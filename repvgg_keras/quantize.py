"""Quantization-aware training (QAT): a Keras model that computes what the int8 runtimes compute.

    qat = rk.quantize_aware(model, calibration_images)   # fake-quantized deploy form
    qat.fit(...)                                          # learns weights and ranges for int8
    plain = rk.to_deploy(qat)                             # float model, weights on the int8 grid

The scheme is the one the int8 paths of the exporters take: convolution weights symmetric int8
per output channel, step max|w| / 127 (zero point 0); activations per tensor with a learned
range, at the model input (symmetric: codes -127..127 over [-r, r]) and after each ReLU, where the
runtimes fuse conv + ReLU and requantize. `activations="unsigned"` (the default) puts a ReLU's
output on [0, r] in 255 steps, the form the CPU runtimes fold the ReLU into (onnxruntime's
QLinearConv, TFLite's int8 with zero point -128, oneDNN's unsigned output);
`activations="symmetric"` keeps it on [-r, r] (zero point 0), the only form TensorRT's explicit
quantization takes. The global average pool rounds to its input's grid, as the runtimes' int8
pools do, and the classifier stays float (`scope="convolutions"`, the default paths), or both
get ranges of their own (`scope="every_op"`, integer-only int8). Inference sums in float64, so a
QAT model's predictions are the int8 runtimes' own, not a float32 approximation of them.

form="deploy" fuses a training-form model first (`to_deploy`): the fused kernel itself is what QAT
fine-tunes. form="training" keeps the branches and BatchNorms (statistics frozen) and quantizes each
block's fused kernel computed from them in the graph (the authors' remedy: QAT constrains the
equivalent kernel). Biases are held where the runtimes hold them, on an int32 grid (`snap_biases`).
"""

import dataclasses

import keras
import numpy as np
from keras import layers, ops

from repvgg_keras import compat, fusion
from repvgg_keras.deploy import to_deploy
from repvgg_keras.layers import RepVGGBlock, all_layers

SCOPES = ("convolutions", "every_op")
FORMS = ("deploy", "training")
ACTIVATIONS = ("unsigned", "symmetric")
ACTIVATION_BITS = 8
MIN_RANGE = 1e-6
# Each step keeps this many significant bits, so that every grid value (an 8-bit code times the
# step) is exact in float32 and every int8 x int8 product exact in float64: the QAT model then
# sums what the runtimes sum in int32, with no float rounding to tip a value across a midpoint.
STEP_BITS = 15


def grid_step(value_range, codes):
    """The step of a grid with `codes` steps over `value_range` (a float32 tensor), rounded to
    STEP_BITS significant bits."""
    step = ops.maximum(ops.convert_to_tensor(value_range, "float32"), MIN_RANGE) / codes
    unit = ops.stop_gradient(ops.power(2.0, ops.floor(ops.log2(step)) - (STEP_BITS - 1)))
    return step + ops.stop_gradient(ops.round(step / unit) * unit - step)  # gradient: step's


def _symmetric_fake_quant(x, step, axis=None):
    """`x` on codes -127..127 times `step` (narrow range: zero point 0)."""
    return keras.quantizers.fake_quant_with_min_max_vars(
        x, -127 * step, 127 * step, num_bits=ACTIVATION_BITS, narrow_range=True, axis=axis
    )


def _unsigned_fake_quant(x, step):
    """`x` on codes 0..255 times `step`."""
    return keras.quantizers.fake_quant_with_min_max_vars(
        x, 0.0, 255 * step, num_bits=ACTIVATION_BITS, narrow_range=False
    )


@dataclasses.dataclass(frozen=True)
class Grid:
    """Where a quantizer puts its tensor: `step` apart, codes 0..255 (`unsigned`, a ReLU's
    output, zero point 0) or -127..127 (symmetric, zero point 0)."""

    step: float
    unsigned: bool

    @property
    def codes(self):
        """(lowest, highest) integer code."""
        return (0, 255) if self.unsigned else (-127, 127)

    @property
    def range(self):
        """(lowest, highest) value on the grid."""
        low, high = self.codes
        return low * self.step, high * self.step


def quantize_weights(kernel, per_channel=True):
    """`kernel` on the symmetric int8 grid the runtimes use: [-127, 127] x max|w| / 127, per
    output channel (the last axis) or per tensor."""
    axes = tuple(range(len(kernel.shape) - 1)) if per_channel else None
    step = grid_step(ops.max(ops.abs(kernel), axis=axes), 127)
    return _symmetric_fake_quant(kernel, step, axis=-1 if per_channel else None)


def _in_float64(compute, *tensors):
    """`compute` on float64 copies of `tensors`, its result back in float32.

    The int8 runtimes sum int8 x int8 products in int32, exactly; float32 rounds those sums,
    and a sum lying near a rounding midpoint of the next quantizer then lands one step off. A
    deep model carries each such step on and multiplies it until top-1 answers change, so
    inference computes in float64, whose rounding is far below a step."""
    wide = [ops.cast(tensor, "float64") for tensor in tensors]
    return ops.cast(compute(*wide), "float32")


class _ExactInference:
    """A quantized layer whose inference computes exactly what the int8 runtimes compute
    (`exact_inference`, see `_in_float64`); training, and the graph the TFLite converter
    reads (which holds the fake-quant ops it converts), compute in float32."""

    def __init__(self, *args, exact_inference=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.exact_inference = exact_inference

    def computes_exactly(self, training):
        return self.exact_inference and not training

    def get_config(self):
        return {**super().get_config(), "exact_inference": self.exact_inference}


class _ReadsQuantized(_ExactInference):
    """A quantized layer that knows the quantizer of its input (`input_quantizer`, a layer name):
    the runtimes hold its bias in int32 with the step input step x weight step, which
    `snap_biases` reproduces."""

    def __init__(self, *args, input_quantizer=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.input_quantizer = input_quantizer
        # Set by snap_biases on the reference copy: the step of the int32 accumulator as the
        # runtimes hold it (input step x weight step, multiplied in float32), the exact product
        # the float64 sum comes in, and the step of the quantizer after the layer.
        self.accumulator_step = None
        self.exact_step = None
        self.output_step = None

    def get_config(self):
        return {**super().get_config(), "input_quantizer": self.input_quantizer}

    def accumulated(self, outputs, bias):
        """The float64 sum `outputs` and `bias` as the runtimes hold them: the sum an integer
        times the accumulator step, and the bias its int32 code times that step (float32 can
        hold neither exactly)."""
        if self.accumulator_step is None:
            return outputs + bias if bias is not None else outputs
        step = ops.convert_to_tensor(self.accumulator_step, "float64")
        outputs = outputs * ops.convert_to_tensor(self.accumulator_step / self.exact_step)
        if bias is None:
            return outputs
        return outputs + ops.round(bias / step) * step

    def requantized(self, outputs):
        """`outputs` (float64) rounded to the next quantizer's grid here, as the runtimes'
        requantization does, before float32 could round a value across a midpoint (the
        quantizer after it then finds each value on its grid already)."""
        if self.output_step is None:
            return outputs
        return ops.round(outputs / self.output_step) * self.output_step

    def as_float_layer(self, base):
        """A `base` layer (its float class) with this layer's config."""
        config = self.get_config()
        del config["input_quantizer"], config["exact_inference"]
        return base.from_config(config)


@keras.saving.register_keras_serializable(package="repvgg_keras")
class QuantizedConv2D(_ReadsQuantized, layers.Conv2D):
    """A Conv2D computing with its kernel fake-quantized to int8 per output channel.

    Gradients pass straight through the rounding, so training moves the float kernel while the
    forward pass sees what an int8 runtime will hold.
    """

    def call(self, inputs, training=None):
        if not self.computes_exactly(training):
            return super().call(inputs)

        def conv(x, kernel, *bias):
            outputs = layers.Conv2D.convolution_op(self, x, kernel)
            return self.requantized(self.accumulated(outputs, bias[0] if bias else None))

        bias = [self.bias] if self.use_bias else []
        outputs = _in_float64(conv, inputs, quantize_weights(self.kernel), *bias)
        return self.activation(outputs) if self.activation is not None else outputs

    def convolution_op(self, inputs, kernel):
        return super().convolution_op(inputs, quantize_weights(kernel))

    def deploy_replacement(self):
        """The plain Conv2D (and its weights) that `to_deploy` puts in this layer's place."""
        kernel, *rest = self.get_weights()
        grid = keras.ops.convert_to_numpy(quantize_weights(ops.convert_to_tensor(kernel)))
        return self.as_float_layer(layers.Conv2D), [np.asarray(grid), *rest]


@keras.saving.register_keras_serializable(package="repvgg_keras")
class QuantizedDense(_ReadsQuantized, layers.Dense):
    """A Dense layer computing with its kernel fake-quantized to int8, per tensor (LiteRT's
    integer-only FULLY_CONNECTED takes one weight scale)."""

    def call(self, inputs, training=None):
        def dense(x, kernel, *bias):
            outputs = ops.matmul(x, kernel)
            return ops.add(outputs, bias[0]) if bias else outputs

        kernel = quantize_weights(self.kernel, per_channel=False)
        bias = [self.bias] if self.use_bias else []
        if self.computes_exactly(training):
            exact = lambda x, kernel, *bias: self.requantized(
                self.accumulated(ops.matmul(x, kernel), bias[0] if bias else None)
            )
            outputs = _in_float64(exact, inputs, kernel, *bias)
        else:
            outputs = dense(inputs, kernel, *bias)
        return self.activation(outputs) if self.activation is not None else outputs

    def deploy_replacement(self):
        kernel, *rest = self.get_weights()
        grid = quantize_weights(ops.convert_to_tensor(kernel), per_channel=False)
        return self.as_float_layer(layers.Dense), [
            np.asarray(keras.ops.convert_to_numpy(grid)),
            *rest,
        ]


@keras.saving.register_keras_serializable(package="repvgg_keras")
class ActivationQuantizer(_ExactInference, layers.Layer):
    """Per-tensor int8 fake quantization with a trainable range r (zero point 0): symmetric on
    [-r, r], or `unsigned` on [0, r] (after a ReLU) with twice the resolution.

    The range starts at the largest |value| seen on the calibration images; its gradient is the
    fake-quant op's own (values clipped by the range push it out, the rest pull it in).
    """

    def __init__(self, initial_range=1.0, unsigned=False, **kwargs):
        super().__init__(**kwargs)
        self.initial_range = float(initial_range)
        self.unsigned = bool(unsigned)

    def build(self, input_shape):
        self.range = self.add_weight(
            name="range",
            shape=(),
            initializer=keras.initializers.Constant(self.initial_range),
            trainable=True,
        )

    def step(self):
        return grid_step(ops.abs(self.range), 255 if self.unsigned else 127)

    def grid(self):
        """The learned Grid: what an int8 exporter writes for this tensor."""
        return Grid(float(keras.ops.convert_to_numpy(self.step())), self.unsigned)

    def call(self, inputs, training=None):
        step = self.step()
        if not self.computes_exactly(training):
            if self.unsigned:
                return _unsigned_fake_quant(inputs, step)
            return _symmetric_fake_quant(inputs, step)
        low, high = (0, 255) if self.unsigned else (-127, 127)
        # float32 division, as onnxruntime's QuantizeLinear; ties to even, as it rounds; the
        # code times the step is exact in float32 (STEP_BITS)
        return ops.clip(ops.round(inputs / step), low, high) * step

    def deploy_replacement(self):
        return None, None  # the float deploy form computes without it

    def get_config(self):
        return {
            **super().get_config(),
            "initial_range": self.initial_range,
            "unsigned": self.unsigned,
        }


@keras.saving.register_keras_serializable(package="repvgg_keras")
class QuantizedRepVGGBlock(_ReadsQuantized, RepVGGBlock):
    """A RepVGG block computing as its int8 deploy form: the branches fused into one 3x3 kernel
    inside the graph (differentiable, BatchNorm statistics frozen), that kernel fake-quantized per
    output channel, one conv (the authors' remedy: QAT constrains the equivalent kernel). The
    branch kernels and BatchNorm scales and shifts train; the runtimes get the fused kernel."""

    def build(self, input_shape):
        if self.se_channels:
            raise ValueError(
                f"{self.name}: squeeze-excitation blocks have no single fused kernel to "
                "quantize in training form: use form='deploy'."
            )
        super().build(input_shape)

    def call(self, inputs, training=None):
        kernel, bias = self.fused_kernel()
        padded = self.pad(inputs) if self.pad is not None else inputs

        def conv(x, kernel, bias):
            outputs = ops.conv(
                x,
                kernel,
                strides=self.strides,
                padding="same" if self.strides == 1 else "valid",
                dilation_rate=self.dilation_rate,
            )
            return outputs + bias

        if self.computes_exactly(training):
            return ops.relu(_in_float64(conv, padded, quantize_weights(kernel), bias))
        return ops.relu(conv(padded, quantize_weights(kernel), bias))

    def fused_kernel(self):
        """(kernel, bias) of the equivalent 3x3 conv as tensors of the branch weights (what
        `get_deploy_weights` computes in numpy), BatchNorm in inference mode."""

        def scale(bn):
            return bn.gamma / ops.sqrt(bn.moving_variance + bn.epsilon)

        def shift(bn):
            return bn.beta - bn.moving_mean * scale(bn)

        kernel = self.dense_conv.kernel * scale(self.dense_bn)
        bias = shift(self.dense_bn)
        if self.pointwise_conv is not None:
            pointwise = ops.pad(self.pointwise_conv.kernel, [[1, 1], [1, 1], [0, 0], [0, 0]])
            if self.pointwise_bn is None:
                kernel = kernel + pointwise
            else:
                kernel = kernel + pointwise * scale(self.pointwise_bn)
                bias = bias + shift(self.pointwise_bn)
        identity = fusion.identity_kernel(self.filters, self.groups).astype("float32")
        if self.identity_bn is not None:
            kernel = kernel + identity * scale(self.identity_bn)
            bias = bias + shift(self.identity_bn)
        elif self.adds_plain_identity:
            kernel = kernel + identity
        if self.post_bn is not None:
            post = scale(self.post_bn)
            kernel = kernel * post
            bias = (bias - self.post_bn.moving_mean) * post + self.post_bn.beta
        return kernel, bias

    def get_deploy_weights(self):
        """The fused kernel on the int8 grid and its bias: what `to_deploy` puts in the plain conv."""
        kernel, bias = self.fused_kernel()
        grid = quantize_weights(kernel)
        return (
            np.asarray(keras.ops.convert_to_numpy(grid), np.float32),
            np.asarray(keras.ops.convert_to_numpy(bias), np.float32),
        )


QUANTIZED_LAYERS = (QuantizedConv2D, QuantizedDense, QuantizedRepVGGBlock, ActivationQuantizer)


def is_quantize_aware(model):
    """True when `model` holds fake-quantized layers (made by `quantize_aware`)."""
    return any(isinstance(layer, QUANTIZED_LAYERS) for layer in all_layers(model))


def fused(qat):
    """The deploy form of a training-form QAT model, still quantization-aware: each block becomes
    [pad] -> QuantizedConv2D (its fused kernel, the same grid) -> ReLU, the rest shared. Converters
    need the kernel as one constant before its fake quantization."""
    blocks = [l for l in qat.layers if isinstance(l, QuantizedRepVGGBlock)]
    if not blocks:
        return qat

    def call(layer, *args, **kwargs):
        if not isinstance(layer, QuantizedRepVGGBlock):
            return layer(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        name = layer.name
        if layer.pad is not None:
            x = layers.ZeroPadding2D(layer.dilation_rate, name=f"{name}_pad")(x)
        conv = QuantizedConv2D(
            layer.filters,
            3,
            strides=layer.strides,
            padding="same" if layer.strides == 1 else "valid",
            dilation_rate=layer.dilation_rate,
            groups=layer.groups,
            name=f"{name}_reparam",
            input_quantizer=layer.input_quantizer,
            exact_inference=layer.exact_inference,
        )
        x = conv(x)
        kernel, bias = layer.fused_kernel()
        conv.set_weights([keras.ops.convert_to_numpy(kernel), keras.ops.convert_to_numpy(bias)])
        return layers.ReLU(name=f"{name}_relu")(x)

    return keras.models.clone_model(qat, clone_function=lambda layer: layer, call_function=call)


def snap_biases(qat, exact_inference=True):
    """`qat` (made deploy form by `fused`) computing as the runtimes do, to the last step: each
    quantized layer's sum and bias on the int32 grid they keep them on (step: its input's step x
    its weight step per channel, a float32 product as TFLite and onnxruntime compute it), and
    its output rounded to the next quantizer's grid in float64 (`requantized`). A copy; `qat`
    is left as it is. exact_inference=False: its inference sums in float32, the graph the
    TFLite converter reads."""
    twin = fused(qat)
    copy = keras.models.clone_model(twin)
    copy.set_weights(twin.get_weights())
    grids = activation_grids(copy)
    for layer in copy.layers:
        if isinstance(layer, _ExactInference):
            layer.exact_inference = exact_inference
        if not isinstance(layer, (QuantizedConv2D, QuantizedDense)):
            continue
        after = _quantizer_after(layer)
        if after is not None:
            layer.output_step = after.grid().step
        if layer.input_quantizer not in grids:
            continue
        kernel, *bias = layer.get_weights()
        axes = tuple(range(kernel.ndim - 1)) if isinstance(layer, QuantizedConv2D) else None
        weight_step = grid_step(np.abs(kernel).max(axis=axes), 127)  # as quantize_weights
        weight_step = keras.ops.convert_to_numpy(weight_step)
        input_step = np.float32(grids[layer.input_quantizer].step)
        exact = np.float64(input_step) * weight_step.astype(np.float64)
        step = (input_step * weight_step).astype(np.float64)  # as TFLite and onnxruntime
        layer.accumulator_step, layer.exact_step = step, exact
        if bias:
            layer.set_weights([kernel, (np.round(bias[0] / step) * step).astype(bias[0].dtype)])
    return copy


def quantize_scope(model):
    """The `scope` a QAT model was made with: "every_op" when its classifier is quantized."""
    if not is_quantize_aware(model):
        raise ValueError(f"Model {model.name!r} is not quantization-aware.")
    dense = any(isinstance(layer, QuantizedDense) for layer in all_layers(model))
    return "every_op" if dense else "convolutions"


def pools_on_grid(model):
    """True when `model` (a QAT model) rounds its global average pool's output to an int8 grid:
    in scope "convolutions" its input's, as the int8 runtimes' pools do."""
    return pooled_grid(model) is not None


def _quantizer_after(layer):
    """The ActivationQuantizer that `layer`'s output goes through (past a ReLU), or None."""
    for consumer in compat.consumers(layer):
        if isinstance(consumer, ActivationQuantizer):
            return consumer
        if isinstance(consumer, layers.ReLU):
            return _quantizer_after(consumer)
    return None


def pooled_grid(model):
    """The Grid `model`'s global average pool rounds to, or None (it pools in float, or `model`
    is not quantization-aware)."""
    for layer in all_layers(model):
        if isinstance(layer, layers.GlobalAveragePooling2D):
            quantizer = _quantizer_after(layer)
            if quantizer is not None:
                return quantizer.grid()
    return None


def conv_grids(model):
    """({conv name: Grid of its input}, {conv name: Grid after its ReLU}) of a deploy-form QAT
    model (`fused`, `snap_biases`): what an int8 runtime's fused conv + ReLU reads and writes."""
    grids = activation_grids(model)
    inputs, outputs = {}, {}
    for layer in all_layers(model):
        if not isinstance(layer, QuantizedConv2D):
            continue
        if layer.input_quantizer in grids:
            inputs[layer.name] = grids[layer.input_quantizer]
        after = _quantizer_after(layer)
        if after is not None:
            outputs[layer.name] = grids[after.name]
    return inputs, outputs


def activation_grids(model):
    """{quantizer name: its learned Grid} of a QAT model: what the int8 exporters read."""
    return {
        layer.name: layer.grid()
        for layer in all_layers(model)
        if isinstance(layer, ActivationQuantizer)
    }


def quantize_aware(
    model,
    calibration_images,
    scope="convolutions",
    form="deploy",
    activations="unsigned",
    batch_size=32,
):
    """A QAT model computing `model` as the int8 runtimes will, trainable with `fit`.

    Args:
        model: a RepVGG classifier, training form (fused first) or deploy form.
        calibration_images: a few dozen to a few hundred preprocessed model inputs
            ([N, H, W, C] array); each activation range starts at its largest |value| on them.
        scope: "convolutions" (the pool on its input's grid, the classifier float: TFLite
            `int8`, ONNX QDQ, OpenVINO, SavedModel int8) or "every_op" (TFLite `int8_full`).
        form: "deploy" (fine-tune the fused convs: BatchNorm folded first) or "training"
            (a training-form model keeps its branches and BatchNorms, frozen statistics; each
            block's fused kernel is computed from them in the graph and quantized).
        activations: "unsigned" (a ReLU's output on [0, r]: onnxruntime, OpenVINO, TFLite and
            SavedModel int8 run it exactly, at their post-training speed) or "symmetric" (on
            [-r, r]: the ONNX QDQ form TensorRT's explicit quantization takes).
        batch_size: batch size of the calibration pass.

    Returns a new model (the input model is left untouched); `to_deploy` of it gives the float
    model with its weights on the int8 grid.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"quantize_aware expects a keras.Model, got {type(model).__name__}.")
    if scope not in SCOPES:
        raise ValueError(f"Unknown scope {scope!r}: choose one of {', '.join(SCOPES)}.")
    if is_quantize_aware(model):
        raise ValueError(f"Model {model.name!r} is already quantization-aware.")
    if form not in FORMS:
        raise ValueError(f"Unknown form {form!r}: choose one of {', '.join(FORMS)}.")
    if activations not in ACTIVATIONS:
        raise ValueError(
            f"Unknown activations {activations!r}: choose one of {', '.join(ACTIVATIONS)}."
        )
    images = _check_calibration(model, calibration_images)
    blocks = [l for l in all_layers(model) if type(l) is RepVGGBlock]
    if form == "training" and not blocks:
        raise ValueError(
            f"Model {model.name!r} has no RepVGG block in training form: use form='deploy'."
        )
    plain = model if form == "training" else to_deploy(model) if _needs_fusion(model) else model
    convs = [l for l in all_layers(plain) if type(l) in (layers.Conv2D, RepVGGBlock)]
    if not convs:
        raise ValueError(f"Model {model.name!r} has no Conv2D layer: nothing to quantize.")
    if any(isinstance(l, keras.Model) for l in plain.layers):
        raise ValueError(
            f"Model {model.name!r} nests another model: quantize_aware takes one flat "
            "functional model (a RepVGG builder's output)."
        )
    if not isinstance(plain.layers[-1], layers.Dense):
        raise ValueError(
            f"Model {model.name!r} ends in {type(plain.layers[-1]).__name__}, not a classifier: "
            "quantize_aware takes a classifier with its Dense top (include_top=True); "
            "segmentation models and bare backbones have no int8 export to match."
        )
    builder = _QuantizedGraph(scope, unsigned_relus=activations == "unsigned")
    qat = keras.models.clone_model(
        plain, clone_function=builder.clone, call_function=builder.call, recursive=False
    )
    for clone, original in builder.originals:
        clone.set_weights(original.get_weights())
    _calibrate(plain, qat, builder.points, images, batch_size)
    return qat


def _needs_fusion(model):
    return any(isinstance(l, (layers.BatchNormalization, RepVGGBlock)) for l in all_layers(model))


def _check_calibration(model, images):
    if images is None:
        raise ValueError("quantize_aware needs calibration images to set its activation ranges.")
    images = np.asarray(images, np.float32)
    expected = tuple(model.input_shape[1:])
    if images.ndim < 2 or len(images) == 0:
        raise ValueError(
            f"calibration images must be a non-empty [N, H, W, C] array, got shape {images.shape}."
        )
    if len(expected) != images.ndim - 1 or any(
        e is not None and e != got for e, got in zip(expected, images.shape[1:])
    ):
        raise ValueError(
            f"calibration images have shape {images.shape[1:]}, the model takes {expected}."
        )
    if not np.isfinite(images).all():
        raise ValueError("calibration images hold NaN or inf values.")
    return images


class _QuantizedGraph:
    """clone_model callbacks: quantized convs (and classifier), a quantizer at the model
    input and after each ReLU (and, for every_op, after pooling and the classifier)."""

    def __init__(self, scope, unsigned_relus):
        self.scope = scope
        self.unsigned_relus = unsigned_relus
        self.originals = []  # (clone, original) pairs whose weights are copied after cloning
        self.produced = set()  # ids of tensors made inside the graph (the rest are inputs)
        self.input_quantizers = {}
        self.points = []  # (quantizer, name of the layer it follows, or None for the input)
        self.quantized_by = {}  # id(tensor) -> name of the quantizer whose grid it is on
        self.quantizers = {}  # name -> ActivationQuantizer

    def clone(self, layer):
        cls = type(layer)
        if cls is layers.Conv2D:
            cls = QuantizedConv2D
        elif cls is RepVGGBlock:
            cls = QuantizedRepVGGBlock
        elif cls is layers.Dense and self.scope == "every_op":
            cls = QuantizedDense
        clone = cls.from_config(layer.get_config())
        self.originals.append((clone, layer))
        return clone

    def call(self, layer, *args, **kwargs):
        args = keras.tree.map_structure(self._quantize_input, args)
        source = self.quantized_by.get(id(args[0])) if args else None
        if isinstance(layer, _ReadsQuantized):
            layer.input_quantizer = source
        outputs = layer(*args, **kwargs)
        if isinstance(layer, layers.ZeroPadding2D) and source:  # zero stays on the grid
            self.quantized_by[id(outputs)] = source
        if self._quantizes_output(layer):
            unsigned = self.unsigned_relus and self._non_negative(layer, source)
            outputs = self._quantizer(f"{layer.name}_quant", layer.name, outputs, unsigned)
        elif isinstance(layer, layers.GlobalAveragePooling2D) and source:
            # The int8 runtimes pool in int8 on their input's grid (TFLite's MEAN keeps its
            # input's scale): the pooled features go through the same quantizer again.
            outputs = self.quantizers[source](outputs)
            self.quantized_by[id(outputs)] = source
        self.produced.add(id(outputs))
        return outputs

    def _quantizer(self, name, follows, tensor, unsigned=False):
        quantizer = ActivationQuantizer(unsigned=unsigned, name=name)
        self.quantizers[name] = quantizer
        self.points.append((quantizer, follows))
        quantized = quantizer(tensor)
        self.quantized_by[id(quantized)] = name
        self.produced.add(id(quantized))
        return quantized

    def _quantize_input(self, tensor):
        if not keras.backend.is_keras_tensor(tensor) or id(tensor) in self.produced:
            return tensor
        if id(tensor) not in self.input_quantizers:
            quantized = self._quantizer(f"{tensor.name}_quant", None, tensor)
            self.input_quantizers[id(tensor)] = quantized
        return self.input_quantizers[id(tensor)]

    def _quantizes_output(self, layer):
        if isinstance(layer, (layers.ReLU, RepVGGBlock)) or (
            isinstance(layer, layers.Conv2D) and layer.get_config()["activation"] == "relu"
        ):
            return True
        every_op = (layers.GlobalAveragePooling2D, layers.Dense)
        return self.scope == "every_op" and isinstance(layer, every_op)

    def _non_negative(self, layer, source):
        """Whether `layer`'s output is never negative: it ends in a ReLU, or it pools an
        unsigned quantizer's output."""
        if isinstance(layer, layers.GlobalAveragePooling2D):
            return source is not None and self.quantizers[source].unsigned
        if isinstance(layer, layers.ReLU):
            return not layer.negative_slope
        return not isinstance(layer, layers.Dense)


def _calibrate(plain, qat, points, images, batch_size):
    """Set each quantizer's range to the largest |value| its float tensor takes on `images`
    (the float model's tensor at the same point: min/max calibration, as the runtimes do)."""
    tensors = [plain.get_layer(name).output if name else plain.inputs[0] for _, name in points]
    probe = keras.Model(plain.inputs[0], tensors)
    maxima = np.zeros(len(points))
    for start in range(0, len(images), batch_size):
        values = probe(images[start : start + batch_size], training=False)
        values = values if isinstance(values, (list, tuple)) else [values]
        for i, value in enumerate(values):
            value = np.abs(keras.ops.convert_to_numpy(value))
            maxima[i] = max(maxima[i], float(value.max()))
    for (quantizer, _), maximum in zip(points, maxima):
        quantizer.initial_range = max(float(maximum), MIN_RANGE)
        quantizer.range.assign(np.float32(quantizer.initial_range))
