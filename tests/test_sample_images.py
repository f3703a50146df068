"""The photos shipped with the package: what every export verifies on when nothing else is installed."""

import os
import subprocess
import sys

import numpy as np
import pytest

from export import images
from tests.helpers import REPO


def test_sample_images_are_real_distinct_photos_of_every_subject():
    files = images.sample_files()
    assert len(files) == 64
    assert os.path.exists(os.path.join(images.SAMPLE_DIR, "LICENSE.md"))
    first = {os.path.basename(f).rsplit("_", 1)[0] for f in files[:10]}
    assert len(first) == 10  # interleaved: a short verification set still covers every subject
    pixels = images.load_images("sample", 16, 40, 56)
    assert pixels.shape == (16, 40, 56, 3) and pixels.dtype == np.uint8
    assert len({p.tobytes() for p in pixels}) == 16
    assert 20 < pixels.std() < 120  # photographs, not constant or noise-free images
    assert images.load_images("sample", 4, 32, 32, channels=1).shape == (4, 32, 32, 1)
    with pytest.raises(ValueError, match="at least 1"):
        images.load_images("sample", 0, 32, 32)


def test_a_corrupt_image_in_a_folder_is_named(tmp_path):
    (tmp_path / "good.jpg").write_bytes(open(images.sample_files()[0], "rb").read())
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match="broken.jpg"):
        images.load_images(str(tmp_path), 4, 32, 32)


WITHOUT_FASHION_MNIST = """
import runpy, sys
from export import images

def missing(*args, **kwargs):
    raise FileNotFoundError("Fashion-MNIST is not installed on this machine")

images.fashion_mnist = missing
sys.argv = ["export.tflite"] + sys.argv[1:]
runpy.run_module("export.tflite", run_name="__main__")
"""


@pytest.mark.slow
def test_exporter_defaults_need_no_dataset(tmp_path):
    """Run from outside the repository with Fashion-MNIST unavailable: the default verification
    and calibration images are the shipped photos."""
    output = tmp_path / "a0.tflite"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            WITHOUT_FASHION_MNIST,
            "--model=RepVGG_A0",
            "--image_size=32",
            "--classes=10",
            "--quantize=int8",
            "--min_agreement=0",  # random weights: int8 keeps no meaningful top-1
            f"--output={output}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert " OK" in done.stdout and output.exists()
    assert done.stdout.strip().splitlines()[-1].startswith("verified: top-1 agreement")
