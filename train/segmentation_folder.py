"""Segmentation folders, root/<split>/images/<name>.(jpg|png) with root/<split>/masks/<name>.png:
checked once when loaded (every pair decoded), unusable files skipped with a warning naming them,
mask values that are no class refused naming the masks."""

import concurrent.futures
import dataclasses
import os

import numpy as np
import tensorflow as tf

from repvgg_keras.masks import IGNORE_LABEL
from train.folders import IMAGE_EXTENSIONS, decode_image, folder_splits
from train.sources import DatasetNotFound, listing, warning

MASK_MODES = ("L", "P", "1", "I;16", "I")  # one channel of class indices (P: palette indices)


@dataclasses.dataclass
class SegmentationFolder:
    """root/<split>/images/<name>.(jpg|jpeg|png) with root/<split>/masks/<name>.png."""

    root: str
    num_classes: int
    class_names: list  # from root/classes.txt, else None
    examples: dict  # split -> [(image path, mask path)], sorted by name
    eval_split: str
    skipped: list  # (relative path, reason)


def read_mask(path):
    """Class indices uint8/int32 [H, W] of a 1-channel or palette PNG (PIL keeps palette indices,
    where TensorFlow's PNG decoder would turn them into colours)."""
    from PIL import Image

    with Image.open(path) as mask:
        if mask.mode not in MASK_MODES:
            raise ValueError(f"mode {mask.mode}, not a 1-channel or palette PNG")
        return np.asarray(mask, np.int32)


def read_pair(image_path, mask_path):
    image = decode_image(tf.io.read_file(image_path))
    mask = tf.numpy_function(lambda p: read_mask(p.decode()), [mask_path], tf.int32)
    return image, tf.ensure_shape(mask, (None, None))


def _check_pair(image_path, mask_path):
    """(the mask's values other than IGNORE_LABEL, sorted, None) or (None, reason to skip)."""
    try:
        image = decode_image(tf.io.read_file(image_path))
    except (tf.errors.OpError, OSError):
        return None, "unreadable image"
    try:
        mask = read_mask(mask_path)
    except Exception as error:  # PIL raises several types for broken files
        return None, f"unreadable mask ({str(error).splitlines()[0] if str(error) else 'broken'})"
    if tuple(image.shape[:2]) != mask.shape:
        return None, (
            f"image {image.shape[1]}x{image.shape[0]} but mask {mask.shape[1]}x{mask.shape[0]}"
        )
    return np.unique(mask[mask != IGNORE_LABEL]), None


def _files(folder, extensions, root, ignored):
    """{name without extension: path} of the files in `folder` with one of `extensions`; other
    entries are appended to `ignored` as (relative path, reason). Two files of one name (s0.jpg
    and s0.png) are an error: which one goes with the mask s0.png?"""
    if not os.path.isdir(folder):
        return {}
    found, seen = {}, {}  # seen: real path -> path, so that a linked file counts once
    for f in sorted(os.listdir(folder)):
        path = os.path.join(folder, f)
        if not (f.lower().endswith(extensions) and os.path.isfile(path)):
            wanted = "/".join(e for e in extensions if e != ".jpeg")
            ignored.append((os.path.relpath(path, root), f"not a {wanted} file"))
            continue
        first = seen.setdefault(os.path.realpath(path), path)
        if first != path:
            ignored.append((os.path.relpath(path, root), f"= {os.path.relpath(first, root)}"))
            continue
        name = os.path.splitext(f)[0]
        if name in found:
            raise ValueError(
                f"Segmentation folder {root!r}: {os.path.relpath(found[name], root)} and "
                f"{os.path.relpath(path, root)} share the name {name!r}, and a mask pairs with "
                "one image by name: rename or remove one of them."
            )
        found[name] = path
    return found


def _ranges(values):
    """[3, 4, 5, 9] -> '3..5, 9'"""
    runs = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(f"{a}..{b}" if b > a else f"{a}" for a, b in runs)


def _check_labels(root, holders, class_names):
    """The class count of a folder whose masks hold the values `holders` ({value: [mask paths]}):
    len(class_names), else the largest value + 1. Raises ValueError naming the masks and the
    remedy for a value that is no class index (above 254, other than 255, or negative), one at
    or above the classes.txt count, and, without classes.txt, values that leave class indices
    unused (a stray 200 among 0..4 would make a 201-class model)."""

    def where(value):  # "a.png holds" / "a.png, b.png hold"
        files = listing(os.path.relpath(p, root) for p in holders[value])
        return f"{files} hold{'s' if len(holders[value]) == 1 else ''}"

    bad = [v for v in holders if v < 0 or v > IGNORE_LABEL]
    if bad:
        value = max(bad, key=abs)
        raise ValueError(
            f"Segmentation folder {root!r}: {where(value)} the value {value}; mask values are "
            f"class indices 0..{IGNORE_LABEL - 1}, and {IGNORE_LABEL} marks pixels to ignore. "
            "Re-encode those masks (8-bit class indices)."
        )
    largest = max(holders, default=-1)
    if class_names is not None:
        if largest >= len(class_names):
            raise ValueError(
                f"Segmentation folder {root!r}: {where(largest)} class index {largest} but "
                f"classes.txt names {len(class_names)} classes (0..{len(class_names) - 1}); add "
                f"the missing names or mark such pixels {IGNORE_LABEL} (ignore)."
            )
        return len(class_names)
    if largest < 1:
        raise ValueError(
            f"Segmentation folder {root!r}: every mask is 0 or {IGNORE_LABEL} (ignore); "
            "masks need class indices 1, 2, ... or a classes.txt naming the classes."
        )
    unused = [v for v in range(largest) if v not in holders]
    if unused:
        above = [v for v in sorted(holders) if v > unused[0]]
        raise ValueError(
            f"Segmentation folder {root!r} has no classes.txt, so its classes are the mask values "
            f"0..{largest}, but {_ranges(unused)} appear in no mask: {where(above[-1])} the value "
            f"{above[-1]} (values {_ranges(above)} may be stray). Mark stray pixels {IGNORE_LABEL} "
            f"(ignore), or add {os.path.join(root, 'classes.txt')} naming the classes, one per line."
        )
    return largest + 1


def scan_segmentation_folder(root, eval_split=None, warn=None):
    """Check root/<split>/images and root/<split>/masks once and list the usable pairs.

    Every image and mask of the training and evaluation splits is decoded once. Images without a
    mask, masks without an image, pairs of different sizes, unreadable files and files of other
    types are skipped and named in one warning line on `warn`. The class count is
    root/classes.txt's line count when present, else the largest mask value below IGNORE_LABEL + 1
    over the train and evaluation masks (so that every evaluation label is a class the model
    has), and then every value below it must appear in some mask (see _check_labels). Raises
    DatasetNotFound for a missing root or missing split folders, ValueError for a split without
    usable pairs, two images of one name, and mask values that are no class (naming the masks).
    """
    expected = (
        f"expected {root}/train/images/<name>.png with {root}/train/masks/<name>.png, "
        "and the same under test/ (or validation/, val/)"
    )
    _, eval_split = folder_splits(
        root, eval_split, "Segmentation folder", expected, DatasetNotFound
    )
    pairs, skipped = {}, []
    for split in ("train", eval_split):
        images = _files(os.path.join(root, split, "images"), IMAGE_EXTENSIONS, root, skipped)
        masks = _files(os.path.join(root, split, "masks"), (".png",), root, skipped)
        skipped += [(os.path.relpath(images[n], root), "no mask") for n in images if n not in masks]
        skipped += [(os.path.relpath(masks[n], root), "no image") for n in masks if n not in images]
        pairs[split] = [(images[n], masks[n]) for n in sorted(images) if n in masks]
    listed = [pair for split_pairs in pairs.values() for pair in split_pairs]
    _check_lossless(root, [mask for _, mask in listed])
    with concurrent.futures.ThreadPoolExecutor(max(4, os.cpu_count() or 1)) as pool:
        checked = dict(zip(listed, pool.map(lambda pair: _check_pair(*pair), listed)))
    skipped += [
        (os.path.relpath(pair[0], root), reason)
        for pair, (_, reason) in checked.items()
        if reason is not None
    ]
    examples = {
        split: [pair for pair in split_pairs if checked[pair][1] is None]
        for split, split_pairs in pairs.items()
    }
    if skipped:
        warning(
            f"skipped {len(skipped)} file(s) in {root}: "
            f"{listing(f'{path} ({reason})' for path, reason in skipped)}",
            warn,
        )
    empty = [split for split in ("train", eval_split) if not examples[split]]
    if empty:
        raise ValueError(
            f"Segmentation folder {root!r} has no usable image/mask pair in "
            f"{' or '.join(s + '/' for s in empty)}"
            f"{' (the skipped files are named above)' if skipped else ''}; {expected}."
        )
    holders = {}
    for pair in (pair for split in examples.values() for pair in split):
        for value in checked[pair][0].tolist():
            holders.setdefault(int(value), []).append(pair[1])
    class_names = _class_names(root)
    num_classes = _check_labels(root, holders, class_names)
    return SegmentationFolder(root, num_classes, class_names, examples, eval_split, skipped)


def _check_lossless(root, masks):
    """Raise ValueError naming the masks that hold JPEG data whatever their name says: JPEG's
    compression blurs class indices into values that are no class, or other classes."""

    def jpeg(path):
        with open(path, "rb") as f:
            return f.read(3) == b"\xff\xd8\xff"

    lossy = [os.path.relpath(path, root) for path in masks if jpeg(path)]
    if lossy:
        raise ValueError(
            f"Segmentation folder {root!r}: masks must be lossless PNG: {listing(lossy)} "
            f"hold{'s' if len(lossy) == 1 else ''} JPEG data; save the class indices as PNG."
        )


def _class_names(root):
    path = os.path.join(root, "classes.txt")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    return names or None
