"""`make demo`: the main job end to end.

1. Build RepVGG-A0 (training form), give its BatchNorms non-trivial statistics (as a
   trained model has), convert it with `to_deploy`, print parity and layer/parameter counts.
2. Export the deploy form as a TF Serving SavedModel, TFLite (float32, float16,
   dynamic-range, int8) and ONNX into demo_output/, each verified in its own runtime on
   real images (Fashion-MNIST), and print one table of the verifications.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import repvgg_keras as rk  # noqa: E402
from export import images, onnx as onnx_export, savedmodel, tflite  # noqa: E402
from repvgg_keras import preprocessing, testing  # noqa: E402

OUTPUT = "demo_output"
SIZE = 224


def convert_and_check():
    print(f"Building RepVGG_A0 (training form, {SIZE}x{SIZE}, 1000 classes)...")
    model = rk.RepVGG_A0()
    testing.randomize_batchnorm(model, seed=0)
    print("Converting to the deploy form with rk.to_deploy...")
    plain = rk.to_deploy(model)
    batch = np.random.default_rng(0).uniform(0, 1, (4, SIZE, SIZE, 3)).astype("float32")
    reference = np.asarray(model(batch, training=False))
    fused = np.asarray(plain(batch))
    diff = testing.max_relative_difference(fused, reference)
    top1 = float(np.mean(reference.argmax(-1) == fused.argmax(-1)))
    print(f"\n{'form':<14}{'layers':>8}{'Conv2D':>8}{'BatchNorm':>10}{'params (M)':>12}")
    for label, m in (("training form", model), ("deploy form", plain)):
        c = testing.layer_counts(m)
        print(
            f"{label:<14}{c['layers']:>8}{c['Conv2D']:>8}{c['BatchNormalization']:>10}"
            f"{m.count_params() / 1e6:>12.3f}"
        )
    print(f"\nparity on 4 images at {SIZE}x{SIZE}: max relative difference {diff:.2e}, top-1 agreement {top1:.2f}")
    print("custom layers in deploy form:", testing.custom_layer_names(plain) or "none")
    if diff > 1e-5:
        raise SystemExit(f"FAILED: deploy form differs from the training form by {diff:.2e}")
    return model, plain


def export_all(model, plain):
    print(f"\nExporting to {OUTPUT}/ (verified on real Fashion-MNIST images)...")
    pixels = images.load_images("fashion_mnist", 16, SIZE, SIZE, 3)
    calibration = preprocessing.normalize(
        images.load_images("fashion_mnist", 80, SIZE, SIZE, 3)[16:].astype(np.float32)
    )
    inputs = preprocessing.normalize(pixels.astype(np.float32))
    reports = [
        savedmodel.export_savedmodel(plain, f"{OUTPUT}/repvgg_a0/1", verify_pixels=pixels,
                                     reference=model, model_name="repvgg_a0", overwrite=True)
    ]
    for quantize in tflite.QUANTIZATIONS:
        reports.append(tflite.export_tflite(
            plain, f"{OUTPUT}/repvgg_a0_{quantize}.tflite", quantize=quantize, verify_inputs=inputs,
            calibration=calibration, reference=model, overwrite=True))
    reports.append(onnx_export.export_onnx(plain, f"{OUTPUT}/repvgg_a0.onnx", verify_inputs=inputs,
                                           reference=model, overwrite=True))
    print(f"\n{'artifact':<36}{'precision':<10}{'size MB':>9}{'max abs':>11}{'max rel':>11}{'top-1':>8}  status")
    for r in reports:
        print(f"{r.artifact:<36}{r.precision:<10}{r.size_mb:>9.2f}{r.max_abs:>11.2e}{r.max_rel:>11.2e}"
              f"{r.top1_agreement:>8.3f}  {'OK' if r.ok else 'FAILED'}")
    print("\n(top-1 = agreement with the Keras training-form model on the same 16 images; "
          "the model has random weights until training is added, so int8 figures are indicative)")


def main():
    model, plain = convert_and_check()
    export_all(model, plain)


if __name__ == "__main__":
    main()
