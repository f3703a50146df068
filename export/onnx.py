"""Export an ONNX file through tf2onnx (opset 17, dynamic batch), checked and verified.

    python -m export.onnx --model RepVGG_A0 --weights a0.keras --output a0.onnx [--nonchw]

The graph passes `onnx.checker` and runs in onnxruntime on the verification images,
compared with the Keras model. Grouped convolutions export as ONNX Conv with `group`.
Input layout: NCHW by default (onnxruntime's native layout, the faster one in
`python -m bench`); --nonchw keeps Keras's NHWC.

A segmentation model (--task segmentation, a PSPNet) gets outputs `logits`
[N, H, W, classes] float32 and `classes` [N, H, W] int32 (the per-pixel argmax); the
outputs stay channels-last whatever the input layout.
"""

import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from absl import flags

import repvgg_keras as rk
from export import atomic, cli, gptq, loading, onnx_int8, precisions, runners, tracing

FLAGS = flags.FLAGS
OPSETS = range(14, 19)  # what tf2onnx 1.16+ converts to (its README); onnxruntime runs all of them


def check_opset(opset):
    if opset not in OPSETS:
        raise ValueError(
            f"--opset {opset} is not supported: choose {OPSETS.start}..{OPSETS.stop - 1} "
            "(the opsets tf2onnx converts to; default 17)."
        )


def convert(model, opset=17, nchw=False):
    """An onnx.ModelProto of `model`: input `images` (NHWC, or NCHW with nchw), output `logits`
    (and `classes`, the per-pixel argmax, for a segmentation model)."""
    import onnx
    import tensorflow as tf
    import tf2onnx

    segmentation = loading.is_segmentation(model)
    spec = (tf.TensorSpec((None,) + tuple(model.input_shape[1:]), tf.float32, name="images"),)

    def outputs(images):
        logits = model(images, training=False)
        if segmentation:
            return {"logits": logits, "classes": tf.argmax(logits, axis=-1, output_type=tf.int32)}
        return {"logits": logits}

    function = tf.function(outputs, input_signature=spec)
    with tracing.plain_grouped_convs():
        proto, _ = tf2onnx.convert.from_function(
            function, input_signature=spec, opset=opset, inputs_as_nchw=["images"] if nchw else None
        )
    # tf2onnx leaves reference cycles that hold its copies of the graph: RepVGG-B1g4 at 224
    # kept 6.2 GB resident after the conversion until a collection (7.3 -> 1.1 GB, measured).
    gc.collect()
    onnx.checker.check_model(proto)
    return proto


def run(path, inputs):
    return runners.onnxruntime(path)(inputs)


QUANTIZATIONS = ("none", "int8")


def export_onnx(
    model,
    output,
    *,
    opset=17,
    nchw=True,
    quantize="none",
    calibration=None,
    verify_inputs,
    reference=None,
    overwrite=False,
    tolerance=None,
    min_agreement=None,
):
    """Convert `model` (int8: the QDQ file, calibrated on `calibration`, or a QAT model's own
    ranges), verify it in onnxruntime against `reference` (default `model`), then move it into
    `output`."""
    check_opset(opset)
    if quantize not in QUANTIZATIONS:
        raise ValueError(
            f"Unknown --quantize {quantize!r}: choose one of {', '.join(QUANTIZATIONS)}."
        )
    if quantize == "int8" and loading.is_segmentation(model):
        raise ValueError("--quantize int8 is for classifiers; export segmentation models in float.")
    artifact = f"ONNX {os.path.basename(output)}" + (" (NCHW)" if nchw else "")

    def write(staged):
        if quantize == "int8":
            with tempfile.TemporaryDirectory() as tmp:
                path = onnx_file(model, tmp, nchw=nchw, int8=True, calibration=calibration)
                shutil.copyfile(path, staged)
            return
        proto = convert(model, opset, nchw)
        with open(staged, "wb") as f:
            f.write(proto.SerializeToString())

    feed = np.transpose(verify_inputs, (0, 3, 1, 2)) if nchw else verify_inputs
    return atomic.verified_export(
        output,
        write,
        atomic.file_checks(artifact, runners.onnxruntime, feed, loading.is_segmentation(model)),
        reference or model,
        verify_inputs,
        precision=precisions.of_quantize(quantize),
        overwrite=overwrite,
        tolerance=tolerance,
        min_agreement=min_agreement,
    )


def onnx_file(deploy, workdir, *, nchw=True, int8=False, calibration=None):
    """`deploy` as ONNX in `workdir` (written once; int8: its GPTQ-rounded kernels (export/gptq.py),
    QDQ calibrated on `calibration`, normalised NHWC images). Returns the path."""
    layout = "nchw" if nchw else "nhwc"
    if not int8:
        return _written(deploy, os.path.join(workdir, f"model_{layout}.onnx"), nchw)
    if calibration is None:
        raise ValueError("int8 needs calibration images (normalised, NHWC).")
    if rk.is_quantize_aware(deploy):
        return _quantize_aware_file(deploy, workdir, calibration, nchw=nchw)
    quantized = os.path.join(workdir, f"model_{layout}_int8.onnx")
    if not os.path.exists(quantized):
        source = rounded_onnx_file(deploy, workdir, calibration, nchw=nchw)
        feed = np.transpose(calibration, (0, 3, 1, 2)) if nchw else calibration
        onnx_int8.quantize(source, quantized, feed)
    return quantized


def _quantize_aware_file(qat, workdir, calibration, *, nchw=True):
    """The QDQ file of a QAT model (rk.quantize_aware, scope "convolutions"): its float form
    (weights on the int8 grid) converted, then quantized with the learned activation ranges."""
    import onnx

    if rk.quantize_scope(qat) != "convolutions":
        raise ValueError(
            "ONNX QDQ quantizes the convolutions and keeps the classifier float: it takes a "
            "quantization-aware model made with scope 'convolutions' (python -m train --qat); "
            "an every_op one exports with export.tflite --quantize int8_full."
        )
    layout = "nchw" if nchw else "nhwc"
    qat = rk.quantize.snap_biases(qat)
    source = _written(rk.to_deploy(qat), os.path.join(workdir, f"model_{layout}_qat.onnx"), nchw)
    graph = onnx.load(source, load_external_data=False).graph
    grids = qat_tensor_grids(qat, graph)
    quantized = os.path.join(workdir, f"model_{layout}_qat_int8.onnx")
    feed = np.transpose(calibration, (0, 3, 1, 2)) if nchw else calibration
    return onnx_int8.quantize_with_grids(
        source, quantized, grids, feed, pools_on_grid=rk.quantize.pools_on_grid(qat)
    )


def qat_tensor_grids(qat, graph):
    """{ONNX tensor name: rk.quantize.Grid} for each activation quantizer of `qat`: the graph
    input and each ReLU's output (tf2onnx names a ReLU's node after its Keras layer)."""
    (graph_input,) = graph.input
    grids = {}
    relus = [node.output[0] for node in graph.node if node.op_type == "Relu"]
    for name, grid in rk.quantize.activation_grids(qat).items():
        source = name[: -len("_quant")]
        if source == qat.inputs[0].name:
            tensors = [graph_input.name]
        else:
            # A deploy-form ReLU layer is the quantizer's source; a training-form block's ReLU
            # becomes `<block>_relu` in the converted float form.
            names = f"({re.escape(source)}|{re.escape(source)}_relu)"
            pattern = re.compile(rf"(^|/){names}(_\d+)?/Relu")
            tensors = [t for t in relus if pattern.search(t)]
        if len(tensors) != 1:
            raise ValueError(
                f"the ONNX graph has {len(tensors)} tensors for the quantizer {name!r}: this "
                "model's layout is not one the QDQ export can map; use export.tflite."
            )
        grids[tensors[0]] = grid
    return grids


def rounded_onnx_file(deploy, workdir, calibration, *, nchw=True):
    """The float ONNX file of `deploy` with its kernels GPTQ-rounded on `calibration` (what the
    int8 QDQ quantizer reads), in `workdir`, written once. Returns the path."""
    path = os.path.join(workdir, f"model_{'nchw' if nchw else 'nhwc'}_gptq.onnx")
    if os.path.exists(path):
        return path
    return _written(gptq.round_kernels(deploy, calibration), path, nchw)


def _written(model, path, nchw):
    """`path`, holding `model` as ONNX (converted unless it already exists). Written staged
    (`atomic.atomic_output`): a process killed while converting leaves no half-written file
    that a later call would take for the conversion."""
    if os.path.exists(path):
        return path
    with atomic.atomic_output(path, overwrite=True) as staged:
        if not _convert_in_child(model, staged, nchw):
            with open(staged, "wb") as f:
                f.write(convert(model, nchw=nchw).SerializeToString())
    return path


_CHILD = """
import sys
import keras
from export import onnx as onnx_export
model = keras.saving.load_model(sys.argv[1])
with open(sys.argv[2], "wb") as f:
    f.write(onnx_export.convert(model, nchw=sys.argv[3] == "nchw").SerializeToString())
"""


def _convert_in_child(deploy, path, nchw):
    """Write the ONNX file `path` from a child process; False (and no file) if that could not
    be done.

    tf2onnx holds several GB while it converts (about 6 GB for RepVGG-B1g4 at 224), which a
    long-lived process (a server's fast_predictor, the benchmark) would keep as its peak; a
    child gives it back when it exits. A model the child cannot reload (custom layers that
    are not registered) is converted in this process instead.
    """
    source = path + ".source.keras"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    )
    try:
        deploy.save(source)
        result = subprocess.run(
            [sys.executable, "-c", _CHILD, source, path, "nchw" if nchw else "nhwc"],
            env=env,
            capture_output=True,
            text=True,
        )
    except Exception:  # saving failed; convert here
        return False
    finally:
        if os.path.exists(source):
            os.remove(source)
    if result.returncode != 0:
        if os.path.exists(path):
            os.remove(path)
        return False
    return True


def main(argv):
    del argv
    export = cli.exporter(export_onnx, opset=FLAGS.opset, nchw=FLAGS.nchw)
    checks = [lambda: check_opset(FLAGS.opset), cli.check_calibration_flags]
    return cli.run_exporter(export, FLAGS.output, checks=checks, runtime="onnxruntime")


if __name__ == "__main__":
    cli.define_model_flags()
    flags.DEFINE_string("output", None, "Path of the .onnx file to write.")
    flags.DEFINE_integer("opset", 17, "ONNX opset.")
    flags.DEFINE_bool(
        "nchw",
        True,
        "NCHW input (channels first; faster in onnxruntime/OpenVINO). "
        "--nonchw: NHWC, as the Keras model takes.",
    )
    flags.DEFINE_enum(
        "quantize",
        "none",
        QUANTIZATIONS,
        "int8: a QDQ file (per-channel weights; activations calibrated, or a QAT model's own "
        "symmetric ranges, the form TensorRT takes).",
    )
    cli.define_calibration_flags()
    flags.mark_flag_as_required("output")
    cli.start(main)
