"""`python -m train --task segmentation`: a short run on fashion_mnist_scenes ends with both forms'
mIoU equal, writes its models and predictions.png, reports a finished run, and refuses flags that
only classification uses; two workers (TF_CONFIG) train one model."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from tests.helpers import REPO, TINY, cli_env, free_ports, one_error_line, train_cli

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
    result = train_cli(tmp_path, "fashion_mnist_scenes", *SEGMENTATION)
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
    run = recorded["flags"]
    assert run["task"] == "segmentation" and run["recipe"] == "segmentation"
    # At most 64 px the small-input head is the default (train/recipes.py SEGMENTATION_HEADS).
    assert (run["output_stride"], run["low_level_skip"], run["image_refine"]) == (16, True, True)
    assert run["head_channels"] == 16 and run["scale_augment"] is False

    deploy = keras.models.load_model(tmp_path / "model_deploy.keras")
    assert len(deploy.outputs) == 1 and deploy.output_shape == (None, 32, 32, 11)  # no aux head
    x = np.zeros((1, 32, 32, 3), "float32")
    assert np.isfinite(np.asarray(deploy(x))).all()

    again = train_cli(tmp_path, "fashion_mnist_scenes", *SEGMENTATION)
    assert again.returncode == 0 and "holds a finished run" in again.stdout
    assert again.stdout.strip().splitlines()[-1] == last


def test_single_head_run_with_the_low_level_skip_and_image_refine(tmp_path):
    result = train_cli(
        tmp_path,
        "fashion_mnist_scenes",
        *SEGMENTATION,
        "--aux_weight",
        "0",
        "--low_level_skip",
        "--image_refine",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert LAST_LINE.match(result.stdout.strip().splitlines()[-1])
    assert "low-level skip, image refine" in result.stdout
    with open(tmp_path / "run_config.json") as f:
        recorded = json.load(f)["flags"]
    assert recorded["low_level_skip"] is True and recorded["image_refine"] is True
    assert "miou" in open(tmp_path / "training_log.csv").readline().split(",")
    deploy = keras.models.load_model(tmp_path / "model_deploy.keras")
    assert deploy.get_layer("head_refine_conv") and deploy.get_layer("image_refine_conv")
    assert len(deploy.outputs) == 1


def _start_workers(model_dir, *extra, stdout=subprocess.PIPE):
    """Start the trainer as workers 0 and 1 of a cluster on loopback ports."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    command = [sys.executable, "-m", "train", "--dataset", "fashion_mnist_scenes"]
    command += ["--model_dir", str(model_dir), *TINY, *extra]
    return [
        subprocess.Popen(
            command,
            cwd=REPO,
            env=dict(
                cli_env(),
                TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
            ),
            stdout=stdout,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]


def _two_workers(model_dir, *extra):
    """Run two workers to the end; returns their outputs."""
    workers = _start_workers(model_dir, *extra)
    outputs = [worker.communicate(timeout=900)[0] for worker in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    return outputs


def test_two_workers_on_loopback_end_with_identical_weights(tmp_path):
    outputs = _two_workers(tmp_path, *SEGMENTATION)
    assert all("2 replica(s)" in out for out in outputs)
    last_lines = [out.strip().splitlines()[-1] for out in outputs]
    assert last_lines[0] == last_lines[1]  # the workers split the evaluation and share its counts
    match = LAST_LINE.match(last_lines[0])
    assert match, last_lines[0]
    training_form, deploy_form = (float(v) for v in match.groups())
    assert 0.0 < training_form <= 1.0 and abs(training_form - deploy_form) <= 0.01
    digests = [re.search(r"weights digest: (\S+)", out).group(1) for out in outputs]
    assert digests[0] == digests[1]

    header = open(tmp_path / "training_log.csv").readline()
    assert "logits_miou" in header and "val_logits_miou" in header
    for name in ("model_train.keras", "model_deploy.keras", "predictions.png"):
        assert os.path.exists(tmp_path / name) and os.path.exists(tmp_path / "worker_1" / name)
    with open(tmp_path / "run_config.json") as f:
        assert json.load(f)["miou"] == last_lines[0]
    chief = keras.saving.load_model(tmp_path / "model_train.keras")
    other = keras.saving.load_model(tmp_path / "worker_1" / "model_train.keras")
    for a, b in zip(chief.weights, other.weights):  # the head's own BatchNorm statistics too
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


@pytest.mark.slow
def test_two_workers_killed_in_mixed_bfloat16_resume_and_end_as_one_model(tmp_path):
    extra = [*SEGMENTATION, "--epochs", "2", "--steps_per_epoch", "12", "--checkpoint_every", "3"]
    extra += ["--mixed_precision", "mixed_bfloat16"]
    workers = _start_workers(tmp_path, *extra, stdout=subprocess.DEVNULL)
    step_file = tmp_path / "last_step"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and all(w.poll() is None for w in workers):
        if step_file.exists() and step_file.read_text().strip() and int(step_file.read_text()) >= 7:
            break
        time.sleep(0.2)
    assert all(w.poll() is None for w in workers), "training ended before it could be killed"
    for worker in workers:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    killed_at = int(step_file.read_text())
    assert 7 <= killed_at < 24

    outputs = _two_workers(tmp_path, *extra)
    resumed = [
        re.search(r"Resuming from the last checkpoint: epoch (\d+), optimizer step (\d+)", out)
        for out in outputs
    ]
    assert all(resumed), outputs[0][-3000:] + outputs[1][-3000:]
    steps = {int(match.group(2)) for match in resumed}
    assert len(steps) == 1 and killed_at - 3 <= steps.pop() <= killed_at  # both from one step
    assert all("precision mixed_bfloat16" in out for out in outputs)
    last_lines = [out.strip().splitlines()[-1] for out in outputs]
    assert last_lines[0] == last_lines[1] and LAST_LINE.match(last_lines[0]), last_lines
    digests = [re.search(r"weights digest: (\S+)", out).group(1) for out in outputs]
    assert digests[0] == digests[1]


def test_classification_flags_are_refused_with_segmentation(tmp_path):
    result = train_cli(tmp_path, "fashion_mnist_scenes", *SEGMENTATION, "--mixup", "0.2")
    one_error_line(result)
    assert "--mixup apply to classification only" in result.stderr
    assert not os.path.exists(tmp_path / "run_config.json")
    one_error_line(
        train_cli(tmp_path, "fashion_mnist_scenes", *SEGMENTATION, "--output_stride", "4")
    )


def test_segmentation_defaults_follow_the_input_size():
    """--task segmentation trains with its own recipe; the head's defaults depend on the input
    size; a flag given replaces only its own option."""
    from train import recipes

    recipe = recipes.get_recipe(recipes.DEFAULT_RECIPE["segmentation"], image_size=64)
    assert (recipe.batch_size, recipe.optimizer) == (32, "sgd")
    assert abs(recipe.scaled_lr(recipe.batch_size) - 0.4) < 1e-9
    small, large = recipes.segmentation_head(64), recipes.segmentation_head(512)
    assert small["output_stride"] == 16 and small["low_level_skip"] and small["image_refine"]
    assert large["output_stride"] == 8 and not large["low_level_skip"] and large["scale_augment"]
    assert recipes.segmentation_head(64, output_stride=8, image_refine=False) == {
        **small,
        "output_stride": 8,
        "image_refine": False,
    }
    assert recipes.DEFAULT_RECIPE["classification"] == "small"


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
