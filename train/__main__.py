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
"""

import dataclasses
import json
import math
import os
import shutil
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS

flags.DEFINE_enum(
    "task",
    "classification",
    ["classification", "segmentation"],
    "classification (RepVGG) or segmentation (PSPNet on the RepVGG backbone).",
)
flags.DEFINE_string(
    "model",
    "RepVGG_A0",
    "Variant name (repvgg_keras.list_models()); the backbone's for segmentation.",
)
flags.DEFINE_list(
    "num_blocks", None, "Override blocks per stage 1-4 (a narrower/shallower custom spec)."
)
flags.DEFINE_list("width_multipliers", None, "Override the width multipliers a,b.")
flags.DEFINE_string(
    "dataset",
    "fashion_mnist",
    "A TFDS name, 'folder:<root>' (root/<split>/<class>/<img>), or fashion_mnist. Segmentation: "
    "fashion_mnist_scenes, 'seg_folder:<root>' (root/<split>/images|masks/) or a prepared TFDS "
    "dataset with image and segmentation_mask features.",
)
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
flags.DEFINE_bool(
    "download", False, "Let tfds download a dataset that is not prepared (off: fail fast)."
)
flags.DEFINE_string(
    "model_dir",
    None,
    "Where checkpoints, logs and the final models go. Rerunning the same "
    "command resumes an interrupted run there; on a finished run it reports the run's accuracy "
    "and leaves its models as they are. Another configuration there is refused (see --overwrite).",
)
flags.DEFINE_bool(
    "overwrite",
    False,
    "Clear the run in --model_dir (run_config.json, backup/, logs/, training_log.csv, "
    "training_curves.png, the .keras models; other files stay) and train from scratch.",
)
flags.DEFINE_enum(
    "recipe",
    None,
    ["paper120", "paper200", "small", "segmentation"],
    "Training recipe (train/recipes.py); default: small, or segmentation for --task segmentation.",
)
flags.DEFINE_integer("image_size", None, "Training resolution (default: the variant's, 224).")
flags.DEFINE_integer(
    "epochs",
    None,
    "Override the recipe. Part of the run's configuration: a finished run is "
    "not extended (train longer in another --model_dir, or --overwrite).",
)
flags.DEFINE_integer("batch_size", None, "Global batch size (override); the lr scales with it.")
flags.DEFINE_float("base_lr", None, "Learning rate at batch 256 (override).")
flags.DEFINE_float("weight_decay", None, "Override.")
flags.DEFINE_enum(
    "optimizer",
    None,
    ["sgd", "adamw"],
    "Override the recipe's optimizer (SGD with momentum); adamw wants a --base_lr near 0.008.",
)
flags.DEFINE_float("warmup_epochs", None, "Override.")
flags.DEFINE_float("label_smoothing", None, "Override.")
flags.DEFINE_float("mixup", None, "Override (Beta alpha; 0 disables).")
flags.DEFINE_float(
    "min_area",
    None,
    "Override the random-resized-crop smallest area (default: the recipe's; "
    "at most 64 px inputs crop at least 0.9 of the image, see train/recipes.py).",
)
flags.DEFINE_enum(
    "augment", None, ["basic", "randaugment"], "Override: crop + flip, or also RandAugment."
)
flags.DEFINE_float("ema_momentum", None, "EMA of weights (e.g. 0.9999); 0 disables.")
flags.DEFINE_bool(
    "custom_l2",
    None,
    "The authors' custom L2 on the equivalent kernel instead of plain "
    "weight decay on the block kernels (coefficient: --weight_decay).",
)
flags.DEFINE_float(
    "eval_crop", None, "Evaluation centre-crop fraction (default: the recipe's; 1.0 = no crop)."
)
flags.DEFINE_bool(
    "quant_friendly",
    False,
    "QARepVGG blocks (no BN on the 1x1 and identity branches, one BN "
    "after the sum): the same plain deploy model, much better int8 accuracy.",
)
flags.DEFINE_string(
    "init_weights",
    None,
    "Fine-tune: start from 'imagenet', an authors'/timm checkpoint or a "
    "training-form .keras model of the same variant; the classifier is kept when the class "
    "count matches, otherwise fresh.",
)
flags.DEFINE_enum(
    "ablation",
    "full",
    ["full", "no_identity", "no_1x1", "plain"],
    "Drop branches (the paper's ablation).",
)
flags.DEFINE_enum(
    "mixed_precision",
    "none",
    ["auto", "none", "mixed_bfloat16", "mixed_float16"],
    "auto: mixed_float16 on GPUs, mixed_bfloat16 on CPUs with AMX, else float32.",
)
flags.DEFINE_integer(
    "checkpoint_every",
    200,
    "Checkpoint every N steps (and at each epoch end); may change on resume.",
)
flags.DEFINE_integer("steps_per_epoch", None, "Default: training examples // batch size.")
flags.DEFINE_integer("train_take", None, "Use only the first N training examples (quick runs).")
flags.DEFINE_integer("eval_take", None, "Use only the first N evaluation examples.")
flags.DEFINE_string("tpu", None, "TPU name/address for TPUStrategy.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_integer(
    "verbose",
    1,
    "Keras fit verbosity: 1 progress bar, 2 one line per epoch (plus a progress "
    "line every --progress_every seconds).",
)
flags.DEFINE_float(
    "progress_every",
    60,
    "With --verbose 2: seconds between progress lines inside an epoch (0: none).",
)
flags.DEFINE_integer(
    "output_stride",
    None,
    "Segmentation: backbone output stride, 8 or 16 (default: 16 for inputs of at most 64 px, "
    "else 8; train/recipes.py SEGMENTATION_HEADS, like the four options below).",
)
flags.DEFINE_bool(
    "fast", False, "Segmentation: the paper's -fast backbone (dilation in the last 5 blocks only)."
)
flags.DEFINE_integer(
    "head_channels",
    None,
    "Segmentation: width of the PSPNet head's 3x3 conv (default: 128 at most 64 px, else 512).",
)
flags.DEFINE_bool(
    "low_level_skip",
    None,
    "Segmentation: refine the PSPNet head with stride-4 backbone features (default: on at most "
    "64 px).",
)
flags.DEFINE_bool(
    "image_refine",
    None,
    "Segmentation: correct the upsampled logits at full resolution from the image (sharp "
    "outlines; default: on at most 64 px).",
)
flags.DEFINE_float(
    "aux_weight", 0.4, "Segmentation: weight of the auxiliary (stage 3) loss; 0 drops that head."
)
flags.DEFINE_bool(
    "scale_augment",
    None,
    "Segmentation: random scale (0.5-2x), crop and flip of image and mask together (default: on "
    "above 64 px; smaller inputs flip only).",
)
flags.mark_flag_as_required("model_dir")

ABLATIONS = {
    "full": (True, True),
    "no_identity": (False, True),
    "no_1x1": (True, False),
    "plain": (False, False),
}
RUN_CONFIG = "run_config.json"
# What a run writes into --model_dir (and --overwrite removes); worker_<i>/ folders belong to other processes.
RUN_FILES = (
    RUN_CONFIG,
    "backup",
    "logs",
    "training_log.csv",
    "training_curves.png",
    "model_train.keras",
    "model_deploy.keras",
    "last_step",
)
# Left by a run of an older version, which recorded no configuration: never resumed or replaced silently.
UNRECORDED_RUN_FILES = ("backup", "model_train.keras", "model_deploy.keras", "training_log.csv")


class UsageError(ValueError):
    """Bad flags or a model_dir that does not fit them: one `error:` line, exit status 1."""


def flag_problems():
    """Every numeric flag out of its range, and malformed lists, as short phrases (checked before
    TensorFlow loads: a nonsense value must not train, or save, an untrained model)."""
    problems = []

    def check(name, low=None, high=None, low_open=False, high_open=False, integer=False):
        value = getattr(FLAGS, name)
        if value is None:
            return
        ok = math.isfinite(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            low_text = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
            high_text = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
            wanted = " and ".join(t for t in (low_text, high_text) if t)
            problems.append(f"--{name} must be {wanted}, not {value:{'d' if integer else 'g'}}")

    for name in (
        "epochs",
        "batch_size",
        "checkpoint_every",
        "steps_per_epoch",
        "train_take",
        "eval_take",
    ):
        check(name, low=1, integer=True)
    check("image_size", low=32, integer=True)  # five stride-2 stages: 32 px end at 1 x 1
    check("seed", low=0, high=2**32 - 1, integer=True)
    for name in ("base_lr", "weight_decay", "warmup_epochs", "mixup", "progress_every"):
        check(name, low=0)
    check("label_smoothing", low=0, high=1, high_open=True)
    check("ema_momentum", low=0, high=1, high_open=True)
    check("min_area", low=0, high=1, low_open=True)
    check("eval_crop", low=0, high=1, low_open=True)
    check("head_channels", low=1, integer=True)
    check("aux_weight", low=0)
    if FLAGS.output_stride not in (None, 8, 16):
        problems.append(f"--output_stride must be 8 or 16, not {FLAGS.output_stride}")
    if FLAGS.task == "segmentation":
        classification_only = [
            f"--{name}"
            for name in ("mixup", "label_smoothing", "min_area", "eval_crop", "augment")
            if getattr(FLAGS, name) is not None
        ]
        if FLAGS.ablation != "full":
            classification_only.append("--ablation")
        if classification_only:
            problems.append(
                f"{', '.join(classification_only)} apply to classification only, not to "
                "--task segmentation (which augments with --scale_augment)"
            )
    if FLAGS.verbose not in (0, 1, 2):
        problems.append(f"--verbose must be 0, 1 or 2, not {FLAGS.verbose}")
    for name, count, kind, low in (("num_blocks", 4, int, 1), ("width_multipliers", 2, float, 0)):
        values = getattr(FLAGS, name)
        if not values:
            continue
        try:
            parsed = [kind(v) for v in values]
            ok = len(parsed) == count and all(
                math.isfinite(v) and v >= max(low, 1e-9) for v in parsed
            )
        except ValueError:
            ok = False
        if not ok:
            what = "positive integers" if kind is int else "positive numbers"
            problems.append(
                f"--{name} takes {count} {what} separated by commas, not {','.join(values)!r}"
            )
    if not FLAGS.model_dir:
        problems.append("--model_dir is empty")
    if FLAGS.dataset == "folder:" or not FLAGS.dataset:
        problems.append("--dataset is empty (a TFDS name, folder:<root> or fashion_mnist)")
    return problems


def run_config(spec, image_size, recipe):
    """The flags that define the model, the data and the schedule, resolved (recipe defaults filled
    in). --verbose, --progress_every, --checkpoint_every, --data_dir, --download and --tpu may change
    between the runs of one model_dir: they do not change what is trained."""
    import repvgg_keras as rk

    dataset = FLAGS.dataset
    if dataset.startswith("folder:"):
        dataset = "folder:" + os.path.abspath(dataset[len("folder:") :])
    config = {
        "model": rk.get_spec(FLAGS.model).name,
        "num_blocks": list(spec.num_blocks),
        "width_multipliers": list(spec.width_multipliers),
        "quant_friendly": FLAGS.quant_friendly,
        "ablation": FLAGS.ablation,
        "init_weights": FLAGS.init_weights,
        "dataset": dataset,
        "image_size": image_size,
        "train_take": FLAGS.train_take,
        "eval_take": FLAGS.eval_take,
        "steps_per_epoch": FLAGS.steps_per_epoch,
        "recipe": recipe_name(),
        "mixed_precision": FLAGS.mixed_precision,
        "seed": FLAGS.seed,
    }
    for field in (
        "epochs",
        "batch_size",
        "base_lr",
        "weight_decay",
        "warmup_epochs",
        "label_smoothing",
        "mixup",
        "min_area",
        "augment",
        "ema_momentum",
        "custom_l2",
        "eval_crop",
    ):
        config[field] = getattr(recipe, field)
    if recipe.optimizer != "sgd":  # recorded when it differs, so earlier SGD runs still resume
        config["optimizer"] = recipe.optimizer
    if FLAGS.task == "segmentation":
        config.update(segmentation_options(image_size), task="segmentation")
    return json.loads(json.dumps(config))  # as it reads back from the file


def recipe_name():
    from train import recipes

    return FLAGS.recipe or recipes.DEFAULT_RECIPE[FLAGS.task]


def segmentation_options(image_size):
    """The PSPNet options of this run: the flags given, the rest from the head for its size."""
    from train import recipes

    head = recipes.segmentation_head(
        image_size,
        output_stride=FLAGS.output_stride,
        head_channels=FLAGS.head_channels,
        low_level_skip=FLAGS.low_level_skip,
        image_refine=FLAGS.image_refine,
        scale_augment=FLAGS.scale_augment,
    )
    return {**head, "fast": FLAGS.fast, "aux_weight": FLAGS.aux_weight}


def _write_json(path, content):
    staged = path + ".tmp"
    with open(staged, "w") as f:
        json.dump(content, f, indent=1)
    os.replace(staged, path)


def _clear_run(model_dir):
    for name in RUN_FILES:
        target = os.path.join(model_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        elif os.path.lexists(target):
            os.remove(target)


def prepare_model_dir(model_dir, config, overwrite):
    """Check --model_dir against this run's configuration before anything is written there.

    Returns the recorded run_config.json content when it holds a finished run of this configuration
    (nothing to train), else None after recording the configuration. Raises UsageError for another
    configuration, or for a run whose configuration was never recorded, unless `overwrite`, which
    removes the run's files (RUN_FILES) first. A run that stopped before its first checkpoint (no
    backup/, log or model) holds nothing to resume and is replaced.
    """
    try:
        os.makedirs(model_dir, exist_ok=True)
    except OSError as error:
        raise UsageError(
            f"cannot create --model_dir {model_dir!r}: {error.strerror or error}."
        ) from None
    from train import lock

    lock.lock_model_dir(model_dir)  # held until this process ends: one trainer per model_dir
    path = os.path.join(model_dir, RUN_CONFIG)
    progress = [
        name for name in UNRECORDED_RUN_FILES if os.path.exists(os.path.join(model_dir, name))
    ]
    if overwrite:
        _clear_run(model_dir)
    elif os.path.exists(path):
        try:
            with open(path) as f:
                recorded = json.load(f)
            recorded_flags = recorded["flags"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UsageError(
                f"{path} is unreadable ({error}): pass --overwrite to clear this run and start over, "
                "or another --model_dir."
            ) from None
        differences = [
            f"--{name}: recorded {recorded_flags.get(name)!r}, given {value!r}"
            for name, value in config.items()
            if recorded_flags.get(name) != value
        ]
        if differences and not progress and not recorded.get("finished"):
            _clear_run(
                model_dir
            )  # it stopped before its first checkpoint (say, on a wrong data path)
        elif differences:
            raise UsageError(
                f"--model_dir {model_dir} holds a run of another configuration ({'; '.join(differences)}): "
                "pass the recorded values to resume it, another --model_dir, or --overwrite to clear it and start over."
            )
        if recorded.get("finished"):
            return recorded
    elif progress:
        raise UsageError(
            f"--model_dir {model_dir} holds {', '.join(progress)} but no {RUN_CONFIG} (a run of an older version): "
            "its configuration is unknown, so it is neither resumed nor replaced. Pass another --model_dir, "
            "or --overwrite to clear it and start over."
        )
    _write_json(path, {"flags": config, "finished": False})
    return None


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
    try:
        config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    except ValueError as error:
        raise UsageError(f"the environment variable TF_CONFIG is not JSON ({error}).") from None
    task = config.get("task", {})
    kind, index = task.get("type", "chief"), int(task.get("index", 0))
    has_chief = "chief" in config.get("cluster", {})
    return (kind == "chief" or (kind == "worker" and index == 0 and not has_chief)), index


def pick_precision(choice):
    import tensorflow as tf

    if choice != "auto":
        return choice
    from repvgg_keras import cpu_features

    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    return "mixed_bfloat16" if "amx_bf16" in cpu_features.cpu_flags() else "none"


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
        spec,
        include_top=include_top,
        input_shape=(image_size, image_size, 3),
        classes=model.output_shape[-1] if include_top else None,
        use_identity=use_identity,
        use_1x1=use_1x1,
        quant_friendly=FLAGS.quant_friendly,
    )
    donor = pretrained.load_donor(FLAGS.init_weights, build)
    fresh = pretrained.copy_weights(model, donor)
    kept = (
        "all weights"
        if not fresh
        else f"all weights but {', '.join(fresh)} (new classes: fresh init)"
    )
    print(f"initialised from {FLAGS.init_weights}: {kept}", flush=True)


def train():
    import keras
    import numpy as np
    import tensorflow as tf

    import repvgg_keras as rk
    from train import callbacks as cb
    from train import data, distributed, guards, recipes

    keras.utils.set_random_seed(FLAGS.seed)
    spec = build_spec()
    image_size = FLAGS.image_size or spec.default_size
    recipe = recipes.get_recipe(
        recipe_name(),
        image_size=image_size,
        epochs=FLAGS.epochs,
        batch_size=FLAGS.batch_size,
        base_lr=FLAGS.base_lr,
        weight_decay=FLAGS.weight_decay,
        optimizer=FLAGS.optimizer,
        warmup_epochs=FLAGS.warmup_epochs,
        label_smoothing=FLAGS.label_smoothing,
        mixup=FLAGS.mixup,
        min_area=FLAGS.min_area,
        augment=FLAGS.augment,
        ema_momentum=FLAGS.ema_momentum,
        eval_crop=FLAGS.eval_crop,
        custom_l2=FLAGS.custom_l2,
    )
    is_chief, task_index = worker_role()
    model_dir = (
        FLAGS.model_dir if is_chief else os.path.join(FLAGS.model_dir, f"worker_{task_index}")
    )
    guards.SIGNALS.backup_dir = os.path.join(model_dir, "backup")
    finished = prepare_model_dir(model_dir, run_config(spec, image_size, recipe), FLAGS.overwrite)
    if finished is not None:
        print(
            f"{model_dir} holds a finished run of this configuration ({recipe.epochs} epochs); its models are "
            "kept as they are. Pass --overwrite to train it again, or another --model_dir."
        )
        missing = [
            n
            for n in ("model_train.keras", "model_deploy.keras")
            if not os.path.exists(os.path.join(model_dir, n))
        ]
        if missing:
            raise UsageError(
                f"the finished run in {model_dir} lacks {', '.join(missing)}: pass --overwrite to "
                "train it again."
            )
        print(finished.get("accuracy") or finished.get("miou", ""), flush=True)
        return 0.0
    precision = pick_precision(FLAGS.mixed_precision)
    if precision != "none":
        keras.mixed_precision.set_global_policy(precision)
    strategy = make_strategy(FLAGS.tpu)

    segmentation = FLAGS.task == "segmentation"
    multi_worker = distributed.is_multi_worker(strategy)
    common = dict(
        image_size=image_size,
        batch_size=recipe.batch_size,
        data_dir=FLAGS.data_dir,
        download=FLAGS.download,
        train_take=FLAGS.train_take,
        eval_take=FLAGS.eval_take,
        seed=FLAGS.seed,
    )
    if segmentation:
        from train import segmentation_data
        from train import segmentation_task as seg

        head = segmentation_options(image_size)
        train_ds, eval_ds, info = segmentation_data.load(
            FLAGS.dataset, augment=head["scale_augment"], **common
        )
    else:
        train_ds, eval_ds, info = data.load(
            FLAGS.dataset,
            min_area=recipe.min_area,
            mixup=recipe.mixup,
            augment=recipe.augment,
            eval_crop=recipe.eval_crop,
            **common,
        )
    segmentation_eval_ds = eval_ds
    if segmentation and FLAGS.aux_weight > 0:
        train_ds, eval_ds = seg.with_aux_targets(train_ds), seg.with_aux_targets(eval_ds)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    train_ds, eval_ds = train_ds.with_options(options), eval_ds.with_options(options)
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
    peak_lr = recipe.scaled_lr(recipe.batch_size)
    use_identity, use_1x1 = ABLATIONS[FLAGS.ablation]
    what = (
        f"PSPNet on {spec.name} (output stride {head['output_stride']}, head "
        f"{head['head_channels']}{', fast' if FLAGS.fast else ''}"
        f"{', low-level skip' if head['low_level_skip'] else ''}"
        f"{', image refine' if head['image_refine'] else ''})"
        if segmentation
        else spec.name
    )
    augmentation = (
        f"scale_augment {'on' if head['scale_augment'] else 'off'}"
        if segmentation
        else f"augment {recipe.augment}"
    )
    print(
        f"{what} ({FLAGS.ablation}{', quant_friendly' if FLAGS.quant_friendly else ''}) on "
        f"{FLAGS.dataset}: {info.train_examples} train / "
        f"{info.eval_examples} {info.eval_split} examples, {info.num_classes} classes, {image_size}px, "
        f"{strategy.num_replicas_in_sync} replica(s), precision {precision}, recipe {recipe_name()} "
        f"({augmentation}): "
        f"{recipe.epochs} epochs x {steps_per_epoch} steps, batch {recipe.batch_size}, "
        f"{recipe.optimizer} peak lr {peak_lr:g}",
        flush=True,
    )

    with strategy.scope():
        if segmentation:
            model = seg.build_model(
                spec,
                image_size,
                info.num_classes,
                options=head,
                quant_friendly=FLAGS.quant_friendly,
                bn_synchronized=strategy.num_replicas_in_sync > 1,
            )
            if FLAGS.init_weights:
                seg.init_backbone(model, FLAGS.init_weights, spec.name)
            optimizer = recipes.make_optimizer(
                recipe, model, total_steps=total_steps, warmup_steps=warmup_steps
            )
            seg.compile_model(model, optimizer, info.num_classes, FLAGS.aux_weight)
        else:
            model = rk.RepVGG(
                spec,
                input_shape=(image_size, image_size, 3),
                classes=info.num_classes,
                use_identity=use_identity,
                use_1x1=use_1x1,
                quant_friendly=FLAGS.quant_friendly,
                bn_synchronized=strategy.num_replicas_in_sync > 1,
            )
            if FLAGS.init_weights:
                init_from_pretrained(model, spec, image_size, use_identity, use_1x1)
            optimizer = recipes.make_optimizer(
                recipe, model, total_steps=total_steps, warmup_steps=warmup_steps
            )
            loss = keras.losses.CategoricalCrossentropy(
                from_logits=True, label_smoothing=recipe.label_smoothing
            )
            model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])

    csv_path = os.path.join(model_dir, "training_log.csv")
    nan_stopper = cb.NaNStopper()
    # Kept after fit: a run killed before it is recorded as finished resumes from the last backup
    # instead of training again; removed once run_config.json says finished.
    backup = cb.BackupEveryStepsAndEpoch(
        os.path.join(model_dir, "backup"),
        save_freq=FLAGS.checkpoint_every,
        delete_checkpoint=False,
        agree=distributed.oldest_among_workers(strategy) if multi_worker else None,
        steps_per_epoch=steps_per_epoch,
    )
    guards.SIGNALS.backup = backup
    callbacks = [
        backup,
        cb.ResumeReporter(os.path.join(model_dir, "last_step")),
        guards.SIGNALS,  # after the two above: a signal saves the step they counted
        nan_stopper,
        cb.LearningRateLogger(),
        keras.callbacks.CSVLogger(csv_path, append=True),
        keras.callbacks.TensorBoard(os.path.join(model_dir, "logs"), update_freq="epoch"),
        cb.CurvePlotter(csv_path, os.path.join(model_dir, "training_curves.png")),
    ]
    if FLAGS.verbose == 2 and FLAGS.progress_every > 0:
        callbacks.append(cb.ProgressLines(FLAGS.progress_every))

    def fit(steps):
        if multi_worker:  # Keras 3's fit fails under this strategy: same loop, by hand
            return distributed.fit(
                model,
                train_ds,
                strategy=strategy,
                epochs=recipe.epochs,
                steps_per_epoch=steps,
                validation_data=eval_ds,
                callbacks=callbacks,
                verbose=FLAGS.verbose,
            )
        return model.fit(
            train_ds,
            epochs=recipe.epochs,
            steps_per_epoch=steps,
            validation_data=eval_ds,
            callbacks=callbacks,
            verbose=FLAGS.verbose,
            shuffle=False,
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
    if nan_stopper.stopped_at is not None:
        raise FloatingPointError(
            f"training diverged (NaN/inf): {nan_stopper.what} (optimizer step "
            f"{nan_stopper.stopped_at}); training stopped and no model was saved: {remedy}."
        )
    diverged = guards.divergence(model)
    if diverged:
        raise FloatingPointError(f"training diverged: {diverged}; no model was saved: {remedy}.")
    if segmentation:
        result, gap = seg.finish(model, model_dir, segmentation_eval_ds, info, strategy)
        if multi_worker:
            print(f"weights digest: {distributed.weights_digest(model):.10e}")
        _write_json(
            os.path.join(model_dir, RUN_CONFIG),
            {"flags": run_config(spec, image_size, recipe), "finished": True, "miou": result},
        )
        shutil.rmtree(os.path.join(model_dir, "backup"), ignore_errors=True)
        print(result, flush=True)
        return gap

    evaluation = None if multi_worker else model.evaluate(eval_ds, verbose=0, return_dict=True)
    diverged = evaluation and guards.divergence(model, val_loss=evaluation["loss"])
    if diverged:
        raise FloatingPointError(f"training diverged: {diverged}; no model was saved: {remedy}.")
    model.save(os.path.join(model_dir, "model_train.keras"))
    with strategy.scope():
        deploy = rk.to_deploy(model)
    deploy.save(
        os.path.join(model_dir, "model_deploy.keras")
    )  # saved uncompiled: no optimizer state
    with strategy.scope():
        deploy.compile(loss=loss, metrics=["accuracy"])
    if multi_worker:
        train_acc = distributed.evaluate_model(model, eval_ds, strategy)
        deploy_acc = distributed.evaluate_model(deploy, eval_ds, strategy)
        print(f"weights digest: {distributed.weights_digest(model):.10e}")
    else:
        train_acc = evaluation["accuracy"]
        deploy_evaluation = deploy.evaluate(eval_ds, verbose=0, return_dict=True)
        deploy_acc = deploy_evaluation["accuracy"]
        diverged = guards.divergence(deploy, val_loss=deploy_evaluation["loss"])
        if diverged:
            os.remove(os.path.join(model_dir, "model_deploy.keras"))
            raise FloatingPointError(
                f"the deploy form does not compute: {diverged}; model_deploy.keras was removed: "
                f"{remedy}."
            )
    print(f"saved {model_dir}/model_train.keras and {model_dir}/model_deploy.keras")
    print(
        f"top-1 on {info.eval_examples} {info.eval_split} examples: training form {train_acc:.4f}, "
        f"deploy form {deploy_acc:.4f}"
    )
    accuracy = f"accuracy: training_form={train_acc:.4f} deploy_form={deploy_acc:.4f}"
    _write_json(
        os.path.join(model_dir, RUN_CONFIG),
        {"flags": run_config(spec, image_size, recipe), "finished": True, "accuracy": accuracy},
    )
    shutil.rmtree(os.path.join(model_dir, "backup"), ignore_errors=True)
    print(accuracy, flush=True)
    return np.abs(train_acc - deploy_acc)


def main(argv):
    del argv
    problems = flag_problems()
    if problems:
        print(f"error: {'; '.join(problems)}.", file=sys.stderr)
        return 1
    import signal

    from train import lock

    early = []  # SIGINT/SIGTERM while TensorFlow loads: noted, answered once it has loaded
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, lambda signum, frame: early.append(signum))
    try:  # before TensorFlow loads: a second trainer is refused at once (else prepare_model_dir)
        is_chief, index = worker_role()
        own_dir = FLAGS.model_dir if is_chief else os.path.join(FLAGS.model_dir, f"worker_{index}")
        if os.path.isdir(own_dir):
            lock.lock_model_dir(own_dir)
    except (ValueError, OSError) as error:  # ModelDirBusy, a malformed TF_CONFIG
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    backup_dir = os.path.join(own_dir, "backup")
    import tensorflow as tf

    from train import data, guards

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
    except (data.DatasetNotFound, ValueError, OSError, FloatingPointError) as error:
        if os.environ.get("REPVGG_TRACEBACK"):
            raise
        if isinstance(error, OSError) and error.filename and error.strerror:
            message = f"{error.strerror}: {error.filename}"
        else:
            message = " ".join(str(error).split())  # one line
        print(f"error: {message}", file=sys.stderr)
        return 1
    except tf.errors.ResourceExhaustedError:
        if os.environ.get("REPVGG_TRACEBACK"):
            raise
        print(
            f"error: out of memory with --batch_size {FLAGS.batch_size or 'default'} at --image_size "
            f"{FLAGS.image_size or 'default'}: lower one of them.",
            file=sys.stderr,
        )
        return 1
    except tf.errors.OpError as error:  # e.g. a file that vanished or cannot be read mid-run
        if os.environ.get("REPVGG_TRACEBACK"):
            raise
        print(
            f"error: {type(error).__name__}: {error.message.strip().splitlines()[0]}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
