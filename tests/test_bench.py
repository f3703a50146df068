"""Benchmark: the --quick smoke run (numbers from every runtime, outputs agree), the counts
it reports, and its ratio arithmetic. Never a timed pass/fail: speeds are only checked > 0."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import repvgg_keras as rk
from bench import flops, report
from export import verify
from tests.helpers import REPO

# Reduced-precision tolerances of the records, by precision (relative to the fp32 Keras model).
TOLERANCE = verify.TOLERANCES


def _quick_specs():
    """Every default runtime and one on request (the QAT files' own checks are in
    tests/test_quantize_export.py)."""
    from bench.runtimes import RUNTIMES

    return [spec for spec in RUNTIMES if spec.by_default or spec.runtime == "tflite-qat"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    every = ",".join(f"{spec.runtime}:{spec.precision}" for spec in _quick_specs())
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", f"--out={out}", f"--runtimes={every}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out / "results.json") as f:
        records = json.load(f)
    with open(out / "meta.json") as f:
        meta = json.load(f)
    return out, records, meta, done.stdout


def test_runtimes_on_request_are_left_out_by_default():
    from bench.runtimes import RUNTIMES, select

    on_request = {(r.runtime, r.precision) for r in RUNTIMES if not r.by_default}
    assert ("tflite-qat", "int8") in on_request
    assert not on_request & {(r.runtime, r.precision) for r in select(None)}
    assert {(r.runtime, r.precision) for r in select(["tflite-qat"])} == {("tflite-qat", "int8")}


@pytest.mark.slow
def test_quick_every_runtime_gives_a_number(quick_run):
    out, records, meta, stdout = quick_run
    skipped = [
        r
        for r in records
        if r["status"] != "ok" and not (r["runtime"] == "openvino" and r["precision"] == "bf16")
    ]  # needs a bf16-capable CPU
    assert not skipped, skipped
    measured = {(r["runtime"], r["precision"], r["batch"]) for r in records if r["status"] == "ok"}
    for spec in _quick_specs():
        for batch in (1, 2):
            if (spec.runtime, spec.precision) != ("openvino", "bf16") or any(
                r["runtime"] == "openvino" and r["precision"] == "bf16" and r["status"] == "ok"
                for r in records
            ):
                assert (spec.runtime, spec.precision, batch) in measured
    assert {("timm", "fp32", 1), ("timm-cl", "fp32", 2)} <= {
        (r["runtime"], r["precision"], r["batch"]) for r in records if r["model"] == "ResNet-18"
    }
    for r in records:
        if r["status"] == "ok":
            assert (
                r["images_per_s"] > 0
                and r["images_per_s_min"] <= r["images_per_s"] <= r["images_per_s_max"]
            )
            assert r["gflops"] > 0
    assert meta["peak_gflops"]["fp32"] > 0 and meta["bench_peak_rss_mb"] > 100
    assert os.path.getsize(out / "results.png") > 1000
    assert "| RepVGG_A0 | keras-deploy | fp32 | 1 |" in (out / "results.md").read_text()


@pytest.mark.slow
def test_quick_outputs_agree_with_keras(quick_run):
    _, records, _, _ = quick_run
    checked = [r for r in records if r["status"] == "ok" and r["model"] == "RepVGG_A0"]
    assert {r["runtime"] for r in checked} >= {
        "keras-deploy",
        "tflite",
        "onnxruntime-nchw",
        "timm-reparam",
        "kimm-reparam",
        "savedmodel",
    }
    for r in checked:
        # timm gets the same weights (imported by our checkpoint loader), so it is compared too.
        assert r["max_rel_diff"] <= TOLERANCE[r["precision"]], r
        if r["precision"] == "fp32":
            assert r["top1_agreement"] == 1.0, r


@pytest.mark.slow
def test_quick_memory_and_structure(quick_run):
    _, records, meta, _ = quick_run
    forms = {s["form"]: s for s in meta["structure"]}
    assert forms["deploy"]["layers"] < forms["train"]["layers"]
    assert forms["deploy"]["graph_nodes"] < forms["train"]["graph_nodes"]
    assert forms["deploy"]["parameters"] < forms["train"]["parameters"]
    rss = [
        r
        for r in records
        if r["runtime"] in ("keras-train", "keras-deploy") and r["status"] == "ok"
    ]
    assert rss and all(r["peak_rss_mb"] > 0 for r in rss)


@pytest.mark.parametrize(
    "name, published", [("RepVGG_A0", 1.4), ("RepVGG_B1g4", 7.3), ("RepVGG_B1", 11.8)]
)
def test_multiply_adds_match_the_paper(name, published):
    model = rk.get_model(name, deploy=True)
    assert round(flops.multiply_adds(model) / 1e9, 1) == published


@pytest.mark.slow
def test_torch_multiply_adds_of_resnet18():
    from bench.timm_import import import_timm

    module = import_timm().create_model("resnet18").eval()
    assert (
        round(flops.torch_multiply_adds(module, 224) / 1e9, 1) == 1.8
    )  # the commonly quoted 1.8 G


def _record(runtime, precision, batch, speed, **extra):
    return dict(
        model="RepVGG_A0",
        runtime=runtime,
        precision=precision,
        batch=batch,
        images_per_s=speed,
        status="ok",
        **extra,
    )


def test_ratios_pick_the_best_runtime_and_respect_agreement():
    records = [
        _record("keras-train", "fp32", 1, 10.0, peak_rss_mb=400.0),
        _record("keras-deploy", "fp32", 1, 25.0, peak_rss_mb=300.0),
        _record("onnxruntime-nchw", "fp32", 1, 50.0),
        _record("timm-reparam", "fp32", 1, 20.0),
        _record("timm-reparam-cl", "fp32", 1, 40.0),
        _record("openvino", "int8", 1, 400.0, top1_agreement=0.99),  # below 99.5%: not counted
        _record("openvino", "bf16", 1, 120.0, top1_agreement=1.0),
        dict(_record("timm-cl", "fp32", 1, 16.0), model="ResNet-18"),
    ]
    found = {what: value for _, _, what, value, _ in report.ratios(records)}
    assert found["Keras deploy / training form speed"] == pytest.approx(2.5)
    assert found["peak RSS deploy / training form"] == pytest.approx(0.75)
    assert found["best fp32 / timm-reparam-cl fp32"] == pytest.approx(50 / 40)
    assert found[
        "best reduced precision (agreement >= 0.995) / timm-reparam-cl fp32"
    ] == pytest.approx(3.0)
    assert found["RepVGG-A0 / ResNet-18 (timm, fp32, best layout each)"] == pytest.approx(2.5)


BAD_ARGUMENTS = """
import contextlib, io, json, sys
from bench import __main__ as bench
results = []
for args in json.loads(sys.argv[1]):  # what `python -m bench ARGS` runs: its flags, then main()
    bench.FLAGS.unparse_flags()
    bench.FLAGS(["bench", *args])
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = bench.main([])
    results.append((code, stderr.getvalue()))
print(json.dumps(results))
"""


def test_bad_arguments_are_clear_errors():
    """Each refused before any work; one process for the three (each would import TensorFlow)."""
    cases = (
        (["--models=RepVGG_Z9"], "RepVGG_Z9"),
        (["--runtimes=tensorrt"], "tensorrt"),
        (["--weights=a0.keras"], "Model=path"),
    )
    done = subprocess.run(
        [sys.executable, "-c", BAD_ARGUMENTS, json.dumps([args for args, _ in cases])],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == len(cases)
    for (args, message), (code, stderr) in zip(cases, results):
        assert code != 0 and message in stderr, (args, stderr[-2000:])
        assert stderr.startswith("error: "), (args, stderr[-2000:])


@pytest.mark.slow
def test_int8_onnx_quantization_keeps_top1(tmp_path):
    """The QDQ file the benchmark and export.openvino use, in onnxruntime, on real images."""
    import onnxruntime as ort

    from export import images, onnx_int8
    from export import onnx as onnx_export
    from repvgg_keras import preprocessing
    from repvgg_keras.parity import randomize_batchnorm

    model = rk.to_deploy(
        randomize_batchnorm(rk.get_model("RepVGG_A0", input_shape=(48, 48, 3), classes=10))
    )
    pixels = images.load_images("fashion_mnist", 48, 48, 48, 3)
    inputs = np.transpose(
        preprocessing.normalize(pixels.astype(np.float32), "imagenet", 3), (0, 3, 1, 2)
    )
    source, target = str(tmp_path / "a0.onnx"), str(tmp_path / "a0_int8.onnx")
    with open(source, "wb") as f:
        f.write(onnx_export.convert(model, nchw=True).SerializeToString())
    onnx_int8.quantize(source, target, inputs[:32])
    run = lambda path: ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(
        ["logits"], {"images": inputs}
    )[0]
    fp32, int8 = run(source), run(target)
    assert os.path.getsize(target) < 0.5 * os.path.getsize(source)  # int8 weights
    assert verify.compare("int8", "int8", int8, fp32).ok
    import onnx

    graph = onnx.load(target).graph
    produced_by = {out: node.op_type for node in graph.node for out in node.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and all(
        produced_by.get(n.input[1]) == "DequantizeLinear" for n in convs
    )  # int8 weights
    head = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    assert head and not any(
        produced_by.get(i) == "DequantizeLinear" for n in head for i in n.input
    )  # float classifier
    assert not any(
        n.op_type == "Relu" for n in graph.node
    )  # folded into the int8 convs' output ranges
    with pytest.raises(ValueError, match="calibration"):
        onnx_int8.quantize(source, target, inputs[:0])


GPU_BENCH = """
import sys
sys.modules["tensorflow"] = None  # the GPU image has no TensorFlow: any import of it fails here too
import runpy
sys.argv = ["bench.gpu", "--quick", "--out", sys.argv[1]]
runpy.run_module("bench.gpu", run_name="__main__")
"""


@pytest.mark.slow
def test_gpu_bench_quick_runs_on_jax_without_tensorflow(tmp_path):
    """The prepared GPU comparison (bench.gpu), smoke-run on the CPU: JAX backend, no TensorFlow."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", PYTHONPATH=repo)
    result = subprocess.run(
        [sys.executable, "-c", GPU_BENCH, str(tmp_path)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = json.load(open(tmp_path / "results.json"))
    cases = {(r["runtime"], r["precision"], r["batch"]) for r in records}
    expected = {
        (runtime, precision, batch)
        for runtime, precision in (
            ("keras-train-jax", "fp32"),
            ("keras-deploy-jax", "fp32"),
            ("keras-deploy-jax", "bf16"),
            ("timm-train", "fp32"),
            ("timm-reparam-cl", "fp32"),
            ("timm-reparam-cl", "bf16"),
        )
        for batch in (1, 2)
    }
    assert cases == expected
    for r in records:
        assert r["images_per_s"] > 0 and r["gflops"] > 0, r
        # Same weights in JAX and PyTorch: fp32 agrees to rounding, bf16 to bf16's precision.
        assert r["max_rel_diff"] < (3e-2 if r["precision"] == "bf16" else 1e-4), r
    assert "ours/best timm-reparam fp32" in open(tmp_path / "results.md").read()


def test_int8_agreement_separates_near_ties_from_confident_flips():
    """bench.int8_agreement's confident column counts only images where fp32's top-2 margin is large."""
    from bench.int8_agreement import agreement_with_fp32

    reference = np.array(
        [
            [5.0, 0.0, 0.0],  # confident, kept
            [0.0, 4.0, 0.0],  # confident, flipped
            [1.0, 1.1, 0.0],  # near-tie, flipped
            [2.0, 0.0, 1.95],
        ]
    )  # near-tie, kept
    got = np.array([[4.0, 0.0, 0.0], [0.0, 1.0, 2.0], [1.2, 1.0, 0.0], [2.0, 0.0, 1.9]])
    labels = np.array([0, 2, 0, 1])
    top1, accuracy, confident = agreement_with_fp32(reference, got, labels, confident_margin=1.0)
    assert (top1, accuracy, confident) == (0.5, 0.75, 0.5)
    assert np.isnan(
        agreement_with_fp32(reference, got, labels, confident_margin=10.0)[2]
    )  # no confident image: undefined


def test_results_go_to_one_folder_per_machine(monkeypatch):
    """`python -m bench` writes to bench/results/<machine>: CPU model words and core count, no punctuation."""
    from bench import machine as bench_main

    monkeypatch.setattr(bench_main.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(
        bench_main.cpu_features, "cpu_name", lambda: "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    )
    assert bench_main.machine_slug() == "intel-xeon-platinum-8481c-2c"
    monkeypatch.setattr(
        bench_main.cpu_features, "cpu_name", lambda: "AMD EPYC 9B14 96-Core Processor"
    )
    assert bench_main.machine_slug() == "amd-epyc-9b14-2c"


def test_serving_batch_sweet_spot_is_where_doubling_stops_paying():
    from bench.serving_batches import sweet_spot

    rows = [
        {"batch": b, "images_per_s": v} for b, v in ((1, 50), (2, 70), (4, 90), (8, 93), (16, 95))
    ]
    assert sweet_spot(rows) == 8  # the first within 95% of the best (95 images/s at 16)
    assert sweet_spot(rows[:1]) == 1
