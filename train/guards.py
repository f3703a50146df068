"""What keeps a run honest: it resumes where it stopped, stops cleanly on SIGINT/SIGTERM, owns its
model_dir alone, and is finished only with a model that computes finite numbers.

- `fit_resumable` runs `fit` so that a run resumed from a backup taken mid-epoch finishes that epoch
  (the batches it had left) before the next: the run ends at its planned optimizer step,
  epochs x steps_per_epoch, wherever it was stopped.
- `StopOnSignal` turns SIGINT and SIGTERM into a backup at the next batch end and an `Interrupted`
  exception, which the command reports in one line (a second signal stops at once).
- `train.lock.lock_model_dir` claims a model_dir for one process.
- `divergence` names what is not finite in a trained model: its weights and statistics, and its
  evaluation loss (computed from its outputs).
"""

import signal

import keras
import numpy as np


def fit_resumable(fit, backup, *, epochs, steps_per_epoch, stopped=lambda: False, announce=print):
    """Call `fit(steps_per_epoch)` (which trains with `backup` among its callbacks) until the run is
    trained. A backup taken mid-epoch resumes at its batch: the rest of that epoch is one `fit` of
    the batches left (the backup stops it at the epoch's end, after its validation and epoch-end
    backup), then the remaining epochs follow unless `stopped()` (a NaN). Returns False when a
    fit stopped early."""
    record = backup.plan()
    done = record["batches"] if record else 0
    epoch, batch = divmod(done, steps_per_epoch)
    if record:
        where = (
            f"epoch {epoch + 1}, optimizer step {record.get('step', done)}, batch {batch} of "
            f"{steps_per_epoch}"
            if epoch < epochs
            else f"all {epochs} epochs trained, optimizer step {record.get('step', done)}"
        )
        announce(f"Resuming from the last checkpoint: {where}.", flush=True)
    if batch and epoch < epochs:
        backup.stop_after_epoch = epoch
        try:
            fit(steps_per_epoch - batch)
        finally:
            backup.stop_after_epoch = None
        if backup.batches_done != (epoch + 1) * steps_per_epoch or stopped():
            return False
        backup.plan()  # the epoch-end backup: undoes the EMA swap that ended the partial fit
    fit(steps_per_epoch)
    return backup.batches_done >= epochs * steps_per_epoch


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; training progress is in the backup (a BaseException, as
    KeyboardInterrupt: no `except Exception` swallows it)."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopOnSignal(keras.callbacks.Callback):
    """SIGINT/SIGTERM during `fit`: at the next training batch end (or validation batch end) write
    a backup of that exact step and raise `Interrupted`; outside `fit`, or on a second signal,
    raise `Interrupted` at once. Place it after the backup callback in the list."""

    def __init__(self, backup=None):
        super().__init__()
        self.backup = backup
        self.backup_dir = None  # where the command says progress is kept
        self.received = None
        self.in_fit = False

    def install(self):
        """Handle SIGINT and SIGTERM, unless ignored (a background job of a script ignores SIGINT)."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not signal.SIG_IGN:
                signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        first = self.received is None
        if first:
            self.received = signum
        if not first or not self.in_fit:
            # Raised where the program is; where that swallows it (a gc callback), `received`
            # stays set and the next fit stops at its start or at its next batch.
            raise Interrupted(signum)

    def on_train_begin(self, logs=None):
        if self.received is not None:
            raise Interrupted(self.received)
        self.in_fit = True

    def on_train_end(self, logs=None):
        self.in_fit = False

    def _stop_here(self):
        if self.received is not None:
            self.in_fit = False
            self.backup.save_backup()
            raise Interrupted(self.received)

    def on_train_batch_end(self, batch, logs=None):
        self._stop_here()

    def on_test_batch_end(self, batch, logs=None):
        if self.in_fit:
            self._stop_here()


SIGNALS = StopOnSignal()  # python -m train installs it at start; train() gives it the backup


def not_finite_weights(model):
    """Paths of the model's variables (weights, BatchNorm statistics) holding NaN or inf."""
    return [
        variable.path
        for variable in model.weights
        if not np.all(np.isfinite(keras.ops.convert_to_numpy(variable).astype("float64")))
    ]


def divergence(model, *, val_loss=None):
    """A phrase saying what in a trained model is not finite, or None when all is finite."""
    bad = not_finite_weights(model)
    problems = []
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        problems.append(f"{len(bad)} of its variables hold NaN or inf ({shown})")
    if val_loss is not None and not np.isfinite(val_loss):
        problems.append(f"its evaluation loss is {val_loss}")
    return "; ".join(problems) or None
