"""A quantization-aware model's learned grids in Neural Compressor's int8 graph.

Neural Compressor calibrates a float graph: it sets the range of every int8 tensor from the
calibration images. A QAT model (rk.quantize_aware) has learned its grids (`rk.quantize.Grid`:
a step, codes 0..255 or -127..127); `apply` puts them in place of the calibrated ranges, so that
the graph rounds where the QAT model rounds:

- the QuantizeV2 that enters int8: qint8 on [-127, 127] (narrow range) times the step, as the
  QAT model's input quantizer;
- each QuantizedConv2DWithBiasAndReluAndRequantize: TensorFlow's fused conv + ReLU writes quint8,
  codes 0..255, so its output range becomes [0, 255 x step]: the QAT model's own grid where its
  ReLU outputs are unsigned (the default). A symmetric grid clips at 127 steps, which quint8
  cannot: there the graph saturates at twice the learned range; verification judges the whole;
- the global average pool, where the QAT model rounds it to the last activation's grid
  (`rk.quantize.pools_on_grid`): a QuantizeV2/Dequantize pair on that grid after it.

The weights (on the int8 grid already) and the biases (on the int32 grid, `snap_biases`) are the
QAT model's: Neural Compressor's per-channel weight steps, max|w| / 127, are its steps.
"""

import re

import numpy as np

QINT8_CODES = 127  # narrow range: -127..127
QUINT8_CODES = 255
REQUANTIZING_CONV = "QuantizedConv2DWithBiasAndReluAndRequantize"
# QuantizedConv2DWithBiasAndReluAndRequantize's inputs 7 and 8: its requested output range.
MIN_OUTPUT, MAX_OUTPUT = 7, 8


def _layer_in(node_name, layer_names):
    """The one name of `layer_names` that `node_name` (a node of the int8 graph) belongs to."""
    found = [
        name for name in layer_names if re.search(rf"(^|/){re.escape(name)}(_\d+)?/", node_name)
    ]
    if len(found) != 1:
        raise ValueError(
            f"the int8 graph's node {node_name!r} maps to {len(found)} quantized layers of the "
            "quantization-aware model: this layout is not one the SavedModel int8 export can "
            "map; use export.onnx or export.tflite."
        )
    return found[0]


def apply(graph_def, input_grids, output_grids, pooled_grid=None):
    """`graph_def` (Neural Compressor's int8 GraphDef, changed in place and returned) with the
    learned grids: `input_grids` {conv layer name: Grid of its input}, `output_grids` {conv layer
    name: Grid after its ReLU}, `pooled_grid` (the last activation's, where the QAT model rounds
    its global pool; None: it does not), as `rk.quantize.conv_grids` and `pooled_grid` give."""
    import tensorflow as tf

    def constant(name, value):  # on the host, as Neural Compressor's ranges
        node = graph_def.node.add()
        node.op, node.name = "HostConst", name
        node.attr["dtype"].type = tf.float32.as_datatype_enum
        node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(np.float32(value)))
        return name

    changed = 0
    for node in list(graph_def.node):
        if node.op == "QuantizeV2":
            step = input_grids[_layer_in(node.name, input_grids)].step
            if node.attr["T"].type == tf.qint8.as_datatype_enum:
                low, high = -step * QINT8_CODES, step * QINT8_CODES
                node.attr["narrow_range"].b = True  # codes -127..127, as in QAT
            else:
                low, high = 0.0, step * QUINT8_CODES
            node.input[1] = constant(f"{node.name}/learned_min", low)
            node.input[2] = constant(f"{node.name}/learned_max", high)
            changed += 1
        elif node.op == REQUANTIZING_CONV:
            step = output_grids[_layer_in(node.name, output_grids)].step
            node.input[MIN_OUTPUT] = constant(f"{node.name}/learned_min", 0.0)
            node.input[MAX_OUTPUT] = constant(f"{node.name}/learned_max", step * QUINT8_CODES)
            changed += 1
    if not changed:
        raise ValueError("the int8 graph holds no quantized convolution to give the ranges to.")
    if pooled_grid is not None:
        _round_pools(graph_def, pooled_grid.step, constant)
    _drop_unread_constants(graph_def)
    return graph_def


def _drop_unread_constants(graph_def):
    """Remove the constants no node reads any more (the calibrated ranges)."""
    read = {name.lstrip("^").split(":")[0] for node in graph_def.node for name in node.input}
    kept = [n for n in graph_def.node if n.op not in ("Const", "HostConst") or n.name in read]
    del graph_def.node[:]
    graph_def.node.extend(kept)


def _round_pools(graph_def, step, constant):
    """A QuantizeV2 (quint8 on `step`) and a Dequantize after each Mean that reads a
    Dequantize (the global average pool of int8 features); its readers read the rounded mean."""
    import tensorflow as tf

    producers = {node.name: node for node in graph_def.node}
    pools = [
        node
        for node in graph_def.node
        if node.op == "Mean" and producers[node.input[0].split(":")[0]].op == "Dequantize"
    ]
    for pool in pools:
        rounded = f"{pool.name}/on_grid"
        for reader in graph_def.node:
            for index, name in enumerate(reader.input):
                if name in (pool.name, f"{pool.name}:0"):
                    reader.input[index] = rounded
        low = constant(f"{pool.name}/grid_min", 0.0)
        high = constant(f"{pool.name}/grid_max", step * QUINT8_CODES)
        quantize = graph_def.node.add()
        quantize.op, quantize.name = "QuantizeV2", f"{pool.name}/to_grid"
        quantize.input.extend([pool.name, low, high])
        quantize.attr["T"].type = tf.quint8.as_datatype_enum
        quantize.attr["mode"].s = b"SCALED"
        quantize.attr["round_mode"].s = b"HALF_TO_EVEN"
        dequantize = graph_def.node.add()
        dequantize.op, dequantize.name = "Dequantize", rounded
        dequantize.input.extend([f"{quantize.name}:0", f"{quantize.name}:1", f"{quantize.name}:2"])
        dequantize.attr["T"].type = tf.quint8.as_datatype_enum
        dequantize.attr["mode"].s = b"SCALED"
