"""Training callbacks: checkpoints every N steps and every epoch, lr logging, curves, NaN stop,
progress lines for logs."""

import csv
import json
import os
import time

import keras


class BackupEveryStepsAndEpoch(keras.callbacks.BackupAndRestore):
    """BackupAndRestore that saves every `save_freq` steps *and* at the end of each epoch.

    On restart the same command resumes from the last backup: weights, optimizer state
    (so the lr schedule) and epoch. The backup before the last is kept too, so that workers
    killed while some had saved a step and others had not can all resume from one step:
    `agree` (set by the multi-worker loop) maps this worker's newest step to the newest step
    every worker holds.
    """

    def __init__(self, *args, agree=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.agree = agree
        # Keras loads only files named *.weights.h5.
        self._prev_weights_path = os.path.join(self.backup_dir, "previous.weights.h5")
        self._prev_training_metadata_path = os.path.join(
            self.backup_dir, "previous_training_metadata.json"
        )

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if self.save_freq != "epoch":
            self._save_model()

    def _save_model(self):
        """Write the new backup beside the last, then rename: the last becomes the previous.

        Keras writes the backup in place, so a kill during the write (tested) leaves a
        corrupt file and a run that cannot resume; a rename is atomic.
        """
        os.makedirs(self.backup_dir, exist_ok=True)
        staged_weights = self._weights_path + ".tmp.weights.h5"
        self.model.save_weights(staged_weights, overwrite=True)
        staged_metadata = self._training_metadata_path + ".tmp"
        with open(staged_metadata, "w") as f:
            json.dump(
                {
                    "epoch": self._current_epoch,
                    "batch": self._last_batch_seen,
                    "step": int(self.model.optimizer.iterations.numpy()),
                },
                f,
            )
        if os.path.exists(self._weights_path) and os.path.exists(self._training_metadata_path):
            os.replace(self._weights_path, self._prev_weights_path)
            os.replace(self._training_metadata_path, self._prev_training_metadata_path)
        os.replace(staged_weights, self._weights_path)
        os.replace(staged_metadata, self._training_metadata_path)

    def _generations(self):
        """[(step, epoch, weights path)] of the backups on disk, newest first."""
        found = []
        for weights, metadata in (
            (self._weights_path, self._training_metadata_path),
            (self._prev_weights_path, self._prev_training_metadata_path),
        ):
            if os.path.exists(weights) and os.path.exists(metadata):
                with open(metadata) as f:
                    record = json.load(f)
                found.append((record.get("step"), record["epoch"], weights))
        return found

    def on_train_begin(self, logs=None):
        generations = self._generations()
        held = ", ".join(str(g[0]) for g in generations)
        if self.agree is not None:
            target = self.agree((generations[0][0] or 0) if generations else 0)
            if target == 0:
                return  # some worker holds no backup: every worker starts afresh
            generations = [g for g in generations if g[0] == target]
        for _, epoch, weights in generations:
            if self.model.optimizer is not None and not self.model.optimizer.built:
                self.model.optimizer.build(self.model.trainable_variables)
            try:
                self.model.load_weights(weights)
            except OSError:  # a file cut short: try the previous backup
                continue
            self.model._initial_epoch = epoch
            return
        if self.agree is not None:
            raise ValueError(
                f"this worker's backups in {self.backup_dir} (steps {held or 'none'}) do not "
                f"include step {target}, the newest every worker holds: the workers' backup/ "
                "folders come from different runs. Rerun with --overwrite to start afresh."
            )
        if held:
            raise ValueError(
                f"the backups in {self.backup_dir} (steps {held}) cannot be read. Rerun with "
                "--overwrite to start afresh."
            )


class ResumeReporter(keras.callbacks.Callback):
    """Prints where training starts (after BackupAndRestore restored it) and records the step."""

    def __init__(self, step_file):
        super().__init__()
        self.step_file = step_file

    def on_train_begin(self, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        epoch = getattr(self.model, "_initial_epoch", 0) or 0
        if step:
            print(
                f"Resuming from the last checkpoint: epoch {epoch}, optimizer step {step}.",
                flush=True,
            )

    def on_train_batch_end(self, batch, logs=None):
        staged = self.step_file + ".tmp"
        with open(staged, "w") as f:
            f.write(str(int(self.model.optimizer.iterations.numpy())))
        os.replace(staged, self.step_file)


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
        done, steps = (
            batch + 1,
            self.params["steps"],
        )  # params: set by fit (and by train.distributed's loop)
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
    """Stops on a NaN/inf loss and remembers it, so the run can end with a clear message."""

    def __init__(self):
        super().__init__()
        self.stopped_at = None

    def on_batch_end(self, batch, logs=None):
        super().on_batch_end(batch, logs)
        if self.model.stop_training and self.stopped_at is None:
            self.stopped_at = int(self.model.optimizer.iterations.numpy())


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
    figure.savefig(png_path, dpi=80)
    plt.close(figure)
