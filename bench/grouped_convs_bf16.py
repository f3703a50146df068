# Usage: python bench/grouped_convs_bf16.py  (one process, machine otherwise idle)
"""Per-layer timing of RepVGG-B1g4's deploy convs (3x3, bias, ReLU) at batch 1 in TF:
dense vs grouped, fp32 vs bf16, and two rewrites of the grouped conv (block-diagonal dense
kernel; split into per-group convs + concat)."""

import time

import numpy as np
import tensorflow as tf


def median_ms(fn, x, reps=30):
    fn(x)
    fn(x)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(x).numpy()
        ts.append(time.perf_counter() - t)
    return 1000 * float(np.median(ts))


def make(h, c, groups, dtype, mode):
    rng = np.random.default_rng(0)
    w = tf.constant(rng.normal(size=(3, 3, c // groups, c)).astype("float32") * 0.05, dtype)
    b = tf.constant(np.zeros(c, "float32"), dtype)
    if mode == "blockdiag":
        full = np.zeros((3, 3, c, c), "float32")
        cg = c // groups
        wn = np.asarray(tf.cast(w, tf.float32))
        for g in range(groups):
            full[:, :, g * cg : (g + 1) * cg, g * cg : (g + 1) * cg] = wn[
                :, :, :, g * cg : (g + 1) * cg
            ]
        wfull = tf.constant(full, dtype)
        f = lambda x: tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, wfull, 1, "SAME"), b))
    elif mode == "split":
        cg = c // groups
        ws = [w[:, :, :, g * cg : (g + 1) * cg] for g in range(groups)]

        def f(x):
            xs = tf.split(x, groups, axis=-1)
            y = tf.concat([tf.nn.conv2d(xi, wi, 1, "SAME") for xi, wi in zip(xs, ws)], -1)
            return tf.nn.relu(tf.nn.bias_add(y, b))
    else:
        f = lambda x: tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, w, 1, "SAME"), b))
    return tf.function(f)


print("cpu:", open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0])
for h, c in ((56, 128), (28, 256), (14, 512), (7, 2048)):
    for dtype in (tf.float32, tf.bfloat16):
        x = tf.cast(tf.random.normal((1, h, h, c)), dtype)
        row = []
        for groups, mode in ((1, "dense"), (4, "grouped"), (4, "blockdiag"), (4, "split")):
            row.append(f"{mode} {median_ms(make(h, c, groups, dtype, mode), x):7.3f}")
        print(f"{h:3d}x{h:<3d} C{c:<5d} {dtype.name:9s}", " | ".join(row), flush=True)
