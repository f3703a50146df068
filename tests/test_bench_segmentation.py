"""Segmentation speed benchmark: a small run writes its files and ratios, the dilated ResNet
baseline keeps ResNet's weights at output stride 8, the paper's ordering is read correctly.
Never a timed pass/fail: speeds are only checked > 0."""

import json
import os
import subprocess
import sys

import keras
import pytest

from bench import segmentation
from tests.helpers import REPO

MODELS = ("RepVGG_A0", "ResNet-50")


def _bench(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "bench.segmentation", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """Two models at 64px, one round, the Keras runtime (ONNX conversion would add minutes)."""
    out = tmp_path_factory.mktemp("segmentation")
    done = _bench(
        "--image_size=64",
        f"--models={','.join(MODELS)}",
        "--runtimes=keras",
        "--rounds=1",
        "--chunk_seconds=0.05",
        f"--out={out}",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out / "results.json") as f:
        results = json.load(f)
    return out, results, done.stdout


@pytest.mark.slow
def test_small_run_writes_one_row_per_model_and_runtime(small_run):
    out, results, stdout = small_run
    records = results["records"]
    assert [(r["model"], r["runtime"]) for r in records] == [(m, "keras") for m in MODELS]
    for r in records:
        assert r["status"] == "ok"
        assert r["images_per_s"] > 0 and r["images_per_s_min"] <= r["images_per_s_max"]
        assert r["feature_size"] == [8, 8]  # output stride 8 at 64px
        assert r["params_m"] > 1 and r["gmacs"] > 0
    assert records[0]["deploy_form"] and not records[1]["deploy_form"]
    meta = results["meta"]
    for key in ("machine", "isa", "cpu_flags", "versions", "command", "date"):
        assert meta[key], key
    assert (
        meta["command"].startswith("python -m bench.segmentation")
        and "--rounds=1" in meta["command"]
    )
    table = (out / "results.md").read_text()
    for model in MODELS:
        assert f"| {model} | keras |" in table
    assert "7x7 stem" in table and "3x3 stem" in table
    assert "RepVGG_A0: building" in stdout and "round 1/1 done" in stdout


@pytest.mark.slow
def test_small_run_ratio_is_the_measured_speeds(small_run):
    _, results, _ = small_run
    speeds = {r["model"]: r["images_per_s"] for r in results["records"]}
    (ratio,) = results["ratios"]
    assert (ratio["model"], ratio["baseline"], ratio["runtime"]) == (
        "RepVGG_A0",
        "ResNet-50",
        "keras",
    )
    assert ratio["ratio"] == pytest.approx(speeds["RepVGG_A0"] / speeds["ResNet-50"])
    assert ratio["faster"] == (speeds["RepVGG_A0"] > speeds["ResNet-50"])
    assert ratio["paper"] is None  # the paper states a number for B1g2-fast vs ResNet-101 only


def test_dilated_resnet_has_output_stride_8_and_resnet_weights():
    dilated = segmentation.dilated_resnet(50, (64, 64, 3))
    plain = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(64, 64, 3))
    assert plain.output.shape[1:3] == (2, 2)  # output stride 32
    assert dilated.output.shape[1:] == (8, 8, 2048)
    assert dilated.count_params() == plain.count_params()
    assert [w.shape for w in dilated.weights] == [w.shape for w in plain.weights]
    layer = dilated.get_layer
    for name in ("conv4_block1_0_conv", "conv4_block1_1_conv", "conv5_block1_0_conv"):
        assert tuple(layer(name).strides) == (1, 1), name
    assert tuple(layer("conv3_block1_1_conv").strides) == (2, 2)  # the last stride kept
    assert tuple(layer("conv4_block1_2_conv").dilation_rate) == (2, 2)
    assert tuple(layer("conv4_block6_2_conv").dilation_rate) == (2, 2)
    assert tuple(layer("conv5_block3_2_conv").dilation_rate) == (4, 4)
    assert tuple(layer("conv3_block4_2_conv").dilation_rate) == (1, 1)


def test_ratios_and_the_papers_ordering():
    speeds = {
        "RepVGG_A0": 10.0,
        "RepVGG_B1g2": 2.0,
        "RepVGG_B1g2_fast": 4.0,
        "ResNet-50": 3.0,
        "ResNet-101": 2.5,
    }
    records = [
        {"model": m, "runtime": "keras", "status": "ok", "images_per_s": v}
        for m, v in speeds.items()
    ]
    records.append({"model": "RepVGG_A0", "runtime": "onnxruntime", "status": "skipped"})
    rows = segmentation.ratios(records)
    assert len(rows) == 6  # three RepVGG x two ResNets, the skipped runtime has no pair
    fast = next(
        r for r in rows if (r["model"], r["baseline"]) == ("RepVGG_B1g2_fast", "ResNet-101")
    )
    assert fast["ratio"] == pytest.approx(1.6) and fast["faster"] and fast["paper"] == 1.62
    (line,) = segmentation.ordering(rows)
    assert "does not hold for RepVGG_B1g2 vs ResNet-50, RepVGG_B1g2 vs ResNet-101" in line
    assert "(4 of 6 pairs faster)" in line


def test_bad_arguments_are_clear_errors():
    done = _bench("--models=RepVGG_A0,ResNet-152", timeout=120)
    assert done.returncode == 1
    assert "Unknown --models ['ResNet-152']" in done.stderr
    done = _bench("--runtimes=tflite", timeout=120)
    assert done.returncode == 1 and "Unknown --runtimes ['tflite']" in done.stderr
