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

import contextlib
import gc
import os
import sys

import numpy as np
from absl import app, flags

from export import common, verify

FLAGS = flags.FLAGS
OPSETS = range(14, 19)  # what tf2onnx 1.16+ converts to (its README); onnxruntime runs all of them


def check_opset(opset):
    if opset not in OPSETS:
        raise ValueError(
            f"--opset {opset} is not supported: choose {OPSETS.start}..{OPSETS.stop - 1} "
            "(the opsets tf2onnx converts to; default 17)."
        )


@contextlib.contextmanager
def _grouped_convs_without_xla():
    """Trace grouped Conv2D as a plain TF Conv2D op.

    Keras's TF backend wraps grouped convolutions in an XLA-compiled function (TF's CPU
    kernel lacks them), which tf2onnx cannot convert. The plain op converts to an ONNX
    Conv with `group`. Only used while tracing for tf2onnx.
    """
    import tensorflow as tf
    from keras.src.backend.tensorflow import nn as tf_nn

    original = tf_nn.conv

    def conv(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
        if data_format not in (None, "channels_last"):
            return original(inputs, kernel, strides, padding, data_format, dilation_rate)
        return tf.nn.convolution(inputs, kernel, strides, padding.upper(), dilations=dilation_rate)

    tf_nn.conv = conv
    try:
        yield
    finally:
        tf_nn.conv = original


def convert(model, opset=17, nchw=False):
    """An onnx.ModelProto of `model`: input `images` (NHWC, or NCHW with nchw), output `logits`
    (and `classes`, the per-pixel argmax, for a segmentation model)."""
    import onnx
    import tensorflow as tf
    import tf2onnx

    segmentation = common.is_segmentation(model)
    spec = (tf.TensorSpec((None,) + tuple(model.input_shape[1:]), tf.float32, name="images"),)

    def outputs(images):
        logits = model(images, training=False)
        if segmentation:
            return {"logits": logits, "classes": tf.argmax(logits, axis=-1, output_type=tf.int32)}
        return {"logits": logits}

    function = tf.function(outputs, input_signature=spec)
    with _grouped_convs_without_xla():
        proto, _ = tf2onnx.convert.from_function(
            function, input_signature=spec, opset=opset, inputs_as_nchw=["images"] if nchw else None
        )
    # tf2onnx leaves reference cycles that hold its copies of the graph: RepVGG-B1g4 at 224
    # kept 6.2 GB resident after the conversion until a collection (7.3 -> 1.1 GB, measured).
    gc.collect()
    onnx.checker.check_model(proto)
    return proto


def run(path, inputs):
    from export import runners

    return runners.onnxruntime(path)(inputs)


def export_onnx(
    model, output, *, opset=17, nchw=True, verify_inputs, reference=None, overwrite=False
):
    reference = reference or model
    check_opset(opset)
    with common.atomic_output(output, overwrite=overwrite) as staged:
        proto = convert(model, opset, nchw)
        with open(staged, "wb") as f:
            f.write(proto.SerializeToString())
        expected = np.asarray(reference(verify_inputs, training=False))
        feed = np.transpose(verify_inputs, (0, 3, 1, 2)) if nchw else verify_inputs
        artifact = f"ONNX {os.path.basename(output)}" + (" (NCHW)" if nchw else "")
        classes = None
        if common.is_segmentation(model):
            from export import runners

            logits, classes = runners.onnxruntime(staged, output=("logits", "classes"))(feed)
        else:
            logits = run(staged, feed)
        size = os.path.getsize(staged) / 2**20
        report = verify.compare(artifact, "fp32", logits, expected, size)
        verify.check(report)
        if classes is not None:
            verify.check_classes(artifact, classes, logits)
    return report


def main(argv):
    del argv

    def export(shipped, reference, to_input, pixels):
        return export_onnx(
            shipped,
            FLAGS.output,
            opset=FLAGS.opset,
            nchw=FLAGS.nchw,
            verify_inputs=to_input(pixels),
            reference=reference,
            overwrite=FLAGS.overwrite,
        )

    return common.run_exporter(export, FLAGS.output, checks=[lambda: check_opset(FLAGS.opset)])


if __name__ == "__main__":
    common.define_model_flags()
    flags.DEFINE_string("output", None, "Path of the .onnx file to write.")
    flags.DEFINE_integer("opset", 17, "ONNX opset.")
    flags.DEFINE_bool(
        "nchw",
        True,
        "NCHW input (channels first; faster in onnxruntime/OpenVINO). "
        "--nonchw: NHWC, as the Keras model takes.",
    )
    flags.mark_flag_as_required("output")
    app.run(lambda argv: sys.exit(main(argv)))
