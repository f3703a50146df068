"""`make demo`: the main job end to end.

1. Build RepVGG-A0 at 224x224 (training form) with trained-like BatchNorm statistics,
   convert it with `to_deploy`, print the parity and the layer/parameter counts.
2. Train a narrow RepVGG-A0 on Fashion-MNIST (32x32, offline from the Debian package)
   for a couple of minutes with `python -m train`, with QARepVGG blocks (--quant_friendly)
   so that its int8 exports keep the top-1 class; it converts and evaluates both forms.
3. Export the trained deploy model as a TF Serving SavedModel, TFLite (float32, float16,
   dynamic-range, int8) and ONNX into demo_output/, each verified in its own runtime on
   real test images, and print one table: differences, top-1 agreement and accuracy.
"""

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
VERIFY_COUNT = 1000


def convert_and_check(size=224):
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
    if diff > 1e-5:
        raise SystemExit(f"FAILED: deploy form differs from the training form by {diff:.2e}")


def train():
    print(
        f"\n== 2. Training a narrow RepVGG_A0 on Fashion-MNIST (python -m train {' '.join(TRAIN_ARGS)})"
    )
    shutil.rmtree(TRAIN_DIR, ignore_errors=True)
    command = [sys.executable, "-m", "train", "--model_dir", TRAIN_DIR, *TRAIN_ARGS]
    subprocess.run(command, check=True)


def test_images():
    """The first VERIFY_COUNT test images as the training pipeline evaluates them (uint8)."""
    import tensorflow as tf

    from export import images
    from train import data

    raw, labels = images.fashion_mnist("t10k")
    rgb = tf.image.grayscale_to_rgb(tf.constant(raw[:VERIFY_COUNT, ..., None]))
    pixels = tf.map_fn(
        lambda im: data.center_crop(im, 32, 1.0), rgb, fn_output_signature=tf.float32
    )
    return np.clip(np.round(pixels.numpy()), 0, 255).astype(np.uint8), labels[:VERIFY_COUNT]


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
    pixels, labels = test_images()
    inputs = preprocessing.normalize(pixels.astype(np.float32))
    calibration = inputs[-200:]  # int8 calibration uses the last 200, never the verified ones
    keep = slice(0, VERIFY_COUNT - 200)
    inputs, pixels, labels = inputs[keep], pixels[keep], labels[keep]
    reports, outputs = [], {}
    # fp32, and bf16: what `--precision auto` exports on CPUs with native bf16.
    for precision, dtype, folder in (
        ("fp32", None, "repvgg_fm"),
        ("bf16", "bfloat16", "repvgg_fm_bf16"),
    ):
        report = savedmodel.export_savedmodel(
            rk.to_deploy(plain, dtype=dtype),
            f"{OUTPUT}/{folder}/1",
            verify_pixels=pixels,
            reference=model,
            model_name="repvgg_fm",
            overwrite=True,
            precision=precision,
        )
        if dtype:
            report.artifact = f"SavedModel {precision} serving_default"
        reports.append(report)
        outputs[report.artifact] = savedmodel_logits(f"{OUTPUT}/{folder}/1", pixels)
    for quantize in tflite.QUANTIZATIONS:
        path = f"{OUTPUT}/repvgg_fm_{quantize}.tflite"
        reports.append(
            tflite.export_tflite(
                plain,
                path,
                quantize=quantize,
                verify_inputs=inputs,
                calibration=calibration,
                reference=model,
                overwrite=True,
            )
        )
        outputs[reports[-1].artifact] = tflite.run(path, inputs)
    path = f"{OUTPUT}/repvgg_fm.onnx"
    reports.append(
        onnx_export.export_onnx(plain, path, verify_inputs=inputs, reference=model, overwrite=True)
    )
    outputs[reports[-1].artifact] = onnx_export.run(
        path, np.transpose(inputs, (0, 3, 1, 2))
    )  # NCHW input
    for quantize in openvino_export.QUANTIZATIONS:  # fp32, or bf16 where the CPU has it; int8
        path = f"{OUTPUT}/repvgg_fm_openvino_{quantize}"
        precision = openvino_export.default_precision(quantize)
        reports.append(
            openvino_export.export_openvino(
                plain,
                path,
                quantize=quantize,
                verify_inputs=inputs,
                calibration=calibration,
                reference=model,
                overwrite=True,
            )
        )
        outputs[reports[-1].artifact] = openvino_export.run(path, inputs, precision)
    keras_accuracy = float(np.mean(np.argmax(model(inputs, training=False), -1) == labels))
    print(f"\nKeras training form: accuracy {keras_accuracy:.4f} on {len(labels)} test images")
    print(
        f"{'artifact':<36}{'precision':<10}{'size MB':>9}{'max abs':>11}{'max rel':>11}"
        f"{'top-1 agr':>10}{'accuracy':>10}  status"
    )
    for r in reports:
        accuracy = float(np.mean(np.argmax(outputs[r.artifact], -1) == labels))
        print(
            f"{r.artifact:<36}{r.precision:<10}{r.size_mb:>9.2f}{r.max_abs:>11.2e}{r.max_rel:>11.2e}"
            f"{r.top1_agreement:>10.4f}{accuracy:>10.4f}  {'OK' if r.ok else 'FAILED'}"
        )


def savedmodel_logits(path, pixels):
    import tensorflow as tf

    return (
        tf.saved_model.load(path)
        .signatures["serving_uint8"](images=tf.constant(pixels))["logits"]
        .numpy()
    )


def main():
    convert_and_check()
    train()
    export_all()


if __name__ == "__main__":
    main()
