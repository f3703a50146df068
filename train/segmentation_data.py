"""Segmentation input: Fashion-MNIST scenes, a folder of image/mask pairs (seg_folder:<root>), or a
prepared TFDS dataset with `image` and `segmentation_mask` features.

Training transforms image and mask jointly: a random scale of 0.5-2x the size that fits the
shorter side to image_size, padding up to image_size (image with 0, mask with IGNORE_LABEL), one
random crop and one random horizontal flip for both. Evaluation resizes the shorter side to
image_size and crops the centre. Masks are always resized nearest-neighbour, so no label is
invented; images bilinear. Grayscale becomes 3 channels and images are normalised like the
pretrained weights (ImageNet mean/std), as for classification. Folders are checked when loaded
(train/segmentation_folder.py); batches come from train/pipeline.py. Nothing here downloads
unless asked to.
"""

import math

import tensorflow as tf
import tensorflow_datasets as tfds

from repvgg_keras import preprocessing
from repvgg_keras.masks import IGNORE_LABEL
from train import fashion_mnist_scenes, pipeline, tfds_sources
from train.folders import folder_reader
from train.segmentation_folder import read_pair, scan_segmentation_folder
from train.sources import (
    SCENES,
    SEGMENTATION_FOLDER,
    DatasetInfo,
    DatasetNotFound,
    check_task,
    read_splits,
)

CLASS_NAMES = fashion_mnist_scenes.CLASS_NAMES  # of fashion_mnist_scenes
SCALE_RANGE = (0.5, 2.0)


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
    if not tfds_sources.is_prepared(builder):
        builder.download_and_prepare()
    return builder


def _tfds_builder(name, data_dir, download):
    builder = tfds_sources.builder(name, data_dir, download)
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
    eval_split = tfds_sources.eval_split_of(builder, eval_split)
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
    return DatasetInfo(
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
    side = math.ceil(image_size * SCALE_RANGE[1])  # the largest scale the augmentation draws

    def cut(image, mask):
        return pipeline.shrink(image, side), pipeline.shrink(mask[..., None], side, "nearest")[
            ..., 0
        ]

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

    def finish(images, masks):
        return preprocessing.normalize(images, preprocessing_mode, 3), masks

    # Random scales draw from the cut (cached) sources, a stateless seed per example.
    cut = cut if random else None
    return pipeline.batches(
        dataset, transform, finish, cut, training, batch_size, cache, seed, example_seeds=True
    )


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
    """(train_ds, eval_ds, DatasetInfo) for 'fashion_mnist_scenes', 'seg_folder:<root>' or a
    prepared TFDS dataset with `image` and `segmentation_mask` features.

    num_classes: only for TFDS datasets whose metadata does not record it (most do not; the
    scenes and seg_folder count their own).
    """
    check_task(name, "segmentation")
    source_shape = None
    if name.startswith(SEGMENTATION_FOLDER):
        folder = scan_segmentation_folder(name[len(SEGMENTATION_FOLDER) :], eval_split)
        sizes, read = folder_reader(folder, seed, read_pair)
        info = DatasetInfo(folder.num_classes, *sizes, folder.class_names)
    else:
        if name.partition("/")[0] == SCENES:
            builder = _scenes_builder(name, data_dir)
        else:
            builder = _tfds_builder(name, data_dir, download)
        info = _tfds_info(name, builder, eval_split, num_classes)
        source_shape = builder.info.features["image"].shape
        read = lambda split: _tfds_pairs(builder, split, shuffle=split == "train")
    train_raw, eval_raw = read_splits(read, info, train_take, eval_take, batch_size)
    # Decoded examples are cached (image uint8 and mask int32: 7 bytes a pixel, at most the
    # largest scale the augmentation draws); large datasets are not.
    side = math.ceil(image_size * SCALE_RANGE[1])
    options = dict(
        image_size=image_size,
        batch_size=batch_size,
        cache=pipeline.cacheable(info.train_examples, side, 7, source_shape),
    )
    train = make_pipeline(train_raw, training=True, augment=augment, seed=seed, **options)
    evaluation = make_pipeline(eval_raw, training=False, **options)
    return train, evaluation, info
