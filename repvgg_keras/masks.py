"""Segmentation masks for people: a colour per class, an RGB picture of a mask, class areas.

The module itself needs only numpy, but importing it runs `repvgg_keras/__init__.py`, which
imports Keras and its backend (TensorFlow by default): a client without them cannot use it, and
one that has them pays that import (the serving client imports it only for segmentation output).
"""

import numpy as np

IGNORE_LABEL = 255
IGNORE_COLOUR = (255, 255, 255)


def palette(num_classes):
    """uint8 [num_classes, 3]: PASCAL VOC's palette (class bits interleaved into the high bits of
    R, G, B), so class 0 is black and the colours match the ones VOC tools draw. Distinct for up
    to 256 classes."""
    num_classes = int(num_classes)
    if not 1 <= num_classes <= 256:
        raise ValueError(f"palette covers 1 to 256 classes, got {num_classes}.")
    colours = np.zeros((num_classes, 3), dtype=np.uint8)
    for index in range(num_classes):
        label, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((label >> 0) & 1) << shift
            g |= ((label >> 1) & 1) << shift
            b |= ((label >> 2) & 1) << shift
            label >>= 3
        colours[index] = (r, g, b)
    return colours


def colorize(mask, num_classes=None):
    """uint8 RGB [H, W, 3] of an int mask [H, W]: class colours from `palette`, white for
    ignore (255) and for any label outside [0, num_classes)."""
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise ValueError(f"colorize takes one mask [H, W], got shape {mask.shape}.")
    mask = mask.astype(np.int64)
    if num_classes is None:
        counted = mask[(mask >= 0) & (mask != IGNORE_LABEL)]
        num_classes = int(counted.max()) + 1 if counted.size else 1
    colours = palette(num_classes)
    known = (mask >= 0) & (mask < num_classes) & (mask != IGNORE_LABEL)
    picture = np.empty(mask.shape + (3,), dtype=np.uint8)
    picture[...] = IGNORE_COLOUR
    picture[known] = colours[mask[known]]
    return picture


def class_areas(mask, class_names=None):
    """[(class index, name, pixel count, fraction)] for the classes present, largest first.

    The fraction is of the labelled pixels (ignore pixels left out); the name is
    `class_names[index]`, or `str(index)` when no names are given or the list is too short.
    """
    mask = np.asarray(mask).astype(np.int64).reshape(-1)
    mask = mask[(mask >= 0) & (mask != IGNORE_LABEL)]
    counts = np.bincount(mask) if mask.size else np.zeros(0, dtype=np.int64)
    total = int(counts.sum())
    present = np.flatnonzero(counts)
    order = sorted(present, key=lambda index: (-counts[index], index))
    return [
        (
            int(index),
            class_name(class_names, index),
            int(counts[index]),
            float(counts[index] / total),
        )
        for index in order
    ]


def class_name(class_names, index):
    """`class_names[index]`, or `str(index)` when there are no names or too few."""
    if class_names is None or index >= len(class_names):
        return str(index)
    return str(class_names[index])
