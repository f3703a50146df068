"""What `python -m train` does for classification (the default task).

The trainer's loop, recipes, checkpoints, resume, logs and curves are shared with
train/segmentation_task.py; this module supplies the data (train/classification_data.py), the RepVGG with the
paper's ablations, the loss (label-smoothed cross-entropy), top-1 accuracy and the evaluation of
both forms. `Task` has the same methods as `segmentation_task.Task`.
"""

import dataclasses
import os

import keras
import numpy as np

import repvgg_keras as rk
from train import classification_data, distributed, forms, guards, pretrained, staged

# --ablation: (use_identity, use_1x1).
ABLATIONS = {
    "full": (True, True),
    "no_identity": (False, True),
    "no_1x1": (True, False),
    "plain": (False, False),
}


QAT_CALIBRATION_BATCHES = 2  # training batches whose activations set the initial int8 ranges


@dataclasses.dataclass(frozen=True)
class Options:
    """What classification takes beyond the spec, size and recipe (`python -m train`'s flags of
    these names)."""

    dataset: str
    init_weights: str = None  # 'imagenet', a checkpoint or a .keras model
    quant_friendly: bool = False
    ablation: str = "full"  # a key of ABLATIONS
    qat: bool = False
    qat_scope: str = "convolutions"
    qat_form: str = "deploy"
    qat_activations: str = "unsigned"


class Task:
    """RepVGG classification; ends with `accuracy: training_form=<top-1> deploy_form=<top-1>`."""

    result_key = "accuracy"

    def __init__(self, options, spec, image_size, recipe):
        self.options, self.spec, self.image_size, self.recipe = options, spec, image_size, recipe
        self.use_identity, self.use_1x1 = ABLATIONS[options.ablation]
        self.loss = None

    def config_entries(self):
        """What the run records beyond the common flags: the QAT scope of a --qat run."""
        if not self.options.qat:
            return {}
        return {
            "qat_scope": self.options.qat_scope,
            "qat_form": self.options.qat_form,
            "qat_activations": self.options.qat_activations,
        }

    def load(self, **common):
        """(train_ds, eval_ds, info): the datasets `fit` gets."""
        recipe = self.recipe
        train_ds, eval_ds, info = classification_data.load(
            self.options.dataset,
            min_area=recipe.min_area,
            mixup=recipe.mixup,
            augment=recipe.augment,
            eval_crop=recipe.eval_crop,
            **common,
        )
        self.train_ds = train_ds  # --qat calibrates its ranges on a few training batches
        return train_ds, eval_ds, info

    def describe(self):
        """The model and the augmentation, for the line that starts a run."""
        return self.spec.name, f"augment {self.recipe.augment}"

    def build(self, num_classes, *, bn_synchronized):
        """The training form, initialised from --init_weights when given; with --qat, the
        quantization-aware form of that model (the float model kept for the final comparison)."""
        if self.options.qat:
            self.float_model = self.build_float(num_classes, bn_synchronized=bn_synchronized)
            return rk.quantize_aware(
                self.float_model,
                self.calibration_images(),
                scope=self.options.qat_scope,
                form=self.options.qat_form,
                activations=self.options.qat_activations,
            )
        return self.build_float(num_classes, bn_synchronized=bn_synchronized)

    def calibration_images(self):
        batches = []
        for images, _ in self.train_ds.take(QAT_CALIBRATION_BATCHES):
            batches.append(keras.ops.convert_to_numpy(images))
        return np.concatenate(batches)

    def build_float(self, num_classes, *, bn_synchronized):
        source = self.options.init_weights
        if self.options.qat and str(source).endswith(".keras"):
            saved = pretrained.saved_deploy_form(source)
            if saved is not None:  # a deploy-form model: quantized as it is
                if saved.output_shape[-1] != num_classes:
                    raise ValueError(
                        f"--init_weights {source} classifies {saved.output_shape[-1]} classes, "
                        f"--dataset {self.options.dataset} has {num_classes}: --qat fine-tunes "
                        "a model trained on this dataset."
                    )
                print(f"initialised from {source}: the deploy form as it is", flush=True)
                return saved
        model = rk.RepVGG(
            self.spec,
            input_shape=(self.image_size, self.image_size, 3),
            classes=num_classes,
            use_identity=self.use_identity,
            use_1x1=self.use_1x1,
            quant_friendly=self.options.quant_friendly,
            bn_synchronized=bn_synchronized,
        )
        if self.options.init_weights:
            self.init_from_pretrained(model)
        return model

    def init_from_pretrained(self, model):
        source = self.options.init_weights
        build = lambda include_top: rk.RepVGG(
            self.spec,
            include_top=include_top,
            input_shape=(self.image_size, self.image_size, 3),
            classes=model.output_shape[-1] if include_top else None,
            use_identity=self.use_identity,
            use_1x1=self.use_1x1,
            quant_friendly=self.options.quant_friendly,
        )
        fresh = pretrained.copy_weights(model, pretrained.load_donor(source, build))
        kept = (
            "all weights"
            if not fresh
            else f"all weights but {', '.join(fresh)} (new classes: fresh init)"
        )
        print(f"initialised from {source}: {kept}", flush=True)

    def compile(self, model, optimizer, num_classes):
        self.loss = keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=self.recipe.label_smoothing
        )
        model.compile(optimizer=optimizer, loss=self.loss, metrics=["accuracy"])

    def finish(self, model, model_dir, eval_ds, info, strategy, remedy):
        """Save both forms and evaluate them; returns the last line and the forms' top-1 gap.
        A form that does not compute finite numbers is an error (`remedy` says what to do)."""
        if self.options.qat:
            return self.finish_qat(model, model_dir, eval_ds, info, strategy, remedy)
        multi_worker = distributed.is_multi_worker(strategy)
        evaluation = None if multi_worker else model.evaluate(eval_ds, verbose=0, return_dict=True)
        diverged = evaluation and guards.divergence(model, val_loss=evaluation["loss"])
        if diverged:
            raise FloatingPointError(
                f"training diverged: {diverged}; no model was saved: {remedy}."
            )
        deploy = forms.save_forms(model, model_dir, strategy)
        with strategy.scope():
            deploy.compile(loss=self.loss, metrics=["accuracy"])
        if multi_worker:
            forms.check_deploy_form(deploy, eval_ds, model_dir, remedy)
            train_acc = distributed.evaluate_model(model, eval_ds, strategy)
            deploy_acc = distributed.evaluate_model(deploy, eval_ds, strategy)
            print(f"weights digest: {distributed.weights_digest(model):.10e}")
        else:
            train_acc = evaluation["accuracy"]
            deploy_evaluation = deploy.evaluate(eval_ds, verbose=0, return_dict=True)
            deploy_acc = deploy_evaluation["accuracy"]
            forms.check_deploy_form(
                deploy, eval_ds, model_dir, remedy, val_loss=deploy_evaluation["loss"]
            )
        print(f"saved {model_dir}/model_train.keras and {model_dir}/model_deploy.keras")
        print(
            f"top-1 on {info.eval_examples} {info.eval_split} examples: training form "
            f"{train_acc:.4f}, deploy form {deploy_acc:.4f}"
        )
        accuracy = f"accuracy: training_form={train_acc:.4f} deploy_form={deploy_acc:.4f}"
        return accuracy, np.abs(train_acc - deploy_acc)

    def finish_qat(self, qat, model_dir, eval_ds, info, strategy, remedy):
        """Save the QAT model (model_qat.keras, for the int8 exporters) and its float form
        (model_deploy.keras: the weights on the int8 grid); compare the float model QAT started
        from with the QAT model on the evaluation images."""
        with strategy.scope():
            # What the runtimes compute: the deploy form, biases on their int32 grid.
            qat = rk.quantize.snap_biases(qat)
            deploy = rk.to_deploy(qat)
        diverged = guards.divergence(qat)
        if diverged:
            raise FloatingPointError(
                f"training diverged: {diverged}; no model was saved: {remedy}."
            )
        saved = [
            os.path.join(model_dir, name) for name in ("model_qat.keras", "model_deploy.keras")
        ]
        for model, path in zip((qat, deploy), saved):  # uncompiled: no optimizer state
            with staged.staging(path) as staging_path:
                model.save(staging_path)
        forms.check_deploy_form(deploy, eval_ds, model_dir, remedy)
        with strategy.scope():
            qat.compile(loss=self.loss, metrics=["accuracy"])
            self.float_model.compile(loss=self.loss, metrics=["accuracy"])
        if distributed.is_multi_worker(strategy):
            qat_acc = distributed.evaluate_model(qat, eval_ds, strategy)
            fp32_acc = distributed.evaluate_model(self.float_model, eval_ds, strategy)
        else:
            evaluation = qat.evaluate(eval_ds, verbose=0, return_dict=True)
            diverged = guards.divergence(qat, val_loss=evaluation["loss"])
            if diverged:
                for path in saved:
                    os.remove(path)
                raise FloatingPointError(
                    f"training diverged: {diverged}; the models were removed: {remedy}."
                )
            qat_acc = evaluation["accuracy"]
            fp32_acc = self.float_model.evaluate(eval_ds, verbose=0, return_dict=True)["accuracy"]
        print(f"saved {model_dir}/model_qat.keras and {model_dir}/model_deploy.keras")
        print(
            f"top-1 on {info.eval_examples} {info.eval_split} examples: fp32 (--init_weights) "
            f"{fp32_acc:.4f}, quantization-aware {qat_acc:.4f}"
        )
        return f"accuracy: fp32={fp32_acc:.4f} qat={qat_acc:.4f}", 0.0
