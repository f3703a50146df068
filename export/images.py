"""Real images for verification and int8 calibration, resized to the model's input."""

import glob
import gzip
import os

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# Real photographs shipped with the package (public domain / CC0, see its LICENSE.md), so that every
# export verifies on real images with nothing else installed.
SAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_images")
SOURCES_HELP = (
    "'sample' (photos shipped with the package), 'fashion_mnist', 'random', "
    "'tfds:<name>:<split>' or a folder"
)


def fashion_mnist(split="t10k", directory=FASHION_MNIST_DIR):
    """(images uint8 [N, 28, 28], labels) from the Debian package's idx files."""
    images_path = os.path.join(directory, f"{split}-images-idx3-ubyte.gz")
    labels_path = os.path.join(directory, f"{split}-labels-idx1-ubyte.gz")
    if not os.path.exists(images_path):
        raise FileNotFoundError(
            f"Fashion-MNIST not found at {images_path}. Install it with "
            "`apt-get install -y dataset-fashion-mnist`, or pass a folder of images."
        )
    with gzip.open(images_path) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(labels_path) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images, labels


def _resize(images, height, width, channels, what="the images"):
    """`images` at the model's size and channels; only grayscale and RGB convert into each
    other, so a source of other channel counts is a ValueError naming `what` (the source)."""
    import tensorflow as tf

    images = tf.convert_to_tensor(images)
    if images.shape.rank == 3:
        images = images[..., None]
    have = images.shape[-1]
    if have != channels and sorted((have, channels)) != [1, 3]:
        raise ValueError(
            f"{what} holds {have}-channel images and the model takes {channels} channels: only "
            f"grayscale (1) and RGB (3) convert into each other. Use 'random' images or a "
            f"source of {channels}-channel images."
        )
    if have != channels:
        images = (
            tf.image.grayscale_to_rgb(images)
            if channels == 3
            else tf.image.rgb_to_grayscale(images)
        )
    resized = tf.image.resize(tf.cast(images, tf.float32), (height, width), method="bilinear")
    return np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def folder_images(root):
    """The image files under `root`, each file once: linked folders are not followed (a link
    back into the tree would list its images again and again), a linked file counts once."""
    seen, files = set(), []
    for folder, _, names in sorted(os.walk(root, followlinks=False)):
        for name in sorted(names):
            path = os.path.join(folder, name)
            real = os.path.realpath(path)
            if name.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(real) and real not in seen:
                seen.add(real)
                files.append(path)
    return files


def sample_files():
    """The shipped sample photos, interleaved by source (the first few cover every subject)."""
    files = glob.glob(os.path.join(SAMPLE_DIR, "*.jpg"))
    index = lambda path: int(os.path.splitext(path)[0].rsplit("_", 1)[1])
    return sorted(files, key=lambda path: (index(path), os.path.basename(path)))


def _decode_files(files, height, width, channels, what):
    import tensorflow as tf

    decoded = []
    for path in files:
        try:
            image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        except (tf.errors.OpError, OSError) as error:
            raise ValueError(
                f"Cannot read image {path}: {str(error).splitlines()[0]}. "
                "Remove it or point at another folder."
            ) from None
        decoded.append(_resize(image[None], height, width, channels, what)[0])
    return np.stack(decoded)


def _load_tfds(source, count, what):
    """[count, H, W, C] pixels of a prepared tensorflow-datasets split ('tfds:<name>:<split>');
    an unknown name is one line with close matches (tfds's own error lists every dataset)."""
    import difflib

    import tensorflow_datasets as tfds

    _, name, split = (source.split(":") + ["train"])[:3]
    try:
        dataset = tfds.load(name, split=split, as_supervised=True, download=False)
    except tfds.core.DatasetNotFoundError:
        known = tfds.list_builders(with_community_datasets=False)
        close = difflib.get_close_matches(name.split("/")[0], known, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"{what}: no tensorflow-datasets dataset named {name!r}.{hint}") from None
    except AssertionError:  # tfds asserts that the data was prepared
        raise ValueError(
            f"{what}: tensorflow-datasets has no prepared data for {name!r} (nothing is "
            f"downloaded here): run `tfds build {name}` first, or use another source."
        ) from None
    return np.stack([image for image, _ in tfds.as_numpy(dataset.take(count))])


def load_images(source, count, height, width, channels=3, seed=0, what=None):
    """uint8 [count, height, width, channels] pixels from 'sample' (the photos shipped in
    export/sample_images, at most their number), 'fashion_mnist', 'random',
    'tfds:<name>:<split>' (a prepared tensorflow-datasets split) or a folder of images.
    `what` names the source in errors (e.g. the flag that gave it)."""
    what = what or f"image source {source!r}"
    if count < 1:
        raise ValueError(f"Asked for {count} images: the count must be at least 1.")
    if source == "sample":
        return _decode_files(sample_files()[:count], height, width, channels, what)
    if source == "random":
        rng = np.random.default_rng(seed)
        return rng.integers(0, 256, (count, height, width, channels), dtype=np.uint8)
    if source == "fashion_mnist":
        images, _ = fashion_mnist()
        return _resize(images[:count], height, width, channels, what)
    if source.startswith("tfds:"):  # tfds:<name>:<split>, read from the local tfds data dir
        return _resize(_load_tfds(source, count, what), height, width, channels, what)
    if os.path.isdir(source):
        files = folder_images(source)[:count]
        if not files:
            raise ValueError(f"No JPEG/PNG/BMP/GIF images found under {source!r}.")
        return _decode_files(files, height, width, channels, what)
    raise ValueError(f"Unknown image source {source!r}: use {SOURCES_HELP}.")
