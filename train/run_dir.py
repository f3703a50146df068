"""The rules of a run folder (--model_dir): what a run records there, when it resumes, when it is
refused, what --overwrite clears and which folder a worker owns. No TensorFlow here: `python -m
train` claims its folder before it loads TensorFlow."""

import dataclasses
import json
import os
import shutil

from train import lock, staged

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
    staged.write_text(path, json.dumps(content, indent=1))


def _clear_run(model_dir):
    for name in RUN_FILES:
        for target in (
            os.path.join(model_dir, name),
            staged.staged_path(os.path.join(model_dir, name)),
        ):
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            elif os.path.lexists(target):
                os.remove(target)


def _field_problem(recorded):
    """The first field of a recorded run_config.json of the wrong type, as a phrase, or None."""
    if not isinstance(recorded, dict):
        return f"it holds {json.dumps(recorded)[:40]}, not a JSON object"
    wanted = {
        "flags": (dict, "an object"),
        "finished": (bool, "true or false"),
        "classes": (int, "a positive integer"),
        "accuracy": (str, "a string"),
        "miou": (str, "a string"),
    }
    if "flags" not in recorded:
        return 'it lacks the field "flags"'
    for field, (kind, text) in wanted.items():
        value = recorded.get(field)
        if field in recorded and (
            not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 1))
        ):
            return f'its field "{field}" is {json.dumps(value)[:40]}, not {text}'
    return None


def read_run_config(path):
    """The content of a run's run_config.json, every field this module reads checked; UsageError
    naming the file and the field otherwise (a hand-edited or damaged file is not guessed at)."""
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (OSError, ValueError) as error:
        problem = f"it is unreadable ({error})"
    else:
        problem = _field_problem(recorded)
    if problem:
        raise UsageError(
            f"{path}: {problem}. Pass --overwrite to clear this run and start over, fix or remove "
            "the file, or pass another --model_dir."
        )
    return recorded


@dataclasses.dataclass
class Prepared:
    """What `prepare_model_dir` found: `finished`, the recorded content of a finished run of this
    configuration (nothing to train), else None; `recorded`, the content of an unfinished run
    of it (resumed) or None; `replace`, whether starting clears the files of the run there."""

    finished: dict = None
    recorded: dict = None
    replace: bool = False


def prepare_model_dir(model_dir, config, overwrite):
    """Check --model_dir against this run's configuration; nothing of a run there is changed yet
    (`start_run` does that, once the data and the initial weights have been read).

    Raises UsageError for another configuration, or for a run whose configuration was never
    recorded, unless `overwrite` (which replaces the run's files, RUN_FILES, at the start). A run
    that stopped before its first checkpoint (no backup/, log or model) holds nothing to resume
    and is replaced.
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
        return Prepared(replace=True)
    if os.path.exists(path):
        recorded = read_run_config(path)
        recorded_flags = recorded["flags"]
        differences = [
            f"--{name}: recorded {recorded_flags.get(name)!r}, given {value!r}"
            for name, value in config.items()
            if recorded_flags.get(name) != value
        ]
        if differences and not progress and not recorded.get("finished"):
            # It stopped before its first checkpoint (say, on a wrong data path).
            return Prepared(replace=True)
        if differences:
            raise UsageError(
                f"--model_dir {model_dir} holds a run of another configuration ({'; '.join(differences)}): "
                "pass the recorded values to resume it, another --model_dir, or --overwrite to clear it and start over."
            )
        if recorded.get("finished"):
            return Prepared(finished=recorded)
        return Prepared(recorded=recorded)
    if progress:
        raise UsageError(
            f"--model_dir {model_dir} holds {', '.join(progress)} but no {RUN_CONFIG} (a run of an older version): "
            "its configuration is unknown, so it is neither resumed nor replaced. Pass another --model_dir, "
            "or --overwrite to clear it and start over."
        )
    return Prepared()


def start_run(model_dir, config, prepared, classes):
    """Record the run's configuration and its class count (read from the data), clearing the
    previous run's files first when `prepared.replace`. Called once the data and the initial
    weights have been read: a mistake in them leaves the run that was there as it was. A resumed
    run whose data has another class count than recorded is refused."""
    recorded_classes = (prepared.recorded or {}).get("classes")
    if recorded_classes is not None and recorded_classes != classes:
        raise UsageError(
            f"the class count changed from {recorded_classes} to {classes} since this run started "
            f"({os.path.join(model_dir, RUN_CONFIG)}): the checkpoints in {model_dir} hold a "
            f"{recorded_classes}-class classifier. Use --overwrite to start over, or a new --model_dir."
        )
    if prepared.replace:
        _clear_run(model_dir)
    write_json(
        os.path.join(model_dir, RUN_CONFIG),
        {"flags": config, "classes": classes, "finished": False},
    )


def finished_result(model_dir, recorded, epochs):
    """Say that `model_dir` holds a finished run (`recorded`, of `epochs` epochs) and return its
    result line; UsageError when its models are gone, as there is nothing to report on."""
    print(
        f"{model_dir} holds a finished run of this configuration ({epochs} epochs); its models are "
        "kept as they are. Pass --overwrite to train it again, or another --model_dir."
    )
    qat = recorded.get("flags", {}).get("qat_scope") is not None  # --qat: no training form
    models = ("model_qat.keras" if qat else "model_train.keras", "model_deploy.keras")
    missing = [n for n in models if not os.path.exists(os.path.join(model_dir, n))]
    if missing:
        raise UsageError(
            f"the finished run in {model_dir} lacks {', '.join(missing)}: pass --overwrite to "
            "train it again."
        )
    return recorded.get("accuracy") or recorded.get("miou", "")


def record_finished(model_dir, config, classes, result_key, result):
    """Mark the run finished with its result line; its backups are no longer needed."""
    write_json(
        os.path.join(model_dir, RUN_CONFIG),
        {"flags": config, "classes": classes, "finished": True, result_key: result},
    )
    shutil.rmtree(os.path.join(model_dir, "backup"), ignore_errors=True)
