"""One trainer per model_dir: an exclusive lock on model_dir/train.lock, held until the process
ends; and the line a stopped trainer ends with. No TensorFlow here: `python -m train` claims the
folder (and answers a Ctrl-C) before it loads TensorFlow."""

import atexit
import errno
import fcntl
import json
import os
import signal
import socket

LOCK_FILE = "train.lock"


class ModelDirBusy(ValueError):
    pass


_held_locks = {}


def lock_model_dir(model_dir):
    """Claim `model_dir` for this process until it exits: an exclusive flock on model_dir/train.lock
    (pid and host written in it; the file is removed at a normal exit). Another live trainer
    holding it raises ModelDirBusy naming it; the kernel releases the lock of a process that is
    gone however it ended (SIGKILL too), so a lock file it left is taken over."""
    path = os.path.join(model_dir, LOCK_FILE)
    if path in _held_locks:
        return path
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read_holder(fd)
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise
            raise ModelDirBusy(
                f"--model_dir {model_dir} is in use by another trainer ({holder or 'unknown process'}): "
                "wait for it to end, or pass another --model_dir."
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file another process unlinked while we waited for it
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    _held_locks[path] = fd
    atexit.register(_unlock, path)
    return path


def _unlock(path):
    """Remove the lock file, then release it (a process waiting on the removed file retries)."""
    fd = _held_locks.pop(path, None)
    if fd is not None:
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)


def _read_holder(fd):
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def checkpointed_step(backup_dir):
    """The optimizer step of the newest backup in `backup_dir`, or None."""
    try:
        with open(os.path.join(backup_dir, "training_metadata.json")) as f:
            step = json.load(f).get("step")
    except (OSError, ValueError, AttributeError):  # AttributeError: not a JSON object
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def interrupted_message(signum, backup_dir):
    name = signal.Signals(signum).name
    step = checkpointed_step(backup_dir) if backup_dir else None
    if step is None:
        return f"interrupted by {name} before the first checkpoint: run the same command to start."
    return (
        f"interrupted by {name}: progress is checkpointed (optimizer step {step}, {backup_dir}); "
        "run the same command to resume."
    )
