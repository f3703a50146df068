"""`python -m train`'s flags, their checks (before TensorFlow loads: a nonsense value must not
train, or save, an untrained model) and what they resolve to: the custom spec and each task's typed
options. No TensorFlow here."""

import dataclasses
import math

from absl import flags

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
    "training_curves.png, the .keras models; other files stay) and train from scratch. The old "
    "run is cleared only once the new one's data and --init_weights have been read.",
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
flags.DEFINE_bool(
    "qat",
    False,
    "Quantization-aware fine-tuning of --init_weights (rk.quantize_aware): writes model_qat.keras, "
    "which the int8 exporters take, and ends with `accuracy: fp32=.. qat=..`. Recipe 'qat'.",
)
flags.DEFINE_enum(
    "qat_scope",
    "convolutions",
    ["convolutions", "every_op"],
    "With --qat: what runs in int8. convolutions: TFLite --quantize int8 (pooling and classifier "
    "float); every_op: TFLite --quantize int8_full (integer-only).",
)
flags.DEFINE_enum(
    "qat_form",
    "deploy",
    ["deploy", "training"],
    "With --qat: fine-tune the fused convs (deploy), or the branches and BatchNorms with each "
    "block's fused kernel quantized in the graph (training; a training-form --init_weights).",
)
flags.DEFINE_enum(
    "qat_activations",
    "unsigned",
    ["unsigned", "symmetric"],
    "With --qat: a ReLU's output on [0, r] (unsigned: every CPU runtime runs it exactly, at its "
    "post-training speed) or on [-r, r] (symmetric: the ONNX QDQ form TensorRT takes).",
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
    if FLAGS.qat and FLAGS.task == "segmentation":
        problems.append("--qat fine-tunes classifiers, not --task segmentation")
    elif FLAGS.qat and not FLAGS.init_weights:
        problems.append(
            "--qat fine-tunes a trained model: pass it as --init_weights (a run's "
            "model_train.keras or model_deploy.keras, an authors'/timm checkpoint or 'imagenet')"
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


def custom_spec(spec):
    """`spec` with --num_blocks and --width_multipliers applied (named `<name>_custom`)."""
    changes = {}
    if FLAGS.num_blocks:
        changes["num_blocks"] = tuple(int(n) for n in FLAGS.num_blocks)
    if FLAGS.width_multipliers:
        changes["width_multipliers"] = tuple(float(w) for w in FLAGS.width_multipliers)
    if changes:
        spec = dataclasses.replace(spec, name=f"{spec.name}_custom", **changes)
    return spec


def task_options(options_class):
    """The task's typed options (a dataclass) from the flags of the same names."""
    return options_class(
        **{field.name: getattr(FLAGS, field.name) for field in dataclasses.fields(options_class)}
    )
