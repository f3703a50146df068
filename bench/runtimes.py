"""Every way the benchmark runs a model, as data: (runtime, precision, builder).

A builder takes the Subject and the thread count and returns a Predictor: a function
from a batch in the runtime's own layout to float32 logits. The benchmark converts the
input to that layout before timing, so no runtime is charged for a transpose it would
not do in production. A builder raises Unavailable when its library is not installed or
the CPU lacks the precision; the benchmark records the reason instead of a number.
"""

import dataclasses
import os
import traceback
from collections.abc import Callable

import numpy as np


class Unavailable(RuntimeError):
    pass


def attempt(label, record, build, *args):
    """(build(*args), None), or (None, `record` marked skipped or error) when it raises.

    Unavailable (a library or precision this machine lacks) is a skip, said on one line; any other
    exception is an error with its traceback: one broken runtime must not stop the others.
    """
    try:
        return build(*args), None
    except Unavailable as why:
        print(f"  {label}: skipped ({why})", flush=True)
        return None, dict(record, status="skipped", reason=str(why))
    except Exception as error:
        traceback.print_exc()
        return None, dict(record, status="error", reason=f"{type(error).__name__}: {error}")


@dataclasses.dataclass
class Predictor:
    predict: Callable
    layout: str = "NHWC"  # NHWC or NCHW
    note: str = ""

    def feed(self, batch):
        return np.ascontiguousarray(
            np.transpose(batch, (0, 3, 1, 2)) if self.layout == "NCHW" else batch
        )


# --- Keras / TensorFlow -----------------------------------------------------------------


def keras_function(model, xla=False):
    import tensorflow as tf

    function = tf.function(lambda x: model(x, training=False), jit_compile=xla)
    return lambda x: function(tf.constant(x)).numpy()


def keras_train(subject, threads):
    return Predictor(keras_function(subject.keras_train), note="tf.function")


def keras_deploy_eager(subject, threads):
    model = subject.keras_deploy
    return Predictor(lambda x: np.asarray(model(x, training=False)), note="eager model(x)")


def keras_deploy(subject, threads):
    return Predictor(keras_function(subject.keras_deploy), note="tf.function")


def keras_deploy_xla(subject, threads):
    return Predictor(
        keras_function(subject.keras_deploy, xla=True), note="tf.function(jit_compile=True)"
    )


def keras_deploy_low(dtype):
    """The deploy form with its blocks in `dtype` (rk.to_deploy(model, dtype=...)), tf.function."""

    def build(subject, threads):
        import repvgg_keras as rk

        return Predictor(
            keras_function(rk.to_deploy(subject.keras_train, dtype=dtype)),
            note=f"to_deploy(dtype={dtype})",
        )

    return build


def _savedmodel(dtype=None, int8=False, qat=False):
    """What TF Serving runs: the exported SavedModel called through its serving_default signature
    (int8: the graph Neural Compressor quantizes on the subject's calibration images; qat: with
    the ranges of the subject's quantization-aware form, quantize_aware_form)."""

    def build(subject, threads):
        import tensorflow as tf

        import repvgg_keras as rk
        from export import savedmodel

        if int8:
            source = subject.keras_deploy
            if qat:
                source = rk.quantize.snap_biases(quantize_aware_form(subject, "convolutions"))
            try:
                function = savedmodel.int8_function(source, subject.calibration)
            except (ImportError, ValueError) as why:
                raise Unavailable(str(why)) from why
        kind = ("qat-int8" if qat else "int8") if int8 else dtype or "float32"
        path = os.path.join(subject.workdir, f"savedmodel-{kind}")
        if not os.path.exists(path):
            if int8:
                savedmodel.save_serving_model(subject.keras_deploy, path, function=function)
            else:
                deploy = rk.to_deploy(subject.keras_train, dtype=dtype) if dtype else None
                savedmodel.save_serving_model(deploy or subject.keras_deploy, path)
        signature = tf.saved_model.load(path).signatures["serving_default"]
        note = "serving_default" + (f", blocks in {dtype}" if dtype else "")
        return Predictor(
            lambda x: signature(images=tf.constant(x))["logits"].numpy(),
            note=note + (", oneDNN int8 (Neural Compressor)" if int8 else ""),
        )

    return build


# --- TFLite (XNNPACK) ---------------------------------------------------------------------


def _tflite(quantize, qat=False):
    """qat: the int8 file of the subject's quantization-aware form (quantize_aware_form)."""

    def build(subject, threads):
        try:
            import ai_edge_litert  # noqa: F401
        except ImportError as error:
            raise Unavailable("ai-edge-litert is not installed") from error
        from export import runners, tflite

        path = os.path.join(subject.workdir, f"model_{quantize}{'_qat' if qat else ''}.tflite")
        if not os.path.exists(path):
            scope = "every_op" if quantize == "int8_full" else "convolutions"
            model = quantize_aware_form(subject, scope) if qat else subject.keras_deploy
            flatbuffer = tflite.convert(model, quantize, subject.calibration)
            with open(path, "wb") as f:
                f.write(flatbuffer)
        predict = runners.tflite(path, threads)
        kind = "quantization-aware model" if qat else "conversion"
        return Predictor(predict, note=f"XNNPACK, {quantize} {kind}")

    return build


_QUANTIZE_AWARE = {}  # (workdir, scope) -> the subject's QAT model


def quantize_aware_form(subject, scope):
    """The subject's quantization-aware model (rk.quantize_aware of its deploy form, ranges from
    its calibration images): untrained, but the graph a trained QAT model exports to, so its int8
    files time as a trained one's do."""
    import repvgg_keras as rk

    key = (subject.workdir, scope)
    if key not in _QUANTIZE_AWARE:
        _QUANTIZE_AWARE[key] = rk.quantize_aware(
            subject.keras_deploy, subject.calibration, scope=scope
        )
    return _QUANTIZE_AWARE[key]


# --- ONNX: onnxruntime and OpenVINO -----------------------------------------------------


def onnx_path(subject, nchw=True, int8=False, qat=False):
    from export.onnx import onnx_file

    model = quantize_aware_form(subject, "convolutions") if qat else subject.keras_deploy
    return onnx_file(
        model, subject.workdir, nchw=nchw, int8=int8 or qat, calibration=subject.calibration
    )


def _onnxruntime(nchw, int8=False, qat=False):
    def build(subject, threads):
        try:
            import onnxruntime  # noqa: F401
        except ImportError as error:
            raise Unavailable("onnxruntime is not installed") from error
        from export import runners

        note = "QDQ int8 of the quantization-aware model" if qat else "QDQ int8" if int8 else ""
        return Predictor(
            runners.onnxruntime(onnx_path(subject, nchw, int8, qat), threads),
            "NCHW" if nchw else "NHWC",
            note=note,
        )

    return build


def _openvino(precision, qat=False):
    """OpenVINO on the CPU reading our ONNX file (int8: the QDQ file; qat: that of the subject's
    quantization-aware form, quantize_aware_form)."""

    def build(subject, threads):
        import importlib.util

        if importlib.util.find_spec("openvino") is None:
            raise Unavailable("openvino is not installed (pip install openvino)")
        from export import runners
        from export.openvino_runtime import supports

        if not supports(precision):
            raise Unavailable(f"this CPU has no native {precision} support in OpenVINO")
        int8 = precision == "int8"
        predict = runners.openvino(
            onnx_path(subject, nchw=True, int8=int8, qat=qat), precision, threads
        )
        note = "reads the QDQ ONNX" + (" of the quantization-aware model" if qat else "")
        return Predictor(predict, "NCHW", note=note if int8 else "")

    return build


# --- Keras peer (kimm) --------------------------------------------------------------------


def _kimm(reparameterized):
    def build(subject, threads):
        try:
            from bench import kimm_peer

            model = kimm_peer.build(subject.keras_train, subject.name, reparameterized)
        except ImportError:
            raise Unavailable("kimm is not installed (pip install kimm)") from None
        except KeyError as why:
            raise Unavailable(str(why).strip("'\"")) from None
        return Predictor(keras_function(model), note="tf.function")

    return build


# --- PyTorch peers (timm) -----------------------------------------------------------------


def _torch_predictor(module, channels_last=False, bf16=False):
    import torch

    if channels_last:
        module = module.to(memory_format=torch.channels_last)

    def predict(x):
        tensor = torch.from_numpy(x)
        if channels_last:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return module(tensor).float().numpy()

    return Predictor(predict, "NCHW", note="channels_last" if channels_last else "")


def _timm(reparam, channels_last=False, bf16=False):
    def build(subject, threads):
        if subject.timm_model is None:
            raise Unavailable("torch/timm are not installed (make install adds them)")
        import copy

        import torch

        torch.set_num_threads(threads)
        module = copy.deepcopy(subject.timm_model).eval()
        if reparam:
            from timm.utils.model import reparameterize_model

            module = reparameterize_model(module)
        return _torch_predictor(module, channels_last, bf16)

    return build


@dataclasses.dataclass(frozen=True)
class RuntimeSpec:
    runtime: str
    precision: str
    build: Callable
    family: str  # "ours" or "peer"
    by_default: bool = True  # False: measured only when --runtimes names it


RUNTIMES = (
    RuntimeSpec("keras-train", "fp32", keras_train, "ours"),
    RuntimeSpec("keras-deploy-eager", "fp32", keras_deploy_eager, "ours"),
    RuntimeSpec("keras-deploy", "fp32", keras_deploy, "ours"),
    RuntimeSpec("keras-deploy-xla", "fp32", keras_deploy_xla, "ours"),
    RuntimeSpec("keras-deploy", "bf16", keras_deploy_low("bfloat16"), "ours"),
    RuntimeSpec("savedmodel", "fp32", _savedmodel(), "ours"),
    RuntimeSpec("savedmodel", "bf16", _savedmodel("bfloat16"), "ours"),
    RuntimeSpec("savedmodel", "fp16", _savedmodel("float16"), "ours"),
    RuntimeSpec("savedmodel", "int8", _savedmodel(int8=True), "ours"),
    RuntimeSpec("tflite", "fp32", _tflite("none"), "ours"),
    RuntimeSpec("tflite", "fp16", _tflite("float16"), "ours"),
    RuntimeSpec("tflite", "int8", _tflite("int8"), "ours"),  # float pooling + classifier
    RuntimeSpec("tflite-int8-full", "int8", _tflite("int8_full"), "ours"),  # integer-only
    RuntimeSpec("onnxruntime-nchw", "fp32", _onnxruntime(nchw=True), "ours"),
    RuntimeSpec("onnxruntime-nhwc", "fp32", _onnxruntime(nchw=False), "ours"),
    RuntimeSpec("onnxruntime-nchw", "int8", _onnxruntime(nchw=True, int8=True), "ours"),
    # The int8 files of a quantization-aware model (python -m train --qat), on request: they run
    # the same ops as the post-training files above, which the side-by-side timing shows.
    RuntimeSpec("savedmodel-qat", "int8", _savedmodel(int8=True, qat=True), "ours", False),
    RuntimeSpec("tflite-qat", "int8", _tflite("int8", qat=True), "ours", False),
    RuntimeSpec("tflite-qat-int8-full", "int8", _tflite("int8_full", qat=True), "ours", False),
    RuntimeSpec("onnxruntime-qat-nchw", "int8", _onnxruntime(nchw=True, qat=True), "ours", False),
    RuntimeSpec("openvino-qat", "int8", _openvino("int8", qat=True), "ours", False),
    RuntimeSpec("openvino", "fp32", _openvino("fp32"), "ours"),
    RuntimeSpec("openvino", "bf16", _openvino("bf16"), "ours"),
    RuntimeSpec("openvino", "int8", _openvino("int8"), "ours"),
    RuntimeSpec("kimm-train", "fp32", _kimm(reparameterized=False), "peer"),
    RuntimeSpec("kimm-reparam", "fp32", _kimm(reparameterized=True), "peer"),
    RuntimeSpec("timm-train", "fp32", _timm(reparam=False), "peer"),
    RuntimeSpec("timm-reparam", "fp32", _timm(reparam=True), "peer"),
    RuntimeSpec("timm-reparam-cl", "fp32", _timm(reparam=True, channels_last=True), "peer"),
    RuntimeSpec(
        "timm-reparam-cl", "bf16", _timm(reparam=True, channels_last=True, bf16=True), "peer"
    ),
)


def select(names=None):
    """RUNTIMES whose runtime name (or 'runtime:precision') is in `names` (when None: every one
    measured by default)."""
    if not names:
        return [r for r in RUNTIMES if r.by_default]
    known = {r.runtime for r in RUNTIMES} | {f"{r.runtime}:{r.precision}" for r in RUNTIMES}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"Unknown --runtimes {unknown}: choose from {', '.join(sorted(known))}.")
    return [r for r in RUNTIMES if r.runtime in names or f"{r.runtime}:{r.precision}" in names]
