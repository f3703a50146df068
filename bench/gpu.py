"""Our model on Keras's JAX backend against timm's PyTorch RepVGG, on one GPU, side by side.

    KERAS_BACKEND=jax python -m bench.gpu --models RepVGG_A0,RepVGG_B1g4 --batch 1,32,256 --out /tmp/gpu
    KERAS_BACKEND=jax python -m bench.gpu --quick --out /tmp/gpu    # smoke run (runs on a CPU too)

Needs no TensorFlow, so it runs on GPU images that carry JAX, PyTorch and timm only; keras and
its two dependencies travel as wheels (`make gpu-wheels`, docs/gpu.md). Both frameworks get the
same weights (timm's init with trained-like BatchNorm statistics, imported into Keras by
our checkpoint importer), inputs already on the device, a device synchronisation after every
call, warm-up (JIT compilation included) and interleaved rounds; images/s are medians.

"fp32" is each framework's default float32 path: on Ampere and newer GPUs both cuDNN
(PyTorch) and XLA (JAX) run float32 convolutions in TF32 unless told not to (--tf32=false).
"bf16": our deploy model under Keras's mixed_bfloat16 policy (classifier in float32), timm
under torch.autocast(bfloat16). Every record carries its max relative difference to our
training form in fp32 on the same images (random images, so that nothing but the wheels is needed).
"""

import datetime
import json
import os
import platform
import re
import shlex
import sys
import time
import traceback

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["RepVGG_A0", "RepVGG_B1g4"], "RepVGG variants to measure.")
flags.DEFINE_list("batch", ["1", "32", "256"], "Batch sizes.")
flags.DEFINE_integer("image_size", 224, "Input height and width.")
flags.DEFINE_integer("rounds", 7, "Interleaved timing rounds (the median is reported).")
flags.DEFINE_float("chunk_seconds", 0.5, "Length of one timed chunk per case and round.")
flags.DEFINE_bool(
    "compile", True, "Also time timm under torch.compile (the peer's fastest eager-free path)."
)
flags.DEFINE_bool(
    "tf32", True, "Let float32 convolutions use TF32 (both frameworks' default on GPUs)."
)
flags.DEFINE_bool(
    "quick", False, "Smoke run: A0 at 64px, batch 1 and 2, short timings, no torch.compile."
)
flags.DEFINE_string(
    "out",
    None,
    "Output directory (results.json, meta.json, results.md); default "
    "bench/results/<gpu>, e.g. nvidia-h200.",
)

QUICK = dict(
    models=["RepVGG_A0"],
    batch=["1", "2"],
    image_size=64,
    rounds=2,
    chunk_seconds=0.05,
    compile=False,
)
CLASSES = 1000


def check_backend():
    import keras

    if keras.backend.backend() != "jax":
        raise SystemExit(
            f"bench.gpu measures Keras's JAX backend: run it with KERAS_BACKEND=jax "
            f"(this process has {keras.backend.backend()!r})."
        )


def torch_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- the models under test ---------------------------------------------------------------


def build_models(name, image_size):
    """timm's training form and our two Keras forms, holding the same weights."""
    import keras

    import repvgg_keras as rk
    from bench.subject import TIMM_NAMES
    from bench.timm_import import import_timm, randomize_torch_batchnorm
    from repvgg_keras import checkpoints

    timm_model = randomize_torch_batchnorm(
        import_timm().create_model(TIMM_NAMES[name], num_classes=CLASSES).eval()
    )
    keras_train = rk.get_model(name, input_shape=(image_size, image_size, 3), classes=CLASSES)
    checkpoints.load_checkpoint(
        keras_train, {k: v.detach().numpy() for k, v in timm_model.state_dict().items()}
    )
    keras_deploy = rk.to_deploy(keras_train)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        keras_bf16 = rk.get_model(
            name, input_shape=(image_size, image_size, 3), classes=CLASSES, deploy=True
        )
    finally:
        keras.config.set_dtype_policy(previous)
    keras_bf16.set_weights(keras_deploy.get_weights())
    return timm_model, keras_train, keras_deploy, keras_bf16


def jax_predictor(model):
    """A jitted stateless call: (NHWC device array) -> logits (make_case waits for it)."""
    import jax

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    function = jax.jit(
        lambda x: model.stateless_call(trainable, non_trainable, x, training=False)[0]
    )
    return function


def torch_predictor(module, bf16=False, compiled=False):
    import torch

    device = torch_device()
    module = module.to(device).to(memory_format=torch.channels_last)
    if compiled:
        module = torch.compile(module)

    def predict(x):
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            return module(x)

    return predict


def runtimes(timm_model, keras_train, keras_deploy, keras_bf16):
    """(runtime, precision, framework, predictor) for one model."""
    import copy

    from timm.utils.model import reparameterize_model

    reparam = reparameterize_model(copy.deepcopy(timm_model))
    yield "keras-train-jax", "fp32", "jax", jax_predictor(keras_train)
    yield "keras-deploy-jax", "fp32", "jax", jax_predictor(keras_deploy)
    yield "keras-deploy-jax", "bf16", "jax", jax_predictor(keras_bf16)
    yield "timm-train", "fp32", "torch", torch_predictor(copy.deepcopy(timm_model))
    yield "timm-reparam-cl", "fp32", "torch", torch_predictor(copy.deepcopy(reparam))
    yield "timm-reparam-cl", "bf16", "torch", torch_predictor(copy.deepcopy(reparam), bf16=True)
    if FLAGS.compile:
        yield (
            "timm-reparam-compile",
            "fp32",
            "torch",
            torch_predictor(copy.deepcopy(reparam), compiled=True),
        )
        yield (
            "timm-reparam-compile",
            "bf16",
            "torch",
            torch_predictor(copy.deepcopy(reparam), bf16=True, compiled=True),
        )


# --- timing ------------------------------------------------------------------------------


def make_case(key, framework, predictor, images):
    """A bench.timing.Case whose predict runs on the device and waits for it."""
    from bench.timing import Case

    if framework == "jax":
        import jax

        batch = jax.device_put(images)

        def predict(x):
            return predictor(x).block_until_ready()

        to_numpy = lambda out: np.asarray(out, np.float32)
    else:
        import torch

        device = torch_device()
        batch = (
            torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
            .to(device)
            .to(memory_format=torch.channels_last)
        )
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        def predict(x):
            out = predictor(x)
            sync()
            return out

        to_numpy = lambda out: out.float().cpu().numpy()
    case = Case(key, predict, batch)
    case.to_numpy = to_numpy
    return case


def matmul_peak(size):
    """Best TFLOP/s of a square jnp.matmul in float32 (TF32 if allowed) and bfloat16."""
    import jax
    import jax.numpy as jnp

    peaks = {}
    for precision, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        a = jnp.ones((size, size), dtype)
        function = jax.jit(jnp.matmul)
        function(a, a).block_until_ready()
        best = float("inf")
        for _ in range(5):
            begin = time.perf_counter()
            function(a, a).block_until_ready()
            best = min(best, time.perf_counter() - begin)
        peaks[precision] = 2 * size**3 / best / 1e12
    return peaks


def measure_model(name, batches, rounds, chunk_seconds, image_size, peaks, progress=print):
    from bench.flops import multiply_adds
    from bench.timing import measure
    from repvgg_keras.parity import max_relative_difference

    timm_model, keras_train, keras_deploy, keras_bf16 = build_models(name, image_size)
    macs = multiply_adds(keras_deploy)
    images = (
        np.random.default_rng(0)
        .standard_normal((max(batches), image_size, image_size, 3))
        .astype(np.float32)
    )
    reference = np.asarray(
        keras_train(images, training=False), np.float32
    )  # eager fp32 on the device
    cases, records = [], []
    for runtime, precision, framework, predictor in runtimes(
        timm_model, keras_train, keras_deploy, keras_bf16
    ):
        for batch in batches:
            progress(f"{name}: preparing {runtime} {precision} batch {batch}")
            base = {
                "model": name,
                "runtime": runtime,
                "precision": precision,
                "batch": batch,
                "framework": framework,
            }
            try:  # the first call compiles (XLA, torch.compile): one failure must not end a one-shot GPU run
                case = make_case(
                    (name, runtime, precision, batch), framework, predictor, images[:batch]
                )
                got = case.to_numpy(case.predict(case.batch))
            except Exception as error:  # noqa: BLE001
                traceback.print_exc()
                records.append(
                    dict(base, status="error", reason=f"{type(error).__name__}: {error}")
                )
                continue
            expected = reference[:batch]
            case.record = dict(
                base,
                status="ok",
                max_rel_diff=max_relative_difference(got, expected),
                top1_agreement=float(np.mean(got.argmax(-1) == expected.argmax(-1))),
            )
            cases.append(case)
    measure(cases, rounds, chunk_seconds, progress)
    for case in cases:
        record = dict(case.record, **case.summary())
        record["gflops"] = 2 * macs * record["images_per_s"] / 1e9
        record["peak_fraction"] = record["gflops"] / 1e3 / peaks[record["precision"]]
        records.append(record)
    return records


# --- output ------------------------------------------------------------------------------


def markdown(records, meta):
    from bench.report import text_table

    lines = [
        f"# GPU benchmark: {meta['date']}",
        "",
        f"Device: {meta['device']}; TF32 {meta['tf32']}; "
        f"image size {meta['image_size']}; weights: timm init (random, trained-like BN statistics); "
        "inputs on the device, synchronised after every call.",
        "",
        f"Command: `{meta['command']}`",
        "",
        "Matmul peak (jnp.matmul, square "
        + str(meta["peak_size"])
        + "): "
        + ", ".join(f"{k} {v:.1f} TFLOP/s" for k, v in meta["peak_tflops"].items()),
        "",
        "```",
        text_table(records),
        "```",
        "",
    ]
    nan = float("nan")
    for model in sorted({r["model"] for r in records}):
        for batch in sorted({r["batch"] for r in records}):
            speeds = {
                (r["runtime"], r["precision"]): r["images_per_s"]
                for r in records
                if r["model"] == model and r["batch"] == batch and r["status"] == "ok"
            }
            peer = {
                p: max(
                    [
                        v
                        for (runtime, q), v in speeds.items()
                        if runtime.startswith("timm-reparam") and q == p
                    ]
                    or [nan]
                )
                for p in ("fp32", "bf16")
            }
            ours = {p: speeds.get(("keras-deploy-jax", p), nan) for p in ("fp32", "bf16")}
            lines.append(
                f"- {model} batch {batch}: deploy/train (JAX) "
                f"{ours['fp32'] / speeds.get(('keras-train-jax', 'fp32'), nan):.2f}x; ours/best "
                f"timm-reparam fp32 {ours['fp32'] / peer['fp32']:.2f}x, bf16 {ours['bf16'] / peer['bf16']:.2f}x"
            )
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    if FLAGS.quick:
        for name, value in QUICK.items():
            if not FLAGS[name].present:
                FLAGS[name].value = value
    check_backend()
    import jax
    import torch

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = FLAGS.tf32
    jax.config.update("jax_default_matmul_precision", "tensorfloat32" if FLAGS.tf32 else "float32")
    batches = [int(b) for b in FLAGS.batch]
    device = f"{jax.devices()[0].device_kind} (jax {jax.__version__}); torch {torch.__version__} on {torch_device()}"
    print(f"bench.gpu: {device}", flush=True)
    peak_size = 512 if FLAGS.quick else 8192
    meta = {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "machine": platform.machine(),
        "tf32": FLAGS.tf32,
        "image_size": FLAGS.image_size,
        "peak_size": peak_size,
        "peak_tflops": matmul_peak(peak_size),
        "command": "python -m bench.gpu " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }
    records = []
    progress = lambda message: print(message, flush=True)
    if FLAGS.out is None:
        slug = "-".join(re.findall(r"[a-z0-9]+", jax.devices()[0].device_kind.lower())) or "gpu"
        FLAGS.out = os.path.join("bench", "results", slug)
    os.makedirs(FLAGS.out, exist_ok=True)
    for name in FLAGS.models:
        records += measure_model(
            name,
            batches,
            FLAGS.rounds,
            FLAGS.chunk_seconds,
            FLAGS.image_size,
            meta["peak_tflops"],
            progress,
        )
        report = markdown(records, meta)
        for file_name, text in (
            ("results.json", json.dumps(records, indent=1)),
            ("meta.json", json.dumps(meta, indent=1)),
            ("results.md", report),
        ):
            with open(
                os.path.join(FLAGS.out, file_name), "w"
            ) as f:  # after each model: keep what ran
                f.write(text)
    print(report, flush=True)
    return 1 if any(r["status"] == "error" for r in records) else 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
