"""`python -m train --task segmentation`: a short run on fashion_mnist_scenes ends with both forms'
mIoU equal, writes its models and predictions.png, reports a finished run, and refuses flags that
only classification uses."""

import json
import os
import re

import keras
import numpy as np

from tests.test_train_inputs import _one_error_line, _train

SEGMENTATION = [
    "--task",
    "segmentation",
    "--head_channels",
    "16",
    "--train_take",
    "48",
    "--eval_take",
    "24",
    "--epochs",
    "1",
]
LAST_LINE = re.compile(r"^miou: training_form=([0-9.]+) deploy_form=([0-9.]+)$")


def test_short_run_both_forms_agree_and_a_rerun_reports_it(tmp_path):
    result = _train(tmp_path, "fashion_mnist_scenes", *SEGMENTATION)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    match = LAST_LINE.match(last)
    assert match, last
    training_form, deploy_form = (float(v) for v in match.groups())
    assert 0.0 < training_form <= 1.0 and abs(training_form - deploy_form) <= 0.01
    for name in ("model_train.keras", "model_deploy.keras", "predictions.png", "training_log.csv"):
        assert os.path.exists(tmp_path / name), name
    assert "logits_miou" in open(tmp_path / "training_log.csv").readline()
    with open(tmp_path / "run_config.json") as f:
        recorded = json.load(f)
    assert recorded["finished"] and recorded["miou"] == last
    assert recorded["flags"]["task"] == "segmentation" and recorded["flags"]["output_stride"] == 8

    deploy = keras.models.load_model(tmp_path / "model_deploy.keras")
    assert len(deploy.outputs) == 1 and deploy.output_shape == (None, 32, 32, 11)  # no aux head
    x = np.zeros((1, 32, 32, 3), "float32")
    assert np.isfinite(np.asarray(deploy(x))).all()

    again = _train(tmp_path, "fashion_mnist_scenes", *SEGMENTATION)
    assert again.returncode == 0 and "holds a finished run" in again.stdout
    assert again.stdout.strip().splitlines()[-1] == last


def test_classification_flags_are_refused_with_segmentation(tmp_path):
    result = _train(tmp_path, "fashion_mnist_scenes", *SEGMENTATION, "--mixup", "0.2")
    _one_error_line(result)
    assert "--mixup apply to classification only" in result.stderr
    assert not os.path.exists(tmp_path / "run_config.json")
    _one_error_line(_train(tmp_path, "fashion_mnist_scenes", *SEGMENTATION, "--output_stride", "4"))


def test_recipe_optimizer_choice():
    from train import recipes

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    for name, kind in (("sgd", keras.optimizers.SGD), ("adamw", keras.optimizers.AdamW)):
        recipe = recipes.get_recipe("small", optimizer=name)
        assert isinstance(
            recipes.make_optimizer(recipe, model, total_steps=4, warmup_steps=1), kind
        )
    bad = recipes.get_recipe("small", optimizer="lamb")
    try:
        recipes.make_optimizer(bad, model, total_steps=4, warmup_steps=1)
    except ValueError as error:
        assert "Unknown optimizer 'lamb'" in str(error)
    else:
        raise AssertionError("an unknown optimizer was accepted")
