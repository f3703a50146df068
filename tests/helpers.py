"""What several test modules share: the repository root, random images, running a CLI."""

import os
import subprocess
import sys

import numpy as np
import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_images(rng, shape):
    """Standard-normal float32 images of `shape`."""
    return rng.normal(0.0, 1.0, shape).astype("float32")


def cli_env(**extra):
    """The environment a CLI runs in: quiet TensorFlow, unbuffered output, this checkout first."""
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    return dict(
        os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1", PYTHONPATH=path, **extra
    )


def run_cli(module, *args, timeout=600, env=None):
    """`python -m module args...` from the repository root; the finished process."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env or cli_env(),
        timeout=timeout,
    )


def every_variant():
    """Every variant as a test parameter: RepVGG_A0 and RepVGG_B1g4 in the unit tier, the rest slow."""
    import pytest

    import repvgg_keras as rk

    unit_tier = ("RepVGG_A0", "RepVGG_B1g4")
    return [
        pytest.param(name, marks=() if name in unit_tier else pytest.mark.slow)
        for name in rk.list_models()
    ]


# A tiny `python -m train` model: one block a stage, a quarter of A0's width, 32 px.
TINY = [
    "--model",
    "RepVGG_A0",
    "--num_blocks",
    "1,1,1,1",
    "--width_multipliers",
    "0.25,0.25",
    "--image_size",
    "32",
    "--batch_size",
    "8",
    "--verbose",
    "2",
]


def train_cli(model_dir, dataset, *extra, timeout=600):
    """`python -m train` on `dataset` with the TINY model into `model_dir`."""
    command = [
        sys.executable,
        "-m",
        "train",
        "--dataset",
        dataset,
        "--model_dir",
        str(model_dir),
        *TINY,
        *extra,
    ]
    return subprocess.run(
        command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )


def one_error_line(result):
    """Exit status 1 and one `error:` line, last on stderr (TensorFlow's own start-up log lines aside)."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
    return errors[0]


def write_png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    tf.io.write_file(str(path), tf.io.encode_png(pixels))


def write_image_folder(root, train_per_class=8, test_per_class=2, classes=("a", "b")):
    """A train/ and test/ folder of random PNGs, one subfolder per class."""
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for c, name in enumerate(classes):
            for i in range(count):
                write_png(root / split / name / f"{i}.png", seed=hash((split, c, i)) % 2**32)
    return root


def free_ports(count):
    """`count` TCP ports on the loopback that are free now."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports
