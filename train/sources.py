"""What both tasks' data loaders share: the dataset names each task takes, the one info record, the
one error for a dataset that cannot be found, and the cut of the splits to --train_take/--eval_take."""

import dataclasses
import sys

FOLDER = "folder:"  # classification: root/<split>/<class>/<image>
SEGMENTATION_FOLDER = "seg_folder:"  # segmentation: root/<split>/images|masks/<name>
SCENES = "fashion_mnist_scenes"  # segmentation scenes built offline from Fashion-MNIST
EVAL_SPLITS = ("validation", "test", "val")  # the evaluation split: the first of these present


class DatasetNotFound(FileNotFoundError):
    """A dataset name that names nothing usable here: the message says what to pass instead."""


@dataclasses.dataclass
class DatasetInfo:
    num_classes: int
    train_examples: int
    eval_examples: int
    eval_split: str
    class_names: list = None  # where the dataset names its classes (segmentation)


def check_task(name, task):
    """Raise DatasetNotFound for a dataset of the other task (by name, before anything is read)."""
    segmentation = name.startswith(SEGMENTATION_FOLDER) or name.partition("/")[0] == SCENES
    classification = name.startswith(FOLDER) or name.partition("/")[0] == "fashion_mnist"
    if task == "classification" and segmentation:
        raise DatasetNotFound(f"{name} is a segmentation dataset: add --task segmentation.")
    if task == "segmentation" and classification:
        raise DatasetNotFound(f"{name} is a classification dataset: leave out --task segmentation.")


def listing(names, limit=8):
    """`names` for a one-line message: the first `limit`, then how many more."""
    names = list(names)
    return ", ".join(names[:limit]) + (
        f" and {len(names) - limit} more" if len(names) > limit else ""
    )


def warning(message, warn=None):
    print(f"warning: {message}", file=warn or sys.stderr, flush=True)


def read_splits(read, info, train_take=None, eval_take=None, batch_size=None, warn=None):
    """(train, eval) datasets from `read(split)`, cut to the first N examples where asked;
    `info`'s example counts follow the cut. A count that cannot be honoured (a take larger than
    its split, a batch larger than the training examples) is named in one warning line each."""
    train_raw, eval_raw = read("train"), read(info.eval_split)
    for flag, take, split, attribute in (
        ("--train_take", train_take, "train", "train_examples"),
        ("--eval_take", eval_take, info.eval_split, "eval_examples"),
    ):
        if not take:
            continue
        available = getattr(info, attribute)
        if take > available:
            warning(
                f"{flag} {take} is more than the {available} examples of the {split} "
                f"split: using all {available}.",
                warn,
            )
        setattr(info, attribute, min(available, take))
    if train_take:
        train_raw = train_raw.take(train_take)
    if eval_take:
        eval_raw = eval_raw.take(eval_take)
    if batch_size and batch_size > info.train_examples:
        warning(
            f"--batch_size {batch_size} is more than the {info.train_examples} training "
            "examples: each batch holds some of them more than once.",
            warn,
        )
    return train_raw, eval_raw
