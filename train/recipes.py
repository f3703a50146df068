"""The paper's training recipes as data. Any field can be overridden from the command line."""

import dataclasses

from repvgg_keras.layers import RepVGGBlock
from repvgg_keras.structure import all_layers


@dataclasses.dataclass(frozen=True)
class Recipe:
    epochs: int
    batch_size: int  # global batch; the lr scales with it linearly
    base_lr: float  # at reference_batch
    reference_batch: int = 256
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 5.0
    label_smoothing: float = 0.0
    mixup: float = 0.0  # Beta(alpha, alpha); 0 disables
    min_area: float = 0.08  # random-resized-crop smallest area
    augment: str = "basic"  # "basic" (crop + flip) or "randaugment" (train/classification_data.py)
    ema_momentum: float = 0.0  # 0 disables the EMA of weights
    eval_crop: float = 0.875  # evaluation: resize to size / eval_crop, centre-crop size
    custom_l2: bool = False  # the authors' custom L2 on the equivalent kernel (see use_custom_l2)
    optimizer: str = "sgd"  # "sgd" (with momentum, the paper's) or "adamw"

    def scaled_lr(self, global_batch):
        return self.base_lr * global_batch / self.reference_batch


RECIPES = {
    # 120-epoch models: SGD momentum 0.9, batch 256, lr 0.1 cosine to 0, wd 1e-4 with the
    # authors' exclusions, random-resized-crop + flip, no label smoothing.
    "paper120": Recipe(epochs=120, batch_size=256, base_lr=0.1),
    # 200-epoch models add label smoothing 0.1, mixup and stronger augmentation (the authors use
    # AutoAugment's ImageNet policy; Keras ships RandAugment, its search-free successor).
    "paper200": Recipe(
        epochs=200,
        batch_size=256,
        base_lr=0.1,
        label_smoothing=0.1,
        mixup=0.2,
        augment="randaugment",
    ),
    # Small-data recipe for Fashion-MNIST/CIFAR-sized runs on a CPU: short, mild augmentation.
    # eval_crop 1.0: a 0.875 crop of 28x28 Fashion-MNIST zooms in where training did not.
    "small": Recipe(
        epochs=10,
        batch_size=128,
        base_lr=0.1,
        warmup_epochs=1.0,
        min_area=0.5,
        weight_decay=5e-5,
        eval_crop=1.0,
    ),
    # --qat's default: quantization-aware fine-tuning of a trained model (rk.quantize_aware). A
    # small lr from the first step (about 1% of the small recipe's peak: the weights are trained,
    # and warm-up would waste the short run), one pass, the weight decay of the authors' QAT
    # example; ranges train with the weights.
    "qat": Recipe(
        epochs=1,
        batch_size=128,
        base_lr=0.001,
        warmup_epochs=0.0,
        min_area=0.5,
        weight_decay=4e-5,
        eval_crop=1.0,
    ),
    # --task segmentation's default (PSPNet): SGD lr 0.4 at its batch of 32 (base_lr is at batch
    # 256), a short warm-up, two epochs. With the small-input head below and a backbone from a
    # short Fashion-MNIST classification run (--init_weights), it reaches mIoU 0.6 on
    # fashion_mnist_scenes/large (docs/segmentation.md).
    "segmentation": Recipe(
        epochs=2,
        batch_size=32,
        base_lr=3.2,
        warmup_epochs=0.2,
        weight_decay=5e-5,
        eval_crop=1.0,
    ),
}
DEFAULT_RECIPE = {"classification": "small", "segmentation": "segmentation"}

# PSPNet head options (--output_stride, --head_channels, --low_level_skip, --image_refine,
# --scale_augment) when their flags are not given. The paper's head suits large inputs; at most
# SMALL_IMAGE_SIZE px, the 4x4 (64 px) feature maps of output stride 16 with the stride-4 skip and
# the full-resolution image refinement draw sharper outlines at a fraction of the cost, and random
# rescaling of such small scenes hurts more than it helps.
SEGMENTATION_HEADS = {
    "large": dict(
        output_stride=8, head_channels=512, low_level_skip=False, image_refine=False,
        scale_augment=True,
    ),
    "small": dict(
        output_stride=16, head_channels=128, low_level_skip=True, image_refine=True,
        scale_augment=False,
    ),
}  # fmt: skip


# Random-resized-crop at small inputs: a crop of 8% of a 32x32 image is a few pixels upscaled, and
# even the small recipe's 0.5 trains on zoomed views that evaluation never shows. Inputs of at most
# SMALL_IMAGE_SIZE pixels crop at least SMALL_IMAGE_MIN_AREA of the image unless --min_area says otherwise;
# larger (ImageNet-sized) inputs keep the recipe's value (the paper's 0.08).
SMALL_IMAGE_SIZE = 64
SMALL_IMAGE_MIN_AREA = 0.9


def default_min_area(recipe_min_area, image_size):
    """The random-resized-crop smallest area for `image_size` when --min_area is not given."""
    if image_size is not None and image_size <= SMALL_IMAGE_SIZE:
        return max(recipe_min_area, SMALL_IMAGE_MIN_AREA)
    return recipe_min_area


def segmentation_head(image_size, **overrides):
    """The PSPNet head options for `image_size`, with the given (non-None) ones replaced."""
    size = "small" if image_size is not None and image_size <= SMALL_IMAGE_SIZE else "large"
    given = {k: v for k, v in overrides.items() if v is not None}
    return {**SEGMENTATION_HEADS[size], **given}


def get_recipe(name, image_size=None, **overrides):
    """The named recipe with the given (non-None) fields replaced; with `image_size`, the crop
    area default follows the input size (default_min_area) unless min_area is overridden."""
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}: choose one of {', '.join(RECIPES)}.")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "min_area" not in overrides:
        overrides["min_area"] = default_min_area(RECIPES[name].min_area, image_size)
    return dataclasses.replace(RECIPES[name], **overrides)


OPTIMIZERS = ("sgd", "adamw")


def make_optimizer(recipe, model, *, total_steps, warmup_steps):
    """The recipe's SGD (or AdamW): linear warm-up to the batch-scaled lr, cosine to 0, weight
    decay with the authors' exclusions (or their custom L2), EMA of the weights when
    recipe.ema_momentum > 0 (Keras keeps the average and copies it into the model when fit ends).
    AdamW suits short runs of heads trained from scratch (e.g. segmentation on a small dataset);
    its lr is about a hundredth of SGD's."""
    import keras

    peak_lr = recipe.scaled_lr(recipe.batch_size)
    warmup_steps = min(warmup_steps, total_steps - 1)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else peak_lr,
        decay_steps=total_steps - warmup_steps,
        alpha=0.0,
        warmup_target=peak_lr if warmup_steps else None,
        warmup_steps=warmup_steps,
    )
    if recipe.optimizer not in OPTIMIZERS:
        raise ValueError(
            f"Unknown optimizer {recipe.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}."
        )
    common = dict(
        learning_rate=schedule,
        weight_decay=recipe.weight_decay or None,
        use_ema=recipe.ema_momentum > 0,
        ema_momentum=recipe.ema_momentum or 0.99,
    )
    if recipe.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(**common)
    else:
        optimizer = keras.optimizers.SGD(momentum=recipe.momentum, **common)
    if recipe.custom_l2 and not recipe.weight_decay:
        raise ValueError("--custom_l2 takes its coefficient from --weight_decay, which is 0.")
    if recipe.weight_decay:
        excluded = no_decay_variables(model)
        if recipe.custom_l2:
            excluded += use_custom_l2(model, recipe.weight_decay)
        optimizer.exclude_from_weight_decay(var_list=excluded)
    return optimizer


def no_decay_variables(model):
    """Variables the authors exclude from weight decay: classifier bias, BN betas (the fused
    convs' biases and the QAT ranges in a QAT model), and the
    BN gammas of the dense and 1x1 branches (the identity BN's gamma keeps its decay)."""
    excluded = []
    for variable in model.trainable_variables:
        path = variable.path
        if path.endswith(("predictions/bias", "/beta", "_reparam/bias", "_quant/range")):
            excluded.append(variable)
        elif path.endswith("/gamma") and (
            "_dense_bn/" in path or "_1x1_bn/" in path or "_post_bn/" in path
        ):
            excluded.append(variable)
    return excluded


def use_custom_l2(model, coefficient):
    """Switch the blocks to the authors' custom L2 ("custwd"): each RepVGGBlock adds
    0.5 * coefficient * equivalent_kernel_l2() to the training loss, and its 3x3 and 1x1
    kernels get no plain weight decay (returned: pass them to exclude_from_weight_decay)."""
    excluded = []
    for layer in all_layers(model):
        if isinstance(layer, RepVGGBlock):
            if layer.quant_friendly:
                raise ValueError(
                    "--custom_l2 does not apply to --quant_friendly (QARepVGG) blocks, which "
                    "train with plain weight decay: drop --custom_l2."
                )
            layer.kernel_l2 = float(coefficient)
            excluded.append(layer.dense_conv.kernel)
            if layer.pointwise_conv is not None:
                excluded.append(layer.pointwise_conv.kernel)
    return excluded
