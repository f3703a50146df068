"""A training loop for MultiWorkerMirroredStrategy, where Keras 3's `fit` does not work.

Keras 3.15's `Model.fit` fails under MultiWorkerMirroredStrategy ("Attempt to convert a
value (PerReplica...)", keras-team/keras#20585). This loop runs the same model, optimizer,
loss and callbacks with `strategy.run`: gradients are all-reduced by the Keras optimizer,
BatchNorm statistics by `synchronized=True` layers, and the callbacks (checkpoints,
CSV, TensorBoard, progress bar) get the usual calls and logs.
"""

import keras
import numpy as np
import tensorflow as tf


def fit(
    model,
    train_ds,
    *,
    strategy,
    epochs,
    steps_per_epoch,
    global_batch,
    validation_data=None,
    callbacks=(),
    verbose=1,
):
    loss_fn = model.loss
    per_example_loss = keras.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=getattr(loss_fn, "label_smoothing", 0.0), reduction="none"
    )
    train_iter = iter(strategy.experimental_distribute_dataset(train_ds))

    @tf.function
    def train_step(iterator):
        def replica_step(images, labels):
            with tf.GradientTape() as tape:
                logits = model(images, training=True)
                loss = tf.nn.compute_average_loss(
                    per_example_loss(labels, logits), global_batch_size=global_batch
                )
                if model.losses:  # e.g. the custom L2 (--custom_l2), once per replica: scale it
                    loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            grads = tape.gradient(loss, model.trainable_variables)
            model.optimizer.apply_gradients(zip(grads, model.trainable_variables))
            correct = tf.reduce_sum(
                tf.cast(tf.equal(tf.argmax(logits, -1), tf.argmax(labels, -1)), tf.float32)
            )
            return loss, correct

        loss, correct = strategy.run(replica_step, args=next(iterator))
        return (
            strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None),
            strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None),
        )

    @tf.function
    def eval_step(images, labels):
        def replica_step(images, labels):
            logits = model(images, training=False)
            loss = tf.reduce_sum(per_example_loss(labels, logits))
            correct = tf.reduce_sum(
                tf.cast(tf.equal(tf.argmax(logits, -1), tf.argmax(labels, -1)), tf.float32)
            )
            return loss, correct, tf.cast(tf.shape(labels)[0], tf.float32)

        out = strategy.run(replica_step, args=(images, labels))
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for v in out]

    callback_list = keras.callbacks.CallbackList(
        list(callbacks),
        add_history=True,
        add_progbar=verbose != 0,
        model=model,
        verbose=verbose,
        epochs=epochs,
        steps=steps_per_epoch,
    )
    model.stop_training = False
    callback_list.on_train_begin()
    initial_epoch = getattr(model, "_initial_epoch", 0) or 0
    for epoch in range(initial_epoch, epochs):
        callback_list.on_epoch_begin(epoch)
        total_loss = total_correct = 0.0
        for step in range(steps_per_epoch):
            callback_list.on_train_batch_begin(step)
            loss, correct = train_step(train_iter)
            total_loss += float(loss)
            total_correct += float(correct)
            logs = {
                "loss": total_loss / (step + 1),
                "accuracy": total_correct / ((step + 1) * global_batch),
            }
            callback_list.on_train_batch_end(step, logs)
            if model.stop_training:
                break
        if validation_data is not None and not model.stop_training:
            val_loss, val_accuracy = evaluate(strategy, eval_step, validation_data)
            logs.update(val_loss=val_loss, val_accuracy=val_accuracy)
        callback_list.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    model.optimizer.finalize_variable_values(model.trainable_variables)  # EMA weights, as fit does
    callback_list.on_train_end(logs)
    return model.history


def evaluate(strategy, eval_step, dataset):
    loss = correct = count = 0.0
    for images, labels in strategy.experimental_distribute_dataset(dataset):
        batch_loss, batch_correct, batch_count = eval_step(images, labels)
        loss, correct, count = (
            loss + float(batch_loss),
            correct + float(batch_correct),
            count + float(batch_count),
        )
    return loss / max(count, 1.0), correct / max(count, 1.0)


def evaluate_model(model, dataset, strategy):
    """Top-1 accuracy of `model` on `dataset` under `strategy` (works where evaluate() does not)."""

    @tf.function
    def eval_step(images, labels):
        def replica_step(images, labels):
            logits = model(images, training=False)
            correct = tf.reduce_sum(
                tf.cast(tf.equal(tf.argmax(logits, -1), tf.argmax(labels, -1)), tf.float32)
            )
            return tf.constant(0.0), correct, tf.cast(tf.shape(labels)[0], tf.float32)

        out = strategy.run(replica_step, args=(images, labels))
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for v in out]

    return evaluate(strategy, eval_step, dataset)[1]


def weights_digest(model):
    """A short fingerprint of every variable (weights and BN statistics), to compare workers."""
    return float(
        np.sum(
            [
                np.sum(np.asarray(v.numpy(), np.float64) * (i + 1))
                for i, v in enumerate(model.variables)
            ]
        )
    )
