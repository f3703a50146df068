"""Export a .tflite file (float32, float16, dynamic-range or int8), verified in LiteRT.

    python -m export.tflite --model RepVGG_A0 --weights a0.keras --output a0.tflite --quantize int8

int8 quantizes every convolution (weights GPTQ-rounded on the calibration images, export/gptq.py)
and keeps the global pooling and classifier in float (FLOAT_OPS_IN_INT8): an int8 classifier
clips the logits and costs top-1 agreement with the float model (docs/int8.md). int8_full is
the integer-only model that int8-only accelerators need (every op int8).

Converts through a SavedModel (`TFLiteConverter.from_saved_model`; converting concrete
functions drops Keras 3 weights), then runs the file in `ai_edge_litert`'s interpreter on
the verification images and compares with the Keras model. Inputs and outputs stay float32
in every mode (int8 quantizes the ops and weights inside).

A segmentation model (--task segmentation, a PSPNet) gets two outputs: `logits`
[N, H, W, classes] float32 and `classes` [N, H, W] int32 (the per-pixel argmax), in float32
or float16 (--quantize none or float16; the int8 modes are for classifiers).
"""

import os
import tempfile
import warnings

import numpy as np
from absl import flags

import repvgg_keras as rk
from export import atomic, cli, gptq, loading, precisions, runners
from repvgg_keras import structure

FLAGS = flags.FLAGS
QUANTIZATIONS = ("none", "float16", "dynamic", "int8", "int8_full")
SEGMENTATION_QUANTIZATIONS = ("none", "float16")
PRECISION = {mode: precisions.of_quantize(mode) for mode in QUANTIZATIONS}  # what each computes in
# A sliver of the work, and quantizing them clips logits.
FLOAT_OPS_IN_INT8 = ["MEAN", "FULLY_CONNECTED"]


def convert(model, quantize="none", calibration=None, gptq_rounding=True):
    """TFLite flatbuffer bytes of a Keras model. `calibration`: model inputs for int8.
    `gptq_rounding` False: int8 weights rounded to nearest (for comparison)."""
    import tensorflow as tf

    if quantize not in QUANTIZATIONS:
        raise ValueError(
            f"Unknown --quantize {quantize!r}: choose one of {', '.join(QUANTIZATIONS)}."
        )
    segmentation = loading.is_segmentation(model)
    if segmentation and quantize not in SEGMENTATION_QUANTIZATIONS:
        raise ValueError(_segmentation_quantize_error(quantize))
    if rk.is_quantize_aware(model):
        return _convert_quantize_aware(model, quantize)
    if quantize.startswith("int8") and (calibration is None or len(calibration) == 0):
        raise ValueError(f"--quantize {quantize} needs calibration images (--calibration_data).")
    if quantize.startswith("int8") and gptq_rounding:
        model = gptq.round_kernels(model, calibration)
    with tempfile.TemporaryDirectory() as tmp:
        saved = os.path.join(tmp, "saved_model")
        # Keras's own exporter: a SavedModel from tf.saved_model.save(tf.Module) converts
        # to a weightless (NaN) flatbuffer here, as from_concrete_functions does.
        if segmentation:
            _export_segmentation(model, saved)
        else:
            model.export(saved, format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(
            saved, signature_keys=["serving_default"]
        )
        if quantize != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if quantize.startswith("int8"):
            samples = np.asarray(calibration, np.float32)
            converter.representative_dataset = lambda: ([s[None]] for s in samples)
        if quantize == "int8":
            # LiteRT's selective quantization: calibrate once, then quantize all but these ops.
            # The debugger opens its own (deprecated) tf.lite.Interpreter.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                debugger = tf.lite.experimental.QuantizationDebugger(
                    converter=converter,
                    debug_dataset=converter.representative_dataset,
                    debug_options=tf.lite.experimental.QuantizationDebugOptions(
                        denylisted_ops=FLOAT_OPS_IN_INT8
                    ),
                )
                return debugger.get_nondebug_quantized_model()
        if quantize == "int8_full":
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        return converter.convert()


# The QAT scope whose int8 ops each int8 mode holds (rk.quantize_aware's `scope`).
QAT_SCOPES = {"int8": "convolutions", "int8_full": "every_op"}


def _convert_quantize_aware(model, quantize):
    """A QAT model (rk.quantize_aware) in int8 with its own grid weights and learned ranges: the
    converter reads them from the fake-quant ops, so no calibration and no re-rounding. Its float
    modes convert the float model whose weights lie on the grid (rk.to_deploy)."""
    import tensorflow as tf

    if not quantize.startswith("int8"):
        return convert(rk.to_deploy(model), quantize)
    scope = rk.quantize_scope(model)
    if scope != QAT_SCOPES[quantize]:
        other = next(mode for mode, s in QAT_SCOPES.items() if s == scope)
        raise ValueError(
            f"this quantization-aware model was made with scope {scope!r}, which --quantize "
            f"{other} exports; --quantize {quantize} needs one made with scope "
            f"{QAT_SCOPES[quantize]!r} (python -m train --qat --qat_scope {QAT_SCOPES[quantize]})."
        )
    with tempfile.TemporaryDirectory() as tmp:
        saved = os.path.join(tmp, "saved_model")
        rk.quantize.snap_biases(model, exact_inference=False).export(
            saved, format="tf_saved_model", verbose=False
        )
        converter = tf.lite.TFLiteConverter.from_saved_model(
            saved, signature_keys=["serving_default"]
        )
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        return converter.convert()


def _segmentation_quantize_error(quantize):
    return (
        f"--quantize {quantize} is not supported for --task segmentation: use "
        f"{' or '.join(SEGMENTATION_QUANTIZATIONS)}."
    )


def _export_segmentation(model, path):
    """Keras's SavedModel exporter with outputs `logits` and `classes` (their argmax)."""
    import keras
    import tensorflow as tf

    spec = tf.TensorSpec((None,) + tuple(model.input_shape[1:]), tf.float32, name="images")

    def serve(images):
        logits = model(images, training=False)
        return {"logits": logits, "classes": tf.argmax(logits, axis=-1, output_type=tf.int32)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve, input_signature=[spec])
    archive.write_out(path, verbose=False)


def run(path_or_bytes, inputs):
    """Logits of a .tflite model on a batch (ai_edge_litert, XNNPACK)."""
    return runners.tflite(path_or_bytes)(inputs)


def export_tflite(
    model,
    output,
    *,
    quantize="none",
    verify_inputs,
    calibration=None,
    reference=None,
    overwrite=False,
    tolerance=None,
    min_agreement=None,
):
    """Convert, verify against `reference` (default `model`), then move into `output`.
    `tolerance`, `min_agreement`: the acceptance rule's bounds (None: verify's defaults)."""
    artifact = f"TFLite {os.path.basename(output)}"

    def write(staged):
        flatbuffer = convert(model, quantize, calibration)
        with open(staged, "wb") as f:
            f.write(flatbuffer)

    return atomic.verified_export(
        output,
        write,
        atomic.file_checks(artifact, runners.tflite, verify_inputs, loading.is_segmentation(model)),
        reference or model,
        verify_inputs,
        precision=precisions.of_quantize(quantize),  # None for an unknown one: `convert` refuses it
        overwrite=overwrite,
        tolerance=tolerance,
        min_agreement=min_agreement,
        remedy=quantize_aware_pool_advice(model) if quantize == "int8" else None,
    )


def quantize_aware_pool_advice(model):
    """What to do when TFLite int8 of a QAT model (scope "convolutions") that averages its last
    features in float is refused and its global pool sees more than one cell (verification's
    advice for it): the converter pools in int8 on the last activation's grid (MEAN keeps its
    input's scale). `rk.quantize_aware` models round the pool so (`rk.quantize.pools_on_grid`).
    None where that cannot be the cause."""
    if not rk.is_quantize_aware(model) or rk.quantize_scope(model) != "convolutions":
        return None
    if rk.quantize.pools_on_grid(model):
        return None
    pools = [
        layer
        for layer in structure.all_layers(model)
        if type(layer).__name__ == "GlobalAveragePooling2D"
    ]
    cells = [tuple(layer.input.shape[1:3]) for layer in pools]
    if not cells or all(h == 1 and w == 1 for h, w in cells):
        return None
    h, w = cells[0]
    return (
        f"TFLite's int8 converter runs the global average pool over the {h}x{w} features in int8 "
        "on the last activation's grid, which this quantization-aware model computes in float: "
        "make the model again with `python -m train --qat` (its pool then rounds as TFLite's "
        "does), or export this one with `python -m export.onnx --quantize int8` or "
        "`python -m export.openvino --quantize int8`, which pool as the model does."
    )


def main(argv):
    del argv

    def check_task():
        if FLAGS.task == "segmentation" and FLAGS.quantize not in SEGMENTATION_QUANTIZATIONS:
            raise ValueError(_segmentation_quantize_error(FLAGS.quantize))

    export = cli.exporter(export_tflite)
    return cli.run_exporter(export, FLAGS.output, checks=[cli.check_calibration_flags, check_task])


if __name__ == "__main__":
    cli.define_model_flags()
    flags.DEFINE_string("output", None, "Path of the .tflite file to write.")
    flags.DEFINE_enum("quantize", "none", QUANTIZATIONS, "Weight/activation precision.")
    cli.define_calibration_flags()
    flags.mark_flag_as_required("output")
    cli.start(main)
