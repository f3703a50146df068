"""The model builder, `RepVGG(spec, ...)`, that the named ones in builders.py call.

It takes the keras.applications arguments, plus `deploy` (build the plain form
directly), `output_stride` (dilate late stages for dense prediction) and
`features_only` (return every stage's output, strides 2..32).
"""

import keras
from keras import layers

from repvgg_keras import sources
from repvgg_keras import specs as specs_lib
from repvgg_keras.errors import check_classes
from repvgg_keras.layers import PlainBlock, RepVGGBlock

MIN_INPUT_SIZE = 32
INPUT_NAME = "images"


def check_input_shape(input_shape, spec):
    if input_shape is None:
        return (spec.default_size, spec.default_size, 3)
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got {input_shape!r}.")
    height, width, channels = input_shape
    for label, size in (("height", height), ("width", width)):
        if size is not None and size < MIN_INPUT_SIZE:
            raise ValueError(
                f"Input {label} {size} is too small: RepVGG downsamples by 32, so inputs "
                f"must be at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} (got input_shape={input_shape}). "
                "Resize the images or pass a larger input_shape."
            )
    if channels is None or channels < 1:
        raise ValueError(f"input_shape needs a known channel count >= 1, got {input_shape!r}.")
    return input_shape


def _resolve_head_args(include_top, pooling, classes):
    # Checked whatever include_top says: a typo must not pass silently because it is unused.
    if pooling not in (None, "avg", "max"):
        raise ValueError(f"pooling must be None, 'avg' or 'max', got {pooling!r}.")
    if include_top:
        return 1000 if classes is None else check_classes(classes)
    if classes is not None:
        raise ValueError(
            f"classes={classes} was given with include_top=False: the class count only "
            "sets the classifier, which include_top=False leaves out. Drop `classes` or "
            "set include_top=True."
        )
    return None


def RepVGG(
    spec,
    include_top=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=None,
    classifier_activation=None,
    deploy=False,
    output_stride=32,
    dilated_blocks=None,
    features_only=False,
    use_identity=True,
    use_1x1=True,
    bn_synchronized=False,
    quant_friendly=False,
    name=None,
):
    """Build a RepVGG model from a `RepVGGSpec` (or a variant name).

    Args:
        spec: a `RepVGGSpec` or a name from `list_models()`.
        include_top: end with global average pooling and a Dense classifier.
        weights: None (random init), "imagenet" (timm's published weights), a
            `.weights.h5`/`.keras` file saved from the same architecture and form (see
            `deploy`), or a PyTorch checkpoint of the authors or timm (`.pth`,
            `.safetensors`), training or deploy form to match `deploy`.
        input_tensor: optional Keras tensor to build the model on.
        input_shape: (height, width, channels); sizes >= 32 or None (any size).
            Defaults to the variant's training resolution with 3 channels.
        pooling: with include_top=False: None (4D feature map), "avg" or "max".
        classes: classifier width; only with include_top=True (default 1000).
        classifier_activation: activation of the classifier. Defaults to None
            (logits), which is what the training losses and exporters expect; pass
            "softmax" for probabilities.
        deploy: build the plain inference form (3x3 Conv2D + ReLU stack) directly,
            e.g. to load deploy-form weights. Otherwise train-form blocks.
        output_stride: 32 (classification), 16 or 8 (late strides become dilation).
        dilated_blocks: with output_stride 8/16, dilate only the last N blocks (5 gives the
            paper's "-fast" segmentation backbones); None dilates all of the late stages.
        features_only: return a model whose outputs are the five stage outputs
            (stem and stages 1-4, strides 2, 4, 8, 16, 32 at output_stride 32).
        use_identity, use_1x1: keep these branches (the paper's ablation).
        quant_friendly: QARepVGG blocks (no BN on the 1x1 and identity branches, one BN
            after their sum): same deploy form, far less accuracy lost to int8.
        bn_synchronized: synchronise BatchNorm statistics across replicas (multi-GPU or
            multi-worker training with tf.distribute).
        name: model name (default: the variant name).
    """
    if isinstance(spec, str):
        spec = specs_lib.get_spec(spec)
    if features_only and include_top:
        include_top = False
    num_classes = _resolve_head_args(include_top, pooling, classes)
    plans = specs_lib.block_plan(spec, output_stride, dilated_blocks)

    if input_tensor is None:
        input_shape = check_input_shape(input_shape, spec)
        inputs = keras.Input(shape=input_shape, name=INPUT_NAME)
        x = inputs
    else:
        if not keras.backend.is_keras_tensor(input_tensor):
            raise ValueError("input_tensor must be a Keras tensor (e.g. from keras.Input).")
        check_input_shape(tuple(input_tensor.shape[1:]), spec)
        inputs = keras.utils.get_source_inputs(input_tensor)
        x = input_tensor

    stage_outputs = []
    for i, plan in enumerate(plans):
        block_kwargs = dict(
            filters=plan.filters,
            strides=plan.strides,
            groups=plan.groups,
            dilation_rate=plan.dilation_rate,
            se_channels=plan.se_channels,
            name=plan.name,
        )
        if deploy:
            x = PlainBlock(**block_kwargs)(x)
        else:
            x = RepVGGBlock(
                use_identity=use_identity and plan.allow_identity,
                use_1x1=use_1x1,
                bn_synchronized=bn_synchronized,
                quant_friendly=quant_friendly,
                **block_kwargs,
            )(x)
        last_of_stage = i + 1 == len(plans) or plans[i + 1].stage != plan.stage
        if last_of_stage:
            stage_outputs.append(x)

    if features_only:
        outputs = stage_outputs
    elif include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        # Under a mixed policy the classifier runs in float32 (bf16 logits keep ~3 digits).
        head_dtype = "float32" if keras.config.dtype_policy().name.startswith("mixed_") else None
        outputs = layers.Dense(
            num_classes, activation=classifier_activation, name="predictions", dtype=head_dtype
        )(x)
    elif pooling == "avg":
        outputs = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        outputs = layers.GlobalMaxPooling2D(name="max_pool")(x)
    else:
        outputs = x

    model = keras.Model(inputs, outputs, name=name or spec.name)
    # Into this form and these options: `model_from_source` builds in the source's form instead.
    if weights is not None:
        sources.load_into(model, weights, variant=spec.name)
    return model


def load_weights(model, path):
    """Load weights into `model`, strictly, with an error that says why not.

    `path`: a Keras `.weights.h5`/`.keras` file of the same architecture and form, a
    PyTorch/timm checkpoint (`.pth`, `.pt`, `.bin`, `.safetensors`; see checkpoints.py),
    or "imagenet" (timm's published weights, downloaded once and cached). Raises
    `SourceError`; `model_from_source` builds the model in the file's form instead.
    """
    sources.load_into(model, path)


def list_models():
    """Names of the built-in variants, e.g. ['RepVGG_A0', ...]."""
    return list(specs_lib.SPECS)


def get_model(name, **kwargs):
    """Build a named variant: `get_model("RepVGG_A0", classes=10)`."""
    return RepVGG(specs_lib.get_spec(name), **kwargs)
