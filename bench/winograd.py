"""Would Winograd F(2,3) make the fp32 deploy model faster in onnxruntime? Measure, one layer type.

    python -m bench.winograd [--channels 192 --size 14 --layers 13 --batch 1,32]

RepVGG's fp32 runtimes already run at the CPU's matmul peak, so only fewer multiplications can
make them faster. Winograd F(2,3) computes a 3x3 stride-1 conv with 2.25x fewer (16 instead of
36 per 2x2 output tile). onnxruntime and OpenVINO have no Winograd kernel, so this builds it as
an ONNX graph: input transform (a depthwise 4x4 stride-2 Conv), 16 batched MatMuls, output
transform (a MatMul and DepthToSpace), and times it against the plain Conv + Relu stack
with the same weights (default: RepVGG-A0's stage 3, 13 layers of 192 channels at 14x14, 62% of
its multiply-adds). Prints the speed-up and where the Winograd graph spends its time.
"""

import collections
import json
import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("channels", 192, "Input = output channels of every layer.")
flags.DEFINE_integer("size", 14, "Feature map height and width (even).")
flags.DEFINE_integer("layers", 13, "Conv + ReLU layers in the stack.")
flags.DEFINE_list("batch", ["1", "32"], "Batch sizes.")
flags.DEFINE_integer("threads", os.cpu_count(), "onnxruntime intra-op threads.")
flags.DEFINE_integer("rounds", 7, "Interleaved timing rounds (median reported).")

# F(2,3) transforms (Lavin & Gray 2016): y = At [(G g Gt) * (Bt d B)] A
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)


def _model(nodes, initializers, shape, output):
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def direct_stack(kernel, bias, batch, size, layers):
    """Conv(3x3, pad 1) + Relu, `layers` times, NCHW: what our ONNX exporter writes."""
    from onnx import helper, numpy_helper

    nodes, x = [], "x"
    for i in range(layers):
        nodes += [helper.make_node("Conv", [x, "W", "b"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"y{i}"])]
        x = f"y{i}"
    return _model(nodes, [numpy_helper.from_array(kernel, "W"), numpy_helper.from_array(bias, "b")],
                  [batch, kernel.shape[1], size, size], x)


def winograd_stack(kernel, bias, batch, size, layers):
    """The same stack with every conv computed by Winograd F(2,3), laid out to need no big transpose.

    Per layer: a depthwise 4x4 stride-2 Conv (16 outputs per channel) gives the transformed
    tiles V; MatMul with the transformed kernels U [16, K, C] does the work (16 GEMMs per image);
    a MatMul with At x At turns 16 products into each tile's 2x2 outputs; DepthToSpace puts the
    tiles back in place; then bias and ReLU.
    """
    from onnx import helper, numpy_helper

    filters, channels = kernel.shape[:2]
    tiles = size // 2
    input_transform = np.einsum("ij,ml->imjl", BT, BT).reshape(16, 4, 4)
    constants = {
        "input_transform": np.tile(input_transform[None], (channels, 1, 1, 1)).reshape(16 * channels, 1, 4, 4),
        "U": np.einsum("ij,kcjl,ml->imkc", G, kernel, G).reshape(16, filters, channels),
        "output_transform": np.einsum("ij,ml->imjl", AT, AT).reshape(4, 16),
        "bias": bias.reshape(1, filters, 1, 1),
        "by_channel": np.array([0, channels, 16, tiles * tiles], np.int64),
        "by_position": np.array([0, 16, -1], np.int64),
        "tiles_as_depth": np.array([0, 4 * filters, tiles, tiles], np.int64),
    }
    nodes, x = [], "x"
    for i in range(layers):
        p = f"l{i}_"
        nodes += [
            helper.make_node("Conv", [x, "input_transform"], [p + "v"], group=channels, strides=[2, 2],
                             pads=[1, 1, 1, 1], kernel_shape=[4, 4]),  # [N, C*16, T, T]
            helper.make_node("Reshape", [p + "v", "by_channel"], [p + "v1"]),
            helper.make_node("Transpose", [p + "v1"], [p + "V"], perm=[0, 2, 1, 3]),  # [N, 16, C, T*T]
            helper.make_node("MatMul", ["U", p + "V"], [p + "m"]),  # [N, 16, K, T*T]
            helper.make_node("Reshape", [p + "m", "by_position"], [p + "m1"]),
            helper.make_node("MatMul", ["output_transform", p + "m1"], [p + "o"]),  # [N, 4, K*T*T]
            helper.make_node("Reshape", [p + "o", "tiles_as_depth"], [p + "o1"]),
            helper.make_node("DepthToSpace", [p + "o1"], [p + "o2"], blocksize=2, mode="DCR"),
            helper.make_node("Add", [p + "o2", "bias"], [p + "o3"]),
            helper.make_node("Relu", [p + "o3"], [p + "y"]),
        ]
        x = p + "y"
    initializers = [numpy_helper.from_array(v.astype(np.int64 if v.dtype == np.int64 else np.float32), k)
                    for k, v in constants.items()]
    return _model(nodes, initializers, [batch, channels, size, size], x)


def session(model, threads, profile=False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "profile")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def time_per_op(model, x, threads, runs=5):
    """Milliseconds per run spent in each op type (onnxruntime's profiler)."""
    run = session(model, threads, profile=True)
    for _ in range(runs):
        run.run(None, {"x": x})
    totals = collections.Counter()
    with open(run.end_profiling()) as f:
        for event in json.load(f):
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                totals[event["args"]["op_name"]] += event["dur"] / 1000 / runs
    return dict(totals.most_common())


def main(argv):
    del argv
    if FLAGS.size % 2:
        raise SystemExit(f"--size must be even for F(2,3) tiles, got {FLAGS.size}.")
    rng = np.random.default_rng(0)
    kernel = (rng.standard_normal((FLAGS.channels, FLAGS.channels, 3, 3)) * (2 / (9 * FLAGS.channels)) ** 0.5).astype(np.float32)
    bias = rng.standard_normal(FLAGS.channels).astype(np.float32) * 0.1
    print(f"{FLAGS.layers} x Conv3x3({FLAGS.channels}->{FLAGS.channels}) + ReLU at {FLAGS.size}x{FLAGS.size}, "
          f"{FLAGS.threads} threads")
    for batch in (int(b) for b in FLAGS.batch):
        x = rng.standard_normal((batch, FLAGS.channels, FLAGS.size, FLAGS.size)).astype(np.float32)
        models = {"direct": direct_stack(kernel, bias, batch, FLAGS.size, FLAGS.layers),
                  "winograd": winograd_stack(kernel, bias, batch, FLAGS.size, FLAGS.layers)}
        runs = {name: session(model, FLAGS.threads) for name, model in models.items()}
        outputs = {name: run.run(None, {"x": x})[0] for name, run in runs.items()}
        diff = np.abs(outputs["winograd"] - outputs["direct"]).max() / np.abs(outputs["direct"]).max()
        calls = max(1, 64 // batch)
        seconds = {name: [] for name in runs}
        for _ in range(FLAGS.rounds):
            for name, run in runs.items():
                begin = time.perf_counter()
                for _ in range(calls):
                    run.run(None, {"x": x})
                seconds[name].append((time.perf_counter() - begin) / calls)
        direct, winograd = (float(np.median(seconds[n])) * 1000 for n in ("direct", "winograd"))
        print(f"batch {batch}: direct {direct:.2f} ms, Winograd {winograd:.2f} ms -> speed-up "
              f"{direct / winograd:.2f}x (max rel diff {diff:.1e}); Winograd ms per op type: "
              f"{ {k: round(v, 2) for k, v in time_per_op(models['winograd'], x, FLAGS.threads).items()} }",
              flush=True)
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
