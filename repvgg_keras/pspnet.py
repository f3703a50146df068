"""PSPNet (Zhao et al., CVPR 2017) on a dilated RepVGG backbone: the paper's segmentation model.

    model = rk.PSPNet(backbone="RepVGG_B1g2", classes=19, input_shape=(512, 1024, 3))
    plain = rk.to_deploy(model)          # blocks fused, head BNs folded, dropout gone

Layout as in the authors' example_pspnet.py: the backbone at output stride 8 (stages 3
and 4 dilated by 2 and 4), a pyramid pooling module (bins 1, 2, 3, 6: adaptive average
pooling, 1x1 conv to C/4, BN, ReLU, bilinear upsampling, concatenated with the features),
a 3x3 conv-BN-ReLU-dropout head and a 1x1 classifier, upsampled bilinearly to the input
size. Bilinear resizes use half-pixel centres (the exporters' common mode), so any input
size works, not only the 8k+1 sizes of align_corners=True. `aux_head=True` adds PSPNet's
auxiliary classifier on stage 3 as a second output for training (`inference_model` drops it).
Two decoder options outside the paper sharpen small inputs' outlines: `low_level_skip`
(stride-4 features) and `image_refine` (a full-resolution correction from the image).
"""

import keras
from keras import layers

from repvgg_keras import models, sources
from repvgg_keras import specs as specs_lib
from repvgg_keras.errors import SourceError, check_classes
from repvgg_keras.layers import BN_EPSILON, BN_MOMENTUM, all_layers
from repvgg_keras.spatial import AdaptiveAveragePooling2D, ResizeLike

PPM_BINS = (1, 2, 3, 6)
FAST_DILATED_BLOCKS = 5  # the paper's "-fast": last four blocks of stage 3 and stage 4's one
AUX_LOSS_WEIGHT = 0.4
SKIP_STAGE = 1  # stride 4
SKIP_CHANNELS = 48
IMAGE_REFINE_CHANNELS = 16
OUTPUT_NAME = "logits"
AUX_OUTPUT_NAME = "aux_logits"


def _conv_bn_relu(x, filters, kernel_size, name, synchronized=False):
    x = layers.Conv2D(filters, kernel_size, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(
        epsilon=BN_EPSILON, momentum=BN_MOMENTUM, synchronized=synchronized, name=f"{name}_bn"
    )(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def _pyramid_pooling(features, bins, synchronized=False):
    reduced = features.shape[-1] // len(bins)
    branches = [features]
    for b in bins:
        x = AdaptiveAveragePooling2D(b, name=f"ppm{b}_pool")(features)
        x = _conv_bn_relu(x, reduced, 1, name=f"ppm{b}", synchronized=synchronized)
        branches.append(ResizeLike(name=f"ppm{b}_resize")([x, features]))
    return layers.Concatenate(name="ppm_concat")(branches)


def _classifier(
    x,
    images,
    channels,
    classes,
    dropout,
    name,
    low_level=None,
    synchronized=False,
    output_name=OUTPUT_NAME,
):
    """3x3 conv-BN-ReLU, dropout, 1x1 classifier, resized to the input: float32 logits.
    With `low_level` features, the head's output is first upsampled to their size, joined with
    their 1x1 projection and mixed by another 3x3 conv-BN-ReLU (DeepLabv3+'s decoder)."""
    x = _conv_bn_relu(x, channels, 3, name=name, synchronized=synchronized)
    if low_level is not None:
        skip = _conv_bn_relu(
            low_level, SKIP_CHANNELS, 1, name=f"{name}_skip", synchronized=synchronized
        )
        x = ResizeLike(name=f"{name}_upsample")([x, skip])
        x = layers.Concatenate(name=f"{name}_skip_concat")([x, skip])
        x = _conv_bn_relu(x, channels, 3, name=f"{name}_refine", synchronized=synchronized)
    x = layers.SpatialDropout2D(dropout, name=f"{name}_dropout")(x)
    x = layers.Conv2D(classes, 1, name=f"{name}_classifier", dtype="float32")(x)
    return ResizeLike(name=output_name, dtype="float32")([x, images])


def _refine_with_image(logits, images, synchronized=False):
    """Correct the upsampled logits at full resolution from the image itself: a 3x3
    conv-BN-ReLU on [logits, image] and a 3x3 conv to a residual. Upsampling from the
    head's stride blurs every outline; the image's own edges put them back. The residual
    conv starts at zero, so training starts from the plain upsampling."""
    x = layers.Concatenate(name="image_refine_concat")([logits, images])
    x = _conv_bn_relu(x, IMAGE_REFINE_CHANNELS, 3, name="image_refine", synchronized=synchronized)
    residual = layers.Conv2D(
        logits.shape[-1],
        3,
        padding="same",
        kernel_initializer="zeros",
        name="image_refine_residual",
        dtype="float32",
    )(x)
    return layers.Add(name=OUTPUT_NAME, dtype="float32")([logits, residual])


def decoder(
    images,
    features,
    classes,
    bins=PPM_BINS,
    head_channels=512,
    dropout=0.1,
    low_level=None,
    image_refine=False,
    synchronized=False,
):
    """PSPNet's head on any backbone's `features`: pyramid pooling, 3x3 conv-BN-ReLU, dropout,
    1x1 classifier, upsampled to the size of `images`; returns the "logits" tensor.
    `low_level`: finer backbone features to refine the head's output with, `image_refine`:
    correct the upsampled logits from the image (see `PSPNet`);
    `synchronized`: BatchNorm statistics across replicas (as the backbone's `bn_synchronized`)."""
    pooled = _pyramid_pooling(features, bins, synchronized)
    logits = _classifier(
        pooled,
        images,
        head_channels,
        classes,
        dropout,
        "head",
        low_level,
        synchronized,
        output_name="head_full_size" if image_refine else OUTPUT_NAME,
    )
    return _refine_with_image(logits, images, synchronized) if image_refine else logits


def PSPNet(
    backbone="RepVGG_A0",
    classes=21,
    input_shape=None,
    output_stride=8,
    fast=False,
    backbone_weights=None,
    bins=PPM_BINS,
    head_channels=512,
    aux_head=False,
    aux_channels=256,
    dropout=0.1,
    low_level_skip=False,
    image_refine=False,
    quant_friendly=False,
    bn_synchronized=False,
    name=None,
):
    """Build PSPNet on a RepVGG backbone (training form; `rk.to_deploy` fuses it).

    Args:
        backbone: a variant name (`list_models()`) or a `RepVGGSpec`.
        classes: number of classes (per-pixel logits).
        input_shape: (height, width, channels); any size >= 32, or None entries for
            any size at run time (TensorFlow backend). Default: the variant's size, square.
        output_stride: 8 (the paper's) or 16: the backbone's late strides become dilation.
        fast: the paper's "-fast" variant: dilation only in the last five blocks (the
            other late blocks run at the same stride, undilated).
        backbone_weights: None, "imagenet", an authors'/timm checkpoint, or a training-form
            `.keras` classification model of the same variant (its classifier is dropped).
        bins: pyramid pooling grid sizes.
        head_channels, aux_channels: width of the 3x3 conv of the main and auxiliary heads.
        aux_head: add the auxiliary classifier on stage 3 as a second output
            (`[logits, aux_logits]`, both full size), for training with
            `AUX_LOSS_WEIGHT`. `inference_model` returns the model without it.
        dropout: spatial dropout rate before the classifiers.
        low_level_skip: refine the head's output with stride-4 backbone features (a
            DeepLabv3+-style decoder) before classifying; for inputs so small that a
            stride-8 map cannot draw the objects' outlines. Not part of the paper's PSPNet.
        image_refine: correct the logits after upsampling with a small full-resolution
            conv stack that sees the image (sharp outlines). Not part of the paper's PSPNet.
        quant_friendly, bn_synchronized: as for `RepVGG` (`bn_synchronized` also covers the
            head's BatchNorm layers).
        name: model name (default `PSPNet_<variant>`, with `_fast` for `fast=True`).

    Returns a functional keras.Model with input "images" and output "logits"
    [N, H, W, classes] (float32), the backbone nested as a model named "backbone".
    """
    if isinstance(backbone, str):
        backbone = specs_lib.get_spec(backbone)
    classes = check_classes(classes)
    if output_stride not in (8, 16):
        raise ValueError(f"output_stride must be 8 or 16 for PSPNet, got {output_stride!r}.")
    if not bins or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in bins):
        raise ValueError(f"bins must be positive integers, got {bins!r}.")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
    input_shape = models.check_input_shape(
        input_shape or (backbone.default_size, backbone.default_size, 3), backbone
    )
    trunk = models.RepVGG(
        backbone,
        input_shape=input_shape,
        output_stride=output_stride,
        dilated_blocks=FAST_DILATED_BLOCKS if fast else None,
        features_only=True,
        quant_friendly=quant_friendly,
        bn_synchronized=bn_synchronized,
        name="backbone",
    )
    if backbone_weights is not None:
        load_backbone_weights(trunk, backbone_weights, backbone.name)

    images = keras.Input(shape=input_shape, name=models.INPUT_NAME)
    stage_outputs = trunk(images)
    low_level = stage_outputs[SKIP_STAGE] if low_level_skip else None
    outputs = decoder(
        images,
        stage_outputs[4],
        classes,
        bins,
        head_channels,
        dropout,
        low_level,
        image_refine,
        synchronized=bn_synchronized,
    )
    if aux_head:
        aux = _classifier(
            stage_outputs[3],
            images,
            aux_channels,
            classes,
            dropout,
            "aux",
            synchronized=bn_synchronized,
            output_name=AUX_OUTPUT_NAME,
        )
        outputs = [outputs, aux]
    default_name = f"PSPNet_{backbone.name}" + ("_fast" if fast else "")
    return keras.Model(images, outputs, name=name or default_name)


def inference_model(model):
    """A new, uncompiled model of the main output (same layers and weights), without the
    auxiliary head: what is saved, converted and exported (a compiled model's metrics would
    travel with it)."""
    output = model.outputs[0] if len(model.outputs) == 1 else model.get_layer(OUTPUT_NAME).output
    return keras.Model(model.inputs[0], output, name=model.name)


FUSED_BACKBONE = (
    "{source} holds a deploy-form (fused) model: a segmentation backbone is trained in the "
    "training form. Use the training-form file (e.g. model_train.keras) or checkpoint."
)


def load_backbone_weights(trunk, source, variant):
    """Load classification weights into the features-only backbone `trunk`.

    Checkpoints and "imagenet" load directly (their classifier is left out); a `.keras`
    model of the variant lends its block weights by layer name, so a network trained with
    `python -m train` starts a segmentation run.
    """
    src = sources.training_source(source, FUSED_BACKBONE)
    if src.kind != "keras_model":
        sources.load_into(trunk, src, variant=variant)
        return
    _, misfits = sources.copy_layer_weights(trunk, all_layers(src.saved_model))
    if misfits:
        names = [name for name, _, _ in misfits]
        raise SourceError(
            f"{src.describe()} does not fit the {variant} backbone: layers "
            f"{', '.join(names[:4])}{' ...' if len(names) > 4 else ''} are missing or "
            "shaped differently. Pass a training-form model of the same variant and block "
            "options (quant_friendly)."
        )
