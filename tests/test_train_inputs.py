"""The training CLI on what users get wrong: a model_dir of another run, nonsense flag values, image
folders with unreadable images or empty classes, misspelt dataset names, small-image defaults.
Each must end in one `error:` line (or a named warning), never in a traceback or a lost run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import (
    REPO,
    cli_env,
    one_error_line,
    train_cli,
    write_image_folder,
    write_png,
)
from train import classification_data, recipes


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("tiny"))


@pytest.mark.slow
def test_finished_run_is_kept_and_another_configuration_is_refused(tmp_path, tiny_folder):
    model_dir = tmp_path / "run"
    args = ("--epochs", "1", "--steps_per_epoch", "2")
    first = train_cli(model_dir, f"folder:{tiny_folder}", *args)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    accuracy = first.stdout.strip().splitlines()[-1]
    assert accuracy.startswith("accuracy: ")
    recorded = json.loads((model_dir / "run_config.json").read_text())
    assert recorded["finished"] and recorded["flags"]["width_multipliers"] == [0.25, 0.25]
    assert not (model_dir / "backup").exists()
    models = {
        n: (model_dir / n).read_bytes()
        for n in ("model_train.keras", "model_deploy.keras", "training_log.csv")
    }
    stamps = {n: os.stat(model_dir / n).st_mtime_ns for n in models}

    again = train_cli(
        model_dir, f"folder:{tiny_folder}", *args, "--verbose", "1", "--checkpoint_every", "7"
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "finished run of this configuration" in again.stdout
    assert again.stdout.strip().splitlines()[-1] == accuracy  # the recorded result, not a new run

    other = train_cli(model_dir, f"folder:{tiny_folder}", *args, "--quant_friendly")
    line = one_error_line(other)
    assert "--quant_friendly: recorded False, given True" in line and "--overwrite" in line, line
    longer = train_cli(
        model_dir, f"folder:{tiny_folder}", "--epochs", "3", "--steps_per_epoch", "2"
    )
    assert "--epochs: recorded 1, given 3" in one_error_line(longer)
    for (
        name,
        content,
    ) in models.items():  # neither the rerun nor the refusals touched the finished run
        assert (model_dir / name).read_bytes() == content and os.stat(
            model_dir / name
        ).st_mtime_ns == stamps[name]

    fresh = train_cli(model_dir, f"folder:{tiny_folder}", *args, "--quant_friendly", "--overwrite")
    assert fresh.returncode == 0, fresh.stdout[-2000:] + fresh.stderr[-2000:]
    assert "Resuming" not in fresh.stdout
    assert (
        len((model_dir / "training_log.csv").read_text().strip().splitlines()) == 2
    )  # header + one epoch
    assert (
        json.loads((model_dir / "run_config.json").read_text())["flags"]["quant_friendly"] is True
    )


@pytest.mark.slow
def test_run_of_an_older_version_is_refused_unless_overwrite(tmp_path):
    """backup/ without run_config.json: its configuration is unknown, so nothing is resumed or replaced."""
    model_dir = tmp_path / "old"
    (model_dir / "backup").mkdir(parents=True)
    (model_dir / "backup" / "latest.weights.h5").write_bytes(b"x" * 6000)
    (model_dir / "notes.txt").write_text("mine")
    line = one_error_line(train_cli(model_dir, "folder:/nonexistent", "--epochs", "1"))
    assert "backup" in line and "run_config.json" in line and "--overwrite" in line, line
    assert (model_dir / "backup" / "latest.weights.h5").exists() and not (
        model_dir / "run_config.json"
    ).exists()
    # --overwrite reads the new run's data before it clears anything
    line = one_error_line(
        train_cli(model_dir, "folder:/nonexistent", "--epochs", "1", "--overwrite")
    )
    assert "/nonexistent' does not exist" in line, line
    # The new run's data does not exist: nothing of the old one is cleared.
    assert (model_dir / "backup" / "latest.weights.h5").exists()
    assert (model_dir / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--epochs", "0", "--epochs must be >= 1, not 0"),
        ("--epochs", "-1", "--epochs must be >= 1, not -1"),
        ("--batch_size", "0", "--batch_size must be >= 1"),
        ("--image_size", "16", "--image_size must be >= 32"),
        ("--base_lr", "-0.1", "--base_lr must be >= 0"),
        ("--base_lr", "nan", "--base_lr must be >= 0, not nan"),
        ("--min_area", "0", "--min_area must be > 0 and <= 1"),
        ("--label_smoothing", "1", "--label_smoothing must be >= 0 and < 1"),
        ("--steps_per_epoch", "0", "--steps_per_epoch must be >= 1"),
        ("--num_blocks", "1,1", "--num_blocks takes 4 positive integers"),
        ("--width_multipliers", "a,b", "--width_multipliers takes 2 positive numbers"),
    ],
)
def test_nonsense_flag_values_are_refused_before_anything_is_written(
    tmp_path, flag, value, message
):
    model_dir = tmp_path / "run"
    line = one_error_line(train_cli(model_dir, "fashion_mnist", flag, value, timeout=120))
    assert message in line, line
    assert not model_dir.exists()


def test_unreadable_image_is_skipped_and_named(tmp_path, capsys):
    root = write_image_folder(tmp_path / "photos")
    (root / "train" / "a" / "broken.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "train" / "b" / "notes.txt").write_text("not an image")  # ignored, as tfds does
    train, evaluation, info = classification_data.load(
        f"folder:{root}", image_size=32, batch_size=4, seed=0
    )
    warning = capsys.readouterr().err
    assert "skipped 1 unreadable image(s) of 21" in warning and "train/a/broken.jpg" in warning, (
        warning
    )
    assert (info.num_classes, info.train_examples, info.eval_examples) == (2, 16, 4)
    batches = list(train.take(8))  # two passes over the training images: none fails to decode
    assert len(batches) == 8 and all(x.shape == (4, 32, 32, 3) for x, _ in batches)
    assert sum(int(x.shape[0]) for x, _ in evaluation) == 4


def test_every_listed_format_is_read_and_every_skipped_entry_named(tmp_path, capsys):
    """JPEG, PNG, GIF and BMP are read (class c has only GIF and BMP); a text file, a folder inside a
    class folder, a file beside the class folders and an unused split are named in one warning."""
    from PIL import Image

    root = write_image_folder(tmp_path / "photos", train_per_class=1, test_per_class=1)
    pixels = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    for split, names in (("train", ("0.gif", "1.bmp", "2.jpg")), ("test", ("0.bmp",))):
        for name in names:
            (root / split / "c").mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / split / "c" / name)
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    (root / "train" / "b" / "more").mkdir()
    (root / "test" / "readme.md").write_text("about")
    write_png(
        root / "val" / "a" / "0.png", seed=1
    )  # test/ is the evaluation split, val/ is not read
    train, evaluation, info = classification_data.load(
        f"folder:{root}", image_size=32, batch_size=4, seed=0
    )
    assert (info.num_classes, info.train_examples, info.eval_examples) == (3, 5, 3)
    labels = [int(label) for _, y in evaluation for label in np.argmax(y, -1)]
    assert sorted(labels) == [0, 1, 2]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        f"warning: ignored 4 entries that are not .jpg/.png/.gif/.bmp files of a class folder in "
        f"{root}: val/, train/a/notes.txt, train/b/more/, test/readme.md"
    ], warnings


def test_counts_that_cannot_be_honoured_are_named(tmp_path, capsys):
    root = write_image_folder(tmp_path / "photos")  # 16 train, 4 test images
    _, evaluation, info = classification_data.load(
        f"folder:{root}", image_size=32, batch_size=20, train_take=100, eval_take=50
    )
    assert (info.train_examples, info.eval_examples) == (16, 4)
    assert sum(int(x.shape[0]) for x, _ in evaluation) == 4
    warnings = [line for line in capsys.readouterr().err.splitlines() if line]
    assert warnings == [
        "warning: --train_take 100 is more than the 16 examples of the train split: using all 16.",
        "warning: --eval_take 50 is more than the 4 examples of the test split: using all 4.",
        "warning: --batch_size 20 is more than the 16 training examples: each batch holds some "
        "of them more than once.",
    ], warnings
    classification_data.load(
        f"folder:{root}", image_size=32, batch_size=8, train_take=10, eval_take=4
    )
    assert capsys.readouterr().err == ""  # counts that fit: nothing to say


def test_empty_folders_are_named(tmp_path):
    empty_root = tmp_path / "empty"
    empty_root.mkdir()
    with pytest.raises(ValueError, match=r"has no train/ or test/ \(it has no subfolders\)"):
        classification_data.load(f"folder:{empty_root}", image_size=32, batch_size=4)
    no_test = write_image_folder(tmp_path / "no_test", test_per_class=0)
    with pytest.raises(ValueError, match=r"has no test/ \(found train/\)"):
        classification_data.load(f"folder:{no_test}", image_size=32, batch_size=4)
    root = write_image_folder(tmp_path / "photos")
    (root / "train" / "c").mkdir()
    (root / "train" / "c" / "readme.txt").write_text("no images yet")
    (root / "test" / "d").mkdir()
    with pytest.raises(
        ValueError, match=r"no readable .* image in train/c/, test/d/, train/d/ \(missing\)"
    ):
        classification_data.load(f"folder:{root}", image_size=32, batch_size=4)


@pytest.mark.slow
def test_empty_class_through_the_cli_is_one_error_line(tmp_path):
    root = write_image_folder(tmp_path / "photos", train_per_class=2, test_per_class=1)
    (root / "test" / "b" / "0.png").unlink()
    line = one_error_line(train_cli(tmp_path / "run", f"folder:{root}", "--epochs", "1"))
    assert "test/b/" in line, line


@pytest.mark.slow
def test_unknown_dataset_names_the_closest_ones_in_one_line():
    with pytest.raises(classification_data.DatasetNotFound) as caught:
        classification_data.load("fashon_mnist", image_size=32, batch_size=4)
    message = str(caught.value)
    assert "did you mean fashion_mnist" in message and "\n" not in message and len(message) < 300, (
        message
    )
    with pytest.raises(classification_data.DatasetNotFound, match="Unknown dataset 'no_such_name'"):
        classification_data.load("no_such_name", image_size=32, batch_size=4)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["dataset", "data_dir", "model_dir"])
def test_cli_mistakes_end_in_one_error_line(tmp_path, case):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    args = {
        "dataset": ("fashon_mnist", tmp_path / "run", []),
        "data_dir": ("fashion_mnist", tmp_path / "run", ["--data_dir", str(blocker / "tfds")]),
        "model_dir": ("fashion_mnist", blocker / "run", []),
    }[case]
    command = [
        sys.executable,
        "-m",
        "train",
        "--dataset",
        args[0],
        "--model_dir",
        str(args[1]),
        "--epochs",
        "1",
        "--image_size",
        "32",
        *args[2],
    ]
    result = subprocess.run(
        command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300
    )
    line = one_error_line(result)
    expected = {
        "dataset": "did you mean fashion_mnist",
        "data_dir": f"Not a directory: {blocker}",
        "model_dir": "cannot create --model_dir",
    }[case]
    assert expected in line, line


def test_small_inputs_get_a_milder_crop_by_default():
    """Random-resized-crop down to 8% of a 32 px image trains on a few upscaled pixels."""
    assert recipes.get_recipe("small", image_size=32).min_area == recipes.SMALL_IMAGE_MIN_AREA
    assert recipes.get_recipe("paper120", image_size=64).min_area == recipes.SMALL_IMAGE_MIN_AREA
    assert recipes.get_recipe("small", image_size=224).min_area == 0.5
    assert recipes.get_recipe("paper120", image_size=224).min_area == 0.08
    assert (
        recipes.get_recipe("small", image_size=32, min_area=0.3).min_area == 0.3
    )  # --min_area wins
