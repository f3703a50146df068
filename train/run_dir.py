"""The rules of a run folder (--model_dir): what a run records there, when it resumes, when it is
refused, what --overwrite clears and which folder a worker owns. No TensorFlow here: `python -m
train` claims its folder before it loads TensorFlow."""

import json
import os
import shutil

from train import lock

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
# The recipe's fields, as resolved: every one of them changes what is trained.
RECIPE_FIELDS = (
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
    "optimizer",
)


class UsageError(ValueError):
    """Bad flags or a model_dir that does not fit them: one `error:` line, exit status 1."""


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


def own_model_dir(model_dir):
    """The folder this process writes: model_dir for the chief, model_dir/worker_<i> for the others."""
    is_chief, index = worker_role()
    return model_dir if is_chief else os.path.join(model_dir, f"worker_{index}")


def run_config(flags, *, model, spec, image_size, recipe, recipe_name, task_entries):
    """The flags that define the model, the data and the schedule, resolved (recipe defaults filled
    in; `model` the variant's name, `spec` the built one). --verbose, --progress_every,
    --checkpoint_every, --data_dir, --download and --tpu may change between the runs of one
    model_dir: they do not change what is trained."""
    dataset = flags.dataset
    if dataset.startswith("folder:"):
        dataset = "folder:" + os.path.abspath(dataset[len("folder:") :])
    config = {
        "model": model,
        "num_blocks": list(spec.num_blocks),
        "width_multipliers": list(spec.width_multipliers),
        "quant_friendly": flags.quant_friendly,
        "ablation": flags.ablation,
        "init_weights": flags.init_weights,
        "dataset": dataset,
        "image_size": image_size,
        "train_take": flags.train_take,
        "eval_take": flags.eval_take,
        "steps_per_epoch": flags.steps_per_epoch,
        "recipe": recipe_name,
        "mixed_precision": flags.mixed_precision,
        "seed": flags.seed,
    }
    config.update({field: getattr(recipe, field) for field in RECIPE_FIELDS})
    config.update(task_entries)
    # As it reads back from the file.
    return json.loads(json.dumps(config))


def write_json(path, content):
    """Write through a staged file and a rename: a kill never leaves half a file."""
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
    # Held until this process ends: one trainer per model_dir.
    lock.lock_model_dir(model_dir)
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
            # It stopped before its first checkpoint (say, on a wrong data path).
            _clear_run(model_dir)
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
    write_json(path, {"flags": config, "finished": False})
    return None


def finished_result(model_dir, recorded, epochs):
    """Say that `model_dir` holds a finished run (`recorded`, of `epochs` epochs) and return its
    result line; UsageError when its models are gone, as there is nothing to report on."""
    print(
        f"{model_dir} holds a finished run of this configuration ({epochs} epochs); its models are "
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
    return recorded.get("accuracy") or recorded.get("miou", "")


def record_finished(model_dir, config, result_key, result):
    """Mark the run finished with its result line; its backups are no longer needed."""
    write_json(
        os.path.join(model_dir, RUN_CONFIG),
        {"flags": config, "finished": True, result_key: result},
    )
    shutil.rmtree(os.path.join(model_dir, "backup"), ignore_errors=True)
