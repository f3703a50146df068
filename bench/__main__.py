"""Benchmark every way to run RepVGG on this machine, side by side, as ratios.

    python -m bench --models RepVGG_A0,RepVGG_B1g4 --batch 1,32 --image_size 224 --out bench/results
    python -m bench --quick --out /tmp/bench    # smoke run: small inputs, short timings

Prints a table and writes <out>/results.json (one record per model x runtime x precision
x batch), <out>/meta.json, <out>/results.md (table, ratios, structure) and <out>/results.png.
Every runtime gets the same thread count; timings are medians over interleaved rounds.
Outputs are checked against the Keras training form on real images (top-1 agreement and
max relative difference in every record).
"""

import datetime
import os
import platform
import shlex
import sys

from absl import app, flags

from bench import machine, timing
from repvgg_keras import cpu_features

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["RepVGG_A0", "RepVGG_B1g4"], "RepVGG variants to measure.")
flags.DEFINE_list(
    "baselines",
    ["ResNet-18", "ResNet-50"],
    "The paper's baselines (timm, random weights); empty for none.",
)
flags.DEFINE_list("batch", ["1", "32"], "Batch sizes.")
flags.DEFINE_integer("image_size", 224, "Input height and width.")
flags.DEFINE_integer("classes", 1000, "Classifier width.")
flags.DEFINE_integer(
    "threads",
    os.cpu_count(),
    "Threads for every runtime (intra-op; TensorFlow also runs up to this many independent ops at once).",
)
flags.DEFINE_list(
    "runtimes", None, "Only these runtimes ('name' or 'name:precision'); default all."
)
flags.DEFINE_list(
    "weights", None, "Model=path pairs (a trained training-form file); default timm's init."
)
flags.DEFINE_string(
    "images", "fashion_mnist", "Real images for agreement and int8 calibration (see export.images)."
)
flags.DEFINE_integer("image_count", 64, "How many of them.")
flags.DEFINE_integer("rounds", 7, "Interleaved timing rounds (the median is reported).")
flags.DEFINE_float("chunk_seconds", 1.0, "Length of one timed chunk per case and round.")
flags.DEFINE_bool("memory", True, "Measure peak RSS of the Keras forms in separate processes.")
flags.DEFINE_bool(
    "quick", False, "Smoke run: A0 and ResNet-18 at 64px, batch 1 and 2, short timings."
)
flags.DEFINE_string(
    "out",
    None,
    "Output directory (default: bench/results/<machine>, e.g. amd-epyc-2c: one "
    "current result set per machine).",
)

BASELINES = {"ResNet-18": "resnet18", "ResNet-50": "resnet50"}
QUICK = dict(
    models=["RepVGG_A0"],
    baselines=["ResNet-18"],
    batch=["1", "2"],
    image_size=64,
    rounds=2,
    chunk_seconds=0.05,
    image_count=8,
)


def apply_quick():
    for name, value in QUICK.items():
        if not FLAGS[name].present:
            FLAGS[name].value = value


def configure_threads(threads):
    import tensorflow as tf

    timing.use_threads(threads)
    tf.get_logger().setLevel(
        "ERROR"
    )  # one trace per batch size is expected, not a retracing problem


def parse_weights(pairs):
    weights = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--weights takes Model=path pairs, got {pair!r}.")
        model, path = pair.split("=", 1)
        weights[model] = path
    return weights


def check_against_reference(outputs, reference):
    import numpy as np

    from repvgg_keras.parity import max_relative_difference

    return {
        "top1_agreement": float(np.mean(np.argmax(outputs, -1) == np.argmax(reference, -1))),
        "max_rel_diff": max_relative_difference(outputs, reference),
    }


def prepare_model(name, weights, batches, workdir):
    """(cases, records-in-progress) for one RepVGG variant: every runtime built and checked."""
    from bench import runtimes, timing
    from bench import subject as subject_lib

    print(
        f"{name}: building both forms and the exports ({FLAGS.image_size}px, {FLAGS.classes} classes)",
        flush=True,
    )
    subject = subject_lib.build(
        name,
        FLAGS.image_size,
        FLAGS.classes,
        weights,
        FLAGS.images,
        FLAGS.image_count,
        os.path.join(workdir, name),
    )
    reference = runtimes.keras_train(subject, FLAGS.threads).predict(subject.images)
    macs = subject.macs
    cases, records = [], []
    for spec in runtimes.select(FLAGS.runtimes):
        base = {
            "model": name,
            "runtime": spec.runtime,
            "precision": spec.precision,
            "weights": subject.weights,
            "image_size": FLAGS.image_size,
            "threads": FLAGS.threads,
            "macs": macs,
        }
        built, failed = runtimes.attempt(
            f"{spec.runtime} {spec.precision}",
            base,
            build_checked,
            spec,
            subject,
            reference,
            max(batches),
        )
        if failed:
            records.append(failed)
            continue
        predictor, checked = built
        print(
            f"  {spec.runtime} {spec.precision}: ready"
            + (
                f", top-1 agreement {checked['top1_agreement']:.4f}, max rel diff {checked['max_rel_diff']:.2e}"
                if checked
                else ""
            )
            + _memory_note(),
            flush=True,
        )
        for batch in batches:
            images = subject.images[[i % len(subject.images) for i in range(batch)]]
            record = dict(
                base,
                batch=batch,
                layout=predictor.layout,
                note=predictor.note,
                status="ok",
                **checked,
            )
            cases.append(
                timing.Case(key=record, predict=predictor.predict, batch=predictor.feed(images))
            )
    return cases, records


def build_checked(spec, subject, reference, chunk):
    """(predictor, its top-1 agreement and max relative difference to `reference`) for one runtime."""
    predictor = spec.build(subject, FLAGS.threads)
    checked = {}
    if not spec.runtime.startswith("timm") or subject.timm_matches:  # kimm always holds our weights
        checked = check_against_reference(
            predict_in_chunks(predictor, subject.images, chunk), reference
        )
    return predictor, checked


def predict_in_chunks(predictor, images, size):
    """Logits for all check images, at most `size` at a time: runtimes size their memory pools
    to the largest batch they see, so checking 64 images at once would inflate the peak."""
    import numpy as np

    return np.concatenate(
        [
            predictor.predict(predictor.feed(images[i : i + size]))
            for i in range(0, len(images), size)
        ]
    )


def _memory_note():
    """Where the benchmark's own memory goes: RSS now and at its peak, after each runtime's build."""
    from bench.memory import rss_mb

    now, peak = rss_mb(), rss_mb("VmHWM")
    return (
        f" (bench RSS {now:.0f} MB, peak {peak:.0f} MB)"
        if now is not None and peak is not None
        else ""
    )


def prepare_baseline(name, batches):
    """ResNet cases from timm (NCHW and channels_last), random weights: speed only."""
    import numpy as np

    from bench import flops, runtimes, timing
    from bench import subject as subject_lib

    timm = subject_lib.import_timm()
    if timm is None:
        return [], [
            {
                "model": name,
                "runtime": "timm",
                "precision": "fp32",
                "status": "skipped",
                "reason": "torch/timm are not installed",
            }
        ]
    module = timm.create_model(BASELINES[name], num_classes=FLAGS.classes).eval()
    macs = flops.torch_multiply_adds(module, FLAGS.image_size)
    cases = []
    for runtime, channels_last in (("timm", False), ("timm-cl", True)):
        predictor = runtimes._torch_predictor(module, channels_last)
        for batch in batches:
            images = (
                np.random.default_rng(0)
                .normal(size=(batch, FLAGS.image_size, FLAGS.image_size, 3))
                .astype("float32")
            )
            record = {
                "model": name,
                "runtime": runtime,
                "precision": "fp32",
                "batch": batch,
                "layout": "NCHW",
                "note": predictor.note,
                "status": "ok",
                "weights": "random",
                "image_size": FLAGS.image_size,
                "threads": FLAGS.threads,
                "macs": macs,
            }
            cases.append(
                timing.Case(key=record, predict=predictor.predict, batch=predictor.feed(images))
            )
    return cases, []


def measure_cases(cases, batches, peak_gflops):
    """Interleaved timing of `cases`, batch by batch: one finished record per case."""
    from bench import timing

    for batch in batches:
        batch_cases = [c for c in cases if c.key["batch"] == batch]
        print(
            f"Timing batch {batch}: {len(batch_cases)} cases x {FLAGS.rounds} rounds "
            f"of {FLAGS.chunk_seconds}s",
            flush=True,
        )
        timing.measure(batch_cases, FLAGS.rounds, FLAGS.chunk_seconds)
    records = []
    for case in cases:
        record = dict(case.key, **case.summary())
        record["gflops"] = 2 * record["macs"] * record["images_per_s"] / 1e9
        # fp16 here means fp16 weights: XNNPACK computes in fp32 on CPUs without native fp16.
        reference_peak = peak_gflops.get(
            record["precision"] if record["precision"] in ("bf16", "int8") else "fp32"
        )
        record["peak_fraction"] = record["gflops"] / reference_peak if reference_peak else None
        records.append(record)
    return records


def free_memory():
    """Drop the finished model's runtimes: Keras state, then Python garbage."""
    import gc

    import keras

    keras.backend.clear_session()
    gc.collect()


def main(argv):
    del argv
    if FLAGS.quick:
        apply_quick()
    try:
        batches = [int(b) for b in FLAGS.batch]
        weights = parse_weights(FLAGS.weights)
        unknown = [b for b in FLAGS.baselines if b not in BASELINES]
        if unknown:
            raise ValueError(f"Unknown --baselines {unknown}: choose from {', '.join(BASELINES)}.")
        import repvgg_keras as rk

        for name in FLAGS.models:
            rk.get_spec(name)  # a clear error for a misspelt variant, before any work
        from bench import runtimes

        runtimes.select(FLAGS.runtimes)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return run(batches, weights)


def run(batches, weights):
    import tempfile

    from bench import memory, peak, report

    configure_threads(FLAGS.threads)
    FLAGS.out = FLAGS.out or os.path.join("bench", "results", machine.machine_slug())
    os.makedirs(FLAGS.out, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="bench-work-")
    print(f"Measuring this CPU's matmul peak ({FLAGS.threads} threads)...", flush=True)
    peak_gflops = peak.measure(FLAGS.threads, FLAGS.quick)
    print(
        "  "
        + ", ".join(
            f"{k} {peak_gflops[k]:.0f} GFLOP/s ({peak_gflops[k + '_library']})"
            for k in ("fp32", "bf16", "int8")
            if k in peak_gflops
        ),
        flush=True,
    )

    records, structure = [], []
    # One model at a time: build its runtimes, time them, free them (holding every runtime of
    # every model at once peaked at 24 GB). The baselines share the first model's rounds, so
    # the RepVGG-A0 / ResNet-18 ratio is still measured side by side.
    for index, name in enumerate(FLAGS.models or [None]):
        cases, notes = (
            prepare_model(name, weights.get(name), batches, workdir) if name else ([], [])
        )
        records += notes
        for baseline in FLAGS.baselines if index == 0 else []:
            found, notes = prepare_baseline(baseline, batches)
            cases += found
            records += notes
        records += measure_cases(cases, batches, peak_gflops)
        del cases
        free_memory()

    if FLAGS.memory:
        for name in FLAGS.models:
            for batch in batches:
                for form, runtime in (("train", "keras-train"), ("deploy", "keras-deploy")):
                    print(
                        f"Peak memory: {name} {form} form, batch {batch} (own process)", flush=True
                    )
                    measured = memory.measure_in_subprocess(
                        name, form, batch, FLAGS.image_size, FLAGS.classes, FLAGS.threads
                    )
                    if batch == batches[0]:
                        structure.append(measured)
                    for record in records:
                        if (record["model"], record.get("batch"), record["runtime"]) == (
                            name,
                            batch,
                            runtime,
                        ):
                            record["peak_rss_mb"] = measured["peak_rss_mb"]
                            record["model_rss_mb"] = measured["model_rss_mb"]

    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {cpu_features.cpu_name()}, {os.cpu_count()} cores",
        "isa": cpu_features.isa_extensions(),
        "versions": machine.library_versions(),
        "threads": FLAGS.threads,
        "image_size": FLAGS.image_size,
        "classes": FLAGS.classes,
        "command": "python -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "peak_gflops": peak_gflops,
        "peak_size": "512" if FLAGS.quick else "2048",
        "images": FLAGS.images,
        "image_count": FLAGS.image_count,
        "weights": ", ".join(
            sorted({r.get("weights", "") for r in records if r["model"].startswith("RepVGG")})
        ),
        "structure": structure,
        "bench_peak_rss_mb": memory.peak_rss_mb(),  # this process, all runtimes of one model at a time
    }
    report.write(FLAGS.out, records, meta)
    print(report.text_table(records))
    for model, batch, what, value, detail in report.ratios(records):
        print(f"{model} batch {batch}: {what}: {value:.2f}x ({detail})")
    print(f"benchmark process peak RSS: {meta['bench_peak_rss_mb']:.0f} MB")
    print(f"wrote {os.path.join(FLAGS.out, 'results.json')}, results.md, results.png")
    failed = [r for r in records if r.get("status") == "error"]
    return 1 if failed else 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
