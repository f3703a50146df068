"""Static int8 quantization of an exported ONNX file (QDQ, per-channel weights).

onnxruntime's quantizer calibrates activation ranges on real images; the QDQ graph it
writes runs in onnxruntime (VNNI kernels on x86) and OpenVINO reads it as int8.

Only the convolutions and their ReLUs are quantized (QUANTIZED_OPS): they hold all but a
sliver of the work, while quantizing the pooling and classifier as well clips the logits. The
ReLUs go with the convs so that they fold into the int8 conv instead of running in float
between quantize/dequantize pairs. What is left of the gap to fp32 is RepVGG's own: the fused
3x3 kernels carry the identity and 1x1 branches in their centre taps, so per-channel int8
weights lose precision on the other taps; QARepVGG blocks (`train --quant_friendly`) address
that in training, and `onnx_file` hands this quantizer GPTQ-rounded kernels (export/gptq.py).
Measurements: docs/int8.md.
"""

import numpy as np


class _Images:
    """onnxruntime's CalibrationDataReader over a numpy batch, one image at a time."""

    def __init__(self, input_name, images):
        self._feeds = iter([{input_name: image[None]} for image in np.asarray(images, np.float32)])

    def get_next(self):
        return next(self._feeds, None)

    def rewind(self):  # older onnxruntime versions call it between passes
        pass


# minmax reduces each image's tensors as it goes; the histogram methods keep far more in
# memory (percentile on RepVGG-B1g4 at 224: 8.3 GB for 4 images, past 24 GB for 64).
QUANTIZED_OPS = ["Conv", "Relu"]  # Relu too: ORT and OpenVINO fold it into the int8 conv
EXTRA_OPTIONS = {
    "percentile": {"CalibMaxIntermediateOutputs": 8},
    "entropy": {"CalibMaxIntermediateOutputs": 8},
}


def quantize(source, target, calibration_images, method="minmax", op_types=QUANTIZED_OPS):
    """Write the int8 QDQ version of `source` to `target`, calibrated on `calibration_images`
    (in the model's input layout, normalised as the model expects). op_types None: every op."""
    import onnx
    from onnxruntime import quantization as q

    if len(calibration_images) == 0:
        raise ValueError("int8 quantization needs calibration images.")
    (graph_input,) = onnx.load(source, load_external_data=False).graph.input
    methods = {
        "minmax": q.CalibrationMethod.MinMax,
        "percentile": q.CalibrationMethod.Percentile,
        "entropy": q.CalibrationMethod.Entropy,
    }
    return _write_qdq(
        source,
        target,
        _Images(graph_input.name, calibration_images),
        activation_type=q.QuantType.QUInt8,
        calibrate_method=methods[method],
        op_types_to_quantize=op_types,
        extra_options=EXTRA_OPTIONS.get(method, {}),
    )


def _write_qdq(source, target, images, **options):
    """onnxruntime's static QDQ quantization with per-channel int8 weights, the rest `options`."""
    from onnxruntime import quantization as q

    q.quantize_static(
        source,
        target,
        images,
        quant_format=q.QuantFormat.QDQ,
        per_channel=True,
        weight_type=q.QuantType.QInt8,
        **options,
    )
    return target


POOLS = ("GlobalAveragePool", "ReduceMean")


def quantize_with_grids(source, target, grids, calibration_images, pools_on_grid=False):
    """Write the int8 QDQ version of `source` whose activations take the given `grids`
    ({tensor name: rk.quantize.Grid}, a QAT model's learned ones) instead of calibrated ones,
    zero point 0 everywhere: uint8 where a grid is unsigned (a ReLU's output: onnxruntime and
    OpenVINO fold the ReLU into the int8 conv, as for the post-training file), int8 where it is
    symmetric (the form TensorRT's explicit quantization takes); per-channel symmetric int8
    weights, step max|w| / 127. A Relu's input (the conv output) and a Pad's or a Transpose's
    output (an NHWC file's input, in NCHW) share the grid of the tensor they come from, so each
    conv + ReLU rounds once, as the QAT model does; `pools_on_grid`: a global pool's output is
    rounded to its input's grid too. `calibration_images` only feed the quantizer's pass over
    the other tensors."""
    import onnx
    from onnxruntime import quantization as q

    graph = onnx.load(source, load_external_data=False).graph
    grids, pool_grids = dict(grids), {}
    for node in graph.node:  # topological order: a Pad after a Relu sees the Relu's grid
        if node.op_type == "Relu" and node.output[0] in grids:
            grids[node.input[0]] = grids[node.output[0]]
        elif node.op_type in ("Pad", "Transpose") and node.input[0] in grids:
            grids[node.output[0]] = grids[node.input[0]]
        elif pools_on_grid and node.op_type in POOLS and node.input[0] in grids:
            pool_grids[node.output[0]] = grids[node.input[0]]
    overrides = {
        name: [
            {
                "scale": np.array(grid.step, np.float32),
                "zero_point": np.array(0, _code_type(grid)),
                "quant_type": q.QuantType.QUInt8 if grid.unsigned else q.QuantType.QInt8,
            }
        ]
        for name, grid in grids.items()
    }
    (graph_input,) = graph.input
    _write_qdq(
        source,
        target,
        _Images(graph_input.name, calibration_images),
        activation_type=q.QuantType.QInt8,
        op_types_to_quantize=QUANTIZED_OPS,
        extra_options={
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "TensorQuantOverrides": overrides,
        },
    )
    if pool_grids:
        _round_to_grid(target, pool_grids)
    return target


def _code_type(grid):
    return np.uint8 if grid.unsigned else np.int8


def _round_to_grid(path, grids):
    """Put a QuantizeLinear/DequantizeLinear pair (zero point 0) on each tensor of `grids`
    ({tensor name: rk.quantize.Grid}) in the ONNX file at `path`, rewritten in place."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(path)
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        for index, name in enumerate(node.output):
            if name not in grids:
                continue
            unrounded, codes = f"{name}_unrounded", f"{name}_codes"
            node.output[index] = unrounded
            scale, zero = f"{name}_grid_scale", f"{name}_grid_zero_point"
            model.graph.initializer.extend(
                [
                    numpy_helper.from_array(np.array(grids[name].step, np.float32), scale),
                    numpy_helper.from_array(np.array(0, _code_type(grids[name])), zero),
                ]
            )
            nodes.append(helper.make_node("QuantizeLinear", [unrounded, scale, zero], [codes]))
            nodes.append(helper.make_node("DequantizeLinear", [codes, scale, zero], [name]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, path)
