"""Every file the trainer writes (run files, checkpoints, models, figures, the Fashion-MNIST cache)
goes through `staging`: written beside its target, then renamed over it. A full disk or a kill
mid-write leaves the previous file whole (a resumable run), never half a checkpoint or model under
the final name. No TensorFlow here (nor repvgg_keras, which loads it): `python -m train` claims its
folder before TensorFlow loads. Exported artifacts, verified before they take their name, go
through export/atomic.py instead."""

import contextlib
import errno
import gc
import os
import sys


class DiskFullError(ValueError):
    """No space left where a file is written: one `error:` line (a ValueError, as UsageError)."""

    def __init__(self, path):
        super().__init__(disk_full_message(path))
        self.path = path


def disk_full_message(path):
    return (
        f"no space left on the device writing {path}: free space there (or pass another "
        "--model_dir), then run the same command to resume; the files written before are kept."
    )


def is_disk_full(error):
    """Whether `error` (or what caused it) is ENOSPC/EDQUOT, however the library wrapped it
    (h5py and TensorFlow put the errno in their message)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def staged_path(path, unique=False):
    """The file `path` is written to first: hidden, beside it (same file system, so the rename is
    atomic), its name ending as `path`'s does (Keras picks the format from the suffix). `unique`
    adds the process id, for files that several processes may write at once (a shared cache)."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".tmp-{os.getpid()}-{name}" if unique else f".tmp-{name}")


@contextlib.contextmanager
def staging(path, unique=False):
    """Yield the staged path to write `path`'s content to; renamed to `path` when the block ends
    without error. On any error the staged file is removed and `path` stays as it was; a full
    disk raises DiskFullError naming `path`. Nest two to replace two files together."""
    staged = staged_path(path, unique)
    try:
        yield staged
        os.replace(staged, path)
    except BaseException as error:
        _close_h5(staged)
        try:
            os.remove(staged)
        except OSError:
            pass
        if isinstance(error, Exception) and is_disk_full(error):
            raise DiskFullError(path) from None
        raise


def write_text(path, text):
    """`text` into `path` through a staged file."""
    with staging(path) as staged, open(staged, "w") as f:
        f.write(text)


def _close_h5(path):
    """Close the h5py files still open on `path`. Keras's save_weights does not close its file
    when a write fails: the file is closed later by h5py's destructor, whose flush fails again,
    printing a traceback from the destructor, and at interpreter exit the process can die of a
    segmentation fault. Closed here (its flush errors swallowed), nothing is left to fail."""
    h5py = sys.modules.get("h5py")
    if h5py is None:
        return
    target = os.path.abspath(path)
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        for obj in gc.get_objects():
            if not issubclass(type(obj), h5py.File):  # type(): lazy modules import on isinstance
                continue
            try:
                if obj.id.valid and os.path.abspath(obj.filename) == target:
                    for _ in range(3):  # a close whose flush fails leaves ids open: again
                        try:
                            obj.close()
                        except Exception:
                            pass
                        if not obj.id.valid:
                            break
            except Exception:
                continue
    finally:
        sys.unraisablehook = hook
