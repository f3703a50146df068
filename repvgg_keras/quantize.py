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
The layers themselves: `repvgg_keras/quantized_layers.py`.
"""

import keras
import numpy as np
from keras import layers

from repvgg_keras import compat
from repvgg_keras.deploy import to_deploy
from repvgg_keras.layers import RepVGGBlock, all_layers
from repvgg_keras.quantized_layers import (
    MIN_RANGE,
    QUANTIZED_LAYERS,
    ROUNDINGS,
    ActivationQuantizer,
    ExactInference,
    Grid,
    QuantizedConv2D,
    QuantizedDense,
    QuantizedRepVGGBlock,
    ReadsQuantized,
    grid_step,
    quantize_weights,
    weight_step,
)
from repvgg_keras.structure import is_segmentation

__all__ = [
    "ACTIVATIONS",
    "FORMS",
    "SCOPES",
    "ActivationQuantizer",
    "Grid",
    "QuantizedConv2D",
    "QuantizedDense",
    "QuantizedRepVGGBlock",
    "ROUNDINGS",
    "activation_grids",
    "conv_grids",
    "fused",
    "grid_step",
    "is_quantize_aware",
    "pooled_grid",
    "pools_on_grid",
    "quantize_aware",
    "quantize_scope",
    "quantize_weights",
    "snap_biases",
]

SCOPES = ("convolutions", "every_op")
FORMS = ("deploy", "training")
ACTIVATIONS = ("unsigned", "symmetric")


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


def snap_biases(qat, exact_inference=True, runtime="tflite"):
    """`qat` (made deploy form by `fused`) computing as `runtime` does, to the last step: each
    quantized layer's bias on the int32 grid the converters put it on, and its sum requantized
    onto the next quantizer's grid with that runtime's own float32 arithmetic (`ROUNDINGS`:
    "tflite" and "onnxruntime", "openvino", "tensorflow"; `ReadsQuantized.requantized`). A copy;
    `qat` is left as it is. exact_inference=False: its inference sums in float32, the graph the
    TFLite converter reads."""
    if runtime not in ROUNDINGS:
        raise ValueError(f"Unknown int8 runtime {runtime!r}: choose one of {', '.join(ROUNDINGS)}.")
    rounding = ROUNDINGS[runtime]
    twin = fused(qat)
    copy = keras.models.clone_model(twin)
    copy.set_weights(twin.get_weights())
    grids = activation_grids(copy)
    for layer in copy.layers:
        if isinstance(layer, ExactInference):
            layer.exact_inference = exact_inference
            layer.rounding = rounding
        if not isinstance(layer, (QuantizedConv2D, QuantizedDense)):
            continue
        if layer.input_quantizer not in grids:
            continue
        kernel, *bias = layer.get_weights()
        per_channel = isinstance(layer, QuantizedConv2D)  # as each layer quantizes its kernel
        weights = keras.ops.convert_to_numpy(weight_step(kernel, per_channel))
        input_step = np.float32(grids[layer.input_quantizer].step)
        bias_step = input_step * weights  # float32, as the converters compute it
        layer.bias_step = bias_step.astype(np.float64)
        layer.accumulator_step = np.float64(input_step) * weights.astype(np.float64)
        after = _quantizer_after(layer)
        if after is not None:
            output_step = np.float32(after.grid().step)
            layer.requantize_scale = bias_step / output_step  # float32, as the runtimes
            layer.output_step = float(output_step)
        if bias:
            snapped = np.round(bias[0] / layer.bias_step) * layer.bias_step
            layer.set_weights([kernel, snapped.astype(bias[0].dtype)])
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
    if is_segmentation(plain):
        raise ValueError(
            f"Model {model.name!r} outputs a map of logits (a segmentation model, rk.PSPNet): "
            "quantize_aware takes classifiers. Segmentation models take post-training int8 "
            "(export.savedmodel --task segmentation --precision int8), which QARepVGG blocks "
            "keep accurate (python -m train --quant_friendly)."
        )
    if any(isinstance(l, keras.Model) for l in plain.layers):
        raise ValueError(
            f"Model {model.name!r} nests another model: quantize_aware takes one flat "
            "functional model (a RepVGG builder's output)."
        )
    if not isinstance(plain.layers[-1], layers.Dense):
        raise ValueError(
            f"Model {model.name!r} ends in {type(plain.layers[-1]).__name__}, not a classifier: "
            "quantize_aware takes a classifier with its Dense top (include_top=True)."
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
        if isinstance(layer, ReadsQuantized):
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
