"""Fashion-MNIST scenes: a small semantic-segmentation dataset composed offline from Fashion-MNIST.

Recipe (every constant is a class attribute of `FashionMnistScenes`):

- A black 64x64 uint8 canvas gets 1 to 4 garments (uniform). Each garment is drawn uniformly from
  the split's Fashion-MNIST images (train scenes from train-images, test scenes from t10k-images,
  read from Debian's idx files through `train.fashion_mnist_debian`), resized with PIL bilinear to
  a random square side of 24 to 40 px (inclusive) and placed at a random position fully inside
  the canvas.
- A resized garment's foreground is where its pixel is >= 32 (of 255). Fainter pixels are the
  resize's halo and the near-black fringe of the originals, barely visible on black; leaving them
  out keeps the mask on what can be seen. Only foreground pixels are drawn: the canvas takes the
  garment's pixel and the mask its class index + 1 (1..10). Garments are drawn in order, so a
  later garment occludes an earlier one wherever its foreground is, and an earlier garment shows
  through a later one's background. Hence mask == 0 exactly where the image is 0.
- Dark areas inside a garment (below the threshold) stay background: the mask follows the
  pixels, it does not fill holes.
- Scene i of a split draws everything from numpy.random.default_rng((split seed, i)) with split
  seeds train 0 and test 1, so the dataset is the same on every machine and scene i does not
  depend on how many scenes are built.

Sizes: train 10,000 scenes, test 2,000; config `large` (`fashion_mnist_scenes/large`): train 50,000
(its first 10,000 are the default's), the same test scenes (a `ScenesConfig` builds fewer, e.g. in
tests). Features:
`image` (64, 64, 1) uint8, `segmentation_mask` (64, 64, 1) uint8 with 11 classes (0 background),
`num_garments` int32.
"""

import io
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from train import fashion_mnist_debian

CLASS_NAMES = [
    "background",
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_garments(split):
    """(images uint8 [N, 28, 28], labels uint8 [N]) of a Fashion-MNIST split from the Debian files."""
    images_file, labels_file = IDX_FILES[split]
    missing = [
        f
        for f in (images_file, labels_file)
        if not os.path.exists(os.path.join(fashion_mnist_debian.DEBIAN_DIR, f))
    ]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files {missing} not found in {fashion_mnist_debian.DEBIAN_DIR}: "
            "`apt-get install -y dataset-fashion-mnist`."
        )
    images = np.fromfile(fashion_mnist_debian._unzipped(images_file), np.uint8, offset=16)
    labels = np.fromfile(fashion_mnist_debian._unzipped(labels_file), np.uint8, offset=8)
    return images.reshape(-1, 28, 28), labels


def draw_placements(rng, pool_size, canvas_size=64, garment_counts=(1, 4), garment_sizes=(24, 40)):
    """[(garment index, side, top, left)] of one scene, in drawing order (ranges inclusive)."""
    placements = []
    for _ in range(int(rng.integers(garment_counts[0], garment_counts[1] + 1))):
        index = int(rng.integers(pool_size))
        size = int(rng.integers(garment_sizes[0], garment_sizes[1] + 1))
        top, left = (int(v) for v in rng.integers(0, canvas_size - size + 1, size=2))
        placements.append((index, size, top, left))
    return placements


def resize_garment(garment, size):
    """A 28x28 garment as a size x size uint8 array (PIL bilinear)."""
    return np.asarray(Image.fromarray(garment).resize((size, size), Image.Resampling.BILINEAR))


def compose_scene(
    garments,
    labels,
    rng,
    canvas_size=64,
    garment_counts=(1, 4),
    garment_sizes=(24, 40),
    threshold=32,
):
    """One scene: (image uint8 [S, S], mask uint8 [S, S], number of garments).

    garments/labels: the pool to draw from; rng: a numpy Generator (all draws come from it, see
    draw_placements). See the module docstring for the recipe.
    """
    image = np.zeros((canvas_size, canvas_size), np.uint8)
    mask = np.zeros((canvas_size, canvas_size), np.uint8)
    placements = draw_placements(rng, len(garments), canvas_size, garment_counts, garment_sizes)
    for index, size, top, left in placements:
        resized = resize_garment(garments[index], size)
        foreground = resized >= threshold
        window = (slice(top, top + size), slice(left, left + size))
        image[window] = np.where(foreground, resized, image[window])
        mask[window] = np.where(foreground, labels[index] + 1, mask[window])
    return image, mask, len(placements)


class ScenesConfig(tfds.core.BuilderConfig):
    """How many scenes each split gets (the default config is the published dataset)."""

    def __init__(self, *, train_scenes=10_000, test_scenes=2_000, **kwargs):
        super().__init__(**kwargs)
        self.train_scenes = train_scenes
        self.test_scenes = test_scenes


class FashionMnistScenes(tfds.core.GeneratorBasedBuilder):
    """`fashion_mnist_scenes`: 64x64 scenes of 1-4 Fashion-MNIST garments with per-pixel classes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Scenes composed from Debian's Fashion-MNIST files."}
    BUILDER_CONFIGS = [
        ScenesConfig(name="default", description="10,000 train, 2,000 test scenes"),
        ScenesConfig(
            name="large",
            description="50,000 train scenes (the default's 10,000 first), the same 2,000 test",
            train_scenes=50_000,
        ),
    ]

    CANVAS_SIZE = 64
    GARMENT_COUNTS = (1, 4)  # inclusive
    GARMENT_SIZES = (24, 40)  # inclusive, square side in pixels
    THRESHOLD = 32  # resized garment pixel >= THRESHOLD is foreground
    SPLIT_SEEDS = {"train": 0, "test": 1}
    CLASS_NAMES = CLASS_NAMES

    def _info(self):
        shape = (self.CANVAS_SIZE, self.CANVAS_SIZE, 1)
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=shape, dtype=np.uint8),
                    "segmentation_mask": tfds.features.Image(shape=shape, dtype=np.uint8),
                    "num_garments": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            supervised_keys=("image", "segmentation_mask"),
            metadata=tfds.core.MetadataDict(
                num_classes=len(self.CLASS_NAMES), class_names=list(self.CLASS_NAMES)
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        counts = {
            "train": self.builder_config.train_scenes,
            "test": self.builder_config.test_scenes,
        }
        return {split: self._generate_examples(split, count) for split, count in counts.items()}

    def _generate_examples(self, split, count):
        garments, labels = read_garments(split)
        for i in range(count):
            image, mask, garments_drawn = compose_scene(
                garments,
                labels,
                np.random.default_rng((self.SPLIT_SEEDS[split], i)),
                self.CANVAS_SIZE,
                self.GARMENT_COUNTS,
                self.GARMENT_SIZES,
                self.THRESHOLD,
            )
            yield (
                i,
                {
                    "image": _png(image),
                    "segmentation_mask": _png(mask),
                    "num_garments": garments_drawn,
                },
            )


def _png(pixels):
    """PNG bytes by PIL at low compression: several times faster than tfds's own TF encoder."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
