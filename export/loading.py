"""The model an exporter ships: from the flags, or any .keras file as it is, in float32."""

import keras
import numpy as np
from absl import flags

import repvgg_keras as rk
from export import precisions, verify
from repvgg_keras import preprocessing, pspnet, sources
from repvgg_keras.errors import shape_text
from repvgg_keras.structure import all_layers, is_segmentation

FLAGS = flags.FLAGS


def variant_name(model):
    """The variant `model` was built as: its name (`rk.RepVGG` names a model after its spec),
    for a `PSPNet_<variant>[_fast]` its backbone's."""
    if model.name.startswith("PSPNet_"):
        return model.name[len("PSPNet_") :].removesuffix("_fast")
    return model.name


def load_model(name=None, weights=None, image_size=None, classes=None, channels=None):
    """The classifier to export, from `weights` (any model source, in its own form).

    A `.keras` file carries its architecture, so it is taken as it is (any spec, training or
    deploy form, input size, classes and channels); `name`, `image_size`, `classes` and
    `channels` are then checked against it where given (None: the file's), one ValueError on a
    mismatch. Other sources hold weights only: variant `name` (default RepVGG_A0) is built at
    `image_size` (default the variant's), `classes` (default 1000), `channels` (default 3) and
    loaded with `rk.model_from_source`."""
    if weights is not None:
        src = sources.read_source(weights)
        if src.kind == "keras_model":
            if is_segmentation(src.saved_model):
                raise ValueError(
                    f"{src.describe()} is a segmentation model (logits "
                    f"{shape_text(src.saved_model.outputs[0].shape)}): pass --task segmentation."
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
    model = src.saved_model
    output = model.outputs[0].shape
    if len(model.inputs) != 1 or len(model.outputs) != 1 or len(output) != 2:
        raise ValueError(
            f"{src.describe()} is not a classifier: its output is {shape_text(output)}, not "
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
        except rk.SourceError as error:
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
            f"{shape_text(model.outputs[0].shape)}, not per-pixel logits [N, H, W, classes]. "
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
    built_for = variant_name(model)
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


def int8_requested():
    """True when the exporter's flags ask for int8 (--quantize int8* or --precision int8)."""
    quantize = FLAGS["quantize"].value if "quantize" in FLAGS else None
    precision = FLAGS["precision"].value if "precision" in FLAGS else None
    return precisions.of_quantize(quantize) == "int8" or precision == "int8"


def prepare_from_flags(model, runtime="tflite"):
    """(model to ship, Keras reference, pixels -> model-input function) from the flags.

    A quantization-aware model (rk.quantize_aware) ships as it is for int8, verified against
    itself computing with `runtime`'s arithmetic (rk.quantize.ROUNDINGS: each int8 runtime
    rounds its own way, and a deep model carries one step apart on); a float export ships and
    verifies its float form (weights on the int8 grid)."""
    kwargs = dict(include_preprocessing=FLAGS.include_preprocessing, mode=FLAGS.preprocessing)
    if rk.is_quantize_aware(model):
        if not int8_requested():
            model = rk.to_deploy(model)
        else:  # its biases on the runtimes' int32 grid: the reference computes what they do
            model = rk.quantize.snap_biases(model, runtime=runtime)
            if "min_agreement" in FLAGS and not FLAGS["min_agreement"].present:
                FLAGS.min_agreement = verify.MIN_QAT_AGREEMENT
        qat = prepare(model, fuse=False, **kwargs)
        shipped, reference = qat, qat
    else:
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


def model_from_flags():
    """The model --task, --model, --weights, --image_size, --classes and --channels name; those
    not given on the command line are a .keras file's own."""
    given = lambda name: getattr(FLAGS, name) if FLAGS[name].present else None  # else: the file's
    if FLAGS.task == "segmentation":
        return load_segmentation_model(
            FLAGS.model, FLAGS.weights, FLAGS.image_size, given("classes"), given("channels")
        )
    return load_model(
        given("model"), FLAGS.weights, FLAGS.image_size, given("classes"), given("channels")
    )
