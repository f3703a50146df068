"""What `python -m train --task segmentation` does differently from classification.

The trainer's loop, recipes, checkpoints, resume, logs and curves are shared; this module
supplies the data (train/segmentation_data.py), the PSPNet with its auxiliary head, the loss
(per-pixel cross-entropy ignoring label 255, plus the auxiliary loss weighted as in PSPNet),
the metrics (mean IoU and pixel accuracy from an exact confusion matrix), the evaluation of
both forms and a PNG of predictions. `Task` has the same methods as `classification_task.Task`.
"""

import dataclasses
import os

import keras
import numpy as np

from repvgg_keras import preprocessing, pspnet
from repvgg_keras.masks import IGNORE_LABEL
from train import (
    callbacks,
    distributed,
    forms,
    recipes,
    segmentation_data,
    segmentation_figures,
    segmentation_metrics,
)

PREDICTIONS_PNG = "predictions.png"
FIGURE_EXAMPLES = 6


def with_aux_targets(dataset):
    """(images, masks) -> (images, (masks, masks)): the main and auxiliary outputs share labels."""
    return dataset.map(lambda images, masks: (images, (masks, masks)))


def build_model(spec, image_size, num_classes, *, options, quant_friendly, bn_synchronized):
    """The training model: PSPNet with the auxiliary head as a second output."""
    return pspnet.PSPNet(
        spec,
        classes=num_classes,
        input_shape=(image_size, image_size, 3),
        output_stride=options["output_stride"],
        fast=options["fast"],
        head_channels=options["head_channels"],
        low_level_skip=options["low_level_skip"],
        image_refine=options["image_refine"],
        aux_head=options["aux_weight"] > 0,
        quant_friendly=quant_friendly,
        bn_synchronized=bn_synchronized,
    )


def init_backbone(model, source, variant):
    trunk = model.get_layer("backbone")
    if source.endswith(".weights.h5") and os.path.isfile(source):
        # Checked here: Keras's own message on a misfit prints weight values.
        mismatch = callbacks.weights_file_mismatch(source, trunk, part=True)
        if mismatch:
            raise ValueError(
                f"--init_weights {source} {mismatch}: it comes from another model. Pass "
                f"weights of {variant} with the same --num_blocks, --width_multipliers and "
                "--quant_friendly, or the .keras model they came from."
            )
    pspnet.load_backbone_weights(trunk, source, variant)
    print(f"backbone initialised from {source}", flush=True)


def metrics(num_classes):
    return [
        segmentation_metrics.MeanIoU(num_classes, IGNORE_LABEL),
        segmentation_metrics.PixelAccuracy(num_classes, IGNORE_LABEL),
    ]


def compile_model(model, optimizer, num_classes, aux_weight):
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=IGNORE_LABEL)
    if len(model.outputs) == 1:
        model.compile(optimizer=optimizer, loss=loss, metrics=metrics(num_classes))
        return
    model.compile(
        optimizer=optimizer,
        loss=[loss, loss],
        loss_weights=[1.0, aux_weight],
        metrics=[metrics(num_classes), []],
    )


def scores(model, dataset, num_classes, strategy=None):
    """mIoU and pixel accuracy of `model` (single output) on `dataset`, one pass, exact counts.
    Under a multi-worker `strategy` the workers split the batches and sum their counts: each
    evaluates its share and all report the same scores."""
    if strategy is not None and distributed.is_multi_worker(strategy):
        return distributed.evaluate_metrics(model, dataset, strategy, lambda: metrics(num_classes))
    miou, accuracy = metrics(num_classes)
    for images, masks in dataset:
        logits = model(images, training=False)
        miou.update_state(masks, logits)
        accuracy.update_state(masks, logits)
    return float(miou.result()), float(accuracy.result())


def raw_images(normalised):
    """Undo the input normalisation, for pictures (0-255 floats)."""
    scale, offset = preprocessing.scale_and_offset("imagenet", 3)
    return np.clip((np.asarray(normalised) - np.asarray(offset)) / np.asarray(scale), 0, 255)


def save_predictions(path, model, dataset, class_names, num_classes):
    """A PNG of the first evaluation images: picture, ground truth, prediction."""
    images, masks = next(iter(dataset.unbatch().batch(FIGURE_EXAMPLES)))
    predicted = np.argmax(np.asarray(model(images, training=False)), axis=-1)
    segmentation_figures.save_predictions_png(
        path, raw_images(images), np.asarray(masks), predicted, class_names, num_classes
    )


def finish(model, model_dir, eval_ds, info, strategy, remedy):
    """Save both forms, check and evaluate them, draw the PNG; returns the last line's text and
    the forms' mIoU gap. `eval_ds`: (images, masks), without the auxiliary targets."""
    inference = pspnet.inference_model(model)
    deploy = forms.save_forms(inference, model_dir, strategy)
    forms.check_deploy_form(deploy, eval_ds, model_dir, remedy)
    train_miou, train_accuracy = scores(inference, eval_ds, info.num_classes, strategy)
    deploy_miou, deploy_accuracy = scores(deploy, eval_ds, info.num_classes, strategy)
    save_predictions(
        os.path.join(model_dir, PREDICTIONS_PNG),
        deploy,
        eval_ds,
        info.class_names,
        info.num_classes,
    )
    print(f"saved {model_dir}/model_train.keras, model_deploy.keras and {PREDICTIONS_PNG}")
    print(
        f"on {info.eval_examples} {info.eval_split} examples: mIoU training form {train_miou:.4f}, "
        f"deploy form {deploy_miou:.4f}; pixel accuracy {train_accuracy:.4f}, {deploy_accuracy:.4f}"
    )
    return f"miou: training_form={train_miou:.4f} deploy_form={deploy_miou:.4f}", abs(
        train_miou - deploy_miou
    )


@dataclasses.dataclass(frozen=True)
class Options:
    """What segmentation takes beyond the spec, size and recipe (`python -m train`'s flags of these
    names; None: the head's default for the input size, train/recipes.py)."""

    dataset: str
    init_weights: str = None  # a backbone's weights: checkpoint, 'imagenet' or a .keras model
    quant_friendly: bool = False
    output_stride: int = None
    head_channels: int = None
    low_level_skip: bool = None
    image_refine: bool = None
    scale_augment: bool = None
    fast: bool = False
    aux_weight: float = 0.4


class Task:
    """PSPNet on the RepVGG backbone; ends with `miou: training_form=<mIoU> deploy_form=<mIoU>`."""

    result_key = "miou"

    def __init__(self, options, spec, image_size, recipe):
        self.options, self.spec, self.image_size, self.recipe = options, spec, image_size, recipe
        self.head = self.config_entries()

    def config_entries(self):
        """The PSPNet options of this run (the flags given, the rest from the head for its size)
        and the task: recorded in the run's configuration."""
        options = self.options
        head = recipes.segmentation_head(
            self.image_size,
            output_stride=options.output_stride,
            head_channels=options.head_channels,
            low_level_skip=options.low_level_skip,
            image_refine=options.image_refine,
            scale_augment=options.scale_augment,
        )
        return {
            **head,
            "fast": options.fast,
            "aux_weight": options.aux_weight,
            "task": "segmentation",
        }

    def load(self, **common):
        """(train_ds, eval_ds, info): the datasets `fit` gets, with the auxiliary head's targets."""
        train_ds, eval_ds, info = segmentation_data.load(
            self.options.dataset, augment=self.head["scale_augment"], **common
        )
        if self.options.aux_weight > 0:
            return with_aux_targets(train_ds), with_aux_targets(eval_ds), info
        return train_ds, eval_ds, info

    def describe(self):
        """The model and the augmentation, for the line that starts a run."""
        head = self.head
        what = (
            f"PSPNet on {self.spec.name} (output stride {head['output_stride']}, head "
            f"{head['head_channels']}{', fast' if head['fast'] else ''}"
            f"{', low-level skip' if head['low_level_skip'] else ''}"
            f"{', image refine' if head['image_refine'] else ''})"
        )
        return what, f"scale_augment {'on' if head['scale_augment'] else 'off'}"

    def build(self, num_classes, *, bn_synchronized):
        """The training form, its backbone initialised from --init_weights when given."""
        model = build_model(
            self.spec,
            self.image_size,
            num_classes,
            options=self.head,
            quant_friendly=self.options.quant_friendly,
            bn_synchronized=bn_synchronized,
        )
        if self.options.init_weights:
            init_backbone(model, self.options.init_weights, self.spec.name)
        return model

    def compile(self, model, optimizer, num_classes):
        compile_model(model, optimizer, num_classes, self.options.aux_weight)

    def finish(self, model, model_dir, eval_ds, info, strategy, remedy):
        """Save both forms, check them and score them on the evaluation data without auxiliary
        targets, and draw the PNG; returns the last line and the forms' mIoU gap."""
        if self.options.aux_weight > 0:
            eval_ds = eval_ds.map(lambda images, targets: (images, targets[0]))
        result, gap = finish(model, model_dir, eval_ds, info, strategy, remedy)
        if distributed.is_multi_worker(strategy):
            print(f"weights digest: {distributed.weights_digest(model):.10e}")
        return result, gap
