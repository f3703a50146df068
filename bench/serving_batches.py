"""Throughput of the SavedModel by batch size, called as TF Serving calls it: the sweet spot that
export/serving/batching.config is tuned to.

    python -m bench.serving_batches [--model RepVGG_A0 --image_size 224 --batches 1,2,4,8,16,32,64]

Exports the deploy form in each precision (`--precisions fp32,bf16`), loads each SavedModel with
`tf.saved_model.load` and times its `serving_default` signature on every batch size, interleaved,
medians over `--rounds`. Writes serving_batches.json/.md beside the main results
(bench/results/<machine>/). Weights: random with trained-like BatchNorm statistics (speed does
not depend on them).
"""

import datetime
import json
import os
import shlex
import sys
import tempfile

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS

DTYPES = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}
# Larger batches cost latency: the sweet spot is the smallest batch within this share of the best.
SHARE_OF_BEST = 0.95


def sweet_spot(rows):
    """The smallest batch size whose throughput is within SHARE_OF_BEST of the best batch size's."""
    best = max(row["images_per_s"] for row in rows)
    return min(row["batch"] for row in rows if row["images_per_s"] >= SHARE_OF_BEST * best)


def main(argv):
    del argv
    try:
        batches = sorted(int(b) for b in FLAGS.batches)
        unknown = [p for p in FLAGS.precisions if p not in DTYPES]
        if unknown or min(batches) < 1:
            raise ValueError(
                f"--precisions from {', '.join(DTYPES)} and --batches >= 1, got "
                f"{FLAGS.precisions} / {FLAGS.batches}."
            )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    import tensorflow as tf

    import repvgg_keras as rk
    from bench import timing
    from bench.machine import library_versions, machine_slug
    from export.savedmodel import save_serving_model
    from repvgg_keras import cpu_features
    from repvgg_keras.parity import randomize_batchnorm

    size = FLAGS.image_size
    model = randomize_batchnorm(
        rk.get_model(FLAGS.model, input_shape=(size, size, 3), classes=1000)
    )
    images = np.random.default_rng(0).normal(size=(max(batches), size, size, 3)).astype(np.float32)
    cases = []
    with tempfile.TemporaryDirectory() as workdir:
        for precision in FLAGS.precisions:
            path = os.path.join(workdir, precision)
            save_serving_model(rk.to_deploy(model, dtype=DTYPES[precision]), path)
            signature = tf.saved_model.load(path).signatures["serving_default"]
            predict = lambda x, signature=signature: signature(images=tf.constant(x))[
                "logits"
            ].numpy()
            cases += [timing.Case((precision, b), predict, images[:b]) for b in batches]
        timing.measure(
            cases, FLAGS.rounds, FLAGS.chunk_seconds, progress=lambda m: print(m, flush=True)
        )
    rows = [dict(precision=c.key[0], batch=c.key[1], **c.summary()) for c in cases]
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{cpu_features.cpu_name()}, {os.cpu_count()} cores",
        "isa": cpu_features.isa_extensions(),
        "versions": library_versions(),
        "model": FLAGS.model,
        "image_size": size,
        "command": "python -m bench.serving_batches "
        + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }
    lines = [
        f"# SavedModel serving_default by batch size: {FLAGS.model}, {size}x{size}",
        "",
        f"{meta['machine']} ({', '.join(meta['isa'])}); {meta['date']}; `{meta['command']}`",
        "",
        "| precision | batch | images/s (median) | latency ms/request |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['precision']} | {row['batch']} | {row['images_per_s']:.1f} | "
            f"{row['latency_ms']:.1f} |"
        )
    lines.append("")
    for precision in FLAGS.precisions:
        spot = sweet_spot([r for r in rows if r["precision"] == precision])
        lines.append(
            f"- {precision}: batch {spot} reaches {SHARE_OF_BEST:.0%} of the best throughput"
        )
    text = "\n".join(lines) + "\n"
    out = FLAGS.out or os.path.join("bench", "results", machine_slug())
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "serving_batches.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(out, "serving_batches.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


def define_flags():
    flags.DEFINE_string("model", "RepVGG_A0", "Variant.")
    flags.DEFINE_integer("image_size", 224, "Input height and width.")
    flags.DEFINE_list("batches", ["1", "2", "4", "8", "16", "32", "64"], "Batch sizes.")
    flags.DEFINE_list("precisions", ["fp32", "bf16"], "SavedModel precisions (fp32, bf16, fp16).")
    flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds (the median is reported).")
    flags.DEFINE_float("chunk_seconds", 1.0, "Length of one timed chunk per case and round.")
    flags.DEFINE_string("out", None, "Output directory (default: bench/results/<machine>).")


if __name__ == "__main__":
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
