"""Folders of images on disk, for both tasks: the split folders, the image decoder (one op for
reading and for checking), and the reader of a scanned folder's splits. Links back to a folder or
above it are not followed: a `self -> .` link would make a split or class of the folder itself."""

import os

import tensorflow as tf

from train.sources import EVAL_SPLITS, DatasetNotFound

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")  # what decode_image reads
IMAGE_FORMATS = "/".join(e for e in IMAGE_EXTENSIONS if e != ".jpeg")  # for messages


def decode_image(contents, min_side=None):
    """JPEG/PNG/GIF (first frame)/BMP bytes -> uint8 RGB (gray and alpha images too); the folder
    check uses the same op. With `min_side`, a JPEG is decoded at 1/2, 1/4 or 1/8 of its size
    where its shorter side stays at least min_side: a large photo never takes its full memory."""
    decoded = lambda: tf.io.decode_image(contents, channels=3, expand_animations=False)
    if min_side is None:
        return decoded()
    jpeg = lambda ratio: lambda: tf.io.decode_jpeg(contents, channels=3, ratio=ratio)

    def scaled():
        shorter = tf.reduce_min(tf.image.extract_jpeg_shape(contents)[:2])
        return tf.case([(shorter >= r * min_side, jpeg(r)) for r in (8, 4, 2)], default=jpeg(1))

    return tf.cond(tf.io.is_jpeg(contents), scaled, decoded)


def subfolders(path):
    """The folders in `path`, less links back to it or to a folder above it: a `self -> .` link
    would make a split or class of the folder itself."""
    real = os.path.realpath(path)
    return sorted(
        f
        for f in os.listdir(path)
        if os.path.isdir(os.path.join(path, f)) and not links_back(os.path.join(path, f), real)
    )


def links_back(path, parent):
    """Whether the folder `path` resolves to `parent` (a real path) or a folder above it."""
    target = os.path.realpath(path)
    return parent == target or parent.startswith(target.rstrip(os.sep) + os.sep)


def folder_splits(root, eval_split, kind, expected, missing_error):
    """(every split folder of `root`, the evaluation split: `eval_split` or the first of
    EVAL_SPLITS there). Raises DatasetNotFound for a missing `root` and `missing_error` naming a
    missing train/ or evaluation split; `kind` names the folder and `expected` its layout."""
    if not os.path.isdir(root):
        raise DatasetNotFound(f"{kind} {root!r} does not exist or is not a folder ({expected}).")
    splits = subfolders(root)
    eval_split = eval_split or next((s for s in EVAL_SPLITS if s in splits), None)
    missing = [s for s in ("train", eval_split) if s is not None and s not in splits]
    if eval_split is None:
        missing.append("test")
    if missing:
        found = f"found {', '.join(s + '/' for s in splits)}" if splits else "it has no subfolders"
        raise missing_error(
            f"{kind} {root!r} has no {' or '.join(s + '/' for s in missing)} ({found}); {expected}."
        )
    return splits, eval_split


def folder_reader(folder, seed, read_example):
    """(train examples, evaluation examples, evaluation split) of a scanned folder (its `examples`:
    split -> [tuple of paths or labels]) and a function reading one of its splits into
    `read_example(*columns)`, in parallel; the training split shuffled, seeded."""

    def read(split):
        columns = [list(column) for column in zip(*folder.examples[split])]
        dataset = tf.data.Dataset.from_tensor_slices(tuple(columns))
        if split == "train":
            dataset = dataset.shuffle(len(columns[0]), seed=seed)
        return dataset.map(read_example, num_parallel_calls=tf.data.AUTOTUNE)

    sizes = (
        len(folder.examples["train"]),
        len(folder.examples[folder.eval_split]),
        folder.eval_split,
    )
    return sizes, read
