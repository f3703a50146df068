"""Segmentation metrics (exact confusion-matrix counts), mask colours and the results PNG."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image

from repvgg_keras.masks import class_areas, colorize, palette
from tests.helpers import REPO
from train.segmentation_figures import save_predictions_png
from train.segmentation_metrics import (
    ConfusionMatrixMetric,
    MeanIoU,
    PixelAccuracy,
    confusion_matrix,
    scores,
)


def hand_matrix(y_true, labels, num_classes, ignore_label=255):
    """The confusion matrix by a plain loop over pixels, independent of bincount."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    for t, p in zip(np.ravel(y_true), np.ravel(labels)):
        if t != ignore_label and 0 <= t < num_classes:
            matrix[t, p] += 1
    return matrix


def hand_scores(matrix):
    ious = []
    for c in range(len(matrix)):
        tp = matrix[c, c]
        union = matrix[c, :].sum() + matrix[:, c].sum() - tp
        if union:
            ious.append(tp / union)
    return sum(ious) / len(ious), np.trace(matrix) / matrix.sum()


def random_batch(rng, shape, num_classes, ignore_fraction=0.2):
    y_true = rng.integers(0, num_classes, size=shape)
    y_true[rng.random(shape) < ignore_fraction] = 255
    logits = rng.normal(size=shape + (num_classes,)).astype("float32")
    return y_true, logits


def test_streamed_counts_equal_a_hand_count_over_uneven_batches():
    rng = np.random.default_rng(0)
    num_classes = 5
    y_true, logits = random_batch(rng, (7, 6, 9), num_classes)
    y_true[0, 0, :3] = [-1, 5, 17]  # out of range labels are left out too
    expected = hand_matrix(y_true, logits.argmax(-1), num_classes)
    metrics = [ConfusionMatrixMetric(num_classes), MeanIoU(num_classes), PixelAccuracy(num_classes)]
    for start, stop in ((0, 1), (1, 4), (4, 7)):
        for metric in metrics:
            metric.update_state(y_true[start:stop], logits[start:stop])
    for metric in metrics:
        matrix = keras.ops.convert_to_numpy(metric.matrix)
        assert matrix.dtype == np.int64
        np.testing.assert_array_equal(matrix, expected)
    np.testing.assert_array_equal(
        confusion_matrix(y_true, logits.argmax(-1), num_classes), expected
    )
    miou, accuracy = hand_scores(expected)
    assert float(metrics[0].result()) == expected.sum()
    assert metrics[1].result().dtype == "float32"
    assert float(metrics[1].result()) == pytest.approx(miou, abs=1e-6)
    assert float(metrics[2].result()) == pytest.approx(accuracy, abs=1e-6)
    numpy_scores = scores(expected)
    assert numpy_scores["miou"] == pytest.approx(miou, abs=1e-12)
    assert numpy_scores["pixel_accuracy"] == pytest.approx(accuracy, abs=1e-12)


def test_a_class_absent_from_truth_and_prediction_is_left_out_of_the_mean():
    y_true = np.array([[[0, 0, 1, 1, 255]]])
    labels = np.array([[[0, 1, 1, 1, 3]]])  # class 2 nowhere; 3 only under an ignore pixel
    metric = MeanIoU(4)
    metric.update_state(y_true, labels)
    # class 0: tp 1, union 2; class 1: tp 2, union 3; classes 2 and 3 have an empty union.
    assert float(metric.result()) == pytest.approx((1 / 2 + 2 / 3) / 2, abs=1e-6)
    report = scores(confusion_matrix(y_true, labels, 4))
    assert report["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert np.isnan(report["iou"][2]) and np.isnan(report["iou"][3])
    assert report["pixel_accuracy"] == pytest.approx(3 / 4)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_compiled_evaluate_equals_numpy(jit_compile):
    rng = np.random.default_rng(1)
    num_classes = 4
    images = rng.normal(size=(10, 8, 6, 3)).astype("float32")
    y_true, _ = random_batch(rng, (10, 8, 6), num_classes)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 6, 3)), keras.layers.Conv2D(num_classes, 1)])
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=255),
        metrics=[MeanIoU(num_classes), PixelAccuracy(num_classes)],
        jit_compile=jit_compile,
    )
    got = model.evaluate(images, y_true, batch_size=3, verbose=0, return_dict=True)
    labels = model.predict(images, verbose=0).argmax(-1)
    expected = scores(confusion_matrix(y_true, labels, num_classes))
    assert got["miou"] == pytest.approx(expected["miou"], abs=1e-6)
    assert got["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"], abs=1e-6)
    assert 0 < expected["pixel_accuracy"] < 1  # a result that could be wrong


def test_zero_sample_weight_leaves_pixels_out():
    rng = np.random.default_rng(6)
    y_true, logits = random_batch(rng, (4, 3, 5), 3)
    weights = np.array([1.0, 0.0, 1.0, 0.0], dtype="float32")
    metric = ConfusionMatrixMetric(3)
    metric.update_state(y_true, logits, sample_weight=weights)
    expected = hand_matrix(y_true[[0, 2]], logits[[0, 2]].argmax(-1), 3)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(metric.matrix), expected)


def test_reset_state_and_config_round_trip():
    rng = np.random.default_rng(2)
    metric = PixelAccuracy(3, ignore_label=255, name="acc")
    y_true, logits = random_batch(rng, (2, 4, 4), 3)
    metric.update_state(y_true, logits)
    assert keras.ops.convert_to_numpy(metric.matrix).sum() > 0
    metric.reset_state()
    assert keras.ops.convert_to_numpy(metric.matrix).sum() == 0
    assert float(metric.result()) == 0.0
    clone = PixelAccuracy.from_config(metric.get_config())
    assert (clone.name, clone.num_classes, clone.ignore_label) == ("acc", 3, 255)


def test_ignore_label_inside_the_class_range_is_refused():
    with pytest.raises(ValueError, match="ignore_label"):
        MeanIoU(10, ignore_label=3)


def test_counts_past_float32_precision_stay_exact():
    # float32 holds only even integers between 2^24 and 2^25; three updates of 2^23 + 1 correct
    # pixels make an odd count there.
    pixels = 2**23 + 2
    y_true = np.zeros((1, pixels), dtype=np.int32)
    labels = np.zeros((1, pixels), dtype=np.int32)
    labels[0, -1] = 1  # one miss per update, so accuracy sits just below 1
    metric = PixelAccuracy(2)
    for _ in range(3):
        metric.update_state(y_true, labels)
    matrix = keras.ops.convert_to_numpy(metric.matrix)
    assert matrix[0, 0] == 3 * (pixels - 1) and matrix[0, 1] == 3
    assert int(np.float32(matrix[0, 0])) != matrix[0, 0]  # float32 would have rounded it


DISTRIBUTED = r"""
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from train.segmentation_metrics import ConfusionMatrixMetric, MeanIoU, confusion_matrix, scores
rng = np.random.default_rng(3)
images = rng.normal(size=(8, 5, 6, 3)).astype("float32")
y_true = rng.integers(0, 4, size=(8, 5, 6))
y_true[rng.random(y_true.shape) < 0.2] = 255
with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
    model = keras.Sequential([keras.Input((5, 6, 3)), keras.layers.Conv2D(4, 1)])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=255),
                  metrics=[MeanIoU(4), ConfusionMatrixMetric(4, name="pixels")])
got = model.evaluate(images, y_true, batch_size=4, verbose=0, return_dict=True)
expected = scores(confusion_matrix(y_true, model.predict(images, verbose=0).argmax(-1), 4))
print(got["pixels"], int((y_true != 255).sum()), got["miou"], expected["miou"])
"""


@pytest.mark.slow
def test_replicas_sum_their_counts_under_mirrored_strategy():
    done = subprocess.run(
        [sys.executable, "-c", DISTRIBUTED],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    pixels, expected_pixels, miou, expected_miou = map(float, done.stdout.split()[-4:])
    assert pixels == expected_pixels
    assert miou == pytest.approx(expected_miou, abs=1e-6)


def test_palette_is_distinct_deterministic_and_starts_black():
    colours = palette(256)
    assert colours.dtype == np.uint8 and colours.shape == (256, 3)
    assert len({tuple(c) for c in colours}) == 256
    np.testing.assert_array_equal(palette(21), colours[:21])
    assert colours[0].tolist() == [0, 0, 0]
    assert colours[15].tolist() == [192, 128, 128]  # VOC "person"


def test_colorize_shape_dtype_and_ignore_colour():
    mask = np.array([[0, 1, 2], [255, 2, 9]])
    picture = colorize(mask, num_classes=3)
    assert picture.shape == (2, 3, 3) and picture.dtype == np.uint8
    colours = palette(3)
    np.testing.assert_array_equal(picture[0], colours[[0, 1, 2]])
    assert picture[1, 0].tolist() == [255, 255, 255]
    assert picture[1, 2].tolist() == [255, 255, 255]  # out of range drawn as ignore
    assert colorize(mask).shape == (2, 3, 3)


def test_class_areas_sorted_and_summing_to_the_labelled_pixels():
    rng = np.random.default_rng(4)
    mask = rng.choice([0, 2, 2, 3, 3, 3, 255], size=(20, 30))
    areas = class_areas(mask, ["background", "cat", "dog"])
    counts = [count for _, _, count, _ in areas]
    assert counts == sorted(counts, reverse=True)
    assert sum(counts) == int((mask != 255).sum())
    assert sum(fraction for *_, fraction in areas) == pytest.approx(1.0)
    assert {(index, name) for index, name, _, _ in areas} == {
        (0, "background"),
        (2, "dog"),
        (3, "3"),
    }
    assert class_areas(np.full((2, 2), 255)) == []


def test_predictions_png_is_a_valid_image(tmp_path):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(2, 16, 12, 3)).astype(np.uint8)
    true_masks = rng.integers(0, 3, size=(2, 16, 12))
    true_masks[:, :2] = 255
    pred_masks = rng.integers(0, 3, size=(2, 16, 12))
    path = str(tmp_path / "figures" / "predictions.png")
    save_predictions_png(path, images, true_masks, pred_masks, class_names=["bg", "a", "b"])
    with Image.open(path) as picture:
        picture.verify()
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.size[0] > 300 and picture.size[1] > 300
    assert os.listdir(tmp_path / "figures") == ["predictions.png"]
    save_predictions_png(path, images.astype("float32"), true_masks, pred_masks)  # float 0-255
    with pytest.raises(ValueError, match="one of each"):
        save_predictions_png(path, images[:1], true_masks, pred_masks)
