"""Export a SavedModel laid out for TensorFlow Serving, with three signatures and warm-up.

    python -m export.savedmodel --model RepVGG_A0 --weights a0.keras --export_dir models/repvgg_a0

Writes <export_dir>/<version>/ with signatures
  serving_default: float32 `images` [N, H, W, C] -> `logits`, `probabilities`
  serving_uint8:   uint8 `images` (0..255 pixels, normalised inside)
  serving_bytes:   string `images` [N] (encoded JPEG/PNG, decoded, resized, normalised inside)
and assets.extra/tf_serving_warmup_requests. The export is loaded back and verified
before it is moved into place.

A segmentation model (--task segmentation, a PSPNet) gets the same signatures with outputs
`logits` [N, H, W, classes] float32 and `classes` [N, H, W] int32 (the per-pixel argmax).
"""

import os

import numpy as np
from absl import flags

import repvgg_keras as rk
from export import (
    atomic,
    cli,
    compat,
    gptq,
    images,
    learned_ranges,
    loading,
    precisions,
    predict_requests,
    savedmodel_int8,
    signature_checks,
    split_groups,
    tracing,
    verify,
)
from repvgg_keras import cpu_features, preprocessing, structure

FLAGS = flags.FLAGS
SIGNATURES = ("serving_default", "serving_uint8", "serving_bytes")


def freeze(model):
    """`model`'s inference as a concrete function with its weights as constants."""
    import tensorflow as tf

    image_shape = (None, *model.input_shape[1:])
    call = tf.function(lambda x: model(x, training=False))
    return compat.freeze(call.get_concrete_function(tf.TensorSpec(image_shape, tf.float32)))


def int8_function(model, calibration, gptq_rounding=True):
    """`model` (the fused float32 deploy form) as an int8 graph calibrated on `calibration` (model
    inputs; kernels GPTQ-rounded first, export/gptq.py; grouped convolutions split per group,
    export/split_groups.py), refused unless this TensorFlow can run it
    (export/savedmodel_int8.py). `gptq_rounding` False: weights rounded to nearest. A QAT model
    (rk.quantize_aware, biases snapped) keeps its grid weights and learned ranges."""
    rewrite = None
    if rk.is_quantize_aware(model):
        model, rewrite = _float_form_and_learned_ranges(model)
    else:
        if gptq_rounding:
            model = gptq.round_kernels(model, calibration)
        model = split_groups.split_grouped_convs(model)  # int8 convolutions have no groups
    with tracing.plain_grouped_convs(dilated_as_conv2d=True):
        frozen = freeze(model)
    function, graph_def = savedmodel_int8.quantize(
        frozen, model.input_shape[1:], calibration, rewrite=rewrite
    )
    savedmodel_int8.check_runs_here(graph_def)
    return function


def _float_form_and_learned_ranges(qat):
    """(the float form of a QAT model, the GraphDef rewrite that gives Neural Compressor's int8
    graph of it the QAT model's learned ranges in place of the calibrated ones:
    export/learned_ranges.py). `qat`: scope "convolutions", biases on the int32 grid
    (`rk.quantize.snap_biases`)."""
    if rk.quantize_scope(qat) != "convolutions":
        raise ValueError(
            "SavedModel int8 quantizes the convolutions and keeps the classifier float: it takes "
            "a quantization-aware model made with scope 'convolutions'; an every_op one exports "
            "with export.tflite --quantize int8_full."
        )
    float_form = rk.to_deploy(qat)
    if any(getattr(layer, "groups", 1) > 1 for layer in structure.all_layers(float_form)):
        raise ValueError(
            "this quantization-aware model has grouped convolutions, which TensorFlow's int8 "
            "convolution does not run: export it with export.onnx or export.tflite --quantize int8."
        )
    inputs, outputs = rk.quantize.conv_grids(qat)
    pooled = rk.quantize.pooled_grid(qat)
    return float_form, lambda graph_def: learned_ranges.apply(graph_def, inputs, outputs, pooled)


def save_serving_model(
    model, path, preprocessing_mode="imagenet", preprocessing_included=False, function=None
):
    """Write a SavedModel of `model` with the three serving signatures to `path`.

    `function`: what the signatures run on the normalised images instead of `model` frozen in
    float32 (the int8 graph of `int8_function`).

    Uses tf.saved_model.save on a tf.Module rather than keras.export.ExportArchive:
    with Keras 3.15 the archive stores every variable twice.

    The weights are frozen into the graph as constants (one function, no variables): oneDNN then
    prepares each convolution's weights once instead of at every call, which is most of the cost
    of a bf16 model at batch 1, and TF Serving has no variables to restore.

    Every signature checks its input inside the graph before any convolution runs
    (`signature_checks.checked`): a request of the wrong rank, size or channel count, float
    NaN/Inf, or a string that is not an image, fails with InvalidArgument naming what was
    expected and received, and the server stays up. Any batch size is accepted; an empty batch gives
    empty [0, ...] outputs.

    Outputs: `logits` and `probabilities` for a classifier; for a segmentation model
    (per-pixel logits, `loading.is_segmentation`) `logits` [N, H, W, classes] and `classes`
    [N, H, W] int32, the argmax computed in the graph so clients need not fetch the logits.
    """
    import tensorflow as tf

    _, height, width, channels = model.input_shape
    image_shape = (None, height, width, channels)
    segmentation = loading.is_segmentation(model)
    frozen = function or freeze(model)

    def outputs(model_input):
        count = tf.raw_ops.Shape(input=model_input, out_type=tf.int32)[0]
        # oneDNN convolutions fail on an empty batch: run one blank image and return none of it.
        batch = tf.cond(
            count > 0,
            lambda: model_input,
            lambda: tf.zeros((1, height, width, channels), model_input.dtype),
        )
        logits = tf.nest.flatten(frozen(batch))[0][:count]
        if segmentation:
            return {"logits": logits, "classes": tf.argmax(logits, axis=-1, output_type=tf.int32)}
        return {"logits": logits, "probabilities": tf.nn.softmax(logits, axis=-1)}

    def from_pixels(pixels):
        pixels = tf.cast(pixels, tf.float32)
        if not preprocessing_included:
            pixels = preprocessing.normalize(pixels, preprocessing_mode, channels)
        return outputs(pixels)

    def decode(encoded):
        # A string that is not an image fails here with decode's InvalidArgument ("Unknown
        # image file format ..."); `channels=` turns grey or RGBA images into `channels`.
        empty = tf.debugging.Assert(
            tf.strings.length(encoded) > 0,
            [
                "serving_bytes images: received an empty string; expected an encoded JPEG, PNG, "
                "GIF, BMP or WebP image"
            ],
        )
        with tf.control_dependencies([empty]):
            image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
        image = tf.image.resize(tf.cast(image, tf.float32), (height, width), method="bilinear")
        return tf.ensure_shape(image, (height, width, channels))

    def serving_default(images):
        return outputs(
            signature_checks.checked(
                images, image_shape, "serving_default float32 images", finite=True
            )
        )

    def serving_uint8(images):
        return from_pixels(
            signature_checks.checked(images, image_shape, "serving_uint8 uint8 images")
        )

    def serving_bytes(images):
        images = signature_checks.checked(
            images, (None,), "serving_bytes images (one encoded image each)"
        )
        image_spec = tf.TensorSpec((height, width, channels), tf.float32)
        decoded = tf.map_fn(decode, images, fn_output_signature=image_spec)
        return from_pixels(decoded)

    # Inputs of unknown shape: Grappler takes a declared shape as a promise and folds checks
    # of the rank or of known dimensions away, while TF Serving never enforces that promise.
    # The shapes wanted are in the checks' error messages.
    any_shape = lambda dtype: tf.TensorSpec(None, dtype, name="images")
    # No variables at all: a Keras 3 model's wrapped variables are left unset by TF Serving's
    # loader (and any TF1 Session: "Could not find variable ..."); frozen constants need no restore.
    module = tf.Module()
    signatures = {
        "serving_default": tf.function(serving_default, input_signature=[any_shape(tf.float32)]),
        "serving_uint8": tf.function(serving_uint8, input_signature=[any_shape(tf.uint8)]),
        "serving_bytes": tf.function(serving_bytes, input_signature=[any_shape(tf.string)]),
    }
    tf.saved_model.save(module, path, signatures=signatures)


def serving_name(model):
    """The name TF Serving knows `model` by unless told (--serving_name): the variant it was
    built as, lower case, whichever decided it (--model, or a .keras file's own architecture)."""
    return loading.variant_name(model).lower()


def model_inputs(pixels, preprocessing_mode="imagenet", preprocessing_included=False):
    """What the model takes for 0..255 `pixels`: normalised, unless it normalises them itself."""
    pixels = np.asarray(pixels, np.float32)
    if preprocessing_included:
        return pixels
    return preprocessing.normalize(pixels, preprocessing_mode, pixels.shape[-1])


def write_warmup(export_path, model_name, pixels):
    """TF Serving warm-up: one PredictRequest per signature, replayed at model load."""
    import tensorflow as tf

    extra = os.path.join(export_path, "assets.extra")
    os.makedirs(extra, exist_ok=True)
    with tf.io.TFRecordWriter(os.path.join(extra, "tf_serving_warmup_requests")) as writer:
        for log in predict_requests.warmup_logs(model_name, pixels):
            writer.write(log)


def export_savedmodel(
    model,
    version_dir,
    *,
    preprocessing_mode="imagenet",
    preprocessing_included=False,
    verify_pixels=None,
    model_name=None,
    reference=None,
    overwrite=False,
    precision="fp32",
    function=None,
    tolerance=None,
    min_agreement=None,
):
    """Export `model` (already in the form to ship) to `version_dir`, verified, atomically.

    `reference` is the Keras model whose outputs the export must reproduce (default:
    `model`); `precision` ("fp32", "bf16", "fp16": what `model` computes in, see
    `rk.to_deploy(model, dtype=...)`; "int8" with `function` from `int8_function`) picks the
    acceptance rule, `tolerance` and `min_agreement` its bounds (None: verify's defaults).
    `model_name`: the warm-up requests' (None: `serving_name(model)`). Returns the verification
    Report of the signature that agrees least (`verify.weakest`).
    """
    import tensorflow as tf

    model_name = model_name or serving_name(model)

    if verify_pixels is None:
        verify_pixels = images.load_images("random", 4, *model.input_shape[1:])
    model_input = model_inputs(verify_pixels, preprocessing_mode, preprocessing_included)

    def write(staged):
        save_serving_model(model, staged, preprocessing_mode, preprocessing_included, function)
        write_warmup(staged, model_name, verify_pixels[:1])

    def run_signatures(staged):
        loaded = tf.saved_model.load(staged)
        missing = set(SIGNATURES) - set(loaded.signatures)
        if missing:
            raise verify.VerificationError(f"SavedModel lacks signatures {sorted(missing)}.")
        feeds = {
            "serving_default": tf.constant(model_input),
            "serving_uint8": tf.constant(verify_pixels),
            "serving_bytes": tf.stack([tf.io.encode_png(p) for p in verify_pixels]),
        }
        for signature, feed in feeds.items():
            got = loaded.signatures[signature](images=feed)
            yield f"SavedModel {signature}", got["logits"], got.get("classes")

    return atomic.verified_export(
        version_dir,
        write,
        run_signatures,
        reference or model,
        model_input,
        precision=precision,
        overwrite=overwrite,
        tolerance=tolerance,
        min_agreement=min_agreement,
    )


AUTO_MIN_AGREEMENT = 0.995  # bf16 is the automatic choice only if it keeps top-1 this often
CHOICES = ["auto", *precisions.flag_choices("savedmodel")]  # --precision (export/precisions.py)


def choose_precision(requested, deploy_fp32, reference, model_input):
    """(precision, reason): `requested` itself, or for "auto" bf16 where this CPU runs it natively
    and it keeps the fp32 model's top-1 on the verification images, else fp32."""
    if requested != "auto":
        return requested, "asked for"
    isa = cpu_features.native_bf16()
    if isa is None:
        return "fp32", (
            "auto, judging the exporting machine: this CPU has no native bf16 (AMX, AVX512_BF16 "
            "or Arm BF16)"
        )
    expected = np.asarray(reference(model_input, training=False))
    if expected.shape[-1] < 2:
        return "fp32", "auto: a one-class model's top-1 agreement means nothing to choose by"
    bf16 = rk.to_deploy(deploy_fp32, dtype=precisions.get("bf16").compute_dtype)
    got = np.asarray(bf16(model_input, training=False))
    report = verify.compare("bf16", "bf16", got, expected)
    per_pixel = f" x {report.pixels} pixels" if report.pixels > 1 else ""
    agreed = (
        f"top-1 agreement {report.top1_agreement:.2%} on {len(model_input)} verification "
        f"images{per_pixel}"
    )
    if report.ok and report.top1_agreement >= AUTO_MIN_AGREEMENT:
        return "bf16", (
            f"auto, judging the exporting machine: this CPU has {isa} and bf16 keeps fp32's "
            f"top-1 ({agreed}); serve it on machines with native bf16"
        )
    return "fp32", (
        f"auto: bf16 would change the answer ({agreed}, max relative difference "
        f"{report.max_rel:.1e}); pass --precision bf16 to export it anyway"
    )


def choose_int8(deploy_fp32, reference, model_input, calibration, min_agreement=None):
    """For --precision auto with calibration images: (the int8 function, reason) when the int8
    graph runs here and passes the int8 acceptance rule on the verification images, else
    (None, why not)."""
    import tensorflow as tf

    try:
        function = int8_function(deploy_fp32, calibration)
    except (ImportError, ValueError) as why:
        return None, f"int8 cannot be made here ({why})"
    expected = np.asarray(reference(model_input, training=False))
    got = function(tf.constant(model_input)).numpy()
    report = verify.compare("int8", "int8", got, expected, min_agreement=min_agreement)
    per_pixel = f" x {report.pixels} pixels" if report.pixels > 1 else ""
    agreed = (
        f"top-1 agreement {report.top1_agreement:.2%} on {len(model_input)} verification "
        f"images{per_pixel}"
    )
    if not report.ok:
        return None, f"int8 would change the answer ({agreed}: {report.reason()})"
    return function, (
        f"auto, judging the exporting machine: calibration images given and int8 keeps fp32's "
        f"top-1 ({agreed}); serve it where TensorFlow's oneDNN is on"
    )


def check_serving_flags():
    """TF Serving loads the version directories named by a non-negative integer (0 included) and
    ignores others, so --version must be >= 0; --export_dir is the directory above them."""
    if FLAGS.version < 0:
        raise ValueError(
            f"--version must be a non-negative integer (TF Serving's version directories), "
            f"got {FLAGS.version}."
        )
    if os.path.exists(FLAGS.export_dir) and not os.path.isdir(FLAGS.export_dir):
        raise ValueError(
            f"--export_dir {FLAGS.export_dir} is a file: it must be a directory (the version "
            "subdirectory goes below it)."
        )


def export_in_precision(
    model,
    version_dir,
    *,
    precision="fp32",
    verify_pixels,
    reference=None,
    calibration=None,
    min_agreement=None,
    reason=None,
    **options,
):
    """`export_savedmodel` of the fused float32 deploy form `model` computing in `precision`
    (export/precisions.py; "auto": int8 where `calibration` is given and passes the int8 check,
    else `choose_precision`; "int8" needs `calibration`, model inputs). Prints `precision: P
    (why)` first; `reason` replaces the why (e.g. for a CLI default). `options`:
    export_savedmodel's (tolerance, overwrite, preprocessing_mode, ...)."""
    reference = reference or model
    mode = options.get("preprocessing_mode", "imagenet")
    model_input = model_inputs(verify_pixels, mode, options.get("preprocessing_included", False))
    model_name = options.pop("model_name", None) or serving_name(model)
    function, not_int8 = None, ""
    if precision == "int8":
        if calibration is None:
            raise ValueError("--precision int8 needs calibration images (--calibration_data).")
        chosen, why = "int8", "asked for"
        function = int8_function(model, calibration)
    elif precision == "auto" and calibration is not None:
        function, why = choose_int8(model, reference, model_input, calibration, min_agreement)
        chosen = "int8"
        not_int8 = "" if function is not None else f"{why}; "
    if function is None:
        chosen, why = choose_precision(precision, model, reference, model_input)
        why = not_int8 + why
    print(f"precision: {chosen} ({reason or why})", flush=True)
    dtype = precisions.get(chosen).compute_dtype
    if function is None and dtype != "float32":
        model = rk.to_deploy(model, dtype=dtype)
    return export_savedmodel(
        model,
        version_dir,
        verify_pixels=verify_pixels,
        model_name=model_name,
        reference=reference,
        precision=chosen,
        function=function,
        min_agreement=min_agreement,
        **options,
    )


def check_fused():
    """--precision other than fp32 converts the fused model: refuse --no_fuse with it."""
    if FLAGS.precision != "fp32" and FLAGS.no_fuse:
        raise ValueError(
            f"--precision {FLAGS.precision} exports the fused model in that precision: drop "
            "--no_fuse, or pass --precision fp32."
        )


def check_onednn_for_int8():
    """--precision int8 where oneDNN is off cannot run its int8 graph: refuse before the model is
    loaded and calibrated (the graph's own check, `check_runs_here`, would say so later)."""
    if FLAGS.precision == "int8" and not compat.onednn_enabled():
        raise ValueError(
            "--precision int8 runs oneDNN's int8 kernels, and TensorFlow's oneDNN is off in this "
            f"process: {savedmodel_int8.ONEDNN_HINT}."
        )


def main(argv):
    del argv
    version_dir = os.path.join(FLAGS.export_dir, str(FLAGS.version))
    export = cli.exporter(
        export_in_precision,
        output=version_dir,
        pixels=True,
        preprocessing_mode=FLAGS.preprocessing,
        preprocessing_included=FLAGS.include_preprocessing,
        model_name=FLAGS.serving_name,
        reason=None
        if FLAGS["precision"].present
        else "the default: serves alike on every machine; --precision for others",
    )
    checks = [check_serving_flags, check_fused, check_onednn_for_int8, cli.check_calibration_flags]
    return cli.run_exporter(export, version_dir, checks=checks, runtime="tensorflow")


if __name__ == "__main__":
    cli.define_model_flags()
    flags.DEFINE_string(
        "export_dir", None, "TF Serving model base directory; the version goes below it."
    )
    flags.DEFINE_integer(
        "version", 1, "Model version (the subdirectory TF Serving loads): an integer >= 0."
    )
    flags.DEFINE_string(
        "serving_name",
        None,
        "Model name in TF Serving (default: the exported model's variant, lower case).",
    )
    flags.DEFINE_enum(
        "precision",
        "fp32",
        CHOICES,
        "What the convolutions compute in; images in and logits out stay float32, the classifier "
        "float32. fp32 (the default) serves alike on every machine. int8: quantized with Intel "
        "Neural Compressor on --calibration_data, runs where TensorFlow's oneDNN is on. auto "
        "judges the exporting machine: int8 when --calibration_data is given and int8 passes "
        "the int8 check, else bf16 where this CPU runs it natively (AMX, AVX512_BF16, Arm BF16) "
        "and it keeps the fp32 model's top-1 on the verification images, else fp32. fp16: for "
        "GPUs (verified here, slow on most CPUs).",
    )
    cli.define_calibration_flags()
    flags.mark_flag_as_required("export_dir")
    cli.start(main)
