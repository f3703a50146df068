"""What `python -m train --task segmentation` does differently from classification.

The trainer's loop, recipes, checkpoints, resume, logs and curves are shared; this module
supplies the data (train/segmentation_data.py), the PSPNet with its auxiliary head, the loss
(per-pixel cross-entropy ignoring label 255, plus the auxiliary loss weighted as in PSPNet),
the metrics (mean IoU and pixel accuracy from an exact confusion matrix), the evaluation of
both forms and a PNG of predictions.
"""

import keras
import numpy as np

import repvgg_keras as rk
from repvgg_keras import preprocessing, pspnet
from train import distributed, segmentation_data, segmentation_figures, segmentation_metrics

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
        low_level_skip=options.get("low_level_skip", False),
        image_refine=options.get("image_refine", False),
        aux_head=options["aux_weight"] > 0,
        quant_friendly=quant_friendly,
        bn_synchronized=bn_synchronized,
    )


def init_backbone(model, source, variant):
    pspnet.load_backbone_weights(model.get_layer("backbone"), source, variant)
    print(f"backbone initialised from {source}", flush=True)


def metrics(num_classes):
    return [
        segmentation_metrics.MeanIoU(num_classes, segmentation_data.IGNORE_LABEL),
        segmentation_metrics.PixelAccuracy(num_classes, segmentation_data.IGNORE_LABEL),
    ]


def compile_model(model, optimizer, num_classes, aux_weight):
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=segmentation_data.IGNORE_LABEL
    )
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


def finish(model, model_dir, eval_ds, info, strategy):
    """Save both forms, evaluate them, draw the PNG; returns the last line's text and the scores."""
    import os

    inference = pspnet.inference_model(model)
    inference.save(os.path.join(model_dir, "model_train.keras"))
    with strategy.scope():
        deploy = rk.to_deploy(inference)
    deploy.save(os.path.join(model_dir, "model_deploy.keras"))
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
