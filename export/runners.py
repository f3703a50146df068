"""Open exported models for repeated inference, with one set of runtime settings.

The exporters' checks, `export.fast_predictor` and `python -m bench` all build their
onnxruntime sessions, OpenVINO requests and TFLite interpreters here, so the benchmark
measures exactly what users get. Each opener returns a function from a float32 batch (in
the file's own layout) to float32 logits; the file is opened once, not per call.
"""

import os

import numpy as np


def onnxruntime(path, threads=None):
    """onnxruntime CPU session: all graph optimisations, `threads` intra-op (None: all cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1  # one model, one stream of batches
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name
    return lambda x: session.run([output_name], {input_name: np.asarray(x, np.float32)})[0]


def openvino(path, precision="fp32", threads=None):
    """OpenVINO CPU request (LATENCY hint) for an ONNX or IR file at `precision`."""
    from export.openvino_runtime import compile_model

    request = compile_model(path, precision, threads).create_infer_request()
    return lambda x: np.array(request.infer({0: np.ascontiguousarray(x, np.float32)})[0])


def tflite(path_or_bytes, threads=None):
    """ai_edge_litert interpreter (XNNPACK by default); resized when the batch shape changes."""
    from ai_edge_litert.interpreter import Interpreter

    if isinstance(path_or_bytes, (bytes, bytearray)):
        interpreter = Interpreter(model_content=bytes(path_or_bytes), num_threads=threads)
    else:
        interpreter = Interpreter(model_path=path_or_bytes, num_threads=threads)
    (input_detail,) = interpreter.get_input_details()
    output_index = interpreter.get_output_details()[0]["index"]
    allocated = [None]

    def run(x):
        x = np.asarray(x, np.float32)
        if allocated[0] != x.shape:
            interpreter.resize_tensor_input(input_detail["index"], x.shape)
            interpreter.allocate_tensors()
            allocated[0] = x.shape
        interpreter.set_tensor(input_detail["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(output_index)

    return run


def onnx_file(deploy, workdir, *, nchw=True, int8=False, calibration=None):
    """`deploy` as ONNX in `workdir` (written once; int8: QDQ calibrated on `calibration`,
    normalised NHWC images). Returns the path."""
    from export import onnx as onnx_export

    layout = "nchw" if nchw else "nhwc"
    path = os.path.join(workdir, f"model_{layout}.onnx")
    if not os.path.exists(path) and not _convert_in_child(deploy, path, nchw):
        with open(path, "wb") as f:
            f.write(onnx_export.convert(deploy, nchw=nchw).SerializeToString())
    if not int8:
        return path
    if calibration is None:
        raise ValueError("int8 needs calibration images (normalised, NHWC).")
    quantized = os.path.join(workdir, f"model_{layout}_int8.onnx")
    if not os.path.exists(quantized):
        from export.onnx_int8 import quantize

        feed = np.transpose(calibration, (0, 3, 1, 2)) if nchw else calibration
        quantize(path, quantized, feed)
    return quantized


_CHILD = """
import sys
import keras
from export import onnx as onnx_export
model = keras.saving.load_model(sys.argv[1])
with open(sys.argv[2], "wb") as f:
    f.write(onnx_export.convert(model, nchw=sys.argv[3] == "nchw").SerializeToString())
"""


def _convert_in_child(deploy, path, nchw):
    """Write the ONNX file from a child process; False if that could not be done.

    tf2onnx holds several GB while it converts (about 6 GB for RepVGG-B1g4 at 224), which a
    long-lived process (a server's fast_predictor, the benchmark) would keep as its peak; a
    child gives it back when it exits. A model the child cannot reload (custom layers that
    are not registered) is converted in this process instead.
    """
    import subprocess
    import sys

    source = path + ".source.keras"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    try:
        deploy.save(source)
        result = subprocess.run([sys.executable, "-c", _CHILD, source, path + ".partial", "nchw" if nchw else "nhwc"],
                                env=env, capture_output=True, text=True)
    except Exception:  # noqa: BLE001: saving failed; convert here
        return False
    finally:
        if os.path.exists(source):
            os.remove(source)
    if result.returncode != 0:
        if os.path.exists(path + ".partial"):
            os.remove(path + ".partial")
        return False
    os.replace(path + ".partial", path)
    return True
