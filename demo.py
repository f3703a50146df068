"""`make demo`: the main job end to end.

Builds RepVGG-A0 (training form), gives its BatchNorms non-trivial statistics (as a
trained model has), converts it with `to_deploy`, and prints the parity and the
layer/parameter counts of both forms.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import repvgg_keras as rk  # noqa: E402
from repvgg_keras import testing  # noqa: E402


def main():
    print("Building RepVGG_A0 (training form, 224x224, 1000 classes)...")
    model = rk.RepVGG_A0()
    testing.randomize_batchnorm(model, seed=0)
    print("Converting to the deploy form with rk.to_deploy...")
    plain = rk.to_deploy(model)
    images = np.random.default_rng(0).uniform(0, 1, (4, 224, 224, 3)).astype("float32")
    reference = np.asarray(model(images, training=False))
    fused = np.asarray(plain(images))
    diff = testing.max_relative_difference(fused, reference)
    top1 = float(np.mean(reference.argmax(-1) == fused.argmax(-1)))
    rows = [
        ("training form", model),
        ("deploy form", plain),
    ]
    print(f"\n{'form':<14}{'layers':>8}{'Conv2D':>8}{'BatchNorm':>10}{'params (M)':>12}")
    for label, m in rows:
        c = testing.layer_counts(m)
        print(
            f"{label:<14}{c['layers']:>8}{c['Conv2D']:>8}{c['BatchNormalization']:>10}"
            f"{m.count_params() / 1e6:>12.3f}"
        )
    print(f"\nparity on 4 images at 224x224: max relative difference {diff:.2e}, top-1 agreement {top1:.2f}")
    print("custom layers in deploy form:", testing.custom_layer_names(plain) or "none")
    if diff > 1e-5:
        raise SystemExit(f"FAILED: deploy form differs from the training form by {diff:.2e}")


if __name__ == "__main__":
    main()
