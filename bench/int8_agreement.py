"""How well each int8 path keeps a trained model's top-1: agreement with fp32 and accuracy.

    python -m bench.int8_agreement --model_file runs/fm_a0/model_deploy.keras [--count 2000] [--calibration 64]
        [--qat_file runs/fm_a0_qat/model_qat.keras]

Fashion-MNIST only (the labels come with it): checks on the first --count test images,
calibrates on the first --calibration training images. Accuracy, not speed: safe to run
beside other work.
"""

import os
import sys
import tempfile

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "model_file", None, "A trained .keras model (training or deploy form) with 10 classes."
)
flags.DEFINE_integer("count", 2000, "Test images to check on.")
flags.DEFINE_integer("calibration", 64, "Training images to calibrate on.")
flags.DEFINE_float(
    "confident_margin",
    1.0,
    "fp32 top-2 logit margin above which a prediction counts as "
    "confident (the last column: agreement on those images only).",
)
flags.DEFINE_string(
    "qat_file",
    None,
    "A quantization-aware model of --model_file (python -m train --qat): adds its rows (the "
    "QAT Keras model computing as each runtime does, rk.quantize.ROUNDINGS), and each QAT "
    "export's agreement with the QAT Keras model computing as its runtime and as TFLite.",
)
flags.DEFINE_boolean("qat_only", False, "With --qat_file: skip the post-training rows.")
flags.mark_flag_as_required("model_file")
CHUNK = 250  # test images resized and checked at a time


def variants(deploy, calibration, workdir):
    """(name, function on NHWC batches) for every int8 path we ship, plus the all-ops ONNX one,
    and the two main paths with their weights rounded to nearest instead of GPTQ (export/gptq.py)."""
    import tensorflow as tf

    from export import onnx_int8, runners, savedmodel, tflite
    from export.onnx import onnx_file, rounded_onnx_file

    nchw = lambda x: np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))
    for gptq_rounding, note in ((True, ""), (False, ", nearest rounding")):
        int8_graph = savedmodel.int8_function(deploy, calibration, gptq_rounding=gptq_rounding)
        yield (
            f"SavedModel --precision int8{note}",
            lambda x, f=int8_graph: f(tf.constant(x)).numpy(),
        )
        quantizations = ("int8", "int8_full") if gptq_rounding else ("int8",)
        for quantize in quantizations:
            run = runners.tflite(tflite.convert(deploy, quantize, calibration, gptq_rounding))
            yield f"TFLite --quantize {quantize}{note}", run
    default = runners.onnxruntime(
        onnx_file(deploy, workdir, nchw=True, int8=True, calibration=calibration)
    )
    yield "onnxruntime QDQ, Conv + Relu (default)", lambda x: default(nchw(x))
    every_op = f"{workdir}/int8_all.onnx"
    rounded = rounded_onnx_file(deploy, workdir, calibration)  # written by onnx_file above
    onnx_int8.quantize(rounded, every_op, nchw(calibration), op_types=None)
    run = runners.onnxruntime(every_op)
    yield "onnxruntime QDQ, every op", lambda x, run=run: run(nchw(x))


# Each QAT export and the runtime whose arithmetic its reference computes in
# (rk.quantize.ROUNDINGS), as the exporters verify it.
QAT_RUNTIMES = {
    "QAT TFLite --quantize int8": "tflite",
    "QAT TFLite --quantize int8_full": "tflite",
    "QAT SavedModel --precision int8": "tensorflow",
    "QAT onnxruntime QDQ": "onnxruntime",
    "QAT OpenVINO int8": "openvino",
}


def qat_reference_name(runtime):
    """The row of the QAT Keras model computing with `runtime`'s arithmetic."""
    return {
        "openvino": "QAT (Keras, OpenVINO's rounding)",
        "tensorflow": "QAT (Keras, TensorFlow's rounding)",
    }.get(runtime, "QAT (Keras)")


def qat_variants(qat, calibration, workdir):
    """(name, function) for the QAT Keras model (in each runtime's arithmetic) and its int8
    exports."""
    import repvgg_keras as rk
    from export import openvino, runners, tflite
    from export.onnx import onnx_file

    scope = rk.quantize_scope(qat)
    quantize = {"convolutions": "int8", "every_op": "int8_full"}[scope]
    runtimes = ("tflite", "tensorflow", "openvino") if scope == "convolutions" else ("tflite",)
    for runtime in runtimes:  # what the exporters verify against
        snapped = rk.quantize.snap_biases(qat, runtime=runtime)
        yield qat_reference_name(runtime), lambda x, m=snapped: np.asarray(m.predict(x, verbose=0))
    yield f"QAT TFLite --quantize {quantize}", runners.tflite(tflite.convert(qat, quantize))
    if scope == "convolutions":
        import tensorflow as tf

        from export import savedmodel

        int8_graph = savedmodel.int8_function(rk.quantize.snap_biases(qat), calibration)
        yield "QAT SavedModel --precision int8", lambda x: int8_graph(tf.constant(x)).numpy()
        qdq = runners.onnxruntime(
            onnx_file(qat, workdir, nchw=True, int8=True, calibration=calibration)
        )
        yield "QAT onnxruntime QDQ", lambda x: qdq(np.transpose(x, (0, 3, 1, 2)))
        ir = openvino.convert(qat, f"{workdir}/qat_openvino", "int8", calibration)
        yield "QAT OpenVINO int8", lambda x: openvino.run(os.path.dirname(ir), x, "int8")


def confident(reference, margin):
    """Mask of the images whose fp32 top-2 logit margin is at least `margin`."""
    top2 = np.sort(reference, axis=-1)[:, -2:]
    return top2[:, 1] - top2[:, 0] >= margin


def agreement_with_fp32(reference, got, labels, confident_margin):
    """(top-1 agreement, accuracy, agreement where fp32's top-2 logit margin >= confident_margin).

    The last one tells near-ties (an undertrained model's coin flips, which any rounding can
    turn) apart from real int8 damage, which also flips confident predictions."""
    expected, predicted = reference.argmax(-1), got.argmax(-1)
    sure = confident(reference, confident_margin)
    confident_agreement = np.mean(predicted[sure] == expected[sure]) if sure.any() else float("nan")
    return np.mean(predicted == expected), np.mean(predicted == labels), confident_agreement


def main(argv):
    del argv
    import keras

    import repvgg_keras as rk
    from export import images
    from repvgg_keras import preprocessing

    model = keras.saving.load_model(FLAGS.model_file)
    deploy = model if rk.is_deploy_form(model) else rk.to_deploy(model)
    size = deploy.input_shape[1]
    prepare = lambda pixels: preprocessing.normalize(
        images._resize(pixels, size, size, 3).astype(np.float32)
    )
    train_pixels, _ = images.fashion_mnist("train")
    test_pixels, labels = images.fashion_mnist("t10k")
    calibration = prepare(train_pixels[: FLAGS.calibration])
    test_pixels, labels = test_pixels[: FLAGS.count], labels[: FLAGS.count]
    with tempfile.TemporaryDirectory() as workdir:
        paths = [] if FLAGS.qat_only else list(variants(deploy, calibration, workdir))
        if FLAGS.qat_file:
            paths += list(
                qat_variants(keras.saving.load_model(FLAGS.qat_file), calibration, workdir)
            )
        # Images are resized and run a chunk at a time: 10,000 at 224px are 6 GB as float32,
        # and the runtimes' buffers for one such batch several times that.
        reference, outputs = [], {name: [] for name, _ in paths}
        for start in range(0, len(labels), CHUNK):
            chunk = prepare(test_pixels[start : start + CHUNK])
            reference.append(np.asarray(deploy.predict(chunk, verbose=0)))
            for name, run in paths:
                outputs[name].append(run(chunk))
            print(f"checked {start + len(chunk)}/{len(labels)} images", file=sys.stderr, flush=True)
    reference = np.concatenate(reference)
    share = np.mean(confident(reference, FLAGS.confident_margin))
    print(
        f"| int8 path | top-1 agreement with fp32 | accuracy | agreement where fp32 margin >= "
        f"{FLAGS.confident_margin:g} ({share:.1%} of images) |\n|---|---|---|---|"
    )
    row = lambda name, stats: print(
        f"| {name} | " + " | ".join(f"{v:.4f}" for v in stats) + " |", flush=True
    )
    row("fp32 (Keras)", agreement_with_fp32(reference, reference, labels, FLAGS.confident_margin))
    for name, chunks in outputs.items():
        row(
            name,
            agreement_with_fp32(reference, np.concatenate(chunks), labels, FLAGS.confident_margin),
        )
    if FLAGS.qat_file:
        from export.verify import top1_agreement

        print(
            "\n| QAT export | top-1 agreement with the QAT Keras model computing as its runtime "
            "(what the exporter verifies) | with the QAT Keras model computing as TFLite |"
            "\n|---|---|---|"
        )
        default = np.concatenate(outputs[qat_reference_name("tflite")])
        for name, runtime in QAT_RUNTIMES.items():
            if name in outputs:
                got = np.concatenate(outputs[name])
                own = np.concatenate(outputs[qat_reference_name(runtime)])
                agreements = (top1_agreement(got, own), top1_agreement(got, default))
                print(f"| {name} | {agreements[0]:.4f} | {agreements[1]:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
