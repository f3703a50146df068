"""Input pipelines through tensorflow-datasets: any TFDS name, a folder of images, Fashion-MNIST offline.

Training: random-resized-crop + horizontal flip, plus RandAugment with augment="randaugment"
(the 200-epoch recipe's stronger augmentation). Evaluation: resize to image_size / 0.875
then centre crop (the paper's 256 -> 224, scaled). Grayscale becomes 3 channels, pixels
are normalised like the pretrained weights (ImageNet mean/std). Datasets that are not
present raise at once: nothing here downloads unless asked to.
"""

import dataclasses
import os

import tensorflow as tf
import tensorflow_datasets as tfds

from repvgg_keras import preprocessing

EVAL_CROP = 0.875


@dataclasses.dataclass
class DatasetInfo:
    num_classes: int
    train_examples: int
    eval_examples: int
    eval_split: str


class DatasetNotFound(FileNotFoundError):
    pass


def _builder(name, data_dir, download):
    """A prepared tfds builder for `name`, or a DatasetNotFound saying how to get it."""
    if name.startswith("folder:"):
        root = name[len("folder:"):]
        if not os.path.isdir(root):
            raise DatasetNotFound(f"Image folder {root!r} does not exist (expected {root}/<split>/<class>/<image>).")
        return tfds.folder_dataset.ImageFolder(root)
    if name == "fashion_mnist":
        from train import fashion_mnist_debian

        official = tfds.builder("fashion_mnist", data_dir=data_dir)
        if not _is_prepared(official) and fashion_mnist_debian.available():
            name = "fashion_mnist_debian"
    builder = tfds.builder(name, data_dir=data_dir)
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
    eval_split = eval_split or next((s for s in ("validation", "test", "val") if s in known), "test")
    label = builder.info.features["label"]

    def size(split):
        if split in known and splits[split].num_examples:
            return splits[split].num_examples
        return int(builder.as_dataset(split=split).reduce(0, lambda n, _: n + 1))

    return DatasetInfo(label.num_classes, size("train"), size(eval_split), eval_split)


def random_resized_crop(image, size, area=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Inception-style crop (random area and aspect), resized to size x size."""
    begin, crop_size, _ = tf.image.sample_distorted_bounding_box(
        tf.shape(image), tf.zeros((1, 0, 4)), min_object_covered=0.0,
        aspect_ratio_range=ratio, area_range=area, max_attempts=10, use_image_if_no_bounding_boxes=True,
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


AUGMENTATIONS = ("basic", "randaugment")


def make_pipeline(dataset, *, image_size, batch_size, training, num_classes, min_area=0.08,
                  mixup=0.0, cache=True, seed=None, preprocessing_mode="imagenet", drop_remainder=False,
                  eval_crop=EVAL_CROP, augment="basic"):
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

        rand_augment = keras.layers.RandAugment(value_range=(0, 255), num_ops=2, factor=0.5, seed=seed)
    if cache:
        dataset = dataset.cache()
    if training:
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
    return (weight * images + (1 - weight) * tf.reverse(images, [0]),
            weight * labels + (1 - weight) * tf.reverse(labels, [0]))


def load(name, *, image_size, batch_size, data_dir=None, download=False, eval_split=None,
         min_area=0.08, mixup=0.0, train_take=None, eval_take=None, seed=None, eval_crop=EVAL_CROP,
         augment="basic"):
    """(train_ds, eval_ds, DatasetInfo) for a TFDS name, 'folder:<root>' or 'fashion_mnist'.

    eval_crop: the evaluation centre-crop fraction (0.875 as for ImageNet; 1.0 suits small,
    tightly framed images such as Fashion-MNIST trained with mild crops).
    augment: "basic" or "randaugment" (see make_pipeline).
    """
    builder = _builder(name, data_dir, download)
    info = dataset_info(builder, eval_split)
    read = lambda split: builder.as_dataset(split=split, as_supervised=True, shuffle_files=split == "train")
    train_raw, eval_raw = read("train"), read(info.eval_split)
    if train_take:
        train_raw = train_raw.take(train_take)
        info.train_examples = min(info.train_examples, train_take)
    if eval_take:
        eval_raw = eval_raw.take(eval_take)
        info.eval_examples = min(info.eval_examples, eval_take)
    # Large datasets (ImageNet) do not fit in memory: cache only small ones.
    cache = info.train_examples * image_size * image_size * 3 < 4e9
    kwargs = dict(image_size=image_size, batch_size=batch_size, num_classes=info.num_classes, cache=cache)
    train = make_pipeline(train_raw, training=True, min_area=min_area, mixup=mixup, seed=seed,
                          augment=augment, **kwargs)
    evaluation = make_pipeline(eval_raw, training=False, eval_crop=eval_crop, **kwargs)
    return train, evaluation, info
