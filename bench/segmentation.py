"""Segmentation speed: PSPNet on RepVGG against PSPNet on dilated ResNets, side by side.

    python -m bench.segmentation [--models RepVGG_A0,RepVGG_B1g2,RepVGG_B1g2_fast,ResNet-50,ResNet-101]
        [--runtimes keras,onnxruntime] [--image_size 512] [--batch 1] [--rounds 5]

Checks the RepVGG paper's segmentation claim (Cityscapes, 19 classes, output stride 8): PSPNet
with RepVGG backbones runs faster than with ResNet-50/101, RepVGG-B1g2-fast 62% faster than
ResNet-101. Every model has the same head (`pspnet.decoder`) at the same output stride; the
RepVGG ones run in deploy form (`rk.to_deploy`). The ResNets are keras.applications' ResNet v1
(stride on the 1x1 conv, 7x7 stem) with conv4/conv5 made stride 1 and their 3x3 convs dilated
by 2/4; PSPNet's own ResNet has a deep 3x3 stem, so its backbone costs a little more. Random
weights: speed does not depend on them. All cases are timed interleaved in the same rounds
(medians); results.json/.md go to bench/results/<machine>-segmentation/.
"""

import datetime
import json
import os
import shlex
import sys
import tempfile
import types

import numpy as np
from absl import app, flags

from bench.report import speed

FLAGS = flags.FLAGS

# Bench name -> (backbone, fast) for RepVGG; ResNet depth for the baselines.
REPVGG = {
    "RepVGG_A0": ("RepVGG_A0", False),
    "RepVGG_B1g2": ("RepVGG_B1g2", False),
    "RepVGG_B1g2_fast": ("RepVGG_B1g2", True),
}
RESNETS = {"ResNet-50": 50, "ResNet-101": 101}
MODELS = tuple(REPVGG) + tuple(RESNETS)
# What each --runtimes name runs: a row of bench.runtimes.RUNTIMES.
RUNTIMES = {
    "keras": "keras-deploy:fp32",
    "onnxruntime": "onnxruntime-nchw:fp32",
    "savedmodel": "savedmodel:fp32",
    "savedmodel-int8": "savedmodel:int8",
}
RUNTIME_NOTES = {
    "keras": "Keras model in tf.function (jit off), TensorFlow",
    "onnxruntime": "tf2onnx (opset 17, NCHW input), onnxruntime CPU, all graph optimisations",
    "savedmodel": "export.savedmodel's SavedModel, serving_default signature, TensorFlow",
    "savedmodel-int8": "the same, --precision int8 (Neural Compressor, oneDNN int8 ops)",
}
CALIBRATION_COUNT = 8  # random images: the weights are random too, only speed is measured
OUTPUT_STRIDE = 8
DILATIONS = {"conv4": 2, "conv5": 4}  # PSPNet's dilated ResNet: stage 4 by 2, stage 5 by 4
CLAIMS = (("RepVGG_B1g2_fast", "ResNet-101", 1.62),)  # (model, baseline, paper's speed ratio)
STEM_NOTE = (
    "ResNets: keras.applications ResNet v1 (stride on the 1x1 conv, 7x7 stem), conv4/conv5 at "
    "stride 1 with their 3x3 convs dilated by 2/4; PSPNet's own ResNet has a deep 3x3 stem."
)


def dilated_resnet(depth, input_shape):
    """keras.applications' ResNet-`depth` at output stride 8, as in PSPNet's dilated ResNet.

    conv4_block1 and conv5_block1 lose their stride (the 1x1 `_1_conv` and the shortcut
    `_0_conv` carry it in ResNet v1); every 3x3 `_2_conv` of conv4 / conv5 is dilated by 2 / 4,
    so the weights are those of the undilated network, shape for shape.
    """
    import keras

    builders = {50: keras.applications.ResNet50, 101: keras.applications.ResNet101}
    if depth not in builders:
        raise ValueError(f"ResNet depth must be 50 or 101, got {depth!r}.")
    base = builders[depth](weights=None, include_top=False, input_shape=input_shape)

    def clone(layer):
        config = layer.get_config()
        stage = layer.name.split("_", 1)[0]
        if stage in DILATIONS and isinstance(layer, keras.layers.Conv2D):
            if layer.name.endswith(("block1_0_conv", "block1_1_conv")):
                config["strides"] = (1, 1)
            elif layer.name.endswith("_2_conv"):
                config["dilation_rate"] = (DILATIONS[stage],) * 2
        return layer.__class__.from_config(config)

    return keras.models.clone_model(base, clone_function=clone)


def resnet_pspnet(depth, classes, input_shape):
    """PSPNet's head (`pspnet.decoder`) on the dilated ResNet-`depth`."""
    import keras

    from repvgg_keras import models, pspnet

    backbone = dilated_resnet(depth, input_shape)
    images = keras.Input(shape=input_shape, name=models.INPUT_NAME)
    features = backbone(images)
    logits = pspnet.decoder(images, features, classes)
    return keras.Model(images, logits, name=f"PSPNet_ResNet{depth}")


def build(name, classes, input_shape):
    """The inference model timed for bench name `name` and its backbone's feature size."""
    import repvgg_keras as rk

    if name in RESNETS:
        model = resnet_pspnet(RESNETS[name], classes, input_shape)
    else:
        backbone, fast = REPVGG[name]
        model = rk.to_deploy(
            rk.PSPNet(backbone, classes, input_shape, output_stride=OUTPUT_STRIDE, fast=fast)
        )
    features = model.get_layer("ppm_concat").input[0].shape[1:3]
    expected = tuple(-(-size // OUTPUT_STRIDE) for size in input_shape[:2])
    if tuple(features) != expected:
        raise RuntimeError(
            f"{name}: the backbone's feature map is {tuple(features)} for a {input_shape[:2]} "
            f"input, expected {expected} (output stride {OUTPUT_STRIDE})."
        )
    return model, tuple(features)


def traced(spec, subject, threads, images):
    """(predictor, its outputs for `images`): the first call traces, so timing starts warm."""
    predictor = spec.build(subject, threads)
    return predictor, predictor.predict(predictor.feed(images))


def prepare(name, image_size, batch, classes, runtimes, threads, workdir):
    """Timing cases for one model (one per runtime) and records for runtimes that failed."""
    from bench import flops, timing
    from bench import runtimes as runtimes_lib
    from repvgg_keras.parity import max_relative_difference

    print(f"{name}: building ({image_size}px, {classes} classes)", flush=True)
    model, features = build(name, classes, (image_size, image_size, 3))
    images = np.random.default_rng(0).normal(size=(batch, image_size, image_size, 3))
    images = images.astype(np.float32)
    base = {
        "model": name,
        "batch": batch,
        "image_size": image_size,
        "classes": classes,
        "threads": threads,
        "params_m": model.count_params() / 1e6,
        "gmacs": flops.multiply_adds(model) / 1e9,
        "feature_size": list(features),
        "deploy_form": name in REPVGG,
    }
    calibration = np.random.default_rng(1).normal(
        size=(CALIBRATION_COUNT, image_size, image_size, 3)
    )
    subject = types.SimpleNamespace(
        keras_deploy=model,
        workdir=os.path.join(workdir, name),
        calibration=calibration.astype(np.float32),
    )
    os.makedirs(subject.workdir, exist_ok=True)
    cases, failed, reference = [], [], None
    for runtime in runtimes:
        (spec,) = runtimes_lib.select([RUNTIMES[runtime]])
        record = dict(base, runtime=runtime, note=RUNTIME_NOTES[runtime])
        print(
            f"  {runtime}: " + ("" if runtime == "keras" else "converting and ") + "tracing",
            flush=True,
        )
        built, problem = runtimes_lib.attempt(
            runtime, record, traced, spec, subject, threads, images
        )
        if problem:
            failed.append(problem)
            continue
        predictor, outputs = built
        if runtime == "keras":  # the reference itself: its tf.function output
            reference, record["max_rel_diff"] = outputs, None
            print(f"  {runtime}: ready", flush=True)
        else:
            if reference is None:  # Keras not timed: one eager call
                reference = np.asarray(model(images, training=False))
            record["max_rel_diff"] = max_relative_difference(outputs, reference)
            print(
                f"  {runtime}: ready, max rel diff to Keras {record['max_rel_diff']:.1e}",
                flush=True,
            )
        cases.append(
            timing.Case(key=record, predict=predictor.predict, batch=predictor.feed(images))
        )
    return cases, failed


def ratios(records):
    """Each RepVGG PSPNet's speed over each ResNet PSPNet's, per runtime, with the paper's ratio
    where it states one: dicts of model, baseline, runtime, ratio, faster, paper."""
    paper = {(m, b): r for m, b, r in CLAIMS}
    out = []
    runtimes = list(dict.fromkeys(r["runtime"] for r in records))
    for runtime in runtimes:
        for model in REPVGG:
            for baseline in RESNETS:
                ours = speed(records, model=model, runtime=runtime)
                theirs = speed(records, model=baseline, runtime=runtime)
                if ours and theirs:
                    out.append(
                        {
                            "model": model,
                            "baseline": baseline,
                            "runtime": runtime,
                            "ratio": ours / theirs,
                            "faster": ours > theirs,
                            "paper": paper.get((model, baseline)),
                        }
                    )
    return out


def _ratio_line(r):
    line = (
        f"{r['model']} / {r['baseline']} ({r['runtime']}): {r['ratio']:.2f}x, "
        f"{'faster' if r['faster'] else 'NOT faster'}"
    )
    if r["paper"]:
        line += f" (paper: {r['paper']:.2f}x)"
    return line


def ordering(ratio_rows):
    """Per runtime: whether every measured RepVGG PSPNet beats every ResNet PSPNet, and which not."""
    lines = []
    for runtime in dict.fromkeys(r["runtime"] for r in ratio_rows):
        rows = [r for r in ratio_rows if r["runtime"] == runtime]
        slower = [f"{r['model']} vs {r['baseline']}" for r in rows if not r["faster"]]
        lines.append(
            f"{runtime}: "
            + ("holds" if not slower else "does not hold for " + ", ".join(slower))
            + f" ({len(rows) - len(slower)} of {len(rows)} pairs faster)"
        )
    return lines


def _diff(value):
    return "reference" if value is None else f"{value:.1e}"


def markdown(records, ratio_rows, meta):
    lines = [
        f"# PSPNet speed: RepVGG against dilated ResNet backbones, {meta['image_size']}x"
        f"{meta['image_size']}, batch {meta['batch']}",
        "",
        f"{meta['machine']} ({', '.join(meta['isa'])}); {meta['threads']} threads; "
        f"{meta['date']}; `{meta['command']}`",
        "",
        f"{meta['classes']} classes, output stride {OUTPUT_STRIDE}, the same PSP head on every "
        "backbone; RepVGG in deploy form. " + STEM_NOTE,
        "",
        "| model | runtime | images/s (median) | min | max | latency ms | params (M) "
        "| GFLOPs (mult-adds) | features | max rel diff to Keras |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r.get("status") != "ok":
            lines.append(f"| {r['model']} | {r['runtime']} | {r['status']}: {r['reason']} |")
            continue
        lines.append(
            f"| {r['model']} | {r['runtime']} | {r['images_per_s']:.2f} | "
            f"{r['images_per_s_min']:.2f} | {r['images_per_s_max']:.2f} | {r['latency_ms']:.0f} | "
            f"{r['params_m']:.2f} | {r['gmacs']:.1f} | {r['feature_size'][0]}x"
            f"{r['feature_size'][1]} | {_diff(r.get('max_rel_diff'))} |"
        )
    if ratio_rows:
        lines += ["", "Speed ratios (RepVGG PSPNet / ResNet PSPNet, same runtime):", ""]
        lines += [f"- {_ratio_line(r)}" for r in ratio_rows]
        lines += ["", "Every RepVGG PSPNet faster than every ResNet PSPNet?", ""]
        lines += [f"- {line}" for line in ordering(ratio_rows)]
    lines += [
        "",
        "Runtimes: " + "; ".join(f"{k}: {RUNTIME_NOTES[k]}" for k in meta["runtimes"]) + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    unknown = [m for m in FLAGS.models if m not in MODELS]
    unknown_runtimes = [r for r in FLAGS.runtimes if r not in RUNTIMES]
    problem = None
    if unknown:
        problem = f"Unknown --models {unknown}: choose from {', '.join(MODELS)}."
    elif unknown_runtimes:
        problem = f"Unknown --runtimes {unknown_runtimes}: choose from {', '.join(RUNTIMES)}."
    elif FLAGS.image_size < 32 or FLAGS.batch < 1 or FLAGS.rounds < 1:
        problem = "--image_size must be >= 32, --batch and --rounds >= 1."
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    return run()


def run():
    import tensorflow as tf

    from bench import machine, timing
    from repvgg_keras import cpu_features

    timing.use_threads(FLAGS.threads)
    tf.get_logger().setLevel("ERROR")
    out = FLAGS.out or os.path.join("bench", "results", f"{machine.machine_slug()}-segmentation")
    os.makedirs(out, exist_ok=True)
    cases, records = [], []
    with tempfile.TemporaryDirectory(prefix="bench-segmentation-") as workdir:
        for name in FLAGS.models:
            found, failed = prepare(
                name,
                FLAGS.image_size,
                FLAGS.batch,
                FLAGS.classes,
                FLAGS.runtimes,
                FLAGS.threads,
                workdir,
            )
            cases += found
            records += failed
        if not cases:
            print("error: no runtime could run any model (see above).", file=sys.stderr)
            return 2
        print(
            f"Timing {len(cases)} cases x {FLAGS.rounds} rounds of {FLAGS.chunk_seconds}s "
            "(warm-up first)",
            flush=True,
        )
        timing.measure(
            cases, FLAGS.rounds, FLAGS.chunk_seconds, progress=lambda m: print(m, flush=True)
        )
    records += [dict(case.key, status="ok", **case.summary()) for case in cases]
    order = {(m, r): i for i, (m, r) in enumerate((m, r) for m in MODELS for r in RUNTIMES)}
    records.sort(key=lambda r: order[(r["model"], r["runtime"])])
    ratio_rows = ratios(records)
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{cpu_features.cpu_name()}, {os.cpu_count()} cores",
        "isa": cpu_features.isa_extensions(),
        "cpu_flags": sorted(cpu_features.cpu_flags()),
        "versions": machine.library_versions(),
        "threads": FLAGS.threads,
        "runtimes": list(FLAGS.runtimes),
        "image_size": FLAGS.image_size,
        "batch": FLAGS.batch,
        "classes": FLAGS.classes,
        "output_stride": OUTPUT_STRIDE,
        "rounds": FLAGS.rounds,
        "chunk_seconds": FLAGS.chunk_seconds,
        "weights": "random (speed only)",
        "resnets": STEM_NOTE,
        "command": "python -m bench.segmentation " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": meta, "records": records, "ratios": ratio_rows}, f, indent=1)
    text = markdown(records, ratio_rows, meta)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"Wrote {out}/results.json and results.md", flush=True)
    return 2 if any(r.get("status") == "error" for r in records) else 0


def define_flags():
    flags.DEFINE_list("models", list(MODELS), f"PSPNet backbones, from {', '.join(MODELS)}.")
    flags.DEFINE_list("runtimes", list(RUNTIMES), f"Runtimes, from {', '.join(RUNTIMES)}.")
    flags.DEFINE_integer("image_size", 512, "Input height and width.")
    flags.DEFINE_integer("batch", 1, "Batch size.")
    flags.DEFINE_integer("classes", 19, "Classes (Cityscapes: 19).")
    flags.DEFINE_integer(
        "threads",
        os.cpu_count(),
        "Threads for every runtime (intra-op; TensorFlow also runs up to this many independent ops at once).",
    )
    flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds (the median is reported).")
    flags.DEFINE_float("chunk_seconds", 1.0, "Length of one timed chunk per case and round.")
    flags.DEFINE_string(
        "out", None, "Output directory (default: bench/results/<machine>-segmentation)."
    )


if __name__ == "__main__":
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
