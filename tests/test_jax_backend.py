"""The block tests again, in a fresh process on Keras's JAX backend."""

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # converts, exports, serves or trains end to end


def test_block_suite_passes_under_jax():
    tests_dir = os.path.dirname(__file__)
    env = dict(os.environ, KERAS_BACKEND="jax", REPVGG_EXPECT_BACKEND="jax", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            os.path.join(tests_dir, "test_block.py"),
            os.path.join(tests_dir, "test_fusion.py"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert re.search(r"\b[1-9]\d* passed", summary) and not re.search(
        r"\d+ (failed|error)", summary
    ), summary
