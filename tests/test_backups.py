"""The trainer's backups: the last two are kept, a restart loads the newest readable one, and
workers agree on a step they all hold."""

import json

import keras
import numpy as np
import pytest

from train.callbacks import BackupEveryStepsAndEpoch


def _model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def _train_and_back_up(backup_dir, saves):
    """Train a step before each of `saves` backups; returns the weights at each backup."""
    model = _model()
    backup = BackupEveryStepsAndEpoch(str(backup_dir), save_freq=1)
    backup.set_model(model)
    x, y = np.ones((4, 3), "float32"), np.zeros((4, 2), "float32")
    saved = []
    for _ in range(saves):
        model.train_on_batch(x, y)
        backup._save_model()
        saved.append([w.numpy().copy() for w in model.weights])
    return saved


def _restart(backup_dir, agree=None):
    model = _model()
    backup = BackupEveryStepsAndEpoch(str(backup_dir), save_freq=1, agree=agree)
    backup.set_model(model)
    backup.on_train_begin()
    return model


def _assert_weights(model, expected):
    for variable, value in zip(model.weights, expected):
        np.testing.assert_array_equal(variable.numpy(), value)


def test_the_last_two_backups_are_kept_and_the_newest_is_loaded(tmp_path):
    saved = _train_and_back_up(tmp_path, 3)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [
        "latest.weights.h5",
        "previous.weights.h5",
        "previous_training_metadata.json",
        "training_metadata.json",
    ]
    assert json.loads((tmp_path / "training_metadata.json").read_text())["step"] == 3
    assert json.loads((tmp_path / "previous_training_metadata.json").read_text())["step"] == 2
    model = _restart(tmp_path)
    assert int(model.optimizer.iterations.numpy()) == 3
    _assert_weights(model, saved[2])


def test_a_worker_one_backup_ahead_resumes_from_the_step_all_hold(tmp_path):
    saved = _train_and_back_up(tmp_path, 3)
    asked = []
    model = _restart(tmp_path, agree=lambda newest: asked.append(newest) or 2)
    assert asked == [3]
    assert int(model.optimizer.iterations.numpy()) == 2
    _assert_weights(model, saved[1])


def test_workers_start_afresh_when_one_holds_no_backup(tmp_path):
    _train_and_back_up(tmp_path, 2)
    model = _restart(tmp_path, agree=lambda newest: 0)
    assert int(model.optimizer.iterations.numpy()) == 0


def test_backups_from_another_run_are_refused_in_one_message(tmp_path):
    _train_and_back_up(tmp_path, 2)
    with pytest.raises(ValueError, match=r"steps 2, 1\) do not include step 7.*--overwrite"):
        _restart(tmp_path, agree=lambda newest: 7)


def test_an_unreadable_newest_backup_falls_back_to_the_previous(tmp_path):
    saved = _train_and_back_up(tmp_path, 2)
    (tmp_path / "latest.weights.h5").write_bytes(b"cut short")
    model = _restart(tmp_path)
    assert int(model.optimizer.iterations.numpy()) == 1
    _assert_weights(model, saved[0])
