"""Open exported models for repeated inference, with one set of runtime settings.

The exporters' checks, `export.fast_predictor` and `python -m bench` all build their
onnxruntime sessions, OpenVINO requests and TFLite interpreters here, so the benchmark
measures exactly what users get. Each opener returns a function from a float32 batch (in
the file's own layout) to float32 logits; the file is opened once, not per call. Nothing
here converts a model or writes a file: that is the exporters' job (`export.onnx.onnx_file`).

`output` names the output to return ("logits" by default; a segmentation file also has
"classes"), or a tuple of names for a tuple of arrays. A file without an output of that
name (one exported under another name) returns its first output for "logits".
"""

import numpy as np

from export.openvino_runtime import compile_model


def _checked(x, expected, runtime):
    """`x` as float32 if its shape fits `expected` (None: any size), else a ValueError naming both.

    The runtimes answer a wrong shape with their internal errors (XNNPACK "failed to
    prepare") or not at all: a TFLite interpreter resizes to whatever it is given, so one
    image without its batch axis came back as rows of logits.
    """
    x = np.asarray(x, np.float32)
    if expected is None:  # a file that does not say
        return x
    fits = x.ndim == len(expected) and all(
        size is None or size == got for size, got in zip(expected, x.shape)
    )
    if fits and x.ndim and x.shape[0] > 0:
        return x
    wanted = ", ".join(
        "N" if axis == 0 and size is None else "?" if size is None else str(size)
        for axis, size in enumerate(expected)
    )
    problem = "an empty batch" if fits else "the wrong shape"
    raise ValueError(
        f"{runtime} model expects input of shape [{wanted}] (N >= 1 images), "
        f"received {problem}: {list(x.shape)}."
    )


def _pick(names, output):
    """Positions in `names` of the output(s) asked for (see the module docstring)."""
    wanted = (output,) if isinstance(output, str) else tuple(output)
    missing = [name for name in wanted if name not in names and name != "logits"]
    if missing:
        raise ValueError(f"The model has no output {missing[0]!r}; its outputs: {list(names)}.")
    return [names.index(name) if name in names else 0 for name in wanted]


def _returning(output, run):
    """`run` (a batch -> list of arrays) returning one array, or a tuple for a tuple `output`."""
    if isinstance(output, str):
        return lambda x: run(x)[0]
    return lambda x: tuple(run(x))


def onnxruntime(path, threads=None, output="logits"):
    """onnxruntime CPU session: all graph optimisations, `threads` intra-op (None: all cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1  # one model, one stream of batches
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    model_input = session.get_inputs()[0]
    names = [o.name for o in session.get_outputs()]
    output_names = [names[i] for i in _pick(names, output)]
    # Dynamic axes are None or a name ("N", "unk__12"); fixed ones are ints.
    expected = [size if isinstance(size, int) and size > 0 else None for size in model_input.shape]
    return _returning(
        output,
        lambda x: session.run(output_names, {model_input.name: _checked(x, expected, "ONNX")}),
    )


def openvino(path, precision="fp32", threads=None):
    """OpenVINO CPU request (LATENCY hint) for an ONNX or IR file at `precision`."""
    compiled = compile_model(path, precision, threads)
    shape = compiled.input(0).get_partial_shape()
    expected = (
        None if shape.rank.is_dynamic else [d.get_length() if d.is_static else None for d in shape]
    )
    request = compiled.create_infer_request()
    run = lambda x: request.infer({0: np.ascontiguousarray(_checked(x, expected, "OpenVINO"))})
    return lambda x: np.array(run(x)[0])


def _tflite_output_names(interpreter):
    """Output names by tensor index, from the file's signature (a converted SavedModel's)."""
    names = {}
    for key in interpreter.get_signature_list():
        for name, detail in interpreter.get_signature_runner(key).get_output_details().items():
            names.setdefault(detail["index"], name)
    return names


def tflite(path_or_bytes, threads=None, output="logits"):
    """ai_edge_litert interpreter (XNNPACK by default); resized when the batch shape changes."""
    from ai_edge_litert.interpreter import Interpreter

    if isinstance(path_or_bytes, (bytes, bytearray)):
        interpreter = Interpreter(model_content=bytes(path_or_bytes), num_threads=threads)
    else:
        interpreter = Interpreter(model_path=path_or_bytes, num_threads=threads)
    (input_detail,) = interpreter.get_input_details()
    indices = [detail["index"] for detail in interpreter.get_output_details()]
    named = _tflite_output_names(interpreter)
    names = [named.get(index, str(index)) for index in indices]
    output_indices = [indices[i] for i in _pick(names, output)]
    allocated = [None]
    signature = input_detail.get("shape_signature")
    signature = input_detail["shape"] if signature is None or len(signature) == 0 else signature
    # -1: dynamic; the batch axis is resized below whatever the file says.
    expected = [None if axis == 0 or size < 0 else int(size) for axis, size in enumerate(signature)]

    def run(x):
        x = _checked(x, expected, "TFLite")
        if allocated[0] != x.shape:
            interpreter.resize_tensor_input(input_detail["index"], x.shape)
            interpreter.allocate_tensors()
            allocated[0] = x.shape
        interpreter.set_tensor(input_detail["index"], x)
        interpreter.invoke()
        return [interpreter.get_tensor(index) for index in output_indices]

    return _returning(output, run)
