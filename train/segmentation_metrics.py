"""Segmentation metrics from an exact, streaming confusion matrix (mean IoU, pixel accuracy).

keras.metrics.MeanIoU(ignore_class=255, sparse_y_pred=False) counts the same int64 matrix but has
no pixel accuracy to match; one base here gives both scores, and the matrix, from one count.

The Keras metrics take `y_true` as an int mask [N, H, W] (or [N, H, W, 1]) and `y_pred` as logits
[N, H, W, classes] (argmax over the last axis) or already an int label map shaped like `y_true`.
Pixels whose label is `ignore_label` or outside [0, num_classes) are left out. The matrix
variable sums across replicas under tf.distribute. `confusion_matrix` and `scores` are the numpy
equivalents, for reports and tests.
"""

import keras
import numpy as np
from keras import ops

from repvgg_keras.masks import IGNORE_LABEL


def _flat_valid_pairs(y_true, y_pred_labels, num_classes, ignore_label):
    """Flattened (true, pred) int32 pairs and the mask of pixels that count."""
    y_true = ops.reshape(ops.cast(y_true, "int32"), (-1,))
    y_pred_labels = ops.reshape(ops.cast(y_pred_labels, "int32"), (-1,))
    valid = ops.logical_and(ops.greater_equal(y_true, 0), ops.less(y_true, num_classes))
    if ignore_label is not None:
        valid = ops.logical_and(valid, ops.not_equal(y_true, ignore_label))
    return y_true, y_pred_labels, valid


class ConfusionMatrixMetric(keras.metrics.Metric):
    """Accumulates an int64 [num_classes, num_classes] confusion matrix (rows truth, columns
    prediction); subclasses turn it into one score. `result()` here is the pixel count.

    `sample_weight`, if given, is a 0/1 mask per pixel or per example ([N]): zero leaves pixels out,
    any other value counts it once, so the counts stay integers.
    """

    def __init__(self, num_classes, ignore_label=IGNORE_LABEL, name="confusion_matrix", **kwargs):
        super().__init__(name=name, **kwargs)
        num_classes = int(num_classes)
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}.")
        if ignore_label is not None and 0 <= int(ignore_label) < num_classes:
            raise ValueError(
                f"ignore_label {ignore_label} is one of the {num_classes} classes; pick a label "
                "outside [0, num_classes) (255 is the usual choice) or None."
            )
        self.num_classes = num_classes
        self.ignore_label = None if ignore_label is None else int(ignore_label)
        self.matrix = self.add_variable(
            shape=(num_classes, num_classes),
            initializer="zeros",
            dtype="int64",
            aggregation="sum",
            name="confusion_matrix",
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_pred = ops.convert_to_tensor(y_pred)
        is_labels = "int" in keras.backend.standardize_dtype(y_pred.dtype)
        labels = y_pred if is_labels else ops.argmax(y_pred, axis=-1)
        true, pred, valid = _flat_valid_pairs(y_true, labels, self.num_classes, self.ignore_label)
        if sample_weight is not None:
            weight = ops.convert_to_tensor(sample_weight)
            while len(weight.shape) < len(ops.shape(y_true)):  # per-example [N] weights
                weight = ops.expand_dims(weight, -1)
            weight = ops.broadcast_to(weight, ops.shape(y_true))
            valid = ops.logical_and(valid, ops.not_equal(ops.reshape(weight, (-1,)), 0))
        n = self.num_classes
        # Left-out pixels go to an extra bin that is dropped; int32 is exact per batch. A segment
        # sum with a fixed segment count compiles under XLA, where bincount's dynamic size fails.
        index = ops.where(valid, true * n + ops.clip(pred, 0, n - 1), n * n)
        ones = ops.ones_like(index)
        counts = ops.segment_sum(ones, index, num_segments=n * n + 1)[: n * n]
        self.matrix.assign_add(ops.reshape(ops.cast(counts, "int64"), (n, n)))

    def result(self):
        return ops.cast(ops.sum(self.matrix), "float32")

    def reset_state(self):
        self.matrix.assign(ops.zeros((self.num_classes, self.num_classes), dtype="int64"))

    def get_config(self):
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "ignore_label": self.ignore_label,
        }


class MeanIoU(ConfusionMatrixMetric):
    """Mean over classes with a non-empty union of TP / (TP + FP + FN); classes absent from both
    truth and prediction are left out of the mean rather than counted as 0 or 1."""

    def __init__(self, num_classes, ignore_label=IGNORE_LABEL, name="miou", **kwargs):
        super().__init__(num_classes, ignore_label=ignore_label, name=name, **kwargs)

    def result(self):
        matrix = ops.cast(self.matrix, "float64")
        true_positives = ops.diagonal(matrix)
        union = ops.sum(matrix, axis=0) + ops.sum(matrix, axis=1) - true_positives
        present = ops.greater(union, 0)
        iou = ops.where(present, true_positives / ops.maximum(union, 1.0), 0.0)
        classes = ops.sum(ops.cast(present, "float64"))
        return ops.cast(ops.sum(iou) / ops.maximum(classes, 1.0), "float32")


class PixelAccuracy(ConfusionMatrixMetric):
    """Correct pixels over counted pixels (ignore pixels excluded); 0 before any pixel counts."""

    def __init__(self, num_classes, ignore_label=IGNORE_LABEL, name="pixel_accuracy", **kwargs):
        super().__init__(num_classes, ignore_label=ignore_label, name=name, **kwargs)

    def result(self):
        matrix = ops.cast(self.matrix, "float64")
        total = ops.sum(matrix)
        return ops.cast(ops.trace(matrix) / ops.maximum(total, 1.0), "float32")


def confusion_matrix(y_true, y_pred_labels, num_classes, ignore_label=IGNORE_LABEL):
    """int64 [num_classes, num_classes] matrix (rows truth, columns prediction) of two label maps
    of the same shape; truth pixels equal to `ignore_label` or outside [0, num_classes) are left
    out. Predicted labels outside the range are an error (they come from an argmax)."""
    y_true = np.asarray(y_true).astype(np.int64).reshape(-1)
    y_pred = np.asarray(y_pred_labels).astype(np.int64).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(
            f"y_true has {y_true.size} pixels and y_pred_labels {y_pred.size}; pass label maps "
            "of the same shape (argmax the logits over the class axis first)."
        )
    valid = (y_true >= 0) & (y_true < num_classes)
    if ignore_label is not None:
        valid &= y_true != ignore_label
    pred = y_pred[valid]
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(
            f"y_pred_labels has labels outside [0, {num_classes}); pass argmax class indices."
        )
    index = y_true[valid] * num_classes + pred
    counts = np.bincount(index, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def scores(matrix):
    """dict(miou, pixel_accuracy, iou) from a confusion matrix; `iou` is per class, NaN where a
    class is absent from both truth and prediction (and left out of `miou`)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    true_positives = np.diag(matrix)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - true_positives
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, true_positives / union, np.nan)
    total = matrix.sum()
    return {
        "miou": float(np.nanmean(iou)) if np.any(union > 0) else 0.0,
        "pixel_accuracy": float(true_positives.sum() / total) if total else 0.0,
        "iou": [float(v) for v in iou],
    }
