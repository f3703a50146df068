"""The private Keras API the trainer relies on, one name per use.

Written for keras 3.15 (tensorflow 2.21). tests/test_compat.py touches every private name used
here, so an upgrade that removes or renames one fails there, naming what to update.
"""

import keras


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """keras.callbacks.BackupAndRestore with the private parts a subclass builds on under public
    names: `save_backup` (what it calls to save), its two file paths and its epoch count."""

    # BackupAndRestore._save_model: what its epoch and batch ends call to save (Keras 3.15).
    def _save_model(self):
        self.save_backup()

    def save_backup(self):
        """Write a backup (Keras's own writing unless a subclass overrides this)."""
        super()._save_model()

    # BackupAndRestore._weights_path: where it writes the weights, latest.weights.h5 (Keras 3.15).
    @property
    def weights_path(self):
        return self._weights_path

    # BackupAndRestore._training_metadata_path: where it writes training_metadata.json (Keras 3.15).
    @property
    def metadata_path(self):
        return self._training_metadata_path

    # BackupAndRestore._current_epoch: the epoch to resume at; on_epoch_end sets it (Keras 3.15).
    @property
    def current_epoch(self):
        return self._current_epoch

    @current_epoch.setter
    def current_epoch(self, epoch):
        self._current_epoch = epoch


def initial_epoch(model):
    """The epoch `fit` starts at, as a resumed backup set it (0 when none did)."""
    # Model._initial_epoch: where BackupAndRestore tells fit to start (Keras 3.15).
    return getattr(model, "_initial_epoch", 0) or 0


def set_initial_epoch(model, epoch):
    """Make the next `fit` of `model` start at `epoch`, as BackupAndRestore does when it resumes."""
    # Model._initial_epoch: fit reads it over its own `initial_epoch` argument (Keras 3.15).
    model._initial_epoch = epoch


def symbolic_build(model, data_batch):
    """Create the model's variables, compiled metrics, loss trackers and optimizer from the
    element spec `data_batch`, as `fit` does before its first step."""
    # Trainer._symbolic_build: no public call builds metrics and optimizer as fit does (Keras 3.15).
    model._symbolic_build(data_batch=data_batch)
