"""Input pipelines through tensorflow-datasets: any TFDS name, a folder of images, Fashion-MNIST offline.

Training: random-resized-crop + horizontal flip, plus RandAugment with augment="randaugment"
(the 200-epoch recipe's stronger augmentation). Evaluation: resize to image_size / 0.875
then centre crop (the paper's 256 -> 224, scaled). Grayscale becomes 3 channels, pixels
are normalised like the pretrained weights (ImageNet mean/std). Datasets that are not
present raise at once: nothing here downloads unless asked to. An image folder is checked when
it is loaded: every image is decoded once, unreadable ones are skipped with a warning naming
them, and empty splits or classes are refused. Small datasets are cached: training images cut to
the largest size a crop uses, evaluation crops as made, so memory does not follow the sources' size.
"""

import concurrent.futures
import dataclasses
import difflib
import math
import os
import random
import sys

import tensorflow as tf
import tensorflow_datasets as tfds

from repvgg_keras import preprocessing
from train import fashion_mnist_debian

EVAL_CROP = 0.875


@dataclasses.dataclass
class DatasetInfo:
    num_classes: int
    train_examples: int
    eval_examples: int
    eval_split: str


class DatasetNotFound(FileNotFoundError):
    pass


FOLDER = "folder:"
OUR_NAMES = ("fashion_mnist", FOLDER)
# The segmentation task's own datasets (train.segmentation_data), refused here by name.
SCENES = "fashion_mnist_scenes"
SEGMENTATION_FOLDER = "seg_folder:"


def check_classification(name):
    """Raise DatasetNotFound for a segmentation dataset (its examples have masks, not labels)."""
    if name.startswith(SEGMENTATION_FOLDER) or name.partition("/")[0] == SCENES:
        raise DatasetNotFound(f"{name} is a segmentation dataset: add --task segmentation.")


def _check_known(name):
    """Raise DatasetNotFound for a name tfds does not know, with the closest known names (one line:
    tfds's own error lists its whole catalogue)."""
    base = name.split(":")[0].split("/")[0]
    known = list(tfds.list_builders(with_community_datasets=False))  # offline: no community index
    if base in known:
        return
    # fashion_mnist_debian is the builder behind `fashion_mnist`, not a name to type.
    names = (set(known) | set(OUR_NAMES)) - {"fashion_mnist_debian"}
    close = difflib.get_close_matches(name, sorted(names), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise DatasetNotFound(
        f"Unknown dataset {name!r}: {hint}Pass a TFDS name (tfds.list_builders()), "
        "folder:<root> for root/<split>/<class>/<image>, or fashion_mnist."
    )


def _builder(name, data_dir, download):
    """A prepared tfds builder for `name`, or a DatasetNotFound saying how to get it."""
    _check_known(name)
    if name == "fashion_mnist":
        official = tfds.builder("fashion_mnist", data_dir=data_dir)
        if not _is_prepared(official) and fashion_mnist_debian.available():
            name = "fashion_mnist_debian"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    # ValueError: e.g. an unknown config.
    except (tfds.core.registered.DatasetNotFoundError, ValueError) as error:
        raise DatasetNotFound(f"Dataset {name!r}: {str(error).strip().splitlines()[0]}") from None
    if not _is_prepared(builder):
        if name == "fashion_mnist_debian" or download:
            builder.download_and_prepare()
        else:
            raise DatasetNotFound(
                f"Dataset {name!r} is not prepared in {builder.data_dir}. Prepare it first "
                f"(`tfds build {name}`, with its manual files for imagenet2012), pass --data_dir, "
                "or pass --download to let tfds fetch it. Nothing was downloaded."
            )
    return builder


def _is_prepared(builder):
    try:
        return tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json"))
    except Exception:
        return False


def dataset_info(builder, eval_split=None):
    """Classes and split sizes; counts the examples when the builder has no split metadata."""
    splits = builder.info.splits
    known = list(splits.keys()) if splits else []
    eval_split = eval_split or next(
        (s for s in ("validation", "test", "val") if s in known), "test"
    )
    features = builder.info.features
    if "label" not in features:
        kind = (
            "a segmentation dataset: add --task segmentation"
            if "segmentation_mask" in features
            else f"not a classification dataset (no `label` feature; it has {', '.join(features)})"
        )
        raise DatasetNotFound(f"{builder.name} is {kind}.")
    label = features["label"]

    def size(split):
        if split in known and splits[split].num_examples:
            return splits[split].num_examples
        return int(builder.as_dataset(split=split).reduce(0, lambda n, _: n + 1))

    return DatasetInfo(label.num_classes, size("train"), size(eval_split), eval_split)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")  # what decode_image reads
IMAGE_FORMATS = "/".join(e for e in IMAGE_EXTENSIONS if e != ".jpeg")  # for messages
EVAL_SPLITS = ("validation", "test", "val")


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


@dataclasses.dataclass
class ImageFolder:
    """root/<split>/<class>/<image>: class names (sorted over all splits, as tfds labels them) and
    each split's readable (path, label) examples in tfds's ImageFolder order."""

    root: str
    class_names: list
    examples: dict  # split -> [(path, label)]
    eval_split: str
    unreadable: list

    def as_dataset(self, split, shuffle=False, seed=None, min_side=None):
        """(image, label) pairs; min_side: see decode_image."""
        paths = [path for path, _ in self.examples[split]]
        labels = [label for _, label in self.examples[split]]
        dataset = tf.data.Dataset.from_tensor_slices((paths, tf.constant(labels, tf.int64)))
        if shuffle:
            dataset = dataset.shuffle(len(paths), seed=seed)
        return dataset.map(
            lambda path, label: (decode_image(tf.io.read_file(path), min_side), label),
            num_parallel_calls=tf.data.AUTOTUNE,
        )


def _subfolders(path):
    """The folders in `path`, less links back to it or to a folder above it: a `self -> .` link
    would make a split or class of the folder itself."""
    real = os.path.realpath(path)
    return sorted(
        f
        for f in os.listdir(path)
        if os.path.isdir(os.path.join(path, f)) and not _links_back(os.path.join(path, f), real)
    )


def _links_back(path, parent):
    """Whether the folder `path` resolves to `parent` (a real path) or a folder above it."""
    target = os.path.realpath(path)
    return parent == target or parent.startswith(target.rstrip(os.sep) + os.sep)


def _readable(path):
    try:  # a JPEG at 1/8 of its size: every block is still decoded, in 1/64 of the memory
        image = decode_image(tf.io.read_file(path), min_side=1)
        return image.shape[0] > 0 and image.shape[1] > 0
    except (tf.errors.OpError, OSError):
        return False


def _listing(names, limit=8):
    names = list(names)
    return ", ".join(names[:limit]) + (
        f" and {len(names) - limit} more" if len(names) > limit else ""
    )


def folder_splits(root, eval_split, kind, expected, missing_error):
    """(every split folder of `root`, the evaluation split: `eval_split` or the first of
    EVAL_SPLITS there). Raises DatasetNotFound for a missing `root` and `missing_error` naming a
    missing train/ or evaluation split; `kind` names the folder and `expected` its layout."""
    if not os.path.isdir(root):
        raise DatasetNotFound(f"{kind} {root!r} does not exist or is not a folder ({expected}).")
    splits = _subfolders(root)
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


def folder_reader(folder, seed, **options):
    """(train examples, evaluation examples, evaluation split) of a scanned folder and a function
    reading one of its splits (the training split shuffled, seeded; `options` for as_dataset)."""
    sizes = (
        len(folder.examples["train"]),
        len(folder.examples[folder.eval_split]),
        folder.eval_split,
    )
    return sizes, lambda split: folder.as_dataset(
        split, shuffle=split == "train", seed=seed, **options
    )


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
    class_names = sorted({c for split in splits for c in _subfolders(os.path.join(root, split))})
    listed, empty = {}, []
    ignored = [  # other splits (val/ beside test/), files beside the splits
        f"{f}{'/' if os.path.isdir(os.path.join(root, f)) else ''}"
        for f in sorted(os.listdir(root))
        if f not in ("train", eval_split)
    ]
    for split in ("train", eval_split):
        classes = _subfolders(os.path.join(root, split))
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
            for c in _subfolders(os.path.join(root, split))
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
        print(
            f"warning: ignored {len(ignored)} entr{'y' if len(ignored) == 1 else 'ies'} that "
            f"{'is' if len(ignored) == 1 else 'are'} not {IMAGE_FORMATS} files of a class folder "
            f"in {root}: {_listing(ignored)}",
            file=warn or sys.stderr,
            flush=True,
        )
    if unreadable:
        print(
            f"warning: skipped {len(unreadable)} unreadable image(s) of {len(paths)} in {root}: "
            f"{_listing(os.path.relpath(p, root) for p in unreadable)}",
            file=warn or sys.stderr,
            flush=True,
        )
    if empty:
        raise ValueError(
            f"Image folder {root!r}: no readable {IMAGE_FORMATS} image in {_listing(empty)}"
            f"{' (unreadable ones skipped)' if unreadable else ''}; every class needs at least one "
            "image in train/ and each split at least one class folder."
        )
    return ImageFolder(root, class_names, examples, eval_split, unreadable)


CROP_RATIO = (3 / 4, 4 / 3)  # random-resized-crop aspect ratios (width / height)


def random_resized_crop(image, size, area=(0.08, 1.0), ratio=CROP_RATIO):
    """Inception-style crop (random area and aspect), resized to size x size."""
    begin, crop_size, _ = tf.image.sample_distorted_bounding_box(
        tf.shape(image),
        tf.zeros((1, 0, 4)),
        min_object_covered=0.0,
        aspect_ratio_range=ratio,
        area_range=area,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    crop = tf.slice(image, begin, crop_size)
    return tf.image.resize(tf.cast(crop, tf.float32), (size, size), method="bilinear")


def center_crop(image, size, crop_fraction=EVAL_CROP):
    """Resize the shorter side to size / crop_fraction, then crop the centre size x size."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = (size / crop_fraction) / tf.reduce_min(shape)
    resized_hw = tf.cast(tf.round(shape * scale), tf.int32)
    image = tf.image.resize(tf.cast(image, tf.float32), resized_hw, method="bilinear")
    return tf.image.resize_with_crop_or_pad(image, size, size)


def crop_source_side(size, min_area):
    """The shorter side an image needs so that no random-resized-crop of it (area >= min_area,
    aspect within CROP_RATIO) is upscaled to size: larger sources are cut to it before caching."""
    return math.ceil(size / math.sqrt(min_area * min(CROP_RATIO[0], 1 / CROP_RATIO[1])))


def shrink(image, side, method="bilinear"):
    """`image` (or a mask, method="nearest") with its shorter side resized to `side` when longer,
    in its own dtype: what the cache holds, however large the source."""
    shape = tf.shape(image)[:2]
    scale = side / tf.cast(tf.reduce_min(shape), tf.float32)
    resized_hw = tf.maximum(tf.cast(tf.round(tf.cast(shape, tf.float32) * scale), tf.int32), 1)

    def resized():
        pixels = tf.image.resize(image, resized_hw, method)  # bilinear: float32
        return (
            pixels
            if pixels.dtype == image.dtype
            else tf.saturate_cast(tf.round(pixels), image.dtype)
        )

    return tf.cond(scale < 1, resized, lambda: image)


def cached_bytes(examples, side, channels_bytes, source_shape=None):
    """What caching `examples` decoded examples takes at most: their shorter side cut to `side`
    (or the dataset's fixed `source_shape`, when smaller), `channels_bytes` bytes a pixel."""
    if source_shape is not None and None not in source_shape[:2]:
        side = min(side, *source_shape[:2])
    return examples * side * side * channels_bytes


AUGMENTATIONS = ("basic", "randaugment")


def make_pipeline(
    dataset,
    *,
    image_size,
    batch_size,
    training,
    num_classes,
    min_area=0.08,
    mixup=0.0,
    cache=True,
    seed=None,
    preprocessing_mode="imagenet",
    drop_remainder=False,
    eval_crop=EVAL_CROP,
    augment="basic",
):
    """(image, label) pairs -> batched, augmented, normalised (images, one-hot labels).

    augment: "basic" (random-resized-crop + flip) or "randaugment" (then keras.layers.RandAugment,
    two ops at half strength, on whole batches as the layer is built for: the ops are drawn per
    batch, their magnitudes per image; per image it cost about 4x more input time at 32 px).
    The authors' 200-epoch models use
    AutoAugment's ImageNet policy, which neither Keras nor TF ships; RandAugment is its
    search-free successor from the same group with the same ImageNet gains.
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"Unknown augment {augment!r}: choose one of {', '.join(AUGMENTATIONS)}.")
    rand_augment = None
    if training and augment == "randaugment":
        import keras

        rand_augment = keras.layers.RandAugment(
            value_range=(0, 255), num_ops=2, factor=0.5, seed=seed
        )
    if training:
        # Cut before the cache: a cached 5000 px photo would hold 75 MB for a 32 px crop.
        side = crop_source_side(image_size, min_area)
        dataset = dataset.map(
            lambda image, label: (shrink(image, side), label), num_parallel_calls=tf.data.AUTOTUNE
        )
        if cache:
            dataset = dataset.cache()
        dataset = dataset.shuffle(10_000, seed=seed, reshuffle_each_iteration=True).repeat()

    def transform(image, label):
        if image.shape.rank == 3 and image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        if training:
            image = random_resized_crop(image, image_size, (min_area, 1.0))
            image = tf.image.random_flip_left_right(image)
        else:
            image = center_crop(image, image_size, eval_crop)
        return tf.ensure_shape(image, (image_size, image_size, 3)), tf.one_hot(label, num_classes)

    def finish_batch(images, labels):
        if rand_augment is not None:
            images = tf.clip_by_value(rand_augment(images, training=True), 0.0, 255.0)
        return preprocessing.normalize(images, preprocessing_mode, 3), labels

    dataset = dataset.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
    if cache and not training:  # evaluation is deterministic: its crops are cached
        dataset = dataset.cache()
    dataset = dataset.batch(batch_size, drop_remainder=training or drop_remainder)
    dataset = dataset.map(finish_batch, num_parallel_calls=tf.data.AUTOTUNE)
    if training and mixup > 0:
        dataset = dataset.map(lambda x, y: _mixup(x, y, mixup), num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def _mixup(images, labels, alpha):
    """Mix each batch with its reverse using a Beta(alpha, alpha) weight (one per batch)."""
    gamma1 = tf.random.gamma((), alpha)
    gamma2 = tf.random.gamma((), alpha)
    weight = gamma1 / (gamma1 + gamma2)
    return (
        weight * images + (1 - weight) * tf.reverse(images, [0]),
        weight * labels + (1 - weight) * tf.reverse(labels, [0]),
    )


def read_splits(read, info, train_take=None, eval_take=None, batch_size=None, warn=None):
    """(train, eval) datasets from `read(split)`, cut to the first N examples where asked;
    `info`'s example counts follow the cut. A count that cannot be honoured (a take larger than
    its split, a batch larger than the training examples) is named in one warning line each."""
    train_raw, eval_raw = read("train"), read(info.eval_split)
    for flag, take, split, attribute in (
        ("--train_take", train_take, "train", "train_examples"),
        ("--eval_take", eval_take, info.eval_split, "eval_examples"),
    ):
        if not take:
            continue
        available = getattr(info, attribute)
        if take > available:
            print(
                f"warning: {flag} {take} is more than the {available} examples of the {split} "
                f"split: using all {available}.",
                file=warn or sys.stderr,
                flush=True,
            )
        setattr(info, attribute, min(available, take))
    if train_take:
        train_raw = train_raw.take(train_take)
    if eval_take:
        eval_raw = eval_raw.take(eval_take)
    if batch_size and batch_size > info.train_examples:
        print(
            f"warning: --batch_size {batch_size} is more than the {info.train_examples} training "
            "examples: each batch holds some of them more than once.",
            file=warn or sys.stderr,
            flush=True,
        )
    return train_raw, eval_raw


def load(
    name,
    *,
    image_size,
    batch_size,
    data_dir=None,
    download=False,
    eval_split=None,
    min_area=0.08,
    mixup=0.0,
    train_take=None,
    eval_take=None,
    seed=None,
    eval_crop=EVAL_CROP,
    augment="basic",
):
    """(train_ds, eval_ds, DatasetInfo) for a TFDS name, 'folder:<root>' or 'fashion_mnist'.

    eval_crop: the evaluation centre-crop fraction (0.875 as for ImageNet; 1.0 suits small,
    tightly framed images such as Fashion-MNIST trained with mild crops).
    augment: "basic" or "randaugment" (see make_pipeline).
    """
    check_classification(name)
    side = crop_source_side(image_size, min_area)  # enough for evaluation's crop too
    source_shape = None
    if name.startswith(FOLDER):
        folder = scan_image_folder(name[len(FOLDER) :], eval_split)
        sizes, read = folder_reader(folder, seed, min_side=side)
        info = DatasetInfo(len(folder.class_names), *sizes)
    else:
        builder = _builder(name, data_dir, download)
        info = dataset_info(builder, eval_split)
        image = builder.info.features["image"] if "image" in builder.info.features else None
        source_shape = getattr(image, "shape", None)
        read = lambda split: builder.as_dataset(
            split=split, as_supervised=True, shuffle_files=split == "train"
        )
    train_raw, eval_raw = read_splits(read, info, train_take, eval_take, batch_size)
    # Large datasets (ImageNet) do not fit in memory: cache only small ones.
    cache = cached_bytes(info.train_examples, side, 3, source_shape) < 4e9
    kwargs = dict(
        image_size=image_size, batch_size=batch_size, num_classes=info.num_classes, cache=cache
    )
    train = make_pipeline(
        train_raw,
        training=True,
        min_area=min_area,
        mixup=mixup,
        seed=seed,
        augment=augment,
        **kwargs,
    )
    evaluation = make_pipeline(eval_raw, training=False, eval_crop=eval_crop, **kwargs)
    return train, evaluation, info
