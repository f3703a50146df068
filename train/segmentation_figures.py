"""A results picture for segmentation runs: image, true mask and predicted mask side by side."""

import os

import numpy as np

from repvgg_keras.masks import IGNORE_LABEL, class_name, colorize, palette
from train.staged import staging


def _displayable(image):
    """uint8 RGB of a raw image (uint8, or float on the 0-255 scale); grey [H, W] or [H, W, 1]
    is repeated to three channels."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"Images must be [H, W, 3] or [H, W] raw pixels, got shape {image.shape}.")
    if image.dtype != np.uint8:
        image = np.clip(np.rint(image.astype(np.float64)), 0, 255).astype(np.uint8)
    return image


def _pixel_accuracy(true_mask, pred_mask):
    counted = true_mask != IGNORE_LABEL
    return (
        float((true_mask[counted] == pred_mask[counted]).mean()) if counted.any() else float("nan")
    )


def save_predictions_png(
    path, images, true_masks, pred_masks, class_names=None, num_classes=None, dpi=80
):
    """Write a grid, one row per example: image, ground truth, prediction (column titles; the
    row's pixel accuracy, ignore pixels left out, in the prediction's title) and a legend of the
    classes shown.

    `images` are the raw pictures, uint8 or float on the 0-255 scale ([N, H, W, 3], or grey
    [N, H, W] / [N, H, W, 1]), not the model's normalised inputs: undo any normalisation before
    calling. `true_masks` and `pred_masks` are int [N, H, W] label maps (argmax the logits first);
    255 in the truth is ignore and drawn white. `num_classes` defaults to len(class_names), else
    to the largest label seen plus one. The file is written beside `path` and renamed into place,
    so a reader never sees half a PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    true_masks = np.asarray(true_masks).astype(np.int64)
    pred_masks = np.asarray(pred_masks).astype(np.int64)
    if true_masks.ndim == 4 and true_masks.shape[-1] == 1:
        true_masks = true_masks[..., 0]
    if len(images) != len(true_masks) or len(images) != len(pred_masks):
        raise ValueError(
            f"Got {len(images)} images, {len(true_masks)} true masks and {len(pred_masks)} "
            "predicted masks; pass one of each per example."
        )
    if not len(images):
        raise ValueError("No examples to draw; pass at least one image with its masks.")
    if true_masks.shape != pred_masks.shape:
        raise ValueError(
            f"True masks {true_masks.shape} and predicted masks {pred_masks.shape} differ in "
            "shape; pass label maps (argmax over the class axis) of the same size."
        )
    if num_classes is None:
        if class_names is not None:
            num_classes = len(class_names)
        else:
            labels = np.concatenate([true_masks.ravel(), pred_masks.ravel()])
            labels = labels[(labels >= 0) & (labels != IGNORE_LABEL)]
            num_classes = int(labels.max()) + 1 if labels.size else 1
    colours = palette(num_classes)

    rows = len(images)
    shown = np.concatenate([true_masks.ravel(), pred_masks.ravel()])
    shown = np.unique(shown[(shown >= 0) & (shown < num_classes)])
    handles = [
        Patch(facecolor=colours[i] / 255.0, edgecolor="grey", label=class_name(class_names, i))
        for i in shown
    ]
    if (true_masks == IGNORE_LABEL).any():
        handles.append(Patch(facecolor="white", edgecolor="grey", label="ignore (255)"))
    columns = min(max(len(handles), 1), 6)
    legend_height = 0.3 * (-(-len(handles) // columns)) + 0.1
    height = 3.0 * rows + legend_height
    figure, axes = plt.subplots(rows, 3, figsize=(9.6, height), squeeze=False)
    for row in range(rows):
        truth, prediction = true_masks[row], pred_masks[row]
        panels = (
            _displayable(images[row]),
            colorize(truth, num_classes),
            colorize(prediction, num_classes),
        )
        accuracy = _pixel_accuracy(truth, prediction)
        titles = (f"image #{row}", "ground truth", f"prediction (pixel acc {accuracy:.3f})")
        for axis, picture, title in zip(axes[row], panels, titles):
            axis.imshow(picture, interpolation="nearest")
            axis.set_title(title, fontsize=10)
            axis.set_xticks([])
            axis.set_yticks([])
    if handles:
        figure.legend(handles=handles, loc="lower center", ncol=columns, frameon=False)
    figure.tight_layout(rect=(0, legend_height / height, 1, 1))

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    try:
        with staging(path) as staged_png:
            figure.savefig(staged_png, dpi=dpi, format="png")
    finally:
        plt.close(figure)
