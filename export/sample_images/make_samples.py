"""Rebuild the sample images: random square crops (96x96 JPEG) of scikit-image's public-domain and CC0 photos.

pip download --no-deps scikit-image -d /tmp/sk && unzip -q /tmp/sk/*.whl "skimage/data/*" -d /tmp/sk
python export/sample_images/make_samples.py /tmp/sk/skimage/data export/sample_images
"""

import sys

import numpy as np
from PIL import Image

SOURCES = [
    ("astronaut.png", 8),
    ("chelsea.png", 8),
    ("coffee.png", 8),
    ("rocket.jpg", 8),
    ("hubble_deep_field.jpg", 6),
    ("retina.jpg", 6),
    ("camera.png", 5),
    ("brick.png", 5),
    ("grass.png", 5),
    ("gravel.png", 5),
]
SIZE = 96


def main(data_dir, out_dir):
    rng = np.random.default_rng(0)
    for name, count in SOURCES:
        image = Image.open(f"{data_dir}/{name}").convert("RGB")
        width, height = image.size
        for i in range(count):
            side = int(min(width, height) * rng.uniform(0.35, 1.0))
            x, y = rng.integers(0, width - side + 1), rng.integers(0, height - side + 1)
            crop = image.crop((x, y, x + side, y + side)).resize((SIZE, SIZE), Image.BILINEAR)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            crop.save(f"{out_dir}/{name.split('.')[0]}_{i}.jpg", "JPEG", quality=85)


if __name__ == "__main__":
    main(*sys.argv[1:3])
