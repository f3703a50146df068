"""The end of every run, whatever the task: both forms saved (each through a staged file), and a
deploy form that does not compute finite numbers on the evaluation images refused, not shipped."""

import os

import keras
import numpy as np

import repvgg_keras as rk
from train import guards, staged

TRAIN_FILE, DEPLOY_FILE = "model_train.keras", "model_deploy.keras"


def save_forms(training_form, model_dir, strategy):
    """Save `training_form` and its deploy form (rk.to_deploy, uncompiled: no optimizer state);
    returns the deploy form."""
    with staged.staging(os.path.join(model_dir, TRAIN_FILE)) as path:
        training_form.save(path)
    with strategy.scope():
        deploy = rk.to_deploy(training_form)
    with staged.staging(os.path.join(model_dir, DEPLOY_FILE)) as path:
        deploy.save(path)
    return deploy


def check_deploy_form(deploy, eval_ds, model_dir, remedy, val_loss=None):
    """Raise FloatingPointError (model_deploy.keras removed) when the deploy form holds NaN or inf,
    its outputs on the first evaluation batch do, or its evaluation loss `val_loss` does."""
    problem = guards.divergence(deploy, val_loss=val_loss) or not_finite_outputs(deploy, eval_ds)
    if problem:
        os.remove(os.path.join(model_dir, DEPLOY_FILE))
        raise FloatingPointError(
            f"the deploy form does not compute: {problem}; {DEPLOY_FILE} was removed: {remedy}."
        )


def not_finite_outputs(model, dataset):
    """A phrase when `model`'s outputs on the first batch of `dataset` are not all finite."""
    images = next(iter(dataset))[0]
    outputs = keras.ops.convert_to_numpy(model(images, training=False))
    if not np.all(np.isfinite(outputs.astype("float64"))):
        return "its outputs on the first evaluation batch hold NaN or inf"
    return None
