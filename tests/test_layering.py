"""The library stands alone: `repvgg_keras` imports nothing from `export`, `train` or `bench`."""

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

BLOCKED_IMPORT = r"""
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("export", "train", "bench"):
            raise ImportError(f"repvgg_keras imported {name}")

sys.meta_path.insert(0, Block())
import numpy as np
import repvgg_keras as rk
from repvgg_keras import checkpoints, convert_checkpoint, parity, preprocessing, structure  # noqa: F401

model = parity.randomize_batchnorm(rk.RepVGG_A0(input_shape=(32, 32, 3), classes=4))
plain = rk.to_deploy(model)
x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
print(parity.max_relative_difference(plain(x), model(x)))
"""


@pytest.mark.slow
def test_library_imports_and_converts_without_the_other_packages():
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORT],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-5
