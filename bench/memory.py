"""Peak resident memory of inference for one Keras form, in a process of its own.

    python -m bench.memory --model RepVGG_A0 --form deploy --batch 32 --image_size 224

Prints one JSON line: peak RSS of the whole process, the part above what importing
TensorFlow and Keras already took, the layer count and the traced graph's node count.
The deploy form is built directly in deploy form (as a server loads it), so the
training form's memory does not leak into its peak.
"""

import json
import os
import resource
import subprocess
import sys


def rss_mb(field="VmRSS"):
    """This process's resident memory now (VmRSS) or at its peak (VmHWM), in MB; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


def peak_rss_mb():
    """This process's peak resident memory. /proc's VmHWM starts afresh at exec;
    getrusage's ru_maxrss would carry over the (larger) parent's peak across fork+exec."""
    peak = rss_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(model_name, form, batch, image_size, classes, threads):
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import repvgg_keras as rk
    from repvgg_keras.structure import layer_counts

    baseline = peak_rss_mb()
    model = rk.get_model(
        model_name,
        input_shape=(image_size, image_size, 3),
        classes=classes,
        deploy=form == "deploy",
    )
    function = tf.function(lambda x: model(x, training=False))
    x = tf.constant(
        np.random.default_rng(0).normal(size=(batch, image_size, image_size, 3)).astype("float32")
    )
    for _ in range(3):
        function(x).numpy()
    graph = function.get_concrete_function(x).graph
    return {
        "model": model_name,
        "form": form,
        "batch": batch,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "model_rss_mb": round(peak_rss_mb() - baseline, 1),
        "layers": layer_counts(model)["layers"],
        "graph_nodes": len(graph.as_graph_def().node),
        "parameters": int(model.count_params()),
    }


def measure_in_subprocess(model_name, form, batch, image_size, classes, threads):
    command = [
        sys.executable,
        "-m",
        "bench.memory",
        f"--model={model_name}",
        f"--form={form}",
        f"--batch={batch}",
        f"--image_size={image_size}",
        f"--classes={classes}",
        f"--threads={threads}",
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv):
    del argv
    from absl import flags

    f = flags.FLAGS
    print(json.dumps(measure(f.model, f.form, f.batch, f.image_size, f.classes, f.threads)))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("model", "RepVGG_A0", "Variant.")
    flags.DEFINE_enum("form", "deploy", ["train", "deploy"], "Which form to run.")
    flags.DEFINE_integer("batch", 1, "Batch size.")
    flags.DEFINE_integer("image_size", 224, "Input size.")
    flags.DEFINE_integer("classes", 1000, "Classifier width.")
    flags.DEFINE_integer("threads", os.cpu_count(), "Intra-op threads.")
    app.run(main)
