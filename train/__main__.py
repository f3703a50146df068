"""Train a RepVGG model, convert it, evaluate both forms.

    python -m train --model RepVGG_A0 --dataset imagenet2012 --recipe paper120 --model_dir runs/a0
    python -m train --model RepVGG_A0 --dataset fashion_mnist --image_size 32 --epochs 5 --model_dir runs/fm
    python -m train --model RepVGG_A0 --dataset folder:photos --init_weights imagenet --model_dir runs/ft
    python -m train --task segmentation --dataset fashion_mnist_scenes --image_size 64 --model_dir runs/seg

Writes to --model_dir: run_config.json (the flags that define the run), backup/ (checkpoints
every --checkpoint_every steps and each epoch; rerunning the same command resumes), logs/
(TensorBoard), training_log.csv, training_curves.png, model_train.keras and model_deploy.keras
(ready for the exporters). A model_dir holding a run of another configuration is refused
(--overwrite clears it); a finished run is reported, not trained again.
The last line printed is `accuracy: training_form=<top-1> deploy_form=<top-1>`.

--task segmentation trains rk.PSPNet on the backbone (auxiliary head on stage 3 while training,
per-pixel cross-entropy ignoring label 255), reports mean IoU and pixel accuracy, draws
predictions.png, and ends with `miou: training_form=<mIoU> deploy_form=<mIoU>`.

This file holds the driver; train/options.py the flags and their checks, train/run_dir.py the run folder's rules,
train/classification_task.py and train/segmentation_task.py what differs between the tasks,
train/distributed.py the strategy and precision. TensorFlow loads only after the flags are checked
and the run folder is claimed, so that a mistake or a busy folder is answered at once.
"""

import os
import re
import signal
import sys

from absl import app, logging

from train import lock, options, run_dir, staged
from train.options import FLAGS


def train():
    """Train the task's model in --model_dir (or report the finished run there); returns the gap
    between the scores of the two forms."""
    # Imported here, not at the top: main() checks the flags and claims the folder before
    # TensorFlow loads.
    import keras

    import repvgg_keras as rk
    from train import callbacks, distributed, guards, recipes

    task_module = task_modules()[FLAGS.task]
    keras.utils.set_random_seed(FLAGS.seed)
    variant = rk.get_spec(FLAGS.model)
    spec = options.custom_spec(variant)
    image_size = FLAGS.image_size or spec.default_size
    recipe_name = FLAGS.recipe or ("qat" if FLAGS.qat else recipes.DEFAULT_RECIPE[FLAGS.task])
    # Each recipe field has a flag of its name that overrides it (None: the recipe's).
    overrides = {name: getattr(FLAGS, name) for name in run_dir.RECIPE_FIELDS}
    recipe = recipes.get_recipe(recipe_name, image_size=image_size, **overrides)
    task = task_module.Task(options.task_options(task_module.Options), spec, image_size, recipe)
    model_dir = run_dir.own_model_dir(FLAGS.model_dir)
    guards.SIGNALS.backup_dir = os.path.join(model_dir, "backup")
    config = run_dir.run_config(
        FLAGS,
        model=variant.name,
        spec=spec,
        image_size=image_size,
        recipe=recipe,
        recipe_name=recipe_name,
        task_entries=task.config_entries(),
    )
    prepared = run_dir.prepare_model_dir(model_dir, config, FLAGS.overwrite)
    if prepared.finished is not None:
        print(run_dir.finished_result(model_dir, prepared.finished, recipe.epochs), flush=True)
        return 0.0
    precision = distributed.pick_precision(FLAGS.mixed_precision)
    if precision != "none":
        keras.mixed_precision.set_global_policy(precision)
    strategy = distributed.make_strategy(FLAGS.tpu)

    train_ds, eval_ds, info = task.load(
        image_size=image_size,
        batch_size=recipe.batch_size,
        data_dir=FLAGS.data_dir,
        download=FLAGS.download,
        train_take=FLAGS.train_take,
        eval_take=FLAGS.eval_take,
        seed=FLAGS.seed,
    )
    train_ds, eval_ds = distributed.sharded_by_data(train_ds), distributed.sharded_by_data(eval_ds)
    steps_per_epoch, total_steps, warmup_steps = schedule(recipe, info)
    print(
        start_line(task, info, image_size, strategy, precision, recipe_name, steps_per_epoch),
        flush=True,
    )
    with strategy.scope():
        model = task.build(info.num_classes, bn_synchronized=strategy.num_replicas_in_sync > 1)
        optimizer = recipes.make_optimizer(
            recipe, model, total_steps=total_steps, warmup_steps=warmup_steps
        )
        task.compile(model, optimizer, info.num_classes)
    # Only now, with the data and the initial weights read, is the run in model_dir replaced.
    run_dir.start_run(model_dir, config, prepared, info.num_classes)
    run_callbacks, backup, nan_stopper = callbacks.for_run(
        model_dir,
        checkpoint_every=FLAGS.checkpoint_every,
        steps_per_epoch=steps_per_epoch,
        agree=(
            distributed.oldest_among_workers(strategy)
            if distributed.is_multi_worker(strategy)
            else None
        ),
        signals=guards.SIGNALS,
        progress_every=FLAGS.progress_every if FLAGS.verbose == 2 else 0,
    )

    def fit(steps):
        return distributed.fit_model(
            model,
            train_ds,
            strategy=strategy,
            epochs=recipe.epochs,
            steps_per_epoch=steps,
            validation_data=eval_ds,
            callbacks=run_callbacks,
            verbose=FLAGS.verbose,
        )

    guards.fit_resumable(
        fit,
        backup,
        epochs=recipe.epochs,
        steps_per_epoch=steps_per_epoch,
        stopped=lambda: nan_stopper.stopped_at is not None,
    )
    remedy = (
        f"lower --base_lr (now {recipe.base_lr:g}) or check the data, then rerun with "
        "--overwrite to start afresh"
    )
    refuse_diverged(model, nan_stopper, remedy)
    result, gap = task.finish(model, model_dir, eval_ds, info, strategy, remedy)
    run_dir.record_finished(model_dir, config, info.num_classes, task.result_key, result)
    print(result, flush=True)
    return gap


def task_modules():
    """{--task: its module}."""
    from train import classification_task, segmentation_task  # they load TensorFlow: see train()

    return {"classification": classification_task, "segmentation": segmentation_task}


def schedule(recipe, info):
    """(steps per epoch, total steps, warm-up steps); a warm-up longer than the run is cut to it,
    with a warning when --warmup_epochs asked for it."""
    steps_per_epoch = FLAGS.steps_per_epoch or max(1, info.train_examples // recipe.batch_size)
    total_steps = steps_per_epoch * recipe.epochs
    warmup_steps = min(int(recipe.warmup_epochs * steps_per_epoch), total_steps - 1)
    if FLAGS.warmup_epochs is not None and warmup_steps < recipe.warmup_epochs * steps_per_epoch:
        print(
            f"warning: {recipe.warmup_epochs:g} warm-up epoch(s) are "
            f"{int(recipe.warmup_epochs * steps_per_epoch)} steps, more than the run's "
            f"{total_steps}: warming up over {warmup_steps} step(s) (--warmup_epochs).",
            file=sys.stderr,
            flush=True,
        )
    return steps_per_epoch, total_steps, warmup_steps


def start_line(task, info, image_size, strategy, precision, recipe_name, steps_per_epoch):
    """The line that starts a run: model, data, replicas, precision and schedule."""
    recipe = task.recipe
    what, augmentation = task.describe()
    qat = (
        f", quantization-aware ({FLAGS.qat_scope}, {FLAGS.qat_form} form, "
        f"{FLAGS.qat_activations} activations)"
        if FLAGS.qat
        else ""
    )
    return (
        f"{what} ({FLAGS.ablation}{', quant_friendly' if FLAGS.quant_friendly else ''}{qat}) on "
        f"{FLAGS.dataset}: {info.train_examples} train / "
        f"{info.eval_examples} {info.eval_split} examples, {info.num_classes} classes, {image_size}px, "
        f"{strategy.num_replicas_in_sync} replica(s), precision {precision}, recipe {recipe_name} "
        f"({augmentation}): "
        f"{recipe.epochs} epochs x {steps_per_epoch} steps, batch {recipe.batch_size}, "
        f"{recipe.optimizer} peak lr {recipe.scaled_lr(recipe.batch_size):g}"
    )


def refuse_diverged(model, nan_stopper, remedy):
    """Raise FloatingPointError, saving nothing, when training stopped on NaN/inf or left a
    weight that is not finite."""
    from train import guards  # it loads TensorFlow: see train()

    if nan_stopper.stopped_at is not None:
        raise FloatingPointError(
            f"training diverged (NaN/inf): {nan_stopper.what} (optimizer step "
            f"{nan_stopper.stopped_at}); training stopped and no model was saved: {remedy}."
        )
    diverged = guards.divergence(model)
    if diverged:
        raise FloatingPointError(f"training diverged: {diverged}; no model was saved: {remedy}.")


ERROR_LENGTH = 800


def one_line(message):
    """`message` on one line, cut at ERROR_LENGTH characters: a library's message can quote a
    tensor's values (Keras's weight-loading errors print whole arrays)."""
    message = " ".join(str(message).split())
    message = re.sub(r"\[[-+\d.eE,\s\[\]]{40,}\]", "[...]", message)  # printed arrays
    if len(message) > ERROR_LENGTH:
        message = message[:ERROR_LENGTH] + " ... (cut; REPVGG_TRACEBACK=1 shows the traceback)"
    return message


def main(argv):
    del argv
    problems = options.flag_problems()
    if problems:
        print(f"error: {'; '.join(problems)}.", file=sys.stderr)
        return 1
    early = []  # SIGINT/SIGTERM while TensorFlow loads: noted, answered once it has loaded
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, lambda signum, frame: early.append(signum))
    try:  # before TensorFlow loads: a second trainer is refused at once (else prepare_model_dir)
        own_dir = run_dir.own_model_dir(FLAGS.model_dir)
        if os.path.isdir(own_dir):
            lock.lock_model_dir(own_dir)
    except (ValueError, OSError) as error:  # ModelDirBusy, a malformed TF_CONFIG
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    backup_dir = os.path.join(own_dir, "backup")
    # TensorFlow loads here, after the checks above.
    import tensorflow as tf

    from train import guards
    from train.sources import DatasetNotFound

    logging.set_verbosity(logging.WARNING)  # tfds logs every dataset it constructs
    guards.SIGNALS.install()
    if early:
        print(lock.interrupted_message(early[0], backup_dir), file=sys.stderr)
        return 128 + early[0]
    try:
        train()
    except guards.Interrupted as interrupted:
        if os.environ.get("REPVGG_TRACEBACK"):
            raise
        print(
            lock.interrupted_message(interrupted.signum, guards.SIGNALS.backup_dir or backup_dir),
            file=sys.stderr,
        )
        return 128 + interrupted.signum
    except (DatasetNotFound, ValueError, OSError, FloatingPointError) as error:
        if os.environ.get("REPVGG_TRACEBACK"):
            raise
        if staged.is_disk_full(error) and not isinstance(error, staged.DiskFullError):
            message = staged.disk_full_message(getattr(error, "filename", None) or own_dir)
        elif isinstance(error, OSError) and error.filename and error.strerror:
            message = f"{error.strerror}: {error.filename}"
        else:
            message = str(error)
        print(f"error: {one_line(message)}", file=sys.stderr)
        return 1
    except tf.errors.ResourceExhaustedError as error:
        if os.environ.get("REPVGG_TRACEBACK"):
            raise
        if staged.is_disk_full(error):  # TensorFlow reports ENOSPC (its event files) so too
            print(f"error: {staged.disk_full_message(own_dir)}", file=sys.stderr)
            return 1
        print(
            f"error: out of memory with --batch_size {FLAGS.batch_size or 'default'} at --image_size "
            f"{FLAGS.image_size or 'default'}: lower one of them.",
            file=sys.stderr,
        )
        return 1
    except tf.errors.OpError as error:  # e.g. a file that vanished or cannot be read mid-run
        if os.environ.get("REPVGG_TRACEBACK"):
            raise
        if staged.is_disk_full(error):
            print(f"error: {staged.disk_full_message(own_dir)}", file=sys.stderr)
            return 1
        print(
            f"error: {one_line(f'{type(error).__name__}: {error.message.strip().splitlines()[0]}')}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
