"""Classification input: any TFDS name, a folder of images (folder:<root>), Fashion-MNIST offline.

Training: random-resized-crop + horizontal flip, plus RandAugment with augment="randaugment"
(the 200-epoch recipe's stronger augmentation). Evaluation: resize to image_size / 0.875
then centre crop (the paper's 256 -> 224, scaled). Grayscale becomes 3 channels, pixels
are normalised like the pretrained weights (ImageNet mean/std). Datasets that are not
present raise at once: nothing here downloads unless asked to (train/tfds_sources.py). Folders
are checked when loaded (train/image_folder.py). Batches come from train/pipeline.py.
"""

import math

import tensorflow as tf

from repvgg_keras import preprocessing
from train import pipeline, tfds_sources
from train.folders import decode_image, folder_reader
from train.image_folder import scan_image_folder
from train.sources import FOLDER, DatasetInfo, DatasetNotFound, check_task, read_splits

EVAL_CROP = 0.875
AUGMENTATIONS = ("basic", "randaugment")


def dataset_info(builder, eval_split=None):
    """Classes and split sizes; counts the examples when the builder has no split metadata."""
    splits = builder.info.splits
    known = list(splits.keys()) if splits else []
    eval_split = tfds_sources.eval_split_of(builder, eval_split)
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
    batch, their magnitudes per image, which keeps its input time low). The authors' 200-epoch
    models use AutoAugment's ImageNet policy, which neither Keras nor TF ships; RandAugment is its
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
    side = crop_source_side(image_size, min_area)

    def cut(image, label):  # a cached 5000 px photo would hold 75 MB for a 32 px crop
        return pipeline.shrink(image, side), label

    def transform(image, label):
        if image.shape.rank == 3 and image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        if training:
            image = random_resized_crop(image, image_size, (min_area, 1.0))
            image = tf.image.random_flip_left_right(image)
        else:
            image = center_crop(image, image_size, eval_crop)
        return tf.ensure_shape(image, (image_size, image_size, 3)), tf.one_hot(label, num_classes)

    def finish(images, labels):
        if rand_augment is not None:
            images = tf.clip_by_value(rand_augment(images, training=True), 0.0, 255.0)
        images = preprocessing.normalize(images, preprocessing_mode, 3)
        if training and mixup > 0:
            return _mixup(images, labels, mixup)
        return images, labels

    # Training draws its crops anew each epoch from the cut (cached) sources.
    cut = cut if training else None
    return pipeline.batches(
        dataset, transform, finish, cut, training, batch_size, cache, seed, drop_remainder
    )


def _mixup(images, labels, alpha):
    """Mix each batch with its reverse using a Beta(alpha, alpha) weight (one per batch)."""
    gamma1 = tf.random.gamma((), alpha)
    gamma2 = tf.random.gamma((), alpha)
    weight = gamma1 / (gamma1 + gamma2)
    return (
        weight * images + (1 - weight) * tf.reverse(images, [0]),
        weight * labels + (1 - weight) * tf.reverse(labels, [0]),
    )


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
    check_task(name, "classification")
    side = crop_source_side(image_size, min_area)  # enough for evaluation's crop too
    source_shape = None
    if name.startswith(FOLDER):
        folder = scan_image_folder(name[len(FOLDER) :], eval_split)
        sizes, read = folder_reader(
            folder,
            seed,
            lambda path, label: (
                decode_image(tf.io.read_file(path), min_side=side),
                tf.cast(label, tf.int64),
            ),
        )
        info = DatasetInfo(len(folder.class_names), *sizes)
    else:
        builder = tfds_sources.builder(name, data_dir, download)
        info = dataset_info(builder, eval_split)
        source_shape = tfds_sources.image_shape(builder)
        read = lambda split: builder.as_dataset(
            split=split, as_supervised=True, shuffle_files=split == "train"
        )
    train_raw, eval_raw = read_splits(read, info, train_take, eval_take, batch_size)
    options = dict(
        image_size=image_size,
        batch_size=batch_size,
        num_classes=info.num_classes,
        cache=pipeline.cacheable(info.train_examples, side, 3, source_shape),
    )
    train = make_pipeline(
        train_raw,
        training=True,
        min_area=min_area,
        mixup=mixup,
        seed=seed,
        augment=augment,
        **options,
    )
    evaluation = make_pipeline(eval_raw, training=False, eval_crop=eval_crop, **options)
    return train, evaluation, info
