"""int8 for the TF Serving path: a frozen float graph quantized by Intel Neural Compressor.

Neural Compressor (`neural-compressor-tf`) rewrites the graph into TensorFlow's own oneDNN int8
ops (`QuantizeV2`, `QuantizedConv2DWithBiasAndReluAndRequantize`, `Dequantize`): weights per output
channel (already GPTQ-rounded by `savedmodel.int8_function`, export/gptq.py), activations per tensor
from the calibration images' ranges. The classifier's MatMul stays
float, as in the TFLite int8 export: quantizing it clips the logits. The result is a plain graph
that stock tensorflow-cpu runs; whether a server registers these ops is `missing_kernels`'s
question (docs/export-and-serving.md, "int8 in TensorFlow Serving").
"""

import contextlib
import logging
import os
import re
import sys
import tempfile
import uuid
import warnings

import numpy as np

from export import compat, quantized_pads

INSTALL_HINT = (
    "pip install --no-deps neural-compressor-tf==3.10 && pip install prettytable py-cpuinfo "
    "pydantic 'setuptools<81' (make install does this)"
)
CALIBRATION_BATCH = 20


class _Batches:
    """The calibration images as the (images, labels) batches Neural Compressor iterates over."""

    def __init__(self, images, batch_size=CALIBRATION_BATCH):
        self.images = images
        self.batch_size = batch_size

    def __iter__(self):
        for start in range(0, len(self.images), self.batch_size):
            yield self.images[start : start + self.batch_size], None

    def __len__(self):
        return -(-len(self.images) // self.batch_size)


def _neural_compressor():
    """Neural Compressor's TensorFlow API, quiet (it logs every graph pass at INFO)."""
    try:
        # It reads its calibration ranges back from what TensorFlow prints to file descriptor 2,
        # through the `sys.stderr` it sees at import: give it the real one even where stderr is
        # replaced (pytest's capture). And it imports pkg_resources, which warns.
        with warnings.catch_warnings(), contextlib.redirect_stderr(sys.__stderr__ or sys.stderr):
            warnings.simplefilter("ignore")
            from neural_compressor.tensorflow import StaticQuantConfig, quantize_model
    except ImportError as e:
        raise ImportError(
            f"--precision int8 needs Intel Neural Compressor for TensorFlow ({e}): {INSTALL_HINT}."
        ) from e
    logging.getLogger("neural_compressor").setLevel(logging.ERROR)
    return StaticQuantConfig, quantize_model


def quant_config(float_convs=()):
    """Per-channel int8 weights, per-tensor int8 activations; the classifier MatMul and the
    convolutions named in `float_convs` stay float."""
    static_quant_config, _ = _neural_compressor()
    config = static_quant_config(weight_granularity="per_channel")
    keep_float = static_quant_config(weight_dtype="fp32", act_dtype="fp32")
    config.set_local("MatMul", keep_float)
    for name in float_convs:
        # Neural Compressor matches these patterns against its own node names, which add
        # call prefixes to the frozen graph's names.
        config.set_local(f".*{re.escape(name)}$", keep_float)
    return config


def float_convolutions(graph):
    """Names of the Conv2D ops of `graph` (a tf.Graph) that stay float: those whose output (after
    its bias) goes into no ReLU (a segmentation head's classifier and refinement: int8 quantizes a
    convolution with its ReLU, and the calibrated range of the others can be degenerate) and the
    grouped ones (TensorFlow's int8 convolution has no groups)."""

    def feeds_relu(op):
        for consumer in op.outputs[0].consumers():
            if consumer.type in ("Relu", "Relu6"):
                return True
            if consumer.type == "BiasAdd" and feeds_relu(consumer):
                return True
        return False

    def grouped(op):
        return op.inputs[0].shape[-1] != op.inputs[1].shape[2]

    return [
        op.name
        for op in graph.get_operations()
        if op.type == "Conv2D" and (grouped(op) or not feeds_relu(op))
    ]


def quantize(frozen, image_shape, calibration, rewrite=None):
    """The int8 graph of `frozen` (a float32 concrete function images -> logits, traced with
    `tracing.plain_grouped_convs`) as a concrete function with the same input and output,
    calibrated on `calibration` (model inputs), and its GraphDef. `rewrite`: a function applied
    to the int8 GraphDef first (a QAT model's learned ranges, export/learned_ranges.py)."""
    import tensorflow as tf

    _, quantize_model = _neural_compressor()
    calibration = np.asarray(calibration, np.float32)
    if len(calibration) == 0:
        raise ValueError("--precision int8 needs calibration images (--calibration_data).")
    spec = tf.TensorSpec((None, *image_shape), tf.float32, name="images")
    module = tf.Module()
    module.serve = tf.function(
        lambda images: {"logits": tf.nest.flatten(frozen(images))[0]}, input_signature=[spec]
    )
    # deprecation.silence: Neural Compressor's TF1-style graph code warns on every call.
    with (
        tempfile.TemporaryDirectory() as workdir,
        contextlib.chdir(workdir),
        compat.silenced_deprecation(),
    ):
        # Neural Compressor reads a SavedModel directory and writes its workspace into the cwd.
        float_path = os.path.join(workdir, "float")
        tf.saved_model.save(module, float_path, signatures={"serving_default": module.serve})
        config = quant_config(float_convolutions(frozen.graph))
        quantized = quantize_model(float_path, config, _Batches(calibration))
        # Neural Compressor leaves the stride-2 blocks' Pad in float on stock TensorFlow.
        graph_def = quantized_pads.absorb_pads(quantized.graph_def)
    if rewrite is not None:
        graph_def = rewrite(graph_def)
    if not int8_ops(graph_def):
        raise ValueError(
            "Neural Compressor quantized no convolution of this model; export it in another "
            "precision (--precision fp32 or bf16)."
        )
    input_name = quantized.input_tensor_names[0]
    output_name = quantized.output_tensor_names[0]
    return graph_function(graph_def, input_name, output_name), graph_def


def graph_function(graph_def, input_name, output_name):
    """A GraphDef as a concrete function from tensor `input_name` to tensor `output_name`."""
    graph_def = _with_fresh_function_names(graph_def)

    def import_graph():
        compat.import_graph_def(graph_def)

    with compat.silenced_deprecation():
        wrapped = compat.wrap_function(import_graph)
    return wrapped.prune(
        feeds=wrapped.graph.get_tensor_by_name(_tensor(input_name)),
        fetches=wrapped.graph.get_tensor_by_name(_tensor(output_name)),
    )


def _with_fresh_function_names(graph_def):
    """A copy of `graph_def` whose library functions (Keras's XLA-compiled grouped convolutions)
    have names of their own: the float graph's functions of the same names are already in this
    process, with other bodies, and TensorFlow refuses a second definition under one name."""
    renamed = compat.copy_graph_def(graph_def)
    suffix = f"_int8_{uuid.uuid4().hex[:8]}"
    names = {f.signature.name: f.signature.name + suffix for f in renamed.library.function}
    if not names:
        return renamed
    nodes = list(renamed.node)
    for function in renamed.library.function:
        function.signature.name = names[function.signature.name]
        nodes.extend(function.node_def)
    for node in nodes:
        if node.op in names:
            node.op = names[node.op]
        for value in node.attr.values():
            if value.HasField("func") and value.func.name in names:
                value.func.name = names[value.func.name]
    for gradient in renamed.library.gradient:
        gradient.function_name = names.get(gradient.function_name, gradient.function_name)
    return renamed


def _tensor(name):
    return name if ":" in name else f"{name}:0"


def op_counts(graph_def):
    """{op type: count} over a GraphDef and its function library."""
    counts = {}
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes.extend(function.node_def)
    for node in nodes:
        counts[node.op] = counts.get(node.op, 0) + 1
    return counts


def missing_kernels(graph_def, device="CPU"):
    """The op types of `graph_def` that the running TensorFlow has no `device` kernel for."""
    missing = []
    for op in sorted(op_counts(graph_def)):
        registered = compat.registered_kernels(op)
        if not any(kernel.device_type == device for kernel in registered):
            missing.append(op)
    return missing


# Ops registered in stock TensorFlow as placeholders that oneDNN's graph rewrite replaces with its
# int8 kernels: without oneDNN they run and produce no output.
ONEDNN_ONLY_OPS = (
    "QuantizedConv2DWithBiasAndReluAndRequantize",
    "QuantizedConv2DWithBiasAndRequantize",
    "QuantizedConv2DWithBiasAndDequantize",
    "QuantizedMatMulWithBiasAndDequantize",
    "QuantizedMatMulWithBiasAndReluAndRequantize",
    "QuantizedMatMulWithBiasAndRequantize",
    "QuantizedDepthwiseConv2DWithBiasAndReluAndRequantize",
)
ONEDNN_HINT = (
    "set TF_ENABLE_ONEDNN_OPTS=1 (TensorFlow turns oneDNN on by itself only on CPUs with "
    "AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX); serve it the same way (docker run -e "
    "TF_ENABLE_ONEDNN_OPTS=1 tensorflow/serving ...)"
)


def check_runs_here(graph_def, onednn=None):
    """ValueError (one line) unless the running TensorFlow can run every op of `graph_def` on
    the CPU: a kernel registered for each, and oneDNN on where an op is a oneDNN placeholder."""
    missing = missing_kernels(graph_def)
    if missing:
        raise ValueError(
            f"the int8 graph uses ops this TensorFlow registers no CPU kernel for "
            f"({', '.join(missing)}); export with the TensorFlow that will serve it, or choose "
            "--precision fp32."
        )
    placeholders = sorted(set(op_counts(graph_def)) & set(ONEDNN_ONLY_OPS))
    if placeholders and not (compat.onednn_enabled() if onednn is None else onednn):
        raise ValueError(
            f"TensorFlow's oneDNN is off in this process, and without it the int8 ops "
            f"({', '.join(placeholders)}) are placeholders that compute nothing: {ONEDNN_HINT}."
        )


def int8_ops(graph_def):
    """The quantized op types in `graph_def` ({op: count}); empty when nothing was quantized."""
    return {op: n for op, n in op_counts(graph_def).items() if "quantize" in op.lower()}
