"""The layers of a quantization-aware model (`rk.quantize_aware`): each computes what an int8
runtime computes for its op, on the grids the exporters write.

A grid is a step and a code range (`Grid`): weights symmetric int8 per output channel, step
max|w| / 127; activations per tensor with a learned range. Every step keeps STEP_BITS significant
bits, so grid values are exact in float32 and int8 products exact in float64. Training computes
in float32 through Keras' fake-quant op (straight-through gradients, trainable ranges); inference
sums in float64 (`_in_float64`), as exactly as the runtimes' int32 accumulators.
"""

import dataclasses

import keras
import numpy as np
from keras import layers, ops

from repvgg_keras import fusion
from repvgg_keras.layers import RepVGGBlock

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
        return codes(self.unsigned)


@dataclasses.dataclass(frozen=True)
class Rounding:
    """How an int8 runtime computes the roundings that set its codes, in float32 and half to
    even (found by comparing each of its int8 tensors with candidate formulas).

    `requantize`, a convolution's int32 sum onto the next grid: "integer" ((sum + bias code) x
    float32(in step x weight step / out step): XNNPACK, onnxruntime) or "dequantized" (sum x
    float32(in step x weight step), plus the float bias, x float32(1 / out step): oneDNN, in
    TensorFlow and OpenVINO). `quantize`, a float tensor onto a grid: "divide" (x / step),
    "reciprocal" (x x float32(1 / step)) or "scale_shift" (x x float32(1 / step) + the code of
    zero in one fused multiply-add: OpenVINO's FakeQuantize). `symmetric_floor`: the lowest code
    of a symmetric grid's tensor: int8's -128, where the runtime saturates, or -127
    (TensorFlow's narrow-range QuantizeV2)."""

    requantize: str = "integer"
    quantize: str = "divide"
    symmetric_floor: int = -128


# The runtime each exporter verifies in (`snap_biases(..., runtime=)`).
ROUNDINGS = {
    "tflite": Rounding("integer", "divide"),
    "onnxruntime": Rounding("integer", "divide"),
    "openvino": Rounding("dequantized", "scale_shift"),
    "tensorflow": Rounding("dequantized", "reciprocal", symmetric_floor=-127),
}


def _float32(value):
    """`value` (float64: an exact product or sum of two float32 numbers) rounded to float32 as a
    float32 operation rounds it, whatever the compiler fuses."""
    return ops.cast(value, "float32")


def _wide(tensor):
    return ops.cast(tensor, "float64")


def codes(unsigned):
    """(lowest, highest) integer code of an unsigned or a symmetric (narrow-range) int8 grid."""
    return (0, 255) if unsigned else (-127, 127)


def weight_step(kernel, per_channel=True):
    """The step of `kernel`'s symmetric int8 grid: max|w| / 127 per output channel (the last
    axis) or per tensor, kept to STEP_BITS bits."""
    axes = tuple(range(len(kernel.shape) - 1)) if per_channel else None
    return grid_step(ops.max(ops.abs(kernel), axis=axes), 127)


def quantize_weights(kernel, per_channel=True):
    """`kernel` on the symmetric int8 grid the runtimes use: [-127, 127] x max|w| / 127, per
    output channel (the last axis) or per tensor."""
    step = weight_step(kernel, per_channel)
    return _symmetric_fake_quant(kernel, step, axis=-1 if per_channel else None)


def _in_float64(compute, *tensors):
    """`compute` on float64 copies of `tensors`, its result back in float32.

    The int8 runtimes sum int8 x int8 products in int32, exactly; float32 rounds those sums,
    and a sum lying near a rounding midpoint of the next quantizer then lands one step off. A
    deep model carries each such step on and multiplies it until top-1 answers change, so
    inference computes in float64, whose rounding is far below a step."""
    wide = [ops.cast(tensor, "float64") for tensor in tensors]
    return ops.cast(compute(*wide), "float32")


class ExactInference:
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


class ReadsQuantized(ExactInference):
    """A quantized layer that knows the quantizer of its input (`input_quantizer`, a layer name):
    the runtimes hold its bias in int32 with the step input step x weight step, which
    `snap_biases` reproduces."""

    def __init__(self, *args, input_quantizer=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.input_quantizer = input_quantizer
        # Set by snap_biases on the reference copy (see `requantized`).
        self.bias_step = None
        self.accumulator_step = None
        self.requantize_scale = None
        self.output_step = None
        self.rounding = Rounding()  # the runtime's, set by snap_biases

    def get_config(self):
        return {**super().get_config(), "input_quantizer": self.input_quantizer}

    def requantized(self, outputs, bias):
        """The float64 sum `outputs` (exact: int8 products) plus `bias`, as the runtimes compute
        it. Their int32 accumulator counts in `accumulator_step` (input step x weight step) and
        the bias joins it as the code the converters give it (its value over `bias_step`, that
        product in float32); the sum goes onto the next quantizer's grid (`output_step`) as
        `rounding.requantize` says (`Rounding`). Without these (a model `snap_biases` has not
        prepared): the float64 sum plus the bias."""
        if self.accumulator_step is None:
            return outputs + bias if bias is not None else outputs
        total = ops.round(outputs / ops.convert_to_tensor(self.accumulator_step, "float64"))
        if self.requantize_scale is None or self.rounding.requantize == "integer":
            if bias is not None:
                total = total + ops.round(bias / ops.convert_to_tensor(self.bias_step, "float64"))
            if self.requantize_scale is None:
                return total * ops.convert_to_tensor(self.accumulator_step, "float64")
            scale = ops.convert_to_tensor(self.requantize_scale, "float32")
            codes = ops.round(ops.cast(total, "float32") * scale)
        else:  # "dequantized"
            step = ops.convert_to_tensor(self.bias_step, "float64")  # a float32 value
            value = _float32(_wide(ops.cast(total, "float32")) * step)
            if bias is not None:
                value = _float32(_wide(value) + bias)
            reciprocal = np.float64(np.float32(1) / np.float32(self.output_step))
            codes = ops.round(_float32(_wide(value) * reciprocal))
        return ops.cast(codes, "float64") * self.output_step

    def as_float_layer(self, base):
        """A `base` layer (its float class) with this layer's config."""
        config = self.get_config()
        del config["input_quantizer"], config["exact_inference"]
        return base.from_config(config)


@keras.saving.register_keras_serializable(package="repvgg_keras")
class QuantizedConv2D(ReadsQuantized, layers.Conv2D):
    """A Conv2D computing with its kernel fake-quantized to int8 per output channel.

    Gradients pass straight through the rounding, so training moves the float kernel while the
    forward pass sees what an int8 runtime will hold.
    """

    def call(self, inputs, training=None):
        if not self.computes_exactly(training):
            return super().call(inputs)

        def conv(x, kernel, *bias):
            outputs = layers.Conv2D.convolution_op(self, x, kernel)
            return self.requantized(outputs, bias[0] if bias else None)

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
class QuantizedDense(ReadsQuantized, layers.Dense):
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
                ops.matmul(x, kernel), bias[0] if bias else None
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
class ActivationQuantizer(ExactInference, layers.Layer):
    """Per-tensor int8 fake quantization with a trainable range r (zero point 0): symmetric on
    [-r, r], or `unsigned` on [0, r] (after a ReLU) with twice the resolution.

    The range starts at the largest |value| seen on the calibration images; its gradient is the
    fake-quant op's own (values clipped by the range push it out, the rest pull it in).
    """

    def __init__(self, initial_range=1.0, unsigned=False, **kwargs):
        super().__init__(**kwargs)
        self.initial_range = float(initial_range)
        self.unsigned = bool(unsigned)
        # the runtime's (`Rounding`), set by snap_biases; None: x / step on the narrow range
        self.rounding = None

    def build(self, input_shape):
        self.range = self.add_weight(
            name="range",
            shape=(),
            initializer=keras.initializers.Constant(self.initial_range),
            trainable=True,
        )

    def step(self):
        return grid_step(ops.abs(self.range), codes(self.unsigned)[1])

    def grid(self):
        """The learned Grid: what an int8 exporter writes for this tensor."""
        return Grid(float(keras.ops.convert_to_numpy(self.step())), self.unsigned)

    def call(self, inputs, training=None):
        step = self.step()
        if not self.computes_exactly(training):
            if self.unsigned:
                return _unsigned_fake_quant(inputs, step)
            return _symmetric_fake_quant(inputs, step)
        low, high = codes(self.unsigned)
        if self.rounding is not None and not self.unsigned:
            low = self.rounding.symmetric_floor
        scaled, zero_code = self._scaled(inputs, step)
        # ties to even, as the runtimes round; the code times the step is exact in float32
        return ops.clip(ops.round(scaled) - zero_code, low, high) * step

    def _scaled(self, inputs, step):
        """(`inputs` over the step, the code it counts from) in float32 as the runtime computes
        them (`Rounding.quantize`)."""
        quantize = self.rounding.quantize if self.rounding is not None else "divide"
        if quantize == "divide":  # onnxruntime's QuantizeLinear, XNNPACK
            return inputs / step, 0.0
        reciprocal = _wide(1.0 / step)
        if quantize == "reciprocal" or self.unsigned:
            return _float32(_wide(inputs) * reciprocal), 0.0
        # "scale_shift": OpenVINO's FakeQuantize maps codes -128..127 onto levels 0..255:
        # x x float32(255 / range) + float32(128 steps x that), one rounding, less 128
        zero_level = _float32(_wide(128.0 * step) * reciprocal)
        return _float32(_wide(inputs) * reciprocal + _wide(zero_level)), 128.0

    def deploy_replacement(self):
        return None, None  # the float deploy form computes without it

    def get_config(self):
        return {
            **super().get_config(),
            "initial_range": self.initial_range,
            "unsigned": self.unsigned,
        }


@keras.saving.register_keras_serializable(package="repvgg_keras")
class QuantizedRepVGGBlock(ReadsQuantized, RepVGGBlock):
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
