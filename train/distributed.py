"""A training loop for MultiWorkerMirroredStrategy, where Keras 3's `fit` does not work.

Keras 3.15's `Model.fit` fails under MultiWorkerMirroredStrategy ("Attempt to convert a
value (PerReplica...)", keras-team/keras#20585). This loop runs the model's own `train_step`
and `test_step` with `strategy.run`, so any compiled model trains as under `fit`: the
classifier (label-smoothed cross-entropy, accuracy) and the PSPNet (two weighted outputs,
mean IoU). Keras divides each replica's compiled loss and regularization losses (the
custom L2) by the replica count (`scale_loss_for_distribution`), the optimizer sums the
gradients across replicas, so a step equals one on the global batch (a loss that ignores
some pixels averages each replica's mean over its counted pixels, as `fit` does). BatchNorm
statistics are all-reduced by `synchronized=True` layers; the other BatchNormalization
layers' moving statistics are averaged across replicas each epoch. The compiled metrics are
summed across replicas when read, and the callbacks (checkpoints, CSV, TensorBoard, progress
bar) get the logs `fit` writes: `loss`, each compiled metric and their `val_` twins.
"""

import os

import keras
import numpy as np
import tensorflow as tf

from repvgg_keras import cpu_features
from repvgg_keras.structure import all_layers
from train import compat


def make_strategy(tpu=None):
    """TPUStrategy, MultiWorkerMirroredStrategy (TF_CONFIG set), MirroredStrategy (>1 GPU) or default."""
    if tpu:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    if os.environ.get("TF_CONFIG"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def pick_precision(choice):
    """--mixed_precision auto: mixed_float16 on GPUs, mixed_bfloat16 on CPUs with AMX, else none."""
    if choice != "auto":
        return choice
    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    return "mixed_bfloat16" if "amx_bf16" in cpu_features.cpu_flags() else "none"


def is_multi_worker(strategy):
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def fit_model(
    model, train_ds, *, strategy, epochs, steps_per_epoch, validation_data, callbacks, verbose
):
    """`model.fit`, or this module's loop under MultiWorkerMirroredStrategy (where Keras 3's fails)."""
    if is_multi_worker(strategy):
        return fit(
            model,
            train_ds,
            strategy=strategy,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            validation_data=validation_data,
            callbacks=callbacks,
            verbose=verbose,
        )
    return model.fit(
        train_ds,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        validation_data=validation_data,
        callbacks=callbacks,
        verbose=verbose,
        shuffle=False,
    )


def fit(
    model,
    train_ds,
    *,
    strategy,
    epochs,
    steps_per_epoch,
    validation_data=None,
    callbacks=(),
    verbose=1,
):
    """`model.fit(train_ds, ...)` for a compiled model under `strategy`; returns the History."""
    build_like_fit(model, train_ds, strategy)
    train_step = distributed_step(model.train_step, strategy)
    test_step = distributed_step(model.test_step, strategy)
    read_logs = tf.function(model.get_metrics_result)  # cross-replica: sums every replica
    callback_list = keras.callbacks.CallbackList(
        list(callbacks),
        add_history=True,
        add_progbar=verbose != 0,
        model=model,
        verbose=verbose,
        epochs=epochs,
        steps=steps_per_epoch,
    )
    train_batches = iter(strategy.experimental_distribute_dataset(train_ds))
    model.stop_training = False
    callback_list.on_train_begin()
    logs = {}
    for epoch in range(compat.initial_epoch(model), epochs):
        logs = train_epoch(
            model, epoch, train_step, train_batches, steps_per_epoch, callback_list, read_logs
        )
        average_replica_statistics(model, strategy)
        if validation_data is not None and not model.stop_training:
            val_logs = evaluate_compiled(model, validation_data, strategy, test_step, read_logs)
            logs.update({f"val_{name}": value for name, value in val_logs.items()})
        callback_list.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    model.optimizer.finalize_variable_values(model.trainable_variables)  # EMA weights, as fit does
    callback_list.on_train_end(logs)
    return model.history


def build_like_fit(model, dataset, strategy):
    """Create the variables of the model, its compiled metrics, loss trackers and optimizer before
    the first step, as `fit` does: inside `strategy.scope()` (so the metrics sum across replicas),
    outside the traced step (which may not create them), and before BackupAndRestore restores the
    optimizer's state."""
    with strategy.scope():
        compat.symbolic_build(model, dataset.element_spec)


def oldest_among_workers(strategy):
    """A function of this worker's value returning the smallest value any worker passed: the
    newest backup step all workers hold (a worker killed mid-save may be one backup behind)."""

    def smallest(value):
        @tf.function
        def gather():
            def replica():
                context = tf.distribute.get_replica_context()
                return context.all_gather(tf.constant([value], tf.int64), axis=0)

            return strategy.run(replica)

        gathered = strategy.experimental_local_results(gather())[0]
        return int(np.min(gathered.numpy()))

    return smallest


def distributed_step(step, strategy):
    """A tf.function running `step` (the model's train_step or test_step) on each replica's part
    of one distributed batch."""

    @tf.function
    def run(batch):
        strategy.run(step, args=(batch,))

    return run


def train_epoch(model, epoch, train_step, batches, steps, callback_list, read_logs):
    """One epoch of `steps` training steps with fresh metrics; returns the epoch's logs."""
    model.reset_metrics()
    callback_list.on_epoch_begin(epoch)
    logs = {}
    for step in range(steps):
        callback_list.on_train_batch_begin(step)
        train_step(next(batches))
        logs = as_floats(read_logs())
        callback_list.on_train_batch_end(step, logs)
        if model.stop_training:
            break
    return logs


def evaluate_compiled(model, dataset, strategy, test_step, read_logs):
    """The compiled loss and metrics over all of `dataset` (what `evaluate` returns)."""
    model.reset_metrics()
    for batch in strategy.experimental_distribute_dataset(dataset):
        test_step(batch)
    return as_floats(read_logs())


def unsynchronized_statistics(model):
    """The moving means and variances of the BatchNormalization layers without `synchronized=True`
    (layers a model builds without it): each replica updates its own copy from its own part of
    the batch."""
    return [
        variable
        for layer in all_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization) and not layer.synchronized
        for variable in (layer.moving_mean, layer.moving_variance)
    ]


def average_replica_statistics(model, strategy):
    """Give every replica the mean of its copies of `unsynchronized_statistics`, so the workers hold
    one model. A moving average is linear in its updates: averaged once per epoch, it equals
    averaging every step's update across replicas (as tf.keras's on-read statistics did)."""
    statistics = unsynchronized_statistics(model)
    if not statistics:
        return

    @tf.function
    def average():
        for variable in statistics:
            copies = strategy.run(tf.identity, args=(variable,))  # each replica's own
            variable.assign(strategy.reduce(tf.distribute.ReduceOp.MEAN, copies, axis=None))

    average()


def as_floats(logs):
    return {name: float(value) for name, value in logs.items()}


def evaluate_metrics(model, dataset, strategy, new_metrics):
    """The results of the metrics `new_metrics()` makes, for `model` on all of `dataset` (batches of
    (inputs, labels)), each batch split across the replicas and the counts summed; works under
    MultiWorkerMirroredStrategy, where `evaluate` and `predict` do not. Every worker gets the
    same results."""
    with strategy.scope():
        metrics = new_metrics()

    def replica_update(inputs, labels):
        predictions = model(inputs, training=False)
        for metric in metrics:
            metric.update_state(labels, predictions)

    @tf.function
    def update(batch):
        strategy.run(replica_update, args=batch)

    for batch in strategy.experimental_distribute_dataset(sharded_by_data(dataset)):
        update(batch)
    return [float(metric.result()) for metric in metrics]


def sharded_by_data(dataset):
    """Workers split `dataset` by batches, not by files: every example is counted exactly once
    whatever the number of files."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def evaluate_model(model, dataset, strategy):
    """Top-1 accuracy of `model` on `dataset` (one-hot labels) under `strategy`."""
    (accuracy,) = evaluate_metrics(
        model, dataset, strategy, lambda: [keras.metrics.CategoricalAccuracy()]
    )
    return accuracy


def weights_digest(model):
    """A short fingerprint of every weight and BN statistic, to compare workers (not of the dropout
    seeds, which each worker draws for itself)."""
    return float(
        np.sum(
            [
                np.sum(np.asarray(v.numpy(), np.float64) * (i + 1))
                for i, v in enumerate(model.weights)
            ]
        )
    )
