"""`python -m train --qat`: quantization-aware fine-tuning of a trained run, end to end."""

import json
import os

import keras
import pytest

import repvgg_keras as rk
from tests.helpers import one_error_line, run_cli, train_cli

QUICK = ["--train_take", "256", "--eval_take", "64"]


@pytest.fixture(scope="module")
def float_run(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("float")
    result = train_cli(model_dir, "fashion_mnist", "--epochs", "1", *QUICK)
    assert result.returncode == 0, result.stderr[-3000:]
    return model_dir


@pytest.mark.slow
@pytest.mark.parametrize("source", ["model_train.keras", "model_deploy.keras"])
def test_qat_run_writes_a_qat_model_the_int8_exporter_takes(float_run, tmp_path, source):
    model_dir = tmp_path / "qat"
    init = str(float_run / source)
    result = train_cli(model_dir, "fashion_mnist", "--qat", "--init_weights", init, *QUICK)
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("accuracy: fp32=") and " qat=" in last
    fp32 = float(last.split("fp32=")[1].split()[0])
    qat = keras.models.load_model(model_dir / "model_qat.keras")
    assert rk.is_quantize_aware(qat) and rk.quantize_scope(qat) == "convolutions"
    deploy = keras.models.load_model(model_dir / "model_deploy.keras")
    assert not rk.is_quantize_aware(deploy)
    recorded = json.loads((model_dir / "run_config.json").read_text())["flags"]
    assert recorded["recipe"] == "qat" and recorded["qat_scope"] == "convolutions"
    assert 0 <= fp32 <= 1
    if source == "model_train.keras":
        # The same command again reports the finished run.
        again = train_cli(model_dir, "fashion_mnist", "--qat", "--init_weights", init, *QUICK)
        assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == last
        output = tmp_path / "qat.tflite"
        export = [
            "export.tflite",
            "--weights",
            str(model_dir / "model_qat.keras"),
            "--quantize",
            "int8",
            "--verify_images",
            "fashion_mnist",
            "--verify_count",
            "200",
            "--output",
            str(output),
        ]
        exported = run_cli(*export)
        # A QAT source is held to the QAT floor (this one-epoch model has near-ties to lose).
        assert "floor 99.80%" in exported.stdout + exported.stderr
        if exported.returncode != 0:
            exported = run_cli(*export, "--min_agreement", "0.9")
        assert exported.returncode == 0, exported.stderr[-3000:]
        assert os.path.exists(output)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--qat"], "pass it as --init_weights"),
        (
            ["--qat", "--init_weights", "x.keras", "--task", "segmentation"],
            "not --task segmentation",
        ),
        (["--qat", "--init_weights", "x.keras", "--qat_scope", "all"], "qat_scope"),
    ],
)
def test_qat_flags_that_cannot_work_are_one_error_line(tmp_path, extra, message):
    result = train_cli(tmp_path / "run", "fashion_mnist", *extra)
    if "qat_scope" in message:  # absl refuses an enum value itself (exit 1, its own line)
        assert result.returncode != 0 and "qat_scope" in result.stderr
        return
    assert message in one_error_line(result)
    assert not (tmp_path / "run").exists()
