"""What every exporter shares: model flags, loading and fusing, atomic output paths."""

import contextlib
import os
import shutil
import tempfile

from absl import flags, logging

import keras
import repvgg_keras as rk
from repvgg_keras import checkpoints, preprocessing
from repvgg_keras.layers import contains_blocks

FLAGS = flags.FLAGS
logging.set_verbosity(logging.WARNING)  # TF's savers log every file they write at INFO


def define_model_flags():
    flags.DEFINE_string("model", "RepVGG_A0", f"Variant to export, one of: {', '.join(rk.list_models())}.")
    flags.DEFINE_string(
        "weights", None,
        "A .keras or .weights.h5 file, an authors' .pth or timm .safetensors checkpoint "
        "(training or deploy form, detected), or 'imagenet'. Default: random weights "
        "(useful only to test the pipeline).",
    )
    flags.DEFINE_integer("image_size", None, "Input height and width (default: the variant's own, 224 or 320).")
    flags.DEFINE_integer("classes", 1000, "Classifier width; must match --weights.")
    flags.DEFINE_integer("channels", 3, "Input channels (1 for grayscale models).")
    flags.DEFINE_enum(
        "preprocessing", "imagenet", list(preprocessing.MODES),
        "Normalisation of 0..255 pixels the model expects (used by the uint8/bytes inputs and "
        "by --include_preprocessing).",
    )
    flags.DEFINE_bool(
        "include_preprocessing", False,
        "Put the normalisation inside the exported model, so its float input takes 0..255 pixels.",
    )
    flags.DEFINE_bool("no_fuse", False, "Export the three-branch training form as it is (slower; for debugging).")
    flags.DEFINE_bool("overwrite", False, "Replace an existing export (only after the new one verified).")
    flags.DEFINE_string(
        "verify_images", "fashion_mnist",
        "Images for verification and int8 calibration: 'fashion_mnist' (Debian package "
        "dataset-fashion-mnist), 'random', 'tfds:<name>:<split>', or a folder of JPEG/PNG files.",
    )
    flags.DEFINE_integer("verify_count", 16, "Images used for verification.")


def load_model(name, weights=None, image_size=None, classes=1000, channels=3):
    """Build `name` and load `weights` (training or deploy form; .keras or .weights.h5)."""
    spec = rk.get_spec(name)
    size = image_size or spec.default_size
    kwargs = dict(input_shape=(size, size, channels), classes=classes)
    if weights is None:
        return rk.RepVGG(spec, **kwargs)
    if weights == "imagenet":
        return rk.RepVGG(spec, weights="imagenet", **kwargs)
    if not os.path.exists(weights):
        raise FileNotFoundError(f"--weights file {weights!r} does not exist.")
    if checkpoints.is_checkpoint_path(weights):  # the authors' .pth or timm's .safetensors
        deploy = checkpoints.detect_format(checkpoints.read_state_dict(weights)).endswith("deploy")
        return rk.RepVGG(spec, deploy=deploy, weights=weights, **kwargs)
    if weights.endswith(".keras"):
        loaded = keras.saving.load_model(weights)
        model = rk.RepVGG(spec, deploy=not contains_blocks(loaded), **kwargs, **_block_options(loaded))
        if not _same_shapes(model, loaded):
            _mismatch(weights, name)
        model.set_weights(loaded.get_weights())
        return model
    errors = []
    for deploy in (False, True):
        try:
            return rk.RepVGG(spec, deploy=deploy, weights=weights, **kwargs)
        except ValueError as error:
            errors.append(str(error).splitlines()[0])
    _mismatch(weights, name, errors)


def _block_options(model):
    """The builder options a saved training-form model was made with (QARepVGG blocks, ablations)."""
    blocks = [l for l in model._flatten_layers(include_self=False) if isinstance(l, rk.RepVGGBlock)]
    if not blocks:
        return {}
    return dict(quant_friendly=any(b.quant_friendly for b in blocks),
                use_1x1=any(b.use_1x1 for b in blocks), use_identity=any(b.use_identity for b in blocks))


def _same_shapes(a, b):
    sa, sb = [w.shape for w in a.weights], [w.shape for w in b.weights]
    return sa == sb


def _mismatch(weights, name, errors=()):
    raise ValueError(
        f"--weights {weights!r} does not fit {name} in training or deploy form with these "
        "--classes/--channels. " + " ".join(errors)
    )


def prepare(model, *, fuse=True, include_preprocessing=False, mode="imagenet"):
    """Deploy form (unless fuse=False), optionally with the normalisation inside."""
    exported = rk.to_deploy(model) if fuse else model
    if include_preprocessing:
        channels = model.input_shape[-1]
        inputs = keras.Input(model.input_shape[1:], name="images")
        x = preprocessing.normalization_layer(mode, channels)(inputs)
        exported = keras.Model(inputs, exported(x), name=exported.name)
    return exported


def prepare_from_flags(model):
    """(model to ship, Keras reference, pixels -> model-input function) from the flags."""
    import numpy as np

    kwargs = dict(include_preprocessing=FLAGS.include_preprocessing, mode=FLAGS.preprocessing)
    shipped = prepare(model, fuse=not FLAGS.no_fuse, **kwargs)
    reference = prepare(model, fuse=False, **kwargs)
    channels = model.input_shape[-1]
    if FLAGS.include_preprocessing:
        to_input = lambda pixels: np.asarray(pixels, np.float32)
    else:
        to_input = lambda pixels: preprocessing.normalize(
            np.asarray(pixels, np.float32), FLAGS.preprocessing, channels
        )
    return shipped, reference, to_input


def run_exporter(export):
    """Shared CLI body: load the model from flags, load the verification images, call
    `export(shipped, reference, to_input, pixels)` (which returns the output path); turn
    the expected failures into one `error:` line and exit status 1."""
    import sys

    from export import images, verify

    try:
        model = model_from_flags()
        _, height, width, channels = model.input_shape
        shipped, reference, to_input = prepare_from_flags(model)
        pixels = images.load_images(FLAGS.verify_images, FLAGS.verify_count, height, width, channels)
        output = export(shipped, reference, to_input, pixels)
    except (ValueError, FileExistsError, FileNotFoundError, ImportError, verify.VerificationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"exported {output}")
    return 0


def define_calibration_flags():
    """--calibration_data, --calibration_count and --tolerance (the TFLite and OpenVINO CLIs)."""
    flags.DEFINE_string("calibration_data", "fashion_mnist",
                        "int8 calibration images: 'fashion_mnist', 'random', 'tfds:<name>:<split>' or a folder.")
    flags.DEFINE_integer("calibration_count", 64, "Images used for int8 calibration.")
    flags.DEFINE_float("tolerance", None, "Max relative difference allowed (default: per precision).")


def calibration_from_flags(shipped, to_input):
    """Model inputs for int8 calibration (--calibration_data/--calibration_count), or None
    unless --quantize int8; shared by the TFLite and OpenVINO exporters."""
    from export import images

    if not FLAGS.quantize.startswith("int8"):
        return None
    _, height, width, channels = shipped.input_shape
    return to_input(images.load_images(FLAGS.calibration_data, FLAGS.calibration_count, height, width, channels))


def model_from_flags():
    model = load_model(FLAGS.model, FLAGS.weights, FLAGS.image_size, FLAGS.classes, FLAGS.channels)
    return model


@contextlib.contextmanager
def atomic_output(path, overwrite=False):
    """Yield a temporary path beside `path`; move it into place only if the block succeeds.

    An existing `path` is refused unless `overwrite`, and is replaced only after the new
    artifact was written and verified, so a failure never leaves a half-written artifact
    or destroys the previous one.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists: pass --overwrite to replace it (after the new export verifies).")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    staged = os.path.join(workdir, os.path.basename(path))
    try:
        yield staged
        if not os.path.exists(staged):
            raise RuntimeError(f"The exporter wrote nothing to {staged}.")
        backup = None
        if os.path.exists(path):
            backup = os.path.join(workdir, "previous")
            os.replace(path, backup)
        try:
            os.replace(staged, path)
        except BaseException:
            if backup:
                os.replace(backup, path)
            raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
