"""The exporters' command line: the model flags, the calibration flags, and the runner that
turns one export into `exported X` and a `verified:` verdict, or one `error:` line."""

import errno
import os
import sys

from absl import app, flags, logging

import repvgg_keras as rk
from export import atomic, images, loading, verify
from repvgg_keras import preprocessing
from repvgg_keras.models import MIN_INPUT_SIZE

FLAGS = flags.FLAGS


TASKS = ("classification", "segmentation")


def define_model_flags():
    flags.DEFINE_enum(
        "task",
        "classification",
        list(TASKS),
        "classification: a RepVGG classifier (logits [N, classes]). segmentation: a PSPNet "
        "(rk.PSPNet, logits [N, H, W, classes]) from a .keras file, or random weights.",
    )
    flags.DEFINE_string(
        "model",
        "RepVGG_A0",
        f"Variant to export, one of: {', '.join(rk.list_models())}. A .keras --weights file "
        "carries its own architecture (any spec): --model is then only checked against it.",
    )
    flags.DEFINE_string(
        "weights",
        None,
        "A .keras or .weights.h5 file, an authors' .pth or timm .safetensors checkpoint "
        "(training or deploy form, detected), or 'imagenet'. Default: random weights "
        "(useful only to test the pipeline).",
    )
    flags.DEFINE_integer(
        "image_size",
        None,
        "Input height and width (default: a .keras file's own, else the variant's, 224 or 320).",
    )
    flags.DEFINE_integer(
        "classes",
        1000,
        "Classifier width, at least 2; must match --weights (default: a .keras file's own, else "
        "1000). For --task segmentation: the number of segmentation classes (default: the "
        "file's, or 21 with random weights).",
    )
    flags.DEFINE_integer(
        "channels",
        3,
        "Input channels (1 for grayscale models; default: a .keras file's own, else 3).",
    )
    flags.DEFINE_enum(
        "preprocessing",
        "imagenet",
        list(preprocessing.MODES),
        "Normalisation of 0..255 pixels the model expects (used by the uint8/bytes inputs and "
        "by --include_preprocessing).",
    )
    flags.DEFINE_bool(
        "include_preprocessing",
        False,
        "Put the normalisation inside the exported model, so its float input takes 0..255 pixels.",
    )
    flags.DEFINE_bool(
        "no_fuse", False, "Export the three-branch training form as it is (slower; for debugging)."
    )
    flags.DEFINE_bool(
        "overwrite", False, "Replace an existing export (only after the new one verified)."
    )
    flags.DEFINE_string(
        "verify_images",
        "sample",
        "Images the export is verified on: 'sample' (64 photos shipped with the package), 'fashion_mnist' "
        "(Debian package dataset-fashion-mnist), 'random', 'tfds:<name>:<split>', or a folder of JPEG/PNG files.",
    )
    flags.DEFINE_integer("verify_count", 16, "Images used for verification.")


def load_counted_images(source, count, shape, *, flags, purpose):
    """`images.load_images(source, count, *shape)`, with one `note:` line on stderr when the
    source holds fewer than `count` images (e.g. the 64 of 'sample'), so a count that cannot
    be honoured is never dropped silently. `flags`: the (source, count) flag names."""
    pixels = images.load_images(source, count, *shape, what=f"{flags[0]} {source}")
    if len(pixels) < count:
        print(
            f"note: {flags[0]} {source} holds {len(pixels)} images; {purpose} on {len(pixels)}, "
            f"not {count} ({flags[1]})",
            file=sys.stderr,
            flush=True,
        )
    return pixels


def one_class_error(what):
    """Why a one-class model is refused: its top-1 (argmax over one logit) is always 0, so top-1
    agreement would read 100% whatever the export computes (and choose precisions on that)."""
    return (
        f"{what}: a one-class model cannot be exported and verified: the argmax over one logit "
        "is always 0, so top-1 agreement would read 100% whatever the export computes. Use 2 "
        "classes for a binary task (e.g. background and foreground)."
    )


def check_model_flags():
    """Refuse bad --image_size/--classes/--channels/--verify_count before anything is loaded."""
    if FLAGS.image_size is not None and FLAGS.image_size < MIN_INPUT_SIZE:
        raise ValueError(
            f"--image_size {FLAGS.image_size} is too small: RepVGG downsamples by 32, so use {MIN_INPUT_SIZE} "
            "or more (or leave it unset for the variant's own size)."
        )
    if FLAGS.classes < 1:
        raise ValueError(
            f"--classes must be at least 1 (the classifier's width), got {FLAGS.classes}."
        )
    if FLAGS.classes == 1:
        raise ValueError(one_class_error("--classes 1"))
    if FLAGS.channels < 1:
        raise ValueError(
            f"--channels must be at least 1 (3 for RGB, 1 for grayscale), got {FLAGS.channels}."
        )
    if FLAGS.verify_count < 1:
        raise ValueError(f"--verify_count must be at least 1, got {FLAGS.verify_count}.")
    if FLAGS["channels"].present:
        check_preprocessing(FLAGS.channels, f"--channels {FLAGS.channels}")


def check_preprocessing(channels, what):
    """ValueError naming --preprocessing where its statistics do not fit `channels` (the
    library's own error names neither flag); `what` says where the channel count came from."""
    try:
        preprocessing.scale_and_offset(FLAGS.preprocessing, channels)
    except ValueError:
        raise ValueError(
            f"--preprocessing {FLAGS.preprocessing} has statistics for RGB or grayscale images, "
            f"not for the {channels} channels of {what}: pass --preprocessing unit (pixels / 255) "
            "or --preprocessing none (the model takes 0..255 pixels)."
        ) from None


# The int8 runtimes whose arithmetic a QAT model's reference can compute in (rk.quantize.ROUNDINGS).
RUNTIME_NAMES = {
    "tflite": "TFLite (XNNPACK)",
    "onnxruntime": "onnxruntime",
    "openvino": "OpenVINO",
    "tensorflow": "TensorFlow's oneDNN",
}


def run_exporter(export, output=None, checks=(), runtime="tflite"):
    """Shared CLI body: check the flags (`checks`: more callables raising ValueError) and the
    `output` path, load the model from flags and the verification images (`runtime`: the int8
    runtime whose arithmetic a QAT model's reference computes in, rk.quantize.ROUNDINGS), call
    `export(shipped, reference, to_input, pixels)` (which returns its verification Report(s));
    turn the expected failures into one `error:` line and exit status 1. The last line printed
    is the `verified:` verdict."""
    try:
        check_model_flags()
        for check in checks:
            check()
        if output is not None:
            flag = "--output" if "output" in FLAGS else "--export_dir"
            atomic.check_output(output, FLAGS.overwrite, flag)
        model = loading.model_from_flags()
        if model.output_shape[-1] == 1:
            raise ValueError(one_class_error(f"--weights {FLAGS.weights} has one class"))
        _, height, width, channels = model.input_shape
        check_preprocessing(channels, f"--weights {FLAGS.weights}")
        shipped, reference, to_input = loading.prepare_from_flags(model, runtime)
        pixels = load_counted_images(
            FLAGS.verify_images,
            FLAGS.verify_count,
            (height, width, channels),
            flags=("--verify_images", "--verify_count"),
            purpose="verifying",
        )
        verify.check_reference_outputs(reference, to_input(pixels))
        reports = export(shipped, reference, to_input, pixels)
    except (
        ValueError,
        FileExistsError,
        FileNotFoundError,
        ImportError,
        verify.VerificationError,
    ) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # disk full, permissions changed mid-export, ...: name the user's path
        where = f"writing {output}" if output is not None else "exporting"
        full = error.errno in (errno.ENOSPC, errno.EDQUOT)
        hint = ": free some space there or write elsewhere" if full else ""
        print(
            f"error: {error.strerror or error} while {where}; nothing was written{hint}.",
            file=sys.stderr,
        )
        return 1
    except Exception as error:  # a converter or runtime failing on this model: still one line
        if os.environ.get("REPVGG_TRACEBACK"):
            raise
        first_line = (str(error).strip().splitlines() or [""])[0]
        print(
            f"error: the export failed ({type(error).__name__}: {first_line}); nothing was "
            "written. Set REPVGG_TRACEBACK=1 to see where.",
            file=sys.stderr,
        )
        return 1
    print(f"exported {output}")
    if rk.is_quantize_aware(reference):
        print(f"reference: the quantization-aware model computing as {RUNTIME_NAMES[runtime]} does")
    print(verify.verdict(reports), flush=True)
    return 0


def start(main):
    """Run an exporter as the program: absl parses the flags, `main(argv)` returns the exit
    status. absl logging goes to WARNING here (TF's savers log every file they write at INFO),
    never at import, so the exporters' modules stay usable as a library; before the flags are
    parsed, so that --verbosity still wins."""
    logging.set_verbosity(logging.WARNING)
    app.run(lambda argv: sys.exit(main(argv)))


def exporter(export_function, *, output=None, pixels=False, **options):
    """The `export` an exporter gives `run_exporter`: it calls `export_function(shipped, output
    (default --output), verify_inputs=..., reference=..., overwrite=--overwrite, calibration=
    (`calibration_from_flags`), tolerance=--tolerance, min_agreement=--min_agreement, and
    quantize=/precision= where the exporter has those flags, **options)`. `pixels`: pass the
    0..255 verification images as `verify_pixels` instead of model inputs."""

    def export(shipped, reference, to_input, verify_pixels):
        chosen = {name: FLAGS[name].value for name in ("quantize", "precision") if name in FLAGS}
        if pixels:
            verifying = dict(verify_pixels=verify_pixels)
        else:
            verifying = dict(verify_inputs=to_input(verify_pixels))
        return export_function(
            shipped,
            output or FLAGS.output,
            **verifying,
            reference=reference,
            overwrite=FLAGS.overwrite,
            calibration=calibration_from_flags(shipped, to_input),
            tolerance=FLAGS.tolerance,
            min_agreement=FLAGS.min_agreement,
            **{**chosen, **options},
        )

    return export


def define_calibration_flags():
    """--calibration_data, --calibration_count, --tolerance and --min_agreement (the TFLite,
    OpenVINO and SavedModel CLIs)."""
    flags.DEFINE_string(
        "calibration_data",
        "sample",
        "int8 calibration images: 'sample' (64 shipped photos), 'fashion_mnist', 'random', "
        "'tfds:<name>:<split>' or a folder. Calibrate on images like the ones the model will see.",
    )
    flags.DEFINE_integer("calibration_count", 64, "Images used for int8 calibration.")
    flags.DEFINE_float(
        "tolerance",
        None,
        "Relative difference allowed (default: per precision, export/precisions.py): the largest "
        f"for float precisions, the {verify.INT8_PERCENTILE}th percentile over images for int8.",
    )
    flags.DEFINE_float(
        "min_agreement",
        verify.MIN_INT8_AGREEMENT,
        "int8: the fraction of verification images (pixels for segmentation) whose top-1 class "
        "must match the float model's for the export to be accepted.",
    )


def check_calibration_flags():
    """Refuse a --calibration_count or --tolerance that cannot work, before anything is loaded."""
    if FLAGS.calibration_count < 1:
        raise ValueError(f"--calibration_count must be at least 1, got {FLAGS.calibration_count}.")
    if not 0 <= FLAGS.min_agreement <= 1:
        raise ValueError(
            f"--min_agreement is a fraction of images between 0 and 1 (e.g. 0.99), got "
            f"{FLAGS.min_agreement}."
        )
    if FLAGS.tolerance is not None and not FLAGS.tolerance > 0:
        raise ValueError(
            f"--tolerance must be a positive relative difference (e.g. 0.01), got {FLAGS.tolerance}."
        )


def int8_asked():
    """Whether the flags ask for int8 (`loading.int8_requested`), or may choose it: --precision
    auto given --calibration_data."""
    auto = "precision" in FLAGS and FLAGS.precision == "auto"
    return loading.int8_requested() or (auto and FLAGS["calibration_data"].present)


def calibration_from_flags(shipped, to_input, wanted=None):
    """Model inputs for int8 calibration (--calibration_data/--calibration_count), or None
    unless int8 is `wanted` (default: `int8_asked()`)."""
    if wanted is None:
        wanted = int8_asked()
    if not wanted:
        return None
    return to_input(
        load_counted_images(
            FLAGS.calibration_data,
            FLAGS.calibration_count,
            shipped.input_shape[1:],
            flags=("--calibration_data", "--calibration_count"),
            purpose="calibrating",
        )
    )


def refuse_segmentation(what):
    """A `run_exporter` check: ValueError when --task segmentation asks for `what` (a format
    or option that only classifiers export)."""

    def check():
        if FLAGS.task == "segmentation":
            raise ValueError(
                f"{what} does not support --task segmentation: export segmentation models "
                "with export.savedmodel, export.tflite or export.onnx."
            )

    return check
