"""Train a RepVGG model, convert it, evaluate both forms.

    python -m train --model RepVGG_A0 --dataset imagenet2012 --recipe paper120 --model_dir runs/a0
    python -m train --model RepVGG_A0 --dataset fashion_mnist --image_size 32 --epochs 5 --model_dir runs/fm
    python -m train --model RepVGG_A0 --dataset folder:photos --init_weights imagenet --model_dir runs/ft

Writes to --model_dir: backup/ (checkpoints every --checkpoint_every steps and each epoch;
rerunning the same command resumes), logs/ (TensorBoard), training_log.csv,
training_curves.png, model_train.keras and model_deploy.keras (ready for the exporters).
The last line printed is `accuracy: training_form=<top-1> deploy_form=<top-1>`.
"""

import dataclasses
import json
import os
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS

flags.DEFINE_string("model", "RepVGG_A0", "Variant name (repvgg_keras.list_models()).")
flags.DEFINE_list("num_blocks", None, "Override blocks per stage 1-4 (a narrower/shallower custom spec).")
flags.DEFINE_list("width_multipliers", None, "Override the width multipliers a,b.")
flags.DEFINE_string("dataset", "fashion_mnist", "A TFDS name, 'folder:<root>' (root/<split>/<class>/<img>), or fashion_mnist.")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
flags.DEFINE_bool("download", False, "Let tfds download a dataset that is not prepared (off: fail fast).")
flags.DEFINE_string("model_dir", None, "Where checkpoints, logs and the final models go.")
flags.DEFINE_enum("recipe", "small", ["paper120", "paper200", "small"], "Training recipe (train/recipes.py).")
flags.DEFINE_integer("image_size", None, "Training resolution (default: the variant's, 224).")
flags.DEFINE_integer("epochs", None, "Override the recipe.")
flags.DEFINE_integer("batch_size", None, "Global batch size (override); the lr scales with it.")
flags.DEFINE_float("base_lr", None, "Learning rate at batch 256 (override).")
flags.DEFINE_float("weight_decay", None, "Override.")
flags.DEFINE_float("warmup_epochs", None, "Override.")
flags.DEFINE_float("label_smoothing", None, "Override.")
flags.DEFINE_float("mixup", None, "Override (Beta alpha; 0 disables).")
flags.DEFINE_float("min_area", None, "Override the random-resized-crop smallest area.")
flags.DEFINE_enum("augment", None, ["basic", "randaugment"], "Override: crop + flip, or also RandAugment.")
flags.DEFINE_float("ema_momentum", None, "EMA of weights (e.g. 0.9999); 0 disables.")
flags.DEFINE_bool("custom_l2", None, "The authors' custom L2 on the equivalent kernel instead of plain "
                  "weight decay on the block kernels (coefficient: --weight_decay).")
flags.DEFINE_float("eval_crop", None, "Evaluation centre-crop fraction (default: the recipe's; 1.0 = no crop).")
flags.DEFINE_bool("quant_friendly", False, "QARepVGG blocks (no BN on the 1x1 and identity branches, one BN "
                  "after the sum): the same plain deploy model, much better int8 accuracy.")
flags.DEFINE_string("init_weights", None, "Fine-tune: start from 'imagenet', an authors'/timm checkpoint or a "
                    "training-form .keras model of the same variant; the classifier is kept when the class "
                    "count matches, otherwise fresh.")
flags.DEFINE_enum("ablation", "full", ["full", "no_identity", "no_1x1", "plain"], "Drop branches (the paper's ablation).")
flags.DEFINE_enum("mixed_precision", "none", ["auto", "none", "mixed_bfloat16", "mixed_float16"],
                  "auto: mixed_float16 on GPUs, mixed_bfloat16 on CPUs with AMX, else float32.")
flags.DEFINE_integer("checkpoint_every", 200, "Checkpoint every N steps (and at each epoch end).")
flags.DEFINE_integer("steps_per_epoch", None, "Default: training examples // batch size.")
flags.DEFINE_integer("train_take", None, "Use only the first N training examples (quick runs).")
flags.DEFINE_integer("eval_take", None, "Use only the first N evaluation examples.")
flags.DEFINE_string("tpu", None, "TPU name/address for TPUStrategy.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_integer("verbose", 1, "Keras fit verbosity: 1 progress bar, 2 one line per epoch (plus a progress "
                     "line every --progress_every seconds).")
flags.DEFINE_float("progress_every", 60, "With --verbose 2: seconds between progress lines inside an epoch (0: none).")
flags.mark_flag_as_required("model_dir")

ABLATIONS = {"full": (True, True), "no_identity": (False, True), "no_1x1": (True, False), "plain": (False, False)}


def make_strategy(tpu=None):
    """TPUStrategy, MultiWorkerMirroredStrategy (TF_CONFIG set), MirroredStrategy (>1 GPU) or default."""
    import tensorflow as tf

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


def worker_role():
    """(is_chief, task index) from TF_CONFIG; single-process runs are the chief."""
    config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    task = config.get("task", {})
    kind, index = task.get("type", "chief"), int(task.get("index", 0))
    has_chief = "chief" in config.get("cluster", {})
    return (kind == "chief" or (kind == "worker" and index == 0 and not has_chief)), index


def pick_precision(choice):
    import tensorflow as tf

    if choice != "auto":
        return choice
    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    try:
        with open("/proc/cpuinfo") as f:
            return "mixed_bfloat16" if "amx_bf16" in f.read() else "none"
    except OSError:
        return "none"


def build_spec():
    import repvgg_keras as rk

    spec = rk.get_spec(FLAGS.model)
    changes = {}
    if FLAGS.num_blocks:
        changes["num_blocks"] = tuple(int(n) for n in FLAGS.num_blocks)
    if FLAGS.width_multipliers:
        changes["width_multipliers"] = tuple(float(w) for w in FLAGS.width_multipliers)
    if changes:
        spec = dataclasses.replace(spec, name=f"{spec.name}_custom", **changes)
    return spec


def init_from_pretrained(model, spec, image_size, use_identity, use_1x1):
    import repvgg_keras as rk
    from train import pretrained

    build = lambda include_top: rk.RepVGG(
        spec, include_top=include_top, input_shape=(image_size, image_size, 3),
        classes=model.output_shape[-1] if include_top else None,
        use_identity=use_identity, use_1x1=use_1x1, quant_friendly=FLAGS.quant_friendly)
    donor = pretrained.load_donor(FLAGS.init_weights, build)
    fresh = pretrained.copy_weights(model, donor)
    kept = "all weights" if not fresh else f"all weights but {', '.join(fresh)} (new classes: fresh init)"
    print(f"initialised from {FLAGS.init_weights}: {kept}", flush=True)


def train():
    import keras
    import numpy as np
    import tensorflow as tf

    import repvgg_keras as rk
    from train import callbacks as cb, data, distributed, recipes

    keras.utils.set_random_seed(FLAGS.seed)
    recipe = recipes.get_recipe(
        FLAGS.recipe, epochs=FLAGS.epochs, batch_size=FLAGS.batch_size, base_lr=FLAGS.base_lr,
        weight_decay=FLAGS.weight_decay, warmup_epochs=FLAGS.warmup_epochs,
        label_smoothing=FLAGS.label_smoothing, mixup=FLAGS.mixup, min_area=FLAGS.min_area, augment=FLAGS.augment,
        ema_momentum=FLAGS.ema_momentum, eval_crop=FLAGS.eval_crop, custom_l2=FLAGS.custom_l2,
    )
    precision = pick_precision(FLAGS.mixed_precision)
    if precision != "none":
        keras.mixed_precision.set_global_policy(precision)
    strategy = make_strategy(FLAGS.tpu)
    is_chief, task_index = worker_role()
    model_dir = FLAGS.model_dir if is_chief else os.path.join(FLAGS.model_dir, f"worker_{task_index}")
    os.makedirs(model_dir, exist_ok=True)
    spec = build_spec()
    image_size = FLAGS.image_size or spec.default_size

    train_ds, eval_ds, info = data.load(
        FLAGS.dataset, image_size=image_size, batch_size=recipe.batch_size, data_dir=FLAGS.data_dir,
        download=FLAGS.download, min_area=recipe.min_area, mixup=recipe.mixup, augment=recipe.augment,
        train_take=FLAGS.train_take, eval_take=FLAGS.eval_take, seed=FLAGS.seed, eval_crop=recipe.eval_crop,
    )
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    train_ds, eval_ds = train_ds.with_options(options), eval_ds.with_options(options)
    steps_per_epoch = FLAGS.steps_per_epoch or max(1, info.train_examples // recipe.batch_size)
    total_steps = steps_per_epoch * recipe.epochs
    warmup_steps = min(int(recipe.warmup_epochs * steps_per_epoch), total_steps - 1)
    peak_lr = recipe.scaled_lr(recipe.batch_size)
    use_identity, use_1x1 = ABLATIONS[FLAGS.ablation]
    print(f"{spec.name} ({FLAGS.ablation}{', quant_friendly' if FLAGS.quant_friendly else ''}) on {FLAGS.dataset}: {info.train_examples} train / "
          f"{info.eval_examples} {info.eval_split} examples, {info.num_classes} classes, {image_size}px, "
          f"{strategy.num_replicas_in_sync} replica(s), precision {precision}, recipe {FLAGS.recipe} "
          f"(augment {recipe.augment}): "
          f"{recipe.epochs} epochs x {steps_per_epoch} steps, batch {recipe.batch_size}, peak lr {peak_lr:g}",
          flush=True)

    with strategy.scope():
        model = rk.RepVGG(
            spec, input_shape=(image_size, image_size, 3), classes=info.num_classes,
            use_identity=use_identity, use_1x1=use_1x1, quant_friendly=FLAGS.quant_friendly,
            bn_synchronized=strategy.num_replicas_in_sync > 1,
        )
        if FLAGS.init_weights:
            init_from_pretrained(model, spec, image_size, use_identity, use_1x1)
        optimizer = recipes.make_optimizer(recipe, model, total_steps=total_steps, warmup_steps=warmup_steps)
        loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=recipe.label_smoothing)
        model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])

    csv_path = os.path.join(model_dir, "training_log.csv")
    nan_stopper = cb.NaNStopper()
    callbacks = [
        cb.BackupEveryStepsAndEpoch(os.path.join(model_dir, "backup"), save_freq=FLAGS.checkpoint_every),
        cb.ResumeReporter(os.path.join(model_dir, "last_step")),
        nan_stopper,
        cb.LearningRateLogger(),
        keras.callbacks.CSVLogger(csv_path, append=True),
        keras.callbacks.TensorBoard(os.path.join(model_dir, "logs"), update_freq="epoch"),
        cb.CurvePlotter(csv_path, os.path.join(model_dir, "training_curves.png")),
    ]
    if FLAGS.verbose == 2 and FLAGS.progress_every > 0:
        callbacks.append(cb.ProgressLines(FLAGS.progress_every))
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    if multi_worker:  # Keras 3's fit fails under this strategy: same loop, by hand
        distributed.fit(model, train_ds, strategy=strategy, epochs=recipe.epochs, steps_per_epoch=steps_per_epoch,
                        global_batch=recipe.batch_size, validation_data=eval_ds, callbacks=callbacks,
                        verbose=FLAGS.verbose)
    else:
        model.fit(train_ds, epochs=recipe.epochs, steps_per_epoch=steps_per_epoch, validation_data=eval_ds,
                  callbacks=callbacks, verbose=FLAGS.verbose, shuffle=False)
    if nan_stopper.stopped_at is not None:
        raise FloatingPointError(
            f"The loss became NaN/inf at step {nan_stopper.stopped_at}; training stopped. "
            f"Lower --base_lr or check the data; checkpoints up to then are in {model_dir}/backup "
            "(delete it to start afresh)."
        )

    model.save(os.path.join(model_dir, "model_train.keras"))
    with strategy.scope():
        deploy = rk.to_deploy(model)
    deploy.save(os.path.join(model_dir, "model_deploy.keras"))  # saved uncompiled: no optimizer state
    with strategy.scope():
        deploy.compile(loss=loss, metrics=["accuracy"])
    if multi_worker:
        train_acc = distributed.evaluate_model(model, eval_ds, strategy)
        deploy_acc = distributed.evaluate_model(deploy, eval_ds, strategy)
        print(f"weights digest: {distributed.weights_digest(model):.10e}")
    else:
        train_acc = model.evaluate(eval_ds, verbose=0, return_dict=True)["accuracy"]
        deploy_acc = deploy.evaluate(eval_ds, verbose=0, return_dict=True)["accuracy"]
    print(f"saved {model_dir}/model_train.keras and {model_dir}/model_deploy.keras")
    print(f"top-1 on {info.eval_examples} {info.eval_split} examples: training form {train_acc:.4f}, "
          f"deploy form {deploy_acc:.4f}")
    print(f"accuracy: training_form={train_acc:.4f} deploy_form={deploy_acc:.4f}", flush=True)
    return np.abs(train_acc - deploy_acc)


def main(argv):
    del argv
    from train import data

    logging.set_verbosity(logging.WARNING)  # tfds logs every dataset it constructs
    try:
        train()
    except (data.DatasetNotFound, ValueError, FileNotFoundError, FloatingPointError) as error:
        if os.environ.get("REPVGG_TRACEBACK"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
