"""The trainer's data input on inputs that would mislead it: a dataset of the other task, folders
with symlink loops or linked duplicates, JPEG data in a mask named .png, and large source images
(the cache holds them at the training size, so memory does not grow with their resolution)."""

import io
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.helpers import REPO, cli_env, one_error_line, train_cli, write_image_folder
from train import (
    classification_data,
    fashion_mnist_debian,
    folders,
    image_folder,
    pipeline,
    segmentation_data,
    segmentation_folder,
    tfds_sources,
)
from train.fashion_mnist_scenes import FashionMnistScenes, ScenesConfig
from train.sources import DatasetNotFound

SEGMENTATION_HINT = "is a segmentation dataset: add --task segmentation."
CLASSIFICATION_HINT = "is a classification dataset"


# --- a dataset of the other task -----------------------------------------------------------------


def test_a_dataset_of_the_other_task_is_named_with_the_flag(tmp_path):
    for name in ("fashion_mnist_scenes", "fashion_mnist_scenes/large", f"seg_folder:{tmp_path}"):
        with pytest.raises(DatasetNotFound) as caught:
            classification_data.load(name, image_size=32, batch_size=4)
        assert str(caught.value) == f"{name} {SEGMENTATION_HINT}"
    for name in ("fashion_mnist", f"folder:{tmp_path}"):
        with pytest.raises(DatasetNotFound) as caught:
            segmentation_data.load(name, image_size=32, batch_size=4)
        assert str(caught.value) == (
            f"{name} {CLASSIFICATION_HINT}: leave out --task segmentation."
        )


def test_tfds_datasets_of_the_other_task_are_told_by_their_features(tmp_path, monkeypatch):
    """Any TFDS name: masks and no label (classification), or a label and no mask (segmentation)."""
    segmentation = types.SimpleNamespace(
        name="some_scenes",
        info=types.SimpleNamespace(features={"image": 0, "segmentation_mask": 0}, splits=None),
    )
    with pytest.raises(DatasetNotFound, match=f"^some_scenes {SEGMENTATION_HINT}$"):
        classification_data.dataset_info(segmentation)
    other = types.SimpleNamespace(
        name="pairs", info=types.SimpleNamespace(features={"x": 0}, splits=None)
    )
    with pytest.raises(DatasetNotFound, match="pairs is not a classification dataset .*it has x"):
        classification_data.dataset_info(other)
    labelled = types.SimpleNamespace(info=types.SimpleNamespace(features={"image": 0, "label": 0}))
    monkeypatch.setattr(tfds_sources, "builder", lambda name, data_dir, download: labelled)
    with pytest.raises(DatasetNotFound, match=f"^cats {CLASSIFICATION_HINT} .*--task segm"):
        segmentation_data.load("cats", image_size=32, batch_size=4)


@pytest.mark.skipif(not fashion_mnist_debian.available(), reason="no Debian Fashion-MNIST files")
def test_prepared_scenes_read_as_classification_are_one_line(tmp_path):
    """A prepared scenes build once failed with KeyError: 'label' (the check by name aside)."""
    builder = FashionMnistScenes(
        data_dir=str(tmp_path), config=ScenesConfig(name="two", train_scenes=2, test_scenes=1)
    )
    builder.download_and_prepare()
    with pytest.raises(DatasetNotFound, match=f"^fashion_mnist_scenes {SEGMENTATION_HINT}$"):
        classification_data.dataset_info(builder)


def test_the_cli_names_the_task_flag_in_one_error_line(tmp_path):
    line = one_error_line(train_cli(tmp_path / "run", "fashion_mnist_scenes", "--epochs", "1"))
    assert line == f"error: fashion_mnist_scenes {SEGMENTATION_HINT}", line
    assert not (tmp_path / "run" / "model_train.keras").exists()


# --- symlinks -------------------------------------------------------------------------------------


def test_image_folder_links_back_and_linked_files_count_once(tmp_path):
    """`self -> .` links (root, split, class) and `..` links are no splits or classes, and an
    image reached twice through a link is read once."""
    root = write_image_folder(tmp_path / "photos", train_per_class=3, test_per_class=1)
    os.symlink(".", root / "self")
    os.symlink("..", root / "train" / "up")
    os.symlink(".", root / "train" / "a" / "self")
    os.symlink("0.png", root / "train" / "b" / "again.png")
    os.symlink(root / "train" / "a" / "1.png", root / "train" / "a" / "also.png")
    warnings = io.StringIO()
    folder = image_folder.scan_image_folder(str(root), warn=warnings)
    assert folder.class_names == ["a", "b"]
    assert [len(folder.examples[s]) for s in ("train", "test")] == [6, 2]
    assert len({os.path.realpath(p) for p, _ in folder.examples["train"]}) == 6
    warning = warnings.getvalue()
    for named in ("self/", "train/up/", "train/a/self/", "train/b/again.png (= train/b/0.png)"):
        assert named in warning, warning


def _write_mask_pair(root, split, name, mask):
    (root / split / "images").mkdir(parents=True, exist_ok=True)
    (root / split / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray((mask * 80).astype(np.uint8)).save(root / split / "images" / f"{name}.png")
    Image.fromarray(mask.astype(np.uint8)).save(root / split / "masks" / f"{name}.png")


def _seg_folder(root):
    """Three classes in 8x8 blocks: 3 training pairs, 1 test pair."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("test", 1)):
        for i in range(count):
            blocks = rng.permutation(np.arange(16) % 3).reshape(4, 4)
            _write_mask_pair(root, split, str(i), np.kron(blocks, np.ones((8, 8), int)))
    return root


def test_seg_folder_links_count_once(tmp_path):
    root = _seg_folder(tmp_path / "seg")
    os.symlink(".", root / "self")
    os.symlink(".", root / "train" / "images" / "self")
    for kind in ("images", "masks"):
        os.symlink("0.png", root / "train" / kind / "again.png")
    folder = segmentation_folder.scan_segmentation_folder(str(root), warn=io.StringIO())
    assert [len(folder.examples[s]) for s in ("train", "test")] == [3, 1]
    assert folder.num_classes == 3


# --- lossy masks ----------------------------------------------------------------------------------


def test_jpeg_data_in_a_png_mask_is_refused_naming_the_file(tmp_path):
    """JPEG's compression makes values between the classes (0..2 became 0..4)."""
    root = _seg_folder(tmp_path / "seg")
    mask = root / "train" / "masks" / "1.png"
    Image.open(mask).save(mask, format="JPEG", quality=75)
    with pytest.raises(ValueError) as caught:
        segmentation_folder.scan_segmentation_folder(str(root))
    assert "masks must be lossless PNG: train/masks/1.png holds JPEG data" in str(caught.value)
    assert "\n" not in str(caught.value)


# --- large source images --------------------------------------------------------------------------

PEAK_RSS = """
import resource, sys
from train import classification_data
train, evaluation, _ = classification_data.load(sys.argv[1], image_size=32, batch_size=4, seed=0)
for _ in range(2):
    for batch in evaluation:
        pass
for batch in train.take(12):
    pass
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def _peak_rss_mb(root):
    """Peak RSS (MB) of building and iterating the pipelines of `root` at 32 px."""
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, f"folder:{root}"],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split()[-1])


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_source_resolution(tmp_path):
    """8 JPEGs of 4000x4000 px (48 MB each decoded) and of 1x1 px: the same peak within 200 MB
    (the full-size cache and its float copies took about 1 GB more)."""
    rng = np.random.default_rng(0)
    for side, name in ((4000, "large"), (1, "small")):
        for split, count in (("train", 3), ("test", 1)):
            for c in ("a", "b"):
                (tmp_path / name / split / c).mkdir(parents=True)
                for i in range(count):
                    pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
                    Image.fromarray(pixels).resize((side, side)).save(
                        tmp_path / name / split / c / f"{i}.jpg", quality=90
                    )
    large, small = _peak_rss_mb(tmp_path / "large"), _peak_rss_mb(tmp_path / "small")
    assert large - small < 200, (large, small)


def test_large_jpegs_are_decoded_scaled_and_cut_before_the_cache():
    """What the cache holds: a shorter side of at least crop_source_side (no crop is upscaled)
    and under twice it; smaller images stay as they are."""
    side = classification_data.crop_source_side(32, 0.25)
    assert side == 74  # a 25% crop of aspect 3/4 has a shorter side of 0.433 of the image's
    pixels = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    encoded = tf.io.encode_jpeg(tf.image.resize(pixels, (1200, 1600), "nearest"))
    decoded = folders.decode_image(encoded, min_side=side)
    assert decoded.shape == (150, 200, 3)  # 1/8: 150 >= 74
    assert pipeline.shrink(decoded, side).shape == (74, 99, 3)
    assert pipeline.shrink(decoded, side).dtype == tf.uint8
    assert pipeline.shrink(pixels, side).shape == pixels.shape
    mask = np.kron(np.arange(4).reshape(2, 2), np.ones((300, 300), np.int32))[..., None]
    assert set(np.unique(pipeline.shrink(mask, 20, "nearest"))) == {0, 1, 2, 3}
