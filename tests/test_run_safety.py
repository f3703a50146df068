"""A training run survives bad input: --overwrite with a wrong data path or weights file keeps the
run that was there; a full disk is one error line and leaves the last good files (the run
resumes); a malformed run_config.json or backup metadata is named, field and file; a checkpoint of
another class count says so (never Keras's message, which prints weight values)."""

import csv
import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import keras
import numpy as np
import pytest

import repvgg_keras as rk
from tests.helpers import REPO, TINY, cli_env, one_error_line, train_cli, write_image_folder
from train import callbacks, lock, run_dir, staged

TINY_SPEC = dataclasses.replace(
    rk.get_spec("RepVGG_A0"), num_blocks=(1, 1, 1, 1), width_multipliers=(0.25, 0.25)
)
RUN = ("--epochs", "1", "--steps_per_epoch", "2")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("tiny"))


def _tiny_model(classes, spec=TINY_SPEC):
    return rk.RepVGG(spec, input_shape=(32, 32, 3), classes=classes)


def _finished_run(model_dir):
    """A folder holding what a finished run leaves (contents are stand-ins: nothing reads them)."""
    model_dir.mkdir(parents=True)
    (model_dir / "run_config.json").write_text(
        json.dumps({"flags": {"model": "RepVGG_A0"}, "finished": True, "accuracy": "a"})
    )
    (model_dir / "backup").mkdir()
    for name in ("model_train.keras", "model_deploy.keras", "training_log.csv", "last_step"):
        (model_dir / name).write_bytes(name.encode() * 10)
    (model_dir / "logs").mkdir()
    (model_dir / "logs" / "events").write_bytes(b"e")
    return {
        str(p.relative_to(model_dir)): p.read_bytes() for p in model_dir.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize(
    "dataset,extra,named",
    [
        ("folder:/no_such_folder", (), "/no_such_folder"),
        (None, ("--init_weights", "/no_such_file.keras"), "/no_such_file.keras"),
    ],
    ids=["data", "init_weights"],
)
def test_overwrite_keeps_the_run_when_the_new_inputs_are_wrong(
    tmp_path, tiny_folder, dataset, extra, named
):
    model_dir = tmp_path / "run"
    before = _finished_run(model_dir)
    result = train_cli(model_dir, dataset or f"folder:{tiny_folder}", *RUN, *extra, "--overwrite")
    assert named in one_error_line(result)
    after = {
        str(p.relative_to(model_dir)): p.read_bytes() for p in model_dir.rglob("*") if p.is_file()
    }
    assert after == before


@pytest.mark.parametrize(
    "content,named",
    [
        ('{"flags": null, "finished": false}', '"flags" is null'),
        ('{"flags": [1, 2], "finished": false}', '"flags" is [1, 2]'),
        ('{"flags": 3}', '"flags" is 3'),
        ('{"flags": {}, "finished": "yes"}', '"finished" is "yes"'),
        ('{"flags": {}, "classes": 0}', '"classes" is 0'),
        ('{"flags": {}, "finished": true, "accuracy": [0.5]}', '"accuracy" is [0.5]'),
        ("[]", "not a JSON object"),
        ("7", "not a JSON object"),
        ('{"finished": true}', 'lacks the field "flags"'),
        ("{not json", "unreadable"),
    ],
)
def test_a_malformed_run_config_is_named_with_its_field(tmp_path, content, named):
    (tmp_path / "run_config.json").write_text(content)
    with pytest.raises(run_dir.UsageError) as caught:
        run_dir.prepare_model_dir(str(tmp_path), {"model": "RepVGG_A0"}, overwrite=False)
    message = str(caught.value)
    assert str(tmp_path / "run_config.json") in message and named in message, message
    assert "--overwrite" in message and "remove the file" in message, message
    assert (tmp_path / "run_config.json").read_text() == content  # left for the user to fix


def test_a_malformed_run_config_through_the_cli_is_one_error_line(tmp_path, tiny_folder):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    (model_dir / "run_config.json").write_text('{"flags": null}')
    line = one_error_line(train_cli(model_dir, f"folder:{tiny_folder}", *RUN, timeout=300))
    assert '"flags" is null' in line and "run_config.json" in line, line


@pytest.mark.parametrize(
    "metadata,named",
    [
        ("[1]", "not a JSON object"),
        ('{"epoch": 0, "batches": null, "step": 2}', '"batches" is null'),
        ('{"epoch": 0, "batches": "2", "step": 2}', '"batches" is "2"'),
        ('{"epoch": 0, "step": 2}', '"batches" is null'),
        ('{"epoch": 0, "batches": 2, "step": -1}', '"step" is -1'),
        ("", "unreadable"),
    ],
)
def test_malformed_backup_metadata_is_named_with_its_field(tmp_path, metadata, named):
    backup_dir = tmp_path / "backup"
    backup_dir.mkdir()
    (backup_dir / "latest.weights.h5").write_bytes(b"x")
    (backup_dir / "training_metadata.json").write_text(metadata)
    backup = callbacks.BackupEveryStepsAndEpoch(str(backup_dir), steps_per_epoch=2)
    with pytest.raises(ValueError) as caught:
        backup.plan()
    message = str(caught.value)
    assert "training_metadata.json" in message and named in message, message
    assert "--overwrite" in message, message
    # The line a stopped trainer ends with does not fail on it either.
    assert "interrupted by SIGINT" in lock.interrupted_message(signal.SIGINT, str(backup_dir))


def test_a_weights_file_of_another_class_count_or_variant_is_named(tmp_path):
    path = str(tmp_path / "two.weights.h5")
    _tiny_model(2).save_weights(path)
    assert callbacks.weights_file_mismatch(path, _tiny_model(2)) is None
    assert (
        callbacks.weights_file_mismatch(path, _tiny_model(3))
        == "holds a 2-class classifier, the model has 3 classes"
    )
    wider = dataclasses.replace(TINY_SPEC, width_multipliers=(0.5, 0.5))
    message = callbacks.weights_file_mismatch(path, _tiny_model(2, wider))
    assert message.startswith("holds 52 weight tensors shaped for another model"), message


def test_staging_keeps_the_previous_file_when_a_write_fails(tmp_path):
    target = tmp_path / "model.keras"
    target.write_text("good")

    def fail(error):
        with staged.staging(str(target)) as path:
            with open(path, "w") as f:
                f.write("half")
            raise error

    with pytest.raises(RuntimeError):
        fail(RuntimeError("killed"))
    with pytest.raises(staged.DiskFullError) as caught:
        fail(OSError(errno.ENOSPC, "No space left on device"))
    assert str(target) in str(caught.value) and "free space" in str(caught.value)
    assert target.read_text() == "good" and os.listdir(tmp_path) == ["model.keras"]
    staged.write_text(str(target), "new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["model.keras"]


def test_the_csv_log_writes_what_keras_csvlogger_writes(tmp_path):
    """The staged CSV log keeps Keras's columns and values, and appends to a resumed run's."""
    ours, theirs = tmp_path / "ours.csv", tmp_path / "theirs.csv"
    epochs = [
        {"loss": 0.5, "accuracy": np.float32(0.25), "val_loss": 0.75, "learning_rate": 0.1},
        {"loss": 0.25, "accuracy": np.float32(0.5), "val_loss": 0.5, "learning_rate": 0.05},
    ]
    for epoch, logs in enumerate(epochs):  # a new logger each epoch: a resumed run appends
        for logger in (
            callbacks.CsvLog(str(ours)),
            keras.callbacks.CSVLogger(str(theirs), append=True),
        ):
            logger.on_train_begin()
            logger.on_epoch_end(epoch, dict(logs))
            logger.on_train_end()
    assert ours.read_text() == theirs.read_text()
    assert [row["epoch"] for row in csv.DictReader(ours.open())] == ["0", "1"]


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a folder on a tmpfs of that size (needs root; skipped otherwise)."""
    mounted = []

    def mount(size):
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}): needs root")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.slow
@pytest.mark.parametrize("size", ["900k", "2600k"], ids=["at_the_first_backup", "at_the_models"])
def test_a_full_disk_is_one_error_line_and_the_run_resumes(small_disk, tiny_folder, size):
    """No room for a checkpoint (900k), or for the final models (2600k): one line, exit 1 (no
    segmentation fault), only whole files under their names; with room again the run resumes."""
    disk = small_disk(size)
    model_dir = disk / "run"
    line = one_error_line(train_cli(model_dir, f"folder:{tiny_folder}", *RUN, timeout=300))
    assert "no space left" in line and str(model_dir) in line and "free space" in line, line
    for path in model_dir.rglob("*"):
        assert not path.name.startswith(".tmp-"), path
        if path.suffix == ".keras":
            assert zipfile.is_zipfile(path) and zipfile.ZipFile(path).testzip() is None, path
        if path.name.endswith(".weights.h5"):
            assert callbacks._h5_readable(str(path)), path
    subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
    again = train_cli(model_dir, f"folder:{tiny_folder}", *RUN, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert again.stdout.strip().splitlines()[-1].startswith("accuracy: ")


def _stop_after_first_checkpoint(model_dir, dataset, args):
    """Start a long run, SIGTERM it once it wrote a checkpoint: an unfinished run to resume."""
    process = subprocess.Popen(
        [sys.executable, "-m", "train", "--dataset", dataset, "--model_dir", str(model_dir)]
        + [*TINY, *args],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not (model_dir / "backup" / "training_metadata.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, process.stderr.read()


@pytest.mark.slow
def test_resuming_after_a_class_was_added_names_both_counts(tmp_path):
    data = write_image_folder(tmp_path / "data")
    model_dir = tmp_path / "run"
    args = ("--epochs", "50", "--steps_per_epoch", "2", "--checkpoint_every", "1")
    _stop_after_first_checkpoint(model_dir, f"folder:{data}", args)
    write_image_folder(data, classes=("c",))
    line = one_error_line(train_cli(model_dir, f"folder:{data}", *args, timeout=300))
    assert "the class count changed from 2 to 3 since this run started" in line, line
    assert "run_config.json" in line and "--overwrite" in line and len(line) < 1000, line
    # A run recorded without its class count (an older version): the backup's classifier says it.
    recorded = json.loads((model_dir / "run_config.json").read_text())
    del recorded["classes"]
    (model_dir / "run_config.json").write_text(json.dumps(recorded))
    line = one_error_line(train_cli(model_dir, f"folder:{data}", *args, timeout=300))
    assert "holds a 2-class classifier, the model has 3 classes" in line, line
    assert "--overwrite" in line and len(line) < 1000, line


def test_a_backbone_weights_file_of_another_variant_is_named(tmp_path):
    """--task segmentation --init_weights x.weights.h5: a file lacking the backbone's tensors is
    named before Keras loads it (Keras's message prints weight values)."""
    from train import recipes, segmentation_task

    path = str(tmp_path / "classifier.weights.h5")
    _tiny_model(2).save_weights(path)
    head = recipes.segmentation_head(
        32,
        output_stride=None,
        head_channels=None,
        low_level_skip=None,
        image_refine=None,
        scale_augment=None,
    )
    options = {**head, "fast": False, "aux_weight": 0.4}
    for widths, fits in (((0.25, 0.25), True), ((0.5, 0.5), False)):
        spec = dataclasses.replace(TINY_SPEC, width_multipliers=widths)
        model = segmentation_task.build_model(
            spec, 32, 5, options=options, quant_friendly=False, bn_synchronized=False
        )
        if fits:  # the classifier's file holds the backbone's tensors (and more)
            segmentation_task.init_backbone(model, path, spec.name)
            continue
        with pytest.raises(ValueError) as caught:
            segmentation_task.init_backbone(model, path, spec.name)
        message = str(caught.value)
        assert message.startswith(f"--init_weights {path} lacks 22 of the 50 weight tensors")
        assert "--width_multipliers" in message and len(message) < 400, message


def test_an_error_line_never_carries_weight_values():
    """A library message that prints tensors (Keras's loading errors do) loses the values."""
    from train.__main__ import ERROR_LENGTH, one_line

    values = np.random.default_rng(0).normal(size=(40, 3))
    message = f"Layer 'predictions' expected\n<Variable shape=(40, 3), value={values}> and more"
    line = one_line(message * 20)
    assert "\n" not in line and "value=[...]>" in line and "0." not in line, line
    assert len(line) < ERROR_LENGTH + 80, len(line)
