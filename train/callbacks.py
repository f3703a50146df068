"""Training callbacks: checkpoints every N steps and every epoch, lr logging, curves, NaN stop,
progress lines for logs; `for_run`, the list a run trains with."""

import collections
import collections.abc
import csv
import io
import json
import os
import time

import keras
import numpy as np

from train import compat, staged


def for_run(model_dir, *, checkpoint_every, steps_per_epoch, agree, signals, progress_every):
    """The callbacks of a run writing into `model_dir`, in their order; returns them with the
    backup and the NaN stopper, which the trainer asks after `fit`. `signals` (a
    `train.guards.StopOnSignal`) saves through the backup; `progress_every` 0: no progress lines."""
    csv_path = os.path.join(model_dir, "training_log.csv")
    nan_stopper = NaNStopper()
    # Kept after fit: a run killed before it is recorded as finished resumes from the last backup
    # instead of training again; removed once run_config.json says finished.
    backup = BackupEveryStepsAndEpoch(
        os.path.join(model_dir, "backup"),
        save_freq=checkpoint_every,
        delete_checkpoint=False,
        agree=agree,
        steps_per_epoch=steps_per_epoch,
    )
    signals.backup = backup
    callbacks = [
        backup,
        ResumeReporter(os.path.join(model_dir, "last_step")),
        signals,  # after the two above: a signal saves the step they counted
        nan_stopper,
        LearningRateLogger(),
        CsvLog(csv_path),
        keras.callbacks.TensorBoard(os.path.join(model_dir, "logs"), update_freq="epoch"),
        CurvePlotter(csv_path, os.path.join(model_dir, "training_curves.png")),
    ]
    if progress_every > 0:
        callbacks.append(ProgressLines(progress_every))
    return callbacks, backup, nan_stopper


class BackupEveryStepsAndEpoch(compat.BackupAndRestore):
    """BackupAndRestore that saves every `save_freq` steps *and* at the end of each epoch.

    On restart the same command resumes from the last backup: weights, optimizer state
    (so the lr schedule), epoch and batch (`train.guards.fit_resumable` finishes a partial
    epoch first). Each backup records the batches trained (`batches`) and the optimizer
    step. The backup before the last is kept too, so that workers killed while some had
    saved a step and others had not can all resume from one step: `agree` (set by the
    multi-worker loop) maps this worker's newest step to the newest step every worker holds.
    `stop_after_epoch`: stop the fit at the end of that epoch (a resumed partial epoch).
    """

    def __init__(self, *args, agree=None, steps_per_epoch=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.agree = agree
        self.steps_per_epoch = steps_per_epoch
        self.stop_after_epoch = None
        self.batches_done = 0
        self._plan = None
        # Keras loads only files named *.weights.h5.
        self.previous_weights_path = os.path.join(self.backup_dir, "previous.weights.h5")
        self.previous_metadata_path = os.path.join(
            self.backup_dir, "previous_training_metadata.json"
        )

    def on_epoch_begin(self, epoch, logs=None):
        self.current_epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.batches_done += 1
        super().on_train_batch_end(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if self.save_freq != "epoch":
            self.save_backup()
        if self.stop_after_epoch == epoch:
            self.model.stop_training = True

    def save_backup(self):
        """Write the new backup beside the last, then rename: the last becomes the previous.

        Keras writes the backup in place, so a kill during the write (tested) leaves a
        corrupt file and a run that cannot resume; a rename is atomic. A write that fails (a
        full disk) leaves the backups as they were.
        """
        os.makedirs(self.backup_dir, exist_ok=True)
        metadata = {
            "epoch": self.current_epoch,
            "batches": self.batches_done,  # trained in all: epoch and batch to resume at
            "step": int(self.model.optimizer.iterations.numpy()),
        }
        with (
            staged.staging(self.weights_path) as staged_weights,
            staged.staging(self.metadata_path) as staged_metadata,
        ):
            self.model.save_weights(staged_weights, overwrite=True)
            with open(staged_metadata, "w") as f:
                json.dump(metadata, f)
            if os.path.exists(self.weights_path) and os.path.exists(self.metadata_path):
                os.replace(self.weights_path, self.previous_weights_path)
                os.replace(self.metadata_path, self.previous_metadata_path)

    def _generations(self):
        """[metadata with "weights" (its path) and "batches"] of the backups on disk, newest first."""
        found = []
        for weights, metadata in (
            (self.weights_path, self.metadata_path),
            (self.previous_weights_path, self.previous_metadata_path),
        ):
            if os.path.exists(weights) and os.path.exists(metadata):
                found.append(dict(_read_metadata(metadata), weights=weights))
        return found

    def plan(self):
        """Choose the backup the next fit starts from and return its metadata (None: start afresh).

        The newest backup whose file reads; with `agree`, the one at the newest step every
        worker holds (all workers call this together)."""
        generations = self._generations()
        held = ", ".join(str(g.get("step")) for g in generations)
        readable = [g for g in generations if _h5_readable(g["weights"])]
        if self.agree is not None:
            target = self.agree((readable[0].get("step") or 0) if readable else 0)
            if target == 0:  # some worker holds no backup: every worker starts afresh
                self._plan = ("fresh", None)
                return None
            readable = [g for g in readable if g.get("step") == target]
            if not readable:
                raise ValueError(
                    f"this worker's backups in {self.backup_dir} (steps {held or 'none'}) do not "
                    f"include step {target}, the newest every worker holds: the workers' backup/ "
                    "folders come from different runs. Rerun with --overwrite to start afresh."
                )
        if not readable and held:
            raise ValueError(
                f"the backups in {self.backup_dir} (steps {held}) cannot be read. Rerun with "
                "--overwrite to start afresh."
            )
        self._plan = ("resume", readable[0]) if readable else ("fresh", None)
        return self._plan[1]

    def on_train_begin(self, logs=None):
        if self._plan is None:
            self.plan()
        _, record = self._plan
        self._plan = None
        if record is None:
            return
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        mismatch = weights_file_mismatch(record["weights"], self.model)
        if mismatch:
            raise ValueError(
                f"the backup {record['weights']} {mismatch}: it was written for another model or "
                "data (did the class count change since this run started?). Use --overwrite to "
                "start over, or a new --model_dir."
            )
        try:
            self.model.load_weights(record["weights"])
        except OSError as error:
            raise ValueError(
                f"the backup {record['weights']} cannot be read ({error}). Rerun with "
                "--overwrite to start afresh."
            ) from None
        self.batches_done = record["batches"]
        self.current_epoch = (
            record["batches"] // self.steps_per_epoch if self.steps_per_epoch else record["epoch"]
        )
        compat.set_initial_epoch(self.model, self.current_epoch)


def _read_metadata(path):
    """A backup's training_metadata.json, its fields checked: one error naming the file and the
    field, never a traceback from a hand-edited or damaged file."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as error:
        problem = f"it is unreadable ({error})"
    else:
        problem = None if isinstance(record, dict) else "it is not a JSON object"
        for field in ("epoch", "batches", "step"):  # "batches" always, the others when there
            value = record.get(field) if problem is None else 0
            if value is None and field != "batches" and field not in record:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                problem = f'its field "{field}" is {json.dumps(value)[:40]}, not a count'
                break
    if problem:
        raise ValueError(
            f"{path}: {problem}. Pass --overwrite to start over, or remove the backup folder "
            "(the run then starts again from its first step)."
        )
    return record


def weights_file_mismatch(path, model, part=False):
    """How the layer weights in the Keras weights file `path` differ from `model`'s, as a phrase
    ("holds a 2-class classifier, the model has 3 classes"), or None when their shapes agree
    (`part`: when the file holds at least the model's, e.g. a classifier's for its backbone).
    Read with h5py, so that no Keras message (which prints weight values) reaches the user."""
    import h5py

    shapes = []
    try:
        with h5py.File(path, "r") as f:
            if not isinstance(f.get("layers"), h5py.Group):
                return None
            f["layers"].visititems(
                lambda name, item: (
                    shapes.append(tuple(item.shape)) if isinstance(item, h5py.Dataset) else None
                )
            )
    except Exception:  # unreadable: loading says so
        return None
    theirs = collections.Counter(shapes)
    ours = collections.Counter(tuple(w.shape) for w in model.weights)
    if theirs == ours or (part and not ours - theirs):
        return None
    only_theirs, only_ours = (
        sorted((counts - other).elements(), key=lambda s: (-len(s), s))
        for counts, other in ((theirs, ours), (ours, theirs))
    )
    outputs = model.output_shape if isinstance(model.output_shape, list) else [model.output_shape]
    classes = outputs[0][-1]
    widths = {s[-1] for s in only_theirs if s}
    if (
        len(widths) == 1
        and all(s and s[-1] == classes for s in only_ours)
        and collections.Counter(s[:-1] for s in only_theirs)
        == collections.Counter(s[:-1] for s in only_ours)
    ):
        return f"holds a {widths.pop()}-class classifier, the model has {classes} classes"
    if part:
        return (
            f"lacks {len(only_ours)} of the {sum(ours.values())} weight tensors of the model "
            f"(e.g. one of shape {only_ours[0]})"
        )
    example = (
        f" (e.g. file {only_theirs[0]}, model {only_ours[0]})" if only_theirs and only_ours else ""
    )
    return (
        f"holds {len(shapes)} weight tensors shaped for another model: {len(only_theirs)} of "
        f"them do not fit this one{example}"
    )


def _h5_readable(path):
    """Whether every dataset of an HDF5 file reads (a file cut short or corrupted does not)."""
    import h5py

    def read(name, item):
        if isinstance(item, h5py.Dataset):
            item[()]

    try:
        with h5py.File(path, "r") as f:
            f.visititems(read)
        return True
    except Exception:  # h5py raises OSError, KeyError, RuntimeError... on damaged files
        return False


class ResumeReporter(keras.callbacks.Callback):
    """Records the optimizer step after each batch in `step_file` (train.guards.fit_resumable
    announces where a run resumes)."""

    def __init__(self, step_file):
        super().__init__()
        self.step_file = step_file

    def on_train_batch_end(self, batch, logs=None):
        staged.write_text(self.step_file, str(int(self.model.optimizer.iterations.numpy())))


class ProgressLines(keras.callbacks.Callback):
    """One line every `every_seconds` inside an epoch (step, loss, accuracy, s/step, time left).

    `--verbose 2` prints only at epoch ends, and a long epoch (a fine-tune at 224px on a CPU)
    would be silent for an hour; a progress bar (`--verbose 1`) floods log files.
    """

    def __init__(self, every_seconds=60.0, clock=time.monotonic):
        super().__init__()
        self.every_seconds, self.clock = every_seconds, clock

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._started = epoch, self.clock()
        self._last_print = self._started

    def on_train_batch_end(self, batch, logs=None):
        now = self.clock()
        if now - self._last_print < self.every_seconds:
            return
        self._last_print = now
        # params: set by fit (and by train.distributed's loop).
        done, steps = batch + 1, self.params["steps"]
        per_step = (now - self._started) / done
        metrics = "".join(
            f", {k} {float(v):.4f}" for k, v in (logs or {}).items() if k in ("loss", "accuracy")
        )
        print(
            f"epoch {self._epoch + 1}/{self.params['epochs']} step {done}/{steps}{metrics}, "
            f"{per_step:.2f} s/step, epoch ends in {per_step * (steps - done) / 60:.1f} min",
            flush=True,
        )


class LearningRateLogger(keras.callbacks.Callback):
    """Adds the current learning rate to the epoch logs (CSV, TensorBoard, plot)."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            lr = self.model.optimizer.learning_rate
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(lr))


class NaNStopper(keras.callbacks.TerminateOnNaN):
    """Stops on a NaN/inf training loss after a batch, or a NaN/inf training or validation loss at
    an epoch end (weights or BatchNorm statistics that overflowed while the batch loss stayed
    finite), and remembers where and what, so the run can end with a clear message."""

    def __init__(self):
        super().__init__()
        self.stopped_at = None
        self.what = None

    def on_batch_end(self, batch, logs=None):
        super().on_batch_end(batch, logs)
        if self.model.stop_training and self.stopped_at is None:
            self.stopped_at = int(self.model.optimizer.iterations.numpy())
            self.what = f"the training loss became {float((logs or {}).get('loss', 'nan'))}"

    def on_epoch_end(self, epoch, logs=None):
        for key, name in (("loss", "training"), ("val_loss", "validation")):
            value = (logs or {}).get(key)
            if value is None or self.stopped_at is not None:
                continue
            if not np.isfinite(float(value)):
                self.stopped_at = int(self.model.optimizer.iterations.numpy())
                self.what = f"the {name} loss became {float(value)} after epoch {epoch + 1}"
                self.model.stop_training = True


class CsvLog(keras.callbacks.Callback):
    """One row per epoch in a CSV file (the columns of keras.callbacks.CSVLogger, appending to
    the file a resumed run left), the file rewritten through a staged copy each epoch: a full
    disk or a kill leaves the rows written before, never a cut row."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        try:
            with open(self.path, newline="") as f:
                text = f.read()
        except FileNotFoundError:
            text = ""
        header = next(csv.reader(io.StringIO(text)), None) if text.strip() else None
        if header:
            keys = header[1:]
        else:
            keys = sorted(logs)
            if keys and not any(k.startswith("val_") for k in keys):
                keys += [f"val_{k}" for k in keys]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=["epoch", *keys])
        if not header:
            writer.writeheader()
        writer.writerow({"epoch": epoch, **{k: _csv_value(logs.get(k, "NA")) for k in keys}})
        if text and not text.endswith("\n"):
            text += "\r\n"
        staged.write_text(self.path, text + out.getvalue())


def _csv_value(value):
    if isinstance(value, str) or (isinstance(value, np.ndarray) and value.ndim == 0):
        return value
    if isinstance(value, collections.abc.Iterable):
        return f"[{', '.join(map(str, value))}]"
    return value


class CurvePlotter(keras.callbacks.Callback):
    """Writes training_curves.png (loss, accuracy or mean IoU, lr per epoch) from the CSV log."""

    def __init__(self, csv_path, png_path):
        super().__init__()
        self.csv_path, self.png_path = csv_path, png_path

    def on_epoch_end(self, epoch, logs=None):
        plot_curves(self.csv_path, self.png_path)


def plot_curves(csv_path, png_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.exists(csv_path):
        return
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    epochs = [int(r["epoch"]) + 1 for r in rows]
    # Segmentation logs its main output's scores as logits_miou (logits_* when there is an aux head).
    score = next((k for k in ("accuracy", "miou", "logits_miou") if k in rows[0]), "accuracy")
    panels = [
        ("loss", ["loss", "val_loss"]),
        ("mean IoU" if score.endswith("miou") else "accuracy", [score, f"val_{score}"]),
        ("learning rate", ["learning_rate"]),
    ]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for axis, (title, keys) in zip(axes, panels):
        for key in keys:
            if key in rows[0] and rows[0][key] != "":
                axis.plot(epochs, [float(r[key]) for r in rows], marker="o", label=key)
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.legend()
    figure.tight_layout()
    try:
        with staged.staging(png_path) as staged_png:
            figure.savefig(staged_png, dpi=80, format="png")
    finally:
        plt.close(figure)
