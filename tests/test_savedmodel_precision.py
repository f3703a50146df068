"""SavedModels that compute in bf16 or fp16: verified like every export, served through all three
signatures, and `--precision auto` choosing as documented."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import repvgg_keras as rk
from export import images, savedmodel, verify
from repvgg_keras import cpu_features, preprocessing
from repvgg_keras.parity import max_relative_difference, randomize_batchnorm
from tests.helpers import REPO

SIZE = 32


@pytest.fixture(scope="module")
def model():
    return randomize_batchnorm(rk.RepVGG_A0(input_shape=(SIZE, SIZE, 3), classes=10), seed=3)


@pytest.fixture(scope="module")
def pixels():
    return images.load_images("sample", 8, SIZE, SIZE)


@pytest.mark.parametrize("precision,dtype", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_low_precision_savedmodel_verifies_and_serves(tmp_path, model, pixels, precision, dtype):
    shipped = rk.to_deploy(model, dtype=dtype)
    path = str(tmp_path / "1")
    report = savedmodel.export_savedmodel(
        shipped, path, verify_pixels=pixels, reference=model, precision=precision
    )
    assert (
        report.ok
        and report.precision == precision
        and report.tolerance == verify.TOLERANCES[precision]
    )
    loaded = tf.saved_model.load(path)
    fp32_weights_mb = rk.to_deploy(model).count_params() * 4 / 2**20
    assert report.size_mb < 0.7 * fp32_weights_mb  # the frozen weights are stored in 16 bits
    x = preprocessing.normalize(pixels.astype(np.float32), "imagenet", 3)
    expected = np.asarray(model(x, training=False))
    for signature, batch in (
        ("serving_default", tf.constant(x)),
        ("serving_uint8", tf.constant(pixels)),
        ("serving_bytes", tf.stack([tf.io.encode_png(p) for p in pixels])),
    ):
        logits = loaded.signatures[signature](images=batch)["logits"]
        assert logits.dtype == tf.float32  # float32 out, whatever the convolutions compute in
        assert 0 < max_relative_difference(logits, expected) < verify.TOLERANCES[precision], (
            signature
        )


def test_auto_picks_bf16_only_where_native_and_faithful(monkeypatch, model, pixels):
    deploy = rk.to_deploy(model)
    x = preprocessing.normalize(pixels.astype(np.float32), "imagenet", 3)
    assert savedmodel.choose_precision("fp16", deploy, model, x) == ("fp16", "asked for")

    monkeypatch.setattr(cpu_features, "native_bf16", lambda: None)
    precision, reason = savedmodel.choose_precision("auto", deploy, model, x)
    assert precision == "fp32" and "no native bf16" in reason

    monkeypatch.setattr(cpu_features, "native_bf16", lambda: "avx512_bf16")
    clear = rk.to_deploy(model)  # well-separated logits: bf16 cannot flip a near-tie on any CPU
    clear.get_layer("predictions").bias.assign(np.arange(10, dtype=np.float32) * 20.0)
    precision, reason = savedmodel.choose_precision("auto", clear, clear, x)
    assert precision == "bf16" and "avx512_bf16" in reason and "100.00%" in reason

    def shuffled_reference(inputs, training=False):  # a model bf16 would disagree with
        return np.roll(np.asarray(model(inputs, training=False)), 1, axis=-1)

    precision, reason = savedmodel.choose_precision("auto", deploy, shuffled_reference, x)
    assert precision == "fp32" and "--precision bf16" in reason


def _export(tmp_path, *flags):
    return subprocess.run(
        [sys.executable, "-m", "export.savedmodel", "--model=RepVGG_A0", f"--image_size={SIZE}",
         "--classes=10", "--verify_count=4", f"--export_dir={tmp_path / 'sm'}", *flags],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip


@pytest.mark.slow
def test_cli_says_which_precision_and_why(tmp_path):
    done = _export(tmp_path, "--precision=fp16")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (
        "precision: fp16 (asked for)" in done.stdout and "SavedModel serving_bytes" in done.stdout
    )
    done = _export(tmp_path, "--precision=auto", "--version=2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "precision: " in done.stdout and "(auto, judging the exporting machine: " in done.stdout
    # The default is fp32, whatever the exporting CPU: the artifact does not depend on it.
    done = _export(tmp_path, "--version=4")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "precision: fp32 (the default" in done.stdout
    refused = _export(tmp_path, "--precision=bf16", "--no_fuse", "--version=3")
    assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "--no_fuse" in refused.stderr and not (tmp_path / "sm" / "3").exists()
