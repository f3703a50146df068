"""Datasets through tensorflow-datasets, for both tasks: a prepared builder or one line saying how
to get it. Nothing downloads unless asked to (`download`), except Fashion-MNIST, built offline
from Debian's files when tfds's own copy is not prepared."""

import difflib
import os

import tensorflow as tf
import tensorflow_datasets as tfds

from train import fashion_mnist_debian
from train.sources import EVAL_SPLITS, FOLDER, DatasetNotFound

OUR_NAMES = ("fashion_mnist", FOLDER)  # names we take besides tfds's catalogue


def check_known(name):
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


def builder(name, data_dir, download):
    """A prepared tfds builder for `name`, or a DatasetNotFound saying how to get it."""
    check_known(name)
    if name == "fashion_mnist":
        official = tfds.builder("fashion_mnist", data_dir=data_dir)
        if not is_prepared(official) and fashion_mnist_debian.available():
            name = "fashion_mnist_debian"
    try:
        found = tfds.builder(name, data_dir=data_dir)
    # ValueError: e.g. an unknown config.
    except (tfds.core.DatasetNotFoundError, ValueError) as error:
        raise DatasetNotFound(f"Dataset {name!r}: {str(error).strip().splitlines()[0]}") from None
    if not is_prepared(found):
        if name == "fashion_mnist_debian" or download:
            found.download_and_prepare()
        else:
            raise DatasetNotFound(
                f"Dataset {name!r} is not prepared in {found.data_dir}. Prepare it first "
                f"(`tfds build {name}`, with its manual files for imagenet2012), pass --data_dir, "
                "or pass --download to let tfds fetch it. Nothing was downloaded."
            )
    return found


def is_prepared(builder):
    try:
        return tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json"))
    except Exception:
        return False


def eval_split_of(builder, eval_split=None):
    """`eval_split`, else the first of EVAL_SPLITS the builder has (test when it lists none)."""
    splits = builder.info.splits
    known = list(splits.keys()) if splits else []
    return eval_split or next((s for s in EVAL_SPLITS if s in known), "test")


def image_shape(builder):
    """The builder's fixed image shape (None where it has none): bounds what a cache holds."""
    features = builder.info.features
    image = features["image"] if "image" in features else None
    return getattr(image, "shape", None)
