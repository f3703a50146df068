"""The fastest verified way to run a trained model on this CPU.

    from export.fast_predictor import fast_predictor
    predict = fast_predictor(model, check_images=x[:64])
    logits = predict(x)          # NHWC float32, normalised like the model's input
    print(predict.describe())    # runtime, precision, threads, measured difference

Candidates are tried fastest first (the order `python -m bench` measures; docs/benchmarks.md)
and the first that is installed, runs natively on this CPU and passes the exporters'
acceptance rule on the check images (export/verify.py: int8 by its top-1 agreement) is kept;
"fp32" in the plain Keras deploy form always qualifies. Accuracy is never
traded silently: a reduced precision is used only if its top-1 agreement with the fp32 Keras
model on the check images is at least `min_agreement`.
"""

import dataclasses
import os
import tempfile
from collections.abc import Callable

import numpy as np

import repvgg_keras as rk
from export import onnx, runners, tflite, verify
from export.openvino_runtime import supports
from repvgg_keras.errors import shape_text

# Per precision, fastest first as `python -m bench` ranks them (docs/benchmarks.md). TFLite leads
# int8 because it also keeps the classifier in float; of these runtimes only OpenVINO runs bf16.
FASTEST = {
    "int8": ("tflite", "openvino", "onnxruntime"),
    "bf16": ("openvino",),
    "fp32": ("openvino", "onnxruntime", "keras", "tflite"),
}
RUNTIME_CHOICES = ("openvino", "tflite", "onnxruntime", "keras")


@dataclasses.dataclass
class VerifiedPredictor:
    runtime: str
    precision: str
    threads: int
    max_rel_diff: float
    top1_agreement: float
    checked_on: int
    _run: Callable
    layout: str = "NHWC"

    def __call__(self, images):
        x = np.asarray(images, np.float32)
        if self.layout == "NCHW":
            x = np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))
        return self._run(x)

    def describe(self):
        return (
            f"{self.runtime} {self.precision}, {self.threads} threads, {self.layout}; checked on "
            f"{self.checked_on} images: max relative difference {self.max_rel_diff:.2e}, "
            f"top-1 agreement {self.top1_agreement:.4f}"
        )


def _installed(runtime):
    import importlib.util

    module = {
        "openvino": "openvino",
        "tflite": "ai_edge_litert",
        "onnxruntime": "onnxruntime",
        "keras": "tensorflow",
    }[runtime]
    return importlib.util.find_spec(module) is not None


def _native(runtime, precision):
    if precision not in FASTEST or runtime not in FASTEST[precision]:
        return False
    if precision == "fp32":
        return True
    if runtime == "openvino":
        return supports(precision)
    return precision == "int8"  # TFLite and onnxruntime run int8 on any x86/ARM CPU


def _build(runtime, precision, deploy, calibration, threads, workdir):
    """(run function, layout) for one candidate."""
    if runtime == "keras":
        import tensorflow as tf

        function = tf.function(lambda x: deploy(x, training=False), jit_compile=True)
        return (lambda x: function(tf.constant(x)).numpy()), "NHWC"
    if runtime == "tflite":
        flatbuffer = tflite.convert(deploy, "int8" if precision == "int8" else "none", calibration)
        return runners.tflite(flatbuffer, threads), "NHWC"
    path = onnx.onnx_file(
        deploy, workdir, nchw=True, int8=precision == "int8", calibration=calibration
    )
    if runtime == "openvino":
        return runners.openvino(path, precision, threads), "NCHW"
    return runners.onnxruntime(path, threads), "NCHW"


def _checked_images(images, name, model):
    """`images` as float32 NHWC of `model`'s input shape, at least one, all finite; else ValueError."""
    x = np.asarray(images, np.float32)
    wanted = tuple(model.input_shape[1:])
    if x.ndim != 4 or any(w is not None and w != d for w, d in zip(wanted, x.shape[1:])):
        raise ValueError(
            f"{name} must be NHWC images of shape {shape_text((None, *wanted))}, normalised like "
            f"the model's input; got shape {list(x.shape)}."
        )
    if len(x) == 0:
        raise ValueError(f"{name} holds no images: pass at least one (real images, normalised).")
    bad = int((~np.isfinite(x.reshape(len(x), -1)).all(axis=1)).sum())
    if bad:
        raise ValueError(
            f"{name} holds NaN or Inf values in {bad} of {len(x)} images: pass finite, "
            "normalised images."
        )
    return x


def fast_predictor(
    model,
    *,
    precision="auto",
    runtime="auto",
    check_images=None,
    calibration_images=None,
    threads=None,
    min_agreement=0.995,
):
    """The fastest verified way to run `model` (training or deploy form) on this CPU.

    precision: "auto" (int8 if `calibration_images` are given, then bf16 where native, then
    fp32), or one of "fp32", "bf16", "int8". runtime: "auto" (FASTEST's order for each
    precision) or one of RUNTIME_CHOICES.
    check_images: normalised NHWC images to verify on (real images: agreement is only
    meaningful on them); default the calibration images, else 16 random ones.
    Raises ValueError for images that are empty, of another shape or not finite, for a
    model whose own outputs on the check images are not finite, or for bad options.
    """
    if (runtime != "auto" and runtime not in RUNTIME_CHOICES) or precision not in (
        "auto",
        *FASTEST,
    ):
        raise ValueError(
            f"runtime must be 'auto' or one of {RUNTIME_CHOICES}, precision 'auto' or one of "
            f"{tuple(FASTEST)}; got runtime={runtime!r}, precision={precision!r}."
        )
    if isinstance(min_agreement, bool) or not 0 <= min_agreement <= 1:
        raise ValueError(f"min_agreement is a fraction between 0 and 1, got {min_agreement!r}.")
    if threads is not None and (
        isinstance(threads, bool) or int(threads) != threads or threads < 1
    ):
        raise ValueError(
            f"threads must be a positive integer (or None: all cores), got {threads!r}."
        )
    if precision == "int8" and calibration_images is None:
        raise ValueError("precision='int8' needs calibration_images (normalised real images).")
    precisions = (("int8",) if calibration_images is not None else ()) + ("bf16", "fp32")
    precisions = precisions if precision == "auto" else (precision,)
    threads = threads or os.cpu_count()
    deploy = rk.to_deploy(model) if not rk.is_deploy_form(model) else model
    if calibration_images is not None:
        calibration_images = _checked_images(calibration_images, "calibration_images", deploy)
    if check_images is None:
        check_images = calibration_images
    if check_images is None:
        _, height, width, channels = deploy.input_shape
        check_images = np.random.default_rng(0).normal(size=(16, height, width, channels))
    check_images = _checked_images(check_images, "check_images", deploy)
    reference = verify.check_reference_outputs(deploy, check_images, "check images")
    tried = []
    with tempfile.TemporaryDirectory() as workdir:
        for candidate_precision in precisions:
            for candidate_runtime in (
                FASTEST[candidate_precision] if runtime == "auto" else (runtime,)
            ):
                if not (
                    _installed(candidate_runtime)
                    and _native(candidate_runtime, candidate_precision)
                ):
                    continue
                run, layout = _build(
                    candidate_runtime,
                    candidate_precision,
                    deploy,
                    calibration_images,
                    threads,
                    workdir,
                )
                predictor = VerifiedPredictor(
                    candidate_runtime,
                    candidate_precision,
                    threads,
                    0.0,
                    0.0,
                    len(check_images),
                    run,
                    layout,
                )
                # The exporters' acceptance rule (int8 by its agreement), plus the agreement asked for.
                report = verify.compare(
                    candidate_runtime,
                    candidate_precision,
                    predictor(check_images),
                    reference,
                    min_agreement=min_agreement,
                )
                predictor.max_rel_diff = report.max_rel
                predictor.top1_agreement = report.top1_agreement
                if report.ok and report.top1_agreement >= min_agreement:
                    return predictor
                tried.append(predictor.describe())
    raise ValueError(
        "No runtime met the accuracy requirement on the check images: " + "; ".join(tried)
        if tried
        else f"Runtime {runtime!r} cannot run precision {precision!r} on this CPU."
    )
