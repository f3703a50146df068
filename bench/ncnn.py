"""Is ncnn (Winograd 3x3 kernels, the usual phone runtime for RepVGG) faster than onnxruntime here?

    pip install ncnn pnnx        # optional, not in the package's requirements
    python -m bench.ncnn [--model RepVGG_A0 --image_size 224 --rounds 5]

RepVGG's fp32 runtimes already run at this CPU's matmul peak, so only fewer multiplications can
make fp32 faster: ncnn is the one runtime at hand with Winograd convolution kernels. Converts our
deploy model's NCHW ONNX graph with pnnx (fp32 weights), then times, at batch 1 (ncnn runs one
image at a time) and the same thread count, ncnn with and without Winograd, with fp16 and bf16
storage, and onnxruntime fp32, interleaved, reporting each one's max relative difference to Keras.
"""

import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "RepVGG_A0", "Variant.")
flags.DEFINE_integer("image_size", 224, "Input height and width.")
flags.DEFINE_integer("threads", os.cpu_count(), "Threads for every runtime.")
flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds (median, min, max reported).")
flags.DEFINE_integer("runs", 10, "Images per round and runtime.")

FP32 = dict(use_fp16_storage=False, use_fp16_packed=False, use_fp16_arithmetic=False, use_bf16_storage=False)
NCNN_SETTINGS = {
    "ncnn fp32 (Winograd on)": FP32,
    "ncnn fp32 (Winograd off)": dict(FP32, use_winograd_convolution=False),
    "ncnn fp16 storage": dict(use_fp16_storage=True, use_fp16_packed=True, use_bf16_storage=False),
    "ncnn bf16 storage": dict(FP32, use_bf16_storage=True),
}


def convert(onnx_path, size):
    """pnnx: ONNX -> ncnn .param/.bin with float32 weights; returns their paths."""
    try:
        import pnnx
    except ImportError:
        raise SystemExit("bench.ncnn needs the optional packages: pip install ncnn pnnx")
    subprocess.run([pnnx.EXEC_PATH, onnx_path, f"inputshape=[1,3,{size},{size}]", "fp16=0"], check=True,
                   cwd=os.path.dirname(onnx_path), stdout=subprocess.DEVNULL)
    stem = onnx_path[: -len(".onnx")]
    return f"{stem}.ncnn.param", f"{stem}.ncnn.bin"


def ncnn_runner(param, weights, threads, settings):
    """A function image (C, H, W) -> logits for one ncnn.Net configured with `settings`."""
    import ncnn

    net = ncnn.Net()
    net.opt.num_threads = threads
    for key, value in settings.items():
        setattr(net.opt, key, value)
    net.load_param(param)
    net.load_model(weights)

    def run(image):
        extractor = net.create_extractor()
        extractor.input("in0", ncnn.Mat(image).clone())
        _, out = extractor.extract("out0")
        return np.array(out)

    return run


def main(argv):
    del argv
    import repvgg_keras as rk
    from export import runners
    from repvgg_keras.testing import max_relative_difference, randomize_batchnorm

    size = FLAGS.image_size
    model = rk.get_model(FLAGS.model, input_shape=(size, size, 3))
    randomize_batchnorm(model, seed=0)  # non-zero biases after fusion, as in a trained model
    deploy = rk.to_deploy(model)
    image = np.random.default_rng(0).standard_normal((1, size, size, 3)).astype(np.float32)
    reference = np.asarray(deploy(image))[0]
    nchw = np.ascontiguousarray(image.transpose(0, 3, 1, 2))
    with tempfile.TemporaryDirectory() as workdir:
        onnx_path = runners.onnx_file(deploy, workdir, nchw=True)
        param, weights = convert(onnx_path, size)
        ort = runners.onnxruntime(onnx_path, threads=FLAGS.threads)
        cases = {"onnxruntime fp32 NCHW": lambda: ort(nchw)[0]}
        for name, settings in NCNN_SETTINGS.items():
            run = ncnn_runner(param, weights, FLAGS.threads, settings)
            cases[name] = lambda run=run: run(nchw[0])
        differences = {name: max_relative_difference(case(), reference) for name, case in cases.items()}
        speeds = {name: [] for name in cases}
        for _ in range(FLAGS.rounds):
            for name, case in cases.items():
                case()
                start = time.perf_counter()
                for _ in range(FLAGS.runs):
                    case()
                speeds[name].append(FLAGS.runs / (time.perf_counter() - start))
    base = np.median(speeds["onnxruntime fp32 NCHW"])
    print(f"{FLAGS.model} {size}px, batch 1, {FLAGS.threads} threads, {FLAGS.rounds} rounds x {FLAGS.runs} images\n")
    print("| runtime | images/s (median) | min | max | vs onnxruntime fp32 | max rel diff to Keras |")
    print("|---|---|---|---|---|---|")
    for name, values in speeds.items():
        print(f"| {name} | {np.median(values):.1f} | {min(values):.1f} | {max(values):.1f} | "
              f"{np.median(values) / base:.2f}x | {differences[name]:.1e} |")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
