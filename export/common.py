"""What every exporter shares: model flags, loading and fusing, atomic output paths."""

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import sys
import tempfile
import time

import keras
from absl import flags, logging

import repvgg_keras as rk
from export import verify
from repvgg_keras import preprocessing
from repvgg_keras.models import MIN_INPUT_SIZE
from repvgg_keras.structure import all_layers

FLAGS = flags.FLAGS
logging.set_verbosity(logging.WARNING)  # TF's savers log every file they write at INFO


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


def is_segmentation(model):
    """Whether `model` predicts per pixel: logits [N, H, W, classes] at its input's size, rather
    than [N, classes] (or a backbone's smaller feature maps)."""
    output = model.outputs[0].shape
    return len(output) == 4 and tuple(output[1:3]) == tuple(model.inputs[0].shape[1:3])


def load_model(name=None, weights=None, image_size=None, classes=None, channels=None):
    """The classifier to export, from `weights` (any model source, in its own form).

    A `.keras` file carries its architecture, so it is taken as it is (any spec, training or
    deploy form, input size, classes and channels); `name`, `image_size`, `classes` and
    `channels` are then checked against it where given (None: the file's), one ValueError on a
    mismatch. Other sources hold weights only: variant `name` (default RepVGG_A0) is built at
    `image_size` (default the variant's), `classes` (default 1000), `channels` (default 3) and
    loaded with `rk.model_from_source`."""
    from repvgg_keras import sources

    if weights is not None:
        src = sources.read_source(weights)
        if src.kind == "keras_model":
            if is_segmentation(src.saved_model):
                raise ValueError(
                    f"{src.describe()} is a segmentation model (logits "
                    f"{_shape_text(src.saved_model.outputs[0].shape)}): pass --task segmentation."
                )
            return _saved_classifier(src, name, image_size, classes, channels)
        weights = src
    spec = rk.get_spec(name or "RepVGG_A0")
    size = spec.default_size if image_size is None else image_size
    return rk.model_from_source(
        spec,
        weights,
        input_shape=(size, size, 3 if channels is None else channels),
        classes=1000 if classes is None else classes,
    )


def _saved_classifier(src, name, image_size, classes, channels):
    """The classifier a `.keras` Source holds, checked against the arguments that are not None."""
    from repvgg_keras import sources

    model = src.saved_model
    output = model.outputs[0].shape
    if len(model.inputs) != 1 or len(model.outputs) != 1 or len(output) != 2:
        raise ValueError(
            f"{src.describe()} is not a classifier: its output is {_shape_text(output)}, not "
            "logits [N, classes]."
        )
    _check_flags_against(src, model, image_size, classes, channels)
    _, height, width, in_channels = model.input_shape
    out_classes = output[-1]
    if name is not None:  # the variant asked for: rebuilt from its spec, which must fit the file
        try:
            model = rk.model_from_source(
                rk.get_spec(name),
                src,
                input_shape=(height, width, in_channels),
                classes=out_classes,
            )
        except sources.SourceError as error:
            raise ValueError(
                f"--model {name} does not match {src.describe()} (a model built as "
                f"{model.name!r}): its weights do not fit {name}'s layers. Leave --model unset "
                "to export the file's own architecture."
            ) from error
    else:
        model = _in_float32(model)  # trained under a mixed policy: the exporters want float32
    return _at_size(model, image_size)


def _check_flags_against(src, model, image_size, classes, channels):
    """ValueError where --image_size, --classes or --channels, given (not None), contradict the
    .keras file `src` holding `model`, or where its input size is free and --image_size is unset."""
    _, height, width, in_channels = model.input_shape
    out_classes = model.output_shape[-1]
    if classes is not None and classes != out_classes:
        raise ValueError(
            f"--classes {classes} does not match {src.describe()}: its logits have "
            f"{out_classes} classes. Pass --classes {out_classes} (or leave it unset)."
        )
    if channels is not None and channels != in_channels:
        raise ValueError(
            f"--channels {channels} does not match {src.describe()}, which takes {in_channels}-"
            f"channel images. Pass --channels {in_channels} (or leave it unset)."
        )
    if height is None or width is None:
        if image_size is None:
            raise ValueError(
                f"{src.describe()} takes images of any size: pass --image_size to fix the "
                "exported model's input size."
            )
    elif image_size is not None and (height, width) != (image_size, image_size):
        hint = f"pass --image_size {height} or " if height == width else ""
        raise ValueError(
            f"--image_size {image_size} does not match {src.describe()}, built for {height}x"
            f"{width} images: {hint}leave --image_size unset."
        )


def _at_size(model, image_size):
    """`model` traced at image_size x image_size where its input size is free (same layers and
    weights, every shape static), else `model` itself."""
    _, height, width, channels = model.input_shape
    if height is not None and width is not None:
        return model
    inputs = keras.Input((image_size, image_size, channels), name=model.inputs[0].name)
    return keras.models.clone_model(model, input_tensors=inputs, clone_function=lambda l: l)


def _shape_text(shape):
    return (
        "["
        + ", ".join("N" if i == 0 else "?" if d is None else str(d) for i, d in enumerate(shape))
        + "]"
    )


def _in_float32(model):
    """`model` with every layer computing in float32 (same weights): a model saved while a
    mixed_bfloat16/mixed_float16 policy was set keeps that policy per layer, and converters
    then emit low-precision convolutions (ONNX has no bfloat16 Conv)."""
    mixed = [
        l
        for l in [model, *all_layers(model)]
        if getattr(l, "dtype_policy", None) is not None
        and l.dtype_policy.compute_dtype != "float32"
    ]
    if not mixed:
        return model

    def clone(layer):
        if isinstance(layer, keras.Model):
            return keras.models.clone_model(layer, clone_function=clone)
        return layer.__class__.from_config({**layer.get_config(), "dtype": "float32"})

    twin = keras.models.clone_model(model, clone_function=clone)
    twin.set_weights(model.get_weights())
    return twin


def load_segmentation_model(name, weights=None, image_size=None, classes=None, channels=3):
    """A PSPNet to export: the `.keras` file `weights` (training or deploy form, its auxiliary
    head dropped), checked against the other arguments (None: take the file's), or without
    `weights` `rk.PSPNet(name)` with random weights (`classes` default: PSPNet's)."""
    from repvgg_keras import pspnet, sources

    spec = rk.get_spec(name)
    if weights is None:
        size = spec.default_size if image_size is None else image_size
        kwargs = {} if classes is None else {"classes": classes}
        return rk.PSPNet(spec, input_shape=(size, size, channels or 3), **kwargs)
    src = sources.read_source(weights)
    if src.kind != "keras_model":
        raise ValueError(
            f"--task segmentation takes a whole segmentation model saved as .keras (e.g. "
            f"model_deploy.keras or model_train.keras from training), not {src.describe()}."
        )
    model = src.saved_model
    if not is_segmentation(model) or len(model.inputs) != 1:
        raise ValueError(
            f"{src.describe()} is not a segmentation model: its output is "
            f"{_shape_text(model.outputs[0].shape)}, not per-pixel logits [N, H, W, classes]. "
            "Drop --task segmentation to export a classifier."
        )
    model = _in_float32(model)  # trained under a mixed policy: the exporters want float32 layers
    if len(model.outputs) > 1:  # trained with aux_head: serve the main head only
        try:
            model = pspnet.inference_model(model)
        except ValueError:
            raise ValueError(
                f"{src.describe()} has {len(model.outputs)} outputs and none named "
                f"{pspnet.OUTPUT_NAME!r}: save the model with its per-pixel logits as its only "
                "output."
            ) from None
    built_for = model.name[len("PSPNet_") :].removesuffix("_fast")
    if (
        model.name.startswith("PSPNet_")
        and built_for in rk.list_models()
        and built_for != spec.name
    ):
        raise ValueError(
            f"{src.describe()} is a PSPNet on {built_for}, not on --model {spec.name}: "
            f"pass --model {built_for}."
        )
    _check_flags_against(src, model, image_size, classes, channels)
    return _at_size(model, image_size)


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


def load_counted_images(source, count, shape, *, flags, purpose):
    """`images.load_images(source, count, *shape)`, with one `note:` line on stderr when the
    source holds fewer than `count` images (e.g. the 64 of 'sample'), so a count that cannot
    be honoured is never dropped silently. `flags`: the (source, count) flag names."""
    from export import images

    pixels = images.load_images(source, count, *shape)
    if len(pixels) < count:
        print(
            f"note: {flags[0]} {source} holds {len(pixels)} images; {purpose} on {len(pixels)}, "
            f"not {count} ({flags[1]})",
            file=sys.stderr,
            flush=True,
        )
    return pixels


def check_reference_outputs(reference, model_input, images_name="verification images"):
    """ValueError unless the Keras `reference`'s own outputs on `model_input` are all finite:
    broken weights (NaN/Inf, e.g. from diverged training) have nothing an export could
    reproduce, and comparing NaN with NaN would report a meaningless difference."""
    import numpy as np

    outputs = np.asarray(reference(model_input, training=False))
    finite = np.isfinite(outputs.reshape(len(outputs), -1)).all(axis=1)
    if not finite.all():
        kinds = "/".join(
            kind
            for kind, found in (("NaN", np.isnan(outputs).any()), ("inf", np.isinf(outputs).any()))
            if found
        )
        raise ValueError(
            f"the Keras model's own outputs are {kinds} on {int((~finite).sum())} of "
            f"{len(outputs)} {images_name}: the weights are broken (diverged training?)."
        )
    return outputs


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


def check_output(path, overwrite=False, flag="--output"):
    """Refuse an output path that cannot be written before the model is loaded and converted."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(
            f"{path} already exists: pass --overwrite to replace it (after the new export verifies)."
        )
    ancestor = os.path.dirname(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ValueError(f"Cannot write {flag} {path}: {ancestor} is a file, not a directory.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(
            f"Cannot write {flag} {path}: {ancestor} is not writable. Choose another location."
        )


def run_exporter(export, output=None, checks=()):
    """Shared CLI body: check the flags (`checks`: more callables raising ValueError) and the
    `output` path, load the model from flags and the verification images, call
    `export(shipped, reference, to_input, pixels)` (which returns its verification Report(s));
    turn the expected failures into one `error:` line and exit status 1. The last line printed
    is the `verified:` verdict."""
    try:
        check_model_flags()
        for check in checks:
            check()
        if output is not None:
            check_output(output, FLAGS.overwrite)
        model = model_from_flags()
        if model.output_shape[-1] == 1:
            raise ValueError(one_class_error(f"--weights {FLAGS.weights} has one class"))
        _, height, width, channels = model.input_shape
        shipped, reference, to_input = prepare_from_flags(model)
        pixels = load_counted_images(
            FLAGS.verify_images,
            FLAGS.verify_count,
            (height, width, channels),
            flags=("--verify_images", "--verify_count"),
            purpose="verifying",
        )
        check_reference_outputs(reference, to_input(pixels))
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
        print(
            f"error: {error.strerror or error} while {where}; nothing was written.", file=sys.stderr
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
    print(verify.verdict(reports), flush=True)
    return 0


def define_calibration_flags():
    """--calibration_data, --calibration_count, --tolerance and --min_agreement (the TFLite and
    OpenVINO CLIs)."""
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
        "Relative difference allowed (default: per precision, export/verify.py): the largest for "
        f"float precisions, the {verify.INT8_PERCENTILE}th percentile over images for int8.",
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


def calibration_from_flags(shipped, to_input):
    """Model inputs for int8 calibration (--calibration_data/--calibration_count), or None
    unless --quantize int8; shared by the TFLite and OpenVINO exporters."""
    if not FLAGS.quantize.startswith("int8"):
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


def model_from_flags():
    given = lambda name: getattr(FLAGS, name) if FLAGS[name].present else None  # else: the file's
    if FLAGS.task == "segmentation":
        return load_segmentation_model(
            FLAGS.model, FLAGS.weights, FLAGS.image_size, given("classes"), given("channels")
        )
    return load_model(
        given("model"), FLAGS.weights, FLAGS.image_size, given("classes"), given("channels")
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


STAGING_STALE_AFTER_S = 24 * 3600
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def _newest_mtime(directory):
    newest = os.path.getmtime(directory)
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            try:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            except OSError:
                pass
    return newest


def remove_stale_staging(path):
    """Remove staging directories an earlier export of `path` left behind when it was killed.

    Rule: a `.NAME.tmp-HOST-PID-*` directory goes when it was made on this host by a process
    that no longer runs; any other (another host's, or the unnamed `.NAME.tmp-*` of older
    versions) only when nothing in it changed for STAGING_STALE_AFTER_S (a day), so a
    concurrent export, here or on another machine sharing the directory, is never touched.
    An export killed between moving the previous artifact aside and moving the new one in
    left the previous one inside as `previous`: it is put back first when `path` is missing.
    """
    parent, base = os.path.split(os.path.abspath(path))
    named = re.compile(rf"^\.{re.escape(base)}\.tmp-([0-9a-f]{{8}})-(\d+)-[a-z0-9_]+$")
    unnamed = re.compile(rf"^\.{re.escape(base)}\.tmp-[a-z0-9_]{{8}}$")
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in entries:
        match = named.match(entry)
        if not match and not unnamed.match(entry):
            continue
        full = os.path.join(parent, entry)
        try:
            if os.path.islink(full) or not os.path.isdir(full):
                continue
            ours = match is not None and match.group(1) == _HOST
            if ours and _process_alive(int(match.group(2))):
                continue
            if not ours and time.time() - _newest_mtime(full) < STAGING_STALE_AFTER_S:
                continue
            previous = os.path.join(full, "previous")
            if os.path.exists(previous) and not os.path.exists(path):
                os.replace(previous, path)
            shutil.rmtree(full)
        except OSError:
            continue  # best effort: a leftover we cannot remove must not stop this export


def _exists_error(path, meanwhile=False):
    when = " (written by another export while this one ran)" if meanwhile else ""
    return FileExistsError(
        f"{path} already exists{when}: pass --overwrite to replace it (after the new export "
        "verifies); nothing was written."
    )


def _claim(staged, path):
    """Move `staged` to `path` only if `path` does not exist at that moment (atomic), else
    FileExistsError: of concurrent writers without --overwrite, exactly one succeeds.

    A file is hard-linked (link(2) fails with EEXIST, whoever came first), then its staged
    name removed. A directory is renamed: rename(2) onto a missing path is atomic and onto a
    non-empty directory (another export's) or a file fails; only an empty directory could
    be replaced, and one present now is refused first."""
    already = lambda: _exists_error(path, meanwhile=True)
    if os.path.isdir(staged):
        if os.path.lexists(path):
            raise already()
        try:
            os.rename(staged, path)
        except OSError as error:
            if error.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise already() from None
            raise
        return
    try:
        os.link(staged, path)
    except FileExistsError:
        raise already() from None
    except OSError:  # a file system without hard links: claim the name, then fill it atomically
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            raise already() from None
        os.replace(staged, path)
        return
    os.unlink(staged)


def _replace(staged, path, workdir):
    """Move `staged` to `path`, replacing what is there: the last of concurrent writers wins.

    A file is replaced in one rename(2). A directory cannot be renamed onto a non-empty one:
    what is at `path` is first moved into `workdir` (the first one as `previous`, put back if
    the move fails), and again if another export put its own there in between."""
    if not os.path.isdir(staged):
        os.replace(staged, path)
        return
    previous = os.path.join(workdir, "previous")
    for attempt in range(100):
        aside = previous if attempt == 0 else os.path.join(workdir, f"displaced-{attempt}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            pass  # nothing there (or another export moved it away first)
        try:
            os.rename(staged, path)
            return
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                if os.path.lexists(previous) and not os.path.lexists(path):
                    os.rename(previous, path)
                raise
    raise OSError(errno.EBUSY, f"{path} kept being replaced by other exports")


@contextlib.contextmanager
def atomic_output(path, overwrite=False):
    """Yield a temporary path beside `path`; move it into place only if the block succeeds.

    An existing `path` is refused unless `overwrite`, both before the work and at the final
    move, which claims `path` atomically (`_claim`): of concurrent exports to one target
    without `overwrite`, one succeeds and the others get FileExistsError. With `overwrite`
    the last one wins (`_replace`). The previous artifact is replaced only after the new one
    was written and verified, so a failure never leaves a half-written artifact or destroys
    the previous one. The staging directory `.NAME.tmp-HOST-PID-*` names its owner, so a
    later export removes it if this process is killed (remove_stale_staging).
    """
    path = os.path.abspath(path)
    remove_stale_staging(path)  # first: it may put back a previous artifact a killed export held
    if os.path.exists(path) and not overwrite:
        raise _exists_error(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    workdir = tempfile.mkdtemp(
        prefix=f".{os.path.basename(path)}.tmp-{_HOST}-{os.getpid()}-", dir=parent
    )
    staged = os.path.join(workdir, os.path.basename(path))
    try:
        yield staged
        if not os.path.exists(staged):
            raise RuntimeError(f"The exporter wrote nothing to {staged}.")
        if overwrite:
            _replace(staged, path, workdir)
        else:
            _claim(staged, path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
