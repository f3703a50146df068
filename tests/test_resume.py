"""Stopping and resuming `python -m train`: SIGINT, SIGTERM and SIGKILL mid-epoch and at an epoch's
last step all end at the planned optimizer step; SIGINT/SIGTERM end in one line; one trainer per
model_dir; a run whose model does not compute finite numbers is not finished."""

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from tests.helpers import REPO, TINY, cli_env, write_image_folder
from train import callbacks as cb
from train import guards

# `python -m train` that stops after the batch reaching optimizer step PAUSE_AT_STEP until a signal
# arrives (or 60 s pass): the test signals it at that exact step. SIGINT is handled as from a
# terminal: a test run started in the background (`cmd &` in a script) inherits SIGINT ignored, and
# the trainer rightly leaves an ignored SIGINT ignored.
PAUSING_TRAINER = """
import os, runpy, signal, sys, time
from train import callbacks as cb, guards
signal.signal(signal.SIGINT, signal.default_int_handler)
pause_at = int(os.environ["PAUSE_AT_STEP"])
original = cb.ResumeReporter.on_train_batch_end
def on_train_batch_end(self, batch, logs=None):
    original(self, batch, logs)
    if int(self.model.optimizer.iterations.numpy()) == pause_at:
        open(os.environ["PAUSED_FILE"], "w").close()
        deadline = time.monotonic() + 60
        while guards.SIGNALS.received is None and time.monotonic() < deadline:
            time.sleep(0.02)
cb.ResumeReporter.on_train_batch_end = on_train_batch_end
sys.argv = ["train", *sys.argv[1:]]
runpy.run_module("train", run_name="__main__")
"""


def _args(model_dir, dataset, *extra):
    return ["--dataset", dataset, "--model_dir", str(model_dir), *TINY, *extra]


def _run(args):
    return subprocess.run(
        [sys.executable, "-m", "train", *args],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _messages(stderr):
    """stderr without TensorFlow's and absl's own log lines."""
    return [
        line
        for line in stderr.strip().splitlines()
        if line and not re.match(r"^(I|W|E)\d{4} |^WARNING: All log messages|^To enable", line)
    ]


@pytest.mark.slow
def test_every_signal_at_every_moment_resumes_to_the_planned_step(tmp_path):
    """3 epochs x 4 steps, checkpoints every 3; stopped six times (each signal once mid-epoch and
    once after an epoch's last step, before its validation and epoch-end backup; the last at the
    run's last step), then run to the end: the last optimizer step is 12 (the old code replayed a
    stopped epoch from its start), each epoch is logged at most once, the lr ends at 0."""
    root = write_image_folder(tmp_path / "photos")
    model_dir = tmp_path / "run"
    args = _args(
        model_dir, f"folder:{root}", "--epochs", "3", "--steps_per_epoch", "4",
        "--checkpoint_every", "3",
    )  # fmt: skip
    paused = tmp_path / "paused"
    stops = [
        (signal.SIGINT, 2, 0),  # (signal, step it arrives at, step the next run resumes from)
        (signal.SIGTERM, 4, 2),
        (signal.SIGKILL, 6, 4),
        (signal.SIGINT, 8, 4),
        (signal.SIGTERM, 10, 8),
        (signal.SIGKILL, 12, 10),
    ]
    for number, (signum, step, resumed_from) in enumerate(stops):
        paused.unlink(missing_ok=True)
        run = subprocess.Popen(
            [sys.executable, "-c", PAUSING_TRAINER, *args],
            cwd=REPO,
            env=cli_env(PAUSE_AT_STEP=str(step), PAUSED_FILE=str(paused)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while not paused.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert paused.exists(), run.communicate()[1][-3000:]
        if number == 0:  # a second trainer on the same model_dir is refused, the first goes on
            second = subprocess.run(
                [sys.executable, "-m", "train", *args],
                cwd=REPO,
                env=cli_env(),
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert second.returncode == 1 and _messages(second.stderr) == [
                f"error: --model_dir {model_dir} is in use by another trainer (pid {run.pid} on "
                f"{os.uname().nodename}): wait for it to end, or pass another --model_dir."
            ], second.stderr[-3000:]
        run.send_signal(signum)
        out, err = run.communicate(timeout=120)
        if resumed_from:
            assert re.search(
                f"Resuming from the last checkpoint: epoch {resumed_from // 4 + 1}, "
                f"optimizer step {resumed_from}, batch {resumed_from % 4} of 4",
                out,
            ), out
        else:
            assert "Resuming" not in out
        if signum == signal.SIGKILL:
            assert run.returncode == -signal.SIGKILL
            assert (model_dir / "train.lock").exists()  # left behind; the next run takes it over
            continue
        assert run.returncode == 128 + signum, (out[-2000:], err[-2000:])
        assert _messages(err) == [
            f"interrupted by {signum.name}: progress is checkpointed (optimizer step {step}, "
            f"{model_dir / 'backup'}); run the same command to resume."
        ], err[-3000:]
        assert not (model_dir / "train.lock").exists()
    last = _run(args)
    assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
    assert "optimizer step 10, batch 2 of 4" in last.stdout
    assert last.stdout.strip().splitlines()[-1].startswith("accuracy: ")
    assert (model_dir / "last_step").read_text() == "12"  # planned: 3 epochs x 4 steps
    with open(model_dir / "training_log.csv") as f:
        rows = list(csv.DictReader(f))
    epochs = [int(row["epoch"]) for row in rows]
    assert epochs == sorted(set(epochs)) and epochs[-1] == 2, epochs
    assert float(rows[-1]["learning_rate"]) == pytest.approx(0.0, abs=1e-9)
    assert json.loads((model_dir / "run_config.json").read_text())["finished"]


@pytest.mark.slow
def test_a_diverged_run_saves_no_model_and_is_never_finished(tmp_path):
    """--base_lr 1e12: the loss or the BatchNorm statistics overflow; the run ends in one error
    line naming the remedy, saves no model, is not marked finished, and the same command says so
    again instead of reporting a finished run."""
    root = write_image_folder(tmp_path / "photos")
    model_dir = tmp_path / "run"
    args = _args(
        model_dir, f"folder:{root}", "--epochs", "1", "--steps_per_epoch", "3",
        "--base_lr", "1e12", "--warmup_epochs", "2",
    )  # fmt: skip
    for _attempt in range(2):  # the same command again: the same error, not a finished run
        result = _run(args)
        assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
        lines = _messages(result.stderr)
        assert len(lines) == 2 and lines[1].startswith("error: training diverged"), lines
        assert lines[0] == (  # a count that cannot be honoured is said
            "warning: 2 warm-up epoch(s) are 6 steps, more than the run's 3: warming up over 2 "
            "step(s) (--warmup_epochs)."
        )
        assert "lower --base_lr" in lines[1] and "--overwrite" in lines[1], lines
        assert not (model_dir / "model_deploy.keras").exists()
        assert not (model_dir / "model_train.keras").exists()
        assert not json.loads((model_dir / "run_config.json").read_text())["finished"]
        assert "accuracy: training_form" not in result.stdout


def _model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization()])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def test_a_finite_batch_loss_with_a_nan_validation_loss_stops_the_run():
    model = _model()
    stopper = cb.NaNStopper()
    stopper.set_model(model)
    stopper.on_batch_end(0, {"loss": 1.4e9})
    assert not model.stop_training and stopper.stopped_at is None
    stopper.on_epoch_end(0, {"loss": 1.4e9, "val_loss": math.nan})
    assert model.stop_training and stopper.stopped_at == 0
    assert stopper.what == "the validation loss became nan after epoch 1"


def test_divergence_names_statistics_that_overflowed():
    model = _model()
    assert guards.divergence(model, val_loss=0.5) is None
    model.layers[0].moving_variance.assign(np.full(3, np.inf, "float32"))
    assert "moving_variance" in guards.divergence(model)
    assert "evaluation loss is nan" in guards.divergence(_model(), val_loss=math.nan)


def test_a_mid_epoch_backup_resumes_at_its_batch(tmp_path):
    """fit_resumable: a backup after 6 batches of 4-batch epochs finishes epoch 2 (2 batches, then
    stops at its end) before the rest; a fresh run is one fit of whole epochs."""
    backup = cb.BackupEveryStepsAndEpoch(str(tmp_path), save_freq=100, steps_per_epoch=4)
    backup.set_model(_model())
    calls = []

    def fit(steps):
        calls.append((steps, backup.stop_after_epoch))
        backup.batches_done += steps

    guards.fit_resumable(fit, backup, epochs=3, steps_per_epoch=4, announce=lambda *a, **k: 0)
    assert calls == [(4, None)]
    backup._plan = None
    backup.batches_done = 6
    backup._save_model()
    calls.clear()
    said = []
    guards.fit_resumable(
        fit, backup, epochs=3, steps_per_epoch=4, announce=lambda m, **k: said.append(m)
    )
    assert said == ["Resuming from the last checkpoint: epoch 2, optimizer step 0, batch 2 of 4."]
    assert calls == [(2, 1), (4, None)]
    calls.clear()
    backup.batches_done = 6
    stopped = guards.fit_resumable(
        fit, backup, epochs=3, steps_per_epoch=4, stopped=lambda: True, announce=lambda *a, **k: 0
    )
    assert stopped is False and calls == [(2, 1)]  # a NaN at the partial epoch's end: no more
