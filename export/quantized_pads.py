"""Zero padding of an int8 graph moved into the quantized convolutions that read it.

A stride-2 RepVGG block pads its input explicitly (ZeroPadding2D, then a VALID convolution: the
authors' padding, which TensorFlow's SAME does not give). Neural Compressor quantizes the
convolution but, on stock TensorFlow, leaves the Pad in float, so every stride-2 block runs
Dequantize -> Pad -> QuantizeV2 between two int8 convolutions. TensorFlow's quantized convolution
pads by itself (its `padding_list` attribute, which Neural Compressor sets on Intel's own
TensorFlow builds); `absorb_pads` hands the padding to it and drops the float round trip. Zero
stays zero in the SCALED int8 encoding these graphs use, so the output is the same.
"""

from export import compat

QUANTIZED_CONVS = (
    "QuantizedConv2DWithBiasAndReluAndRequantize",
    "QuantizedConv2DWithBiasAndRequantize",
)
# The convolution's inputs: 0 the tensor, 3 and 4 its range (min, max).
TENSOR, MIN_INPUT, MAX_INPUT = 0, 3, 4


def _name(tensor):
    return tensor.lstrip("^").split(":")[0]


def _tensor(tensor):
    """(node name, output index) of a GraphDef input string."""
    return _name(tensor), int(tensor.split(":")[1]) if ":" in tensor else 0


def _outputs(node_name, count=3):
    """(node name, index) of a quantized op's tensor and its range (min, max)."""
    return [(node_name, index) for index in range(count)]


def _uniform_spatial_pad(const):
    """The pad of a NHWC Pad's paddings constant when it is the same on every side of H and W and
    zero on N and C; None otherwise."""
    import tensorflow as tf

    if const is None or const.op != "Const":
        return None
    paddings = tf.make_ndarray(const.attr["value"].tensor)
    if paddings.shape != (4, 2) or paddings[0].any() or paddings[3].any():
        return None
    pad = int(paddings[1, 0])
    return pad if pad > 0 and (paddings[1:3] == pad).all() else None


def absorb_pads(graph_def):
    """A copy of an int8 `graph_def` in which each `[Dequantize ->] Pad -> QuantizeV2` feeding only
    VALID quantized convolutions is replaced by those convolutions' own padding."""
    graph = compat.copy_graph_def(graph_def)
    nodes = {node.name: node for node in graph.node}
    readers = {}
    for node in graph.node:
        for tensor in node.input:
            readers.setdefault(_name(tensor), []).append(node)

    removed = set()
    for pad_node in [node for node in graph.node if node.op == "Pad"]:
        const = nodes.get(_name(pad_node.input[1]))
        pad = _uniform_spatial_pad(const)
        quantize = readers.get(pad_node.name, [])
        if pad is None or len(quantize) != 1 or quantize[0].op != "QuantizeV2":
            continue
        quantize = quantize[0]
        if quantize.attr["mode"].s != b"SCALED":  # zero is not zero in the other encodings
            continue
        convs = list({id(n): n for n in readers.get(quantize.name, [])}.values())
        if not convs or not all(_reads_whole(conv, quantize.name) for conv in convs):
            continue
        producer = _quantized_producer(nodes, readers, pad_node, quantize)
        if producer is None:  # a float input: quantize it unpadded
            quantize.input[0] = pad_node.input[0]
            removed.add(pad_node.name)
        else:  # an int8 convolution's output: read it as it is
            dequantize, conv_before = producer
            for conv in convs:
                conv.input[TENSOR] = conv_before.name
                conv.input[MIN_INPUT] = f"{conv_before.name}:1"
                conv.input[MAX_INPUT] = f"{conv_before.name}:2"
            removed |= {dequantize.name, pad_node.name, quantize.name}
        for conv in convs:
            conv.attr["padding_list"].list.i.extend([0, 0, pad, pad, pad, pad, 0, 0])
        if len(readers.get(const.name, [])) == 1:
            removed.add(const.name)
    kept = [node for node in graph.node if node.name not in removed]
    del graph.node[:]
    graph.node.extend(kept)
    return graph


def _reads_whole(conv, quantize_name):
    """Whether `conv` is a VALID quantized convolution taking the tensor and range of `quantize`."""
    return (
        conv.op in QUANTIZED_CONVS
        and conv.attr["padding"].s == b"VALID"
        and not conv.attr["padding_list"].list.i
        and [_tensor(conv.input[i]) for i in (TENSOR, MIN_INPUT, MAX_INPUT)]
        == _outputs(quantize_name)
    )


def _quantized_producer(nodes, readers, pad_node, quantize):
    """(Dequantize, quantized convolution) when the Pad reads only that convolution's int8 output,
    in the encoding `quantize` would give; None otherwise."""
    dequantize = nodes.get(_name(pad_node.input[0]))
    if dequantize is None or dequantize.op != "Dequantize":
        return None
    conv = nodes.get(_name(dequantize.input[0]))
    if conv is None or conv.op not in QUANTIZED_CONVS:
        return None
    if [_tensor(t) for t in dequantize.input[:3]] != _outputs(conv.name):
        return None
    if len(readers.get(dequantize.name, [])) != 1 or len(readers.get(pad_node.name, [])) != 1:
        return None
    if quantize.attr["T"].type != conv.attr["out_type"].type:
        return None
    if dequantize.attr["mode"].s != b"SCALED":
        return None
    return dequantize, conv
