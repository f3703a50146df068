"""Fashion-MNIST for tensorflow-datasets, built offline from Debian's dataset-fashion-mnist files.

tfds's own `fashion_mnist` builder downloads from the internet; this subclass reads the
same idx files from /usr/share/datasets/fashion-mnist instead (same features and splits).
"""

import os

import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import mnist

from train import staged

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"


class FashionMnistDebian(mnist.FashionMNIST):
    """`fashion_mnist_debian`: tfds's FashionMNIST with the Debian package as its source."""

    VERSION = tfds.core.Version("3.0.1")

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        files = {
            "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
            "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
        }
        missing = [
            f for f, _, _ in files.values() if not os.path.exists(os.path.join(DEBIAN_DIR, f))
        ]
        if missing:
            raise FileNotFoundError(
                f"Fashion-MNIST files {missing} not found in {DEBIAN_DIR}: "
                "`apt-get install -y dataset-fashion-mnist`."
            )
        return [
            tfds.core.SplitGenerator(
                name=split,
                gen_kwargs=dict(
                    num_examples=count, data_path=_unzipped(images), label_path=_unzipped(labels)
                ),
            )
            for split, (images, labels, count) in files.items()
        ]


def _unzipped(filename):
    """tfds's MNIST reader expects extracted idx files: extract once into a temp cache."""
    import gzip
    import shutil
    import tempfile

    target_dir = os.path.join(tempfile.gettempdir(), "repvgg_keras_fashion_mnist")
    os.makedirs(target_dir, exist_ok=True)
    target = os.path.join(target_dir, filename[: -len(".gz")])
    if not os.path.exists(target):
        with (
            staged.staging(target, unique=True) as partial,
            gzip.open(os.path.join(DEBIAN_DIR, filename)) as src,
            open(partial, "wb") as dst,
        ):
            shutil.copyfileobj(src, dst)
    return target


def available():
    return os.path.exists(os.path.join(DEBIAN_DIR, "train-images-idx3-ubyte.gz"))
