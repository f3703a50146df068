"""Classification folders, root/<split>/<class>/<image>: checked once when loaded (every image decoded),
unreadable images skipped with a warning naming them, empty splits or classes refused."""

import concurrent.futures
import dataclasses
import os
import random

import tensorflow as tf

from train.folders import IMAGE_EXTENSIONS, IMAGE_FORMATS, decode_image, folder_splits, subfolders
from train.sources import listing, warning


@dataclasses.dataclass
class ImageFolder:
    """root/<split>/<class>/<image>: class names (sorted over all splits, as tfds labels them) and
    each split's readable (path, label) examples in tfds's ImageFolder order."""

    root: str
    class_names: list
    examples: dict  # split -> [(path, label)]
    eval_split: str
    unreadable: list


def _readable(path):
    try:  # a JPEG at 1/8 of its size: every block is still decoded, in 1/64 of the memory
        image = decode_image(tf.io.read_file(path), min_side=1)
        return image.shape[0] > 0 and image.shape[1] > 0
    except (tf.errors.OpError, OSError):
        return False


def scan_image_folder(root, eval_split=None, warn=None):
    """Check root/<split>/<class>/<image> and list its examples (ImageFolder).

    Every .jpg/.jpeg/.png/.gif/.bmp of the training and evaluation splits is decoded once:
    unreadable ones are skipped, and named in one warning line on `warn`, so that training does not
    stop mid-epoch on them; every other entry that is not read (a file of another type, a folder
    inside a class folder, a file beside the class folders, a split other than the two used) is
    named in another.
    Raises DatasetNotFound for a missing root and ValueError naming the missing or empty split
    folders and the class folders without a readable image.
    """
    expected = f"expected {root}/train/<class>/<image> and {root}/test/<class>/<image> (or validation/, val/)"
    splits, eval_split = folder_splits(root, eval_split, "Image folder", expected, ValueError)
    class_names = sorted({c for split in splits for c in subfolders(os.path.join(root, split))})
    listed, empty = {}, []
    ignored = [  # other splits (val/ beside test/), files beside the splits
        f"{f}{'/' if os.path.isdir(os.path.join(root, f)) else ''}"
        for f in sorted(os.listdir(root))
        if f not in ("train", eval_split)
    ]
    for split in ("train", eval_split):
        classes = subfolders(os.path.join(root, split))
        if not classes:
            empty.append(f"{split}/ (no class folders)")
        ignored += [
            f"{split}/{f}{'/' if os.path.isdir(os.path.join(root, split, f)) else ''}"
            for f in sorted(os.listdir(os.path.join(root, split)))
            if f not in classes
        ]
        listed[split], seen = [], {}  # real path -> listed path: a linked file counts once
        for c in classes:
            for f in sorted(os.listdir(os.path.join(root, split, c))):
                path = os.path.join(root, split, c, f)
                if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(path):
                    first = seen.setdefault(os.path.realpath(path), path)
                    if first == path:
                        listed[split].append((path, class_names.index(c)))
                    else:
                        ignored.append(f"{split}/{c}/{f} (= {os.path.relpath(first, root)})")
                else:
                    ignored.append(f"{split}/{c}/{f}{'/' if os.path.isdir(path) else ''}")
    paths = [path for examples in listed.values() for path, _ in examples]
    with concurrent.futures.ThreadPoolExecutor(max(4, os.cpu_count() or 1)) as pool:
        readable = dict(zip(paths, pool.map(_readable, paths)))
    unreadable = [path for path in paths if not readable[path]]
    examples = {}
    for split, split_examples in listed.items():
        examples[split] = [(path, label) for path, label in split_examples if readable[path]]
        counts = {label for _, label in examples[split]}
        empty += [
            f"{split}/{c}/"
            for c in subfolders(os.path.join(root, split))
            if class_names.index(c) not in counts
        ]
        random.Random(split).shuffle(examples[split])  # tfds's ImageFolder order
    untrained = [
        c
        for i, c in enumerate(class_names)
        if i not in {label for _, label in examples["train"]} and f"train/{c}/" not in empty
    ]
    if untrained:
        empty += [f"train/{c}/ (missing)" for c in untrained]
    if ignored:
        warning(
            f"ignored {len(ignored)} entr{'y' if len(ignored) == 1 else 'ies'} that "
            f"{'is' if len(ignored) == 1 else 'are'} not {IMAGE_FORMATS} files of a class folder "
            f"in {root}: {listing(ignored)}",
            warn,
        )
    if unreadable:
        warning(
            f"skipped {len(unreadable)} unreadable image(s) of {len(paths)} in {root}: "
            f"{listing(os.path.relpath(p, root) for p in unreadable)}",
            warn,
        )
    if empty:
        raise ValueError(
            f"Image folder {root!r}: no readable {IMAGE_FORMATS} image in {listing(empty)}"
            f"{' (unreadable ones skipped)' if unreadable else ''}; every class needs at least one "
            "image in train/ and each split at least one class folder."
        )
    return ImageFolder(root, class_names, examples, eval_split, unreadable)
