"""Input pipelines for semantic segmentation: Fashion-MNIST scenes, a folder of image/mask pairs,
or a prepared TFDS dataset with `image` and `segmentation_mask` features.

Training transforms image and mask jointly: a random scale of 0.5-2x the size that fits the
shorter side to image_size, padding up to image_size (image with 0, mask with IGNORE_LABEL), one
random crop and one random horizontal flip for both. Evaluation resizes the shorter side to
image_size and crops the centre. Masks are always resized nearest-neighbour, so no label is
invented; images bilinear. Grayscale becomes 3 channels and images are normalised like the
pretrained weights (ImageNet mean/std), as in train.data. Nothing here downloads unless asked to.
"""

import concurrent.futures
import dataclasses
import math
import os
import sys

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from repvgg_keras import preprocessing
from repvgg_keras.masks import IGNORE_LABEL
from train import data, fashion_mnist_scenes
from train.data import IMAGE_EXTENSIONS, DatasetNotFound

CLASS_NAMES = fashion_mnist_scenes.CLASS_NAMES  # of fashion_mnist_scenes
SCALE_RANGE = (0.5, 2.0)
SCENES = data.SCENES
FOLDER = data.SEGMENTATION_FOLDER
MASK_MODES = ("L", "P", "1", "I;16", "I")  # one channel of class indices (P: palette indices)


@dataclasses.dataclass
class SegmentationInfo:
    num_classes: int
    train_examples: int
    eval_examples: int
    eval_split: str
    class_names: list = None


# --- seg_folder:<root> -------------------------------------------------------------------------


@dataclasses.dataclass
class SegmentationFolder:
    """root/<split>/images/<name>.(jpg|jpeg|png) with root/<split>/masks/<name>.png."""

    root: str
    num_classes: int
    class_names: list  # from root/classes.txt, else None
    examples: dict  # split -> [(image path, mask path)], sorted by name
    eval_split: str
    skipped: list  # (relative path, reason)

    def as_dataset(self, split, shuffle=False, seed=None):
        images = [image for image, _ in self.examples[split]]
        masks = [mask for _, mask in self.examples[split]]
        dataset = tf.data.Dataset.from_tensor_slices((images, masks))
        if shuffle:
            dataset = dataset.shuffle(len(images), seed=seed)
        return dataset.map(_read_pair, num_parallel_calls=tf.data.AUTOTUNE)


def read_mask(path):
    """Class indices uint8/int32 [H, W] of a 1-channel or palette PNG (PIL keeps palette indices,
    where TensorFlow's PNG decoder would turn them into colours)."""
    from PIL import Image

    with Image.open(path) as mask:
        if mask.mode not in MASK_MODES:
            raise ValueError(f"mode {mask.mode}, not a 1-channel or palette PNG")
        return np.asarray(mask, np.int32)


def _read_pair(image_path, mask_path):
    image = data.decode_image(tf.io.read_file(image_path))
    mask = tf.numpy_function(lambda p: read_mask(p.decode()), [mask_path], tf.int32)
    return image, tf.ensure_shape(mask, (None, None))


def _check_pair(image_path, mask_path):
    """(the mask's values other than IGNORE_LABEL, sorted, None) or (None, reason to skip)."""
    try:
        image = data.decode_image(tf.io.read_file(image_path))
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
        files = data._listing(os.path.relpath(p, root) for p in holders[value])
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
    _, eval_split = data.folder_splits(
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
        print(
            f"warning: skipped {len(skipped)} file(s) in {root}: "
            f"{data._listing(f'{path} ({reason})' for path, reason in skipped)}",
            file=warn or sys.stderr,
            flush=True,
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
            f"Segmentation folder {root!r}: masks must be lossless PNG: {data._listing(lossy)} "
            f"hold{'s' if len(lossy) == 1 else ''} JPEG data; save the class indices as PNG."
        )


def _class_names(root):
    path = os.path.join(root, "classes.txt")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    return names or None


# --- TFDS datasets --------------------------------------------------------------------------------


def _scenes_builder(name, data_dir):
    """The Fashion-MNIST scenes builder (`fashion_mnist_scenes[/<config>]`), prepared offline on
    first use."""
    config = name.partition("/")[2] or "default"
    configs = [c.name for c in fashion_mnist_scenes.FashionMnistScenes.BUILDER_CONFIGS]
    if config not in configs:
        raise DatasetNotFound(
            f"{name!r}: {SCENES} has the configs {', '.join(configs)}, not {config!r}."
        )
    builder = fashion_mnist_scenes.FashionMnistScenes(config=config, data_dir=data_dir)
    if not data._is_prepared(builder):
        builder.download_and_prepare()
    return builder


def check_segmentation(name):
    """Raise DatasetNotFound for a classification dataset of train.data (labels, no masks)."""
    if name.startswith(data.FOLDER) or name.partition("/")[0] == "fashion_mnist":
        raise DatasetNotFound(f"{name} is a classification dataset: leave out --task segmentation.")


def _tfds_builder(name, data_dir, download):
    builder = data._builder(name, data_dir, download)
    features = builder.info.features
    if not isinstance(features, tfds.features.FeaturesDict) or not {
        "image",
        "segmentation_mask",
    } <= set(features.keys()):
        if "label" in features:
            raise DatasetNotFound(
                f"{name} is a classification dataset (no `segmentation_mask` feature): leave "
                "out --task segmentation."
            )
        raise DatasetNotFound(
            f"Dataset {name!r} has no `image` and `segmentation_mask` features (it has "
            f"{', '.join(features.keys()) if hasattr(features, 'keys') else features}); "
            "pass a segmentation dataset, fashion_mnist_scenes or seg_folder:<root>."
        )
    return builder


def _tfds_info(name, builder, eval_split, num_classes):
    splits = builder.info.splits
    known = list(splits.keys()) if splits else []
    eval_split = eval_split or next((s for s in data.EVAL_SPLITS if s in known), "test")
    for split in ("train", eval_split):
        if split not in known:
            raise DatasetNotFound(
                f"Dataset {name!r} has no {split!r} split (it has {', '.join(known)}); "
                "pass eval_split with one of those."
            )
    metadata = builder.info.metadata or {}
    class_names = metadata.get("class_names")
    num_classes = num_classes or metadata.get("num_classes")
    if not num_classes:
        raise ValueError(
            f"Dataset {name!r} does not record its number of mask classes; pass num_classes "
            "(the largest mask value + 1, leaving out the ignore value 255)."
        )
    return SegmentationInfo(
        int(num_classes),
        splits["train"].num_examples,
        splits[eval_split].num_examples,
        eval_split,
        list(class_names) if class_names is not None else None,
    )


def _tfds_pairs(builder, split, shuffle):
    dataset = builder.as_dataset(split=split, shuffle_files=shuffle)

    def pair(example):
        mask = tf.cast(example["segmentation_mask"], tf.int32)
        if mask.shape.rank == 3:
            mask = mask[..., 0]
        return example["image"], mask

    return dataset.map(pair, num_parallel_calls=tf.data.AUTOTUNE)


# --- transforms -----------------------------------------------------------------------------------


def _resize_pair(image, mask, height, width):
    """Image bilinear, mask (rank 3, int32) nearest: nearest never makes a label up."""
    size = tf.stack([height, width])
    image = tf.image.resize(image, size, method="bilinear")
    mask = tf.image.resize(mask, size, method="nearest")
    return image, mask


def _scaled_shape(image, size, factor=1.0):
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = size / tf.reduce_min(shape) * factor
    return tf.unstack(tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), 1))


def train_transform(image, mask, size, seed):
    """Joint random scale, pad, crop and flip; seed: int32/int64 [2] for the stateless draws."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)
    factor = tf.random.stateless_uniform((), seeds[0], *SCALE_RANGE)
    image, mask = _resize_pair(image, mask, *_scaled_shape(image, size, factor))
    shape = tf.shape(image)
    pad = [[0, tf.maximum(size - shape[0], 0)], [0, tf.maximum(size - shape[1], 0)], [0, 0]]
    image = tf.pad(image, pad, constant_values=0.0)
    mask = tf.pad(mask, pad, constant_values=IGNORE_LABEL)
    # One tensor for both, so that crop and flip cannot drift apart.
    both = tf.concat([image, tf.cast(mask, tf.float32)], axis=-1)
    both = tf.image.stateless_random_crop(both, (size, size, 4), seeds[1])
    both = tf.image.stateless_random_flip_left_right(both, seeds[2])
    return both[..., :3], tf.cast(both[..., 3], tf.int32)


def eval_transform(image, mask, size):
    """Shorter side to size (mask nearest), centre crop size x size."""
    image, mask = _resize_pair(image, mask, *_scaled_shape(image, size))
    image = tf.image.resize_with_crop_or_pad(image, size, size)
    mask = tf.image.resize_with_crop_or_pad(mask, size, size)
    return image, mask[..., 0]


def make_pipeline(
    dataset,
    *,
    image_size,
    batch_size,
    training,
    augment=True,
    cache=True,
    seed=None,
    preprocessing_mode="imagenet",
):
    """(image uint8 [H, W, C], mask int [H, W]) pairs -> batched (images float32 [N, S, S, 3]
    normalised, masks int32 [N, S, S] with IGNORE_LABEL kept).

    Training repeats, shuffles (seeded) and drops the last partial batch; evaluation keeps it.
    With augment=False training uses the evaluation transform.
    """
    random = training and augment

    def transform(image, mask, example_seed=None):
        image = tf.cast(image, tf.float32)
        if image.shape.rank == 3 and image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        mask = tf.cast(mask, tf.int32)[..., None]
        if random:
            image, mask = train_transform(image, mask, image_size, example_seed)
        else:
            image, mask = eval_transform(image, mask, image_size)
        return (
            tf.ensure_shape(image, (image_size, image_size, 3)),
            tf.ensure_shape(mask, (image_size, image_size)),
        )

    if not random:  # deterministic: the transformed examples are cached
        dataset = dataset.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
        if cache:
            dataset = dataset.cache()
        if training:
            dataset = dataset.shuffle(10_000, seed=seed, reshuffle_each_iteration=True).repeat()
    else:
        # Cut before the cache to the largest scale the augmentation draws, so that the cache
        # does not grow with the source images' size.
        side = math.ceil(image_size * SCALE_RANGE[1])
        dataset = dataset.map(
            lambda image, mask: (
                data.shrink(image, side),
                data.shrink(mask[..., None], side, "nearest")[..., 0],
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        if cache:
            dataset = dataset.cache()
        dataset = dataset.shuffle(10_000, seed=seed, reshuffle_each_iteration=True).repeat()
        # A stateless seed per example: the same seed gives the same crops whatever the
        # parallelism of the map.
        dataset = tf.data.Dataset.zip((dataset, tf.data.Dataset.random(seed=seed).batch(2)))
        dataset = dataset.map(
            lambda pair, example_seed: transform(*pair, example_seed),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    dataset = dataset.batch(batch_size, drop_remainder=training)
    dataset = dataset.map(
        lambda images, masks: (preprocessing.normalize(images, preprocessing_mode, 3), masks),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return dataset.prefetch(tf.data.AUTOTUNE)


def load(
    name,
    *,
    image_size,
    batch_size,
    data_dir=None,
    download=False,
    eval_split=None,
    train_take=None,
    eval_take=None,
    seed=None,
    augment=True,
    num_classes=None,
):
    """(train_ds, eval_ds, SegmentationInfo) for 'fashion_mnist_scenes', 'seg_folder:<root>' or a
    prepared TFDS dataset with `image` and `segmentation_mask` features.

    num_classes: only for TFDS datasets whose metadata does not record it (most do not; the
    scenes and seg_folder count their own).
    """
    check_segmentation(name)
    source_shape = None
    if name.startswith(FOLDER):
        folder = scan_segmentation_folder(name[len(FOLDER) :], eval_split)
        sizes, read = data.folder_reader(folder, seed)
        info = SegmentationInfo(folder.num_classes, *sizes, folder.class_names)
    else:
        if name.partition("/")[0] == SCENES:
            builder = _scenes_builder(name, data_dir)
        else:
            builder = _tfds_builder(name, data_dir, download)
        info = _tfds_info(name, builder, eval_split, num_classes)
        source_shape = builder.info.features["image"].shape
        read = lambda split: _tfds_pairs(builder, split, shuffle=split == "train")
    train_raw, eval_raw = data.read_splits(read, info, train_take, eval_take, batch_size)
    # Decoded examples are cached (image uint8 and mask int32: 7 bytes a pixel, at most the
    # largest scale the augmentation draws); large datasets are not.
    side = math.ceil(image_size * SCALE_RANGE[1])
    cache = data.cached_bytes(info.train_examples, side, 7, source_shape) < 4e9
    kwargs = dict(image_size=image_size, batch_size=batch_size, cache=cache)
    train = make_pipeline(train_raw, training=True, augment=augment, seed=seed, **kwargs)
    evaluation = make_pipeline(eval_raw, training=False, **kwargs)
    return train, evaluation, info
