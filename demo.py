"""`make demo`: the main job end to end.

1. Build RepVGG-A0 at 224x224 (training form) with trained-like BatchNorm statistics,
   convert it with `to_deploy`, print the parity and the layer/parameter counts.
2. Train a narrow RepVGG-A0 on Fashion-MNIST (32x32, offline from the Debian package)
   for a couple of minutes with `python -m train`, with QARepVGG blocks (--quant_friendly)
   so that its int8 exports keep the top-1 class; it converts and evaluates both forms.
3. Export the trained deploy model as TF Serving SavedModels (fp32, bf16, int8), TFLite (float32,
   float16, dynamic-range, int8), ONNX and OpenVINO (float, int8) into demo_output/,
   each verified in its own runtime on real test images, and print one table: differences,
   top-1 agreement, accuracy, and OK or REFUSED with the reason.

The table always prints; the last line is one summary; the exit status is 1 only when a check
was refused (or training failed).
"""

import argparse
import dataclasses
import functools
import os
import shutil
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import repvgg_keras as rk  # noqa: E402
from repvgg_keras import parity, preprocessing, structure  # noqa: E402

OUTPUT = "demo_output"
TRAIN_DIR = os.path.join(OUTPUT, "train")
TRAIN_ARGS = [
    "--model",
    "RepVGG_A0",
    "--width_multipliers",
    "0.5,1.0",
    "--dataset",
    "fashion_mnist",
    "--image_size",
    "32",
    "--epochs",
    "2",
    "--verbose",
    "2",
    "--quant_friendly",
]
VERIFY_COUNT = 5000  # test images every export is verified on
CALIBRATION_COUNT = 200  # other test images, for int8 calibration only
# int8_full (every op int8, for integer-only accelerators) is left out: quantizing this 32 px
# model's classifier costs it agreement (docs/export-and-serving.md, "Measured: make demo").
DEMO_TFLITE = ("none", "float16", "dynamic", "int8")


@dataclasses.dataclass
class Row:
    """One export in the table: its verification report, or why it could not be made."""

    artifact: str
    precision: str
    report: object = None  # export.verify.Report
    accuracy: float = float("nan")
    problem: str = ""  # why it was refused ("" when the report says OK)

    @property
    def ok(self):
        return not self.problem and self.report is not None and self.report.ok


def convert_and_check(size=224):
    """Step 1 as a table row: the deploy form against the training form (fp32, within 1e-5)."""
    from export import verify

    print(f"== 1. RepVGG_A0 at {size}x{size}: training form -> deploy form")
    model = parity.randomize_batchnorm(rk.RepVGG_A0(), seed=0)
    plain = rk.to_deploy(model)
    batch = np.random.default_rng(0).uniform(0, 1, (4, size, size, 3)).astype("float32")
    reference = np.asarray(model(batch, training=False))
    diff = parity.max_relative_difference(plain(batch), reference)
    print(f"\n{'form':<14}{'layers':>8}{'Conv2D':>8}{'BatchNorm':>10}{'params (M)':>12}")
    for label, m in (("training form", model), ("deploy form", plain)):
        c = structure.layer_counts(m)
        print(
            f"{label:<14}{c['layers']:>8}{c['Conv2D']:>8}{c['BatchNormalization']:>10}{m.count_params() / 1e6:>12.3f}"
        )
    print(
        f"\nparity on 4 images: max relative difference {diff:.2e}; "
        f"custom layers in deploy form: {structure.custom_layer_names(plain) or 'none'}"
    )
    report = verify.compare(
        f"deploy form (RepVGG_A0, {size} px)", "fp32", plain(batch), reference, tolerance=1e-5
    )
    return Row(report.artifact, "fp32", report, problem=report.reason())


def train(seed):
    args = [*TRAIN_ARGS, "--seed", str(seed)]
    print(
        f"\n== 2. Training a narrow RepVGG_A0 on Fashion-MNIST (python -m train {' '.join(args)})"
    )
    shutil.rmtree(TRAIN_DIR, ignore_errors=True)
    command = [sys.executable, "-m", "train", "--model_dir", TRAIN_DIR, *args]
    return subprocess.run(command).returncode


def test_images():
    """The first VERIFY_COUNT + CALIBRATION_COUNT test images as the training pipeline evaluates
    them (uint8), and their labels."""
    import tensorflow as tf

    from export import images
    from train import classification_data

    count = VERIFY_COUNT + CALIBRATION_COUNT
    raw, labels = images.fashion_mnist("t10k")
    rgb = tf.image.grayscale_to_rgb(tf.constant(raw[:count, ..., None]))
    pixels = tf.map_fn(
        lambda im: classification_data.center_crop(im, 32, 1.0), rgb, fn_output_signature=tf.float32
    )
    return np.clip(np.round(pixels.numpy()), 0, 255).astype(np.uint8), labels[:count]


def attempt(rows, artifact, precision, export, outputs, labels):
    """Run one export; a refusal or a converter failure becomes a REFUSED row, never a traceback.
    `outputs()`: the written artifact's logits on the verification images (for the accuracy)."""
    from export import verify

    row = Row(artifact, precision)
    try:
        row.report = export()
        row.artifact = row.report.artifact
        row.accuracy = float(np.mean(np.argmax(outputs(), -1) == labels))
    except verify.VerificationError as error:
        row.report = error.report
        row.problem = error.report.reason() if error.report else str(error)
    except Exception as error:  # a converter or runtime failing on this model
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        # TensorFlow's errors open with "in user code:" and end with the cause.
        row.problem = f"{type(error).__name__}: {lines[-1] if lines else ''}"
    rows.append(row)


def export_all():
    import keras

    from export import onnx as onnx_export
    from export import openvino as openvino_export
    from export import savedmodel, tflite

    print(
        f"\n== 3. Exporting the trained deploy model to {OUTPUT}/, verified on {VERIFY_COUNT} test images"
    )
    model = keras.saving.load_model(os.path.join(TRAIN_DIR, "model_train.keras"))
    plain = keras.saving.load_model(os.path.join(TRAIN_DIR, "model_deploy.keras"))
    all_pixels, all_labels = test_images()
    all_inputs = preprocessing.normalize(all_pixels.astype(np.float32))
    calibration = all_inputs[VERIFY_COUNT:]  # int8 calibration never sees the verified images
    inputs, pixels, labels = (
        all_inputs[:VERIFY_COUNT],
        all_pixels[:VERIFY_COUNT],
        all_labels[:VERIFY_COUNT],
    )
    rows = []
    # fp32; bf16 (`--precision bf16`, for CPUs and GPUs with native bf16); int8 (`--precision
    # int8`: TensorFlow's oneDNN int8 ops, quantized by Intel Neural Compressor).
    for precision, dtype, folder in (
        ("fp32", None, "repvgg_fm"),
        ("bf16", "bfloat16", "repvgg_fm_bf16"),
        ("int8", None, "repvgg_fm_int8"),
    ):
        path = f"{OUTPUT}/{folder}/1"

        def export(precision=precision, dtype=dtype, path=path):
            int8 = savedmodel.int8_function(plain, calibration) if precision == "int8" else None
            return savedmodel.export_savedmodel(
                rk.to_deploy(plain, dtype=dtype),
                path,
                verify_pixels=pixels,
                reference=model,
                model_name="repvgg_fm",
                overwrite=True,
                precision=precision,
                function=int8,
            )

        attempt(
            rows,
            f"SavedModel {folder}",
            precision,
            export,
            functools.partial(savedmodel_logits, path, pixels),
            labels,
        )
        if rows[-1].report is not None:
            rows[-1].artifact = f"SavedModel {folder}"

    def attempt_file(artifact, precision, export, path, outputs, **options):
        """`export(plain, path, ...)` verified on the test images against the training form."""
        options.update(verify_inputs=inputs, reference=model, overwrite=True)
        attempt(
            rows,
            artifact,
            precision,
            functools.partial(export, plain, path, **options),
            outputs,
            labels,
        )

    for quantize in DEMO_TFLITE:
        path = f"{OUTPUT}/repvgg_fm_{quantize}.tflite"
        attempt_file(
            f"TFLite {os.path.basename(path)}",
            tflite.PRECISION[quantize],
            tflite.export_tflite,
            path,
            functools.partial(tflite.run, path, inputs),
            quantize=quantize,
            calibration=calibration,
        )
    path = f"{OUTPUT}/repvgg_fm.onnx"
    attempt_file(
        "ONNX repvgg_fm.onnx (NCHW)",
        "fp32",
        onnx_export.export_onnx,
        path,
        functools.partial(onnx_export.run, path, np.transpose(inputs, (0, 3, 1, 2))),
    )
    for quantize in openvino_export.QUANTIZATIONS:  # fp32, or bf16 where the CPU has it; int8
        path = f"{OUTPUT}/repvgg_fm_openvino_{quantize}"
        precision = openvino_export.default_precision(quantize)
        attempt_file(
            f"OpenVINO {os.path.basename(path)}",
            precision,
            openvino_export.export_openvino,
            path,
            functools.partial(openvino_export.run, path, inputs, precision),
            quantize=quantize,
            calibration=calibration,
        )
    keras_accuracy = float(np.mean(np.argmax(model(inputs, training=False), -1) == labels))
    return rows, keras_accuracy, len(labels)


def savedmodel_logits(path, pixels):
    import tensorflow as tf

    signature = tf.saved_model.load(path).signatures["serving_uint8"]
    return signature(images=tf.constant(pixels))["logits"].numpy()


def print_table(rows, keras_accuracy, count):
    print(f"\nKeras training form: accuracy {keras_accuracy:.4f} on {count} test images")
    print(
        f"{'artifact':<36}{'precision':<10}{'size MB':>9}{'max rel':>10}{'p99 rel':>10}"
        f"{'top-1 agr':>11}{'accuracy':>10}  status"
    )
    for row in rows:
        r = row.report
        if r is None:
            cells = f"{'-':>9}{'-':>10}{'-':>10}{'-':>11}{'-':>10}"
        else:
            size = "-" if np.isnan(r.size_mb) else f"{r.size_mb:.2f}"
            accuracy = "-" if np.isnan(row.accuracy) else f"{row.accuracy:.4f}"
            cells = (
                f"{size:>9}{r.max_rel:>10.2e}{r.percentile_rel:>10.2e}"
                f"{r.top1_agreement:>11.4f}{accuracy:>10}"
            )
        status = "OK" if row.ok else f"REFUSED: {row.problem}"
        print(f"{row.artifact:<36}{row.precision:<10}{cells}  {status}")
    print(
        "Accepted: fp32/fp16/bf16/dynamic by the largest relative difference of any logit; int8 by "
        "its top-1 agreement with the float model and the 99th-percentile difference "
        "(export/verify.py)."
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seed", type=int, default=0, help="training seed (python -m train --seed)"
    )
    parser.add_argument(
        "--skip_convert", action="store_true", help="skip step 1 (the 224 px parity check)"
    )
    args = parser.parse_args(argv)
    rows = [] if args.skip_convert else [convert_and_check()]
    if train(args.seed) != 0:
        print("error: training failed (its message is above); nothing was exported.")
        return 1
    exports, keras_accuracy, count = export_all()
    rows += exports
    print_table(rows, keras_accuracy, count)
    refused = [row.artifact for row in rows if not row.ok]
    if refused:
        print(f"demo: {len(refused)} of {len(rows)} checks REFUSED: {', '.join(refused)}")
        return 1
    int8 = [row.report.top1_agreement for row in rows if row.precision == "int8"]
    print(
        f"demo: all {len(rows)} checks OK; int8 keeps the top-1 class on at least "
        f"{min(int8):.2%} of {count} images"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
