"""An export's target: claimed first, staged beside it, moved in only once the artifact verified.

`atomic_output` stages and moves; `verified_export` is the one sequence every exporter runs in
it: write the artifact, run it on the verification images, compare with the Keras model,
then move it into place.
"""

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
import time

import keras
import numpy as np

import repvgg_keras as rk
from export import verify


def refuse_dangling_link(path, flag="--output"):
    """ValueError if `path`, or the first of its parents that exists, is a symbolic link to
    nothing. Links are not followed: the final move claims or replaces the name `path` itself,
    so the link would read as an export that appeared meanwhile (or, with overwrite, be
    replaced) while the user meant its missing target (an unmounted disk, a moved folder)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        if os.path.islink(probe):
            raise ValueError(
                f"{probe} is a symlink to {os.readlink(probe)}, which does not exist: remove it "
                f"or pass another {flag}."
            )
        if os.path.dirname(probe) == probe:
            return
        probe = os.path.dirname(probe)


def check_output(path, overwrite=False, flag="--output"):
    """Refuse an output path that cannot be written before the model is loaded and converted."""
    path = os.path.abspath(path)
    refuse_dangling_link(path, flag)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(
            f"{path} already exists: pass --overwrite to replace it (after the new export verifies)."
        )
    ancestor = os.path.dirname(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ValueError(f"Cannot write {flag} {path}: {ancestor} is a file, not a directory.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(
            f"Cannot write {flag} {path}: {ancestor} is not writable. Choose another location."
        )


STAGING_STALE_AFTER_S = 24 * 3600
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def _newest_mtime(directory):
    newest = os.path.getmtime(directory)
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            try:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            except OSError:
                pass
    return newest


def remove_stale_staging(path):
    """Remove staging directories an earlier export of `path` left behind when it was killed.

    Rule: a `.NAME.tmp-HOST-PID-*` directory goes when it was made on this host by a process
    that no longer runs; any other (another host's, or the unnamed `.NAME.tmp-*` of older
    versions) only when nothing in it changed for STAGING_STALE_AFTER_S (a day), so a
    concurrent export, here or on another machine sharing the directory, is never touched.
    An export killed between moving the previous artifact aside and moving the new one in
    left the previous one inside as `previous`: it is put back first when `path` is missing.
    """
    parent, base = os.path.split(os.path.abspath(path))
    named = re.compile(rf"^\.{re.escape(base)}\.tmp-([0-9a-f]{{8}})-(\d+)-[a-z0-9_]+$")
    unnamed = re.compile(rf"^\.{re.escape(base)}\.tmp-[a-z0-9_]{{8}}$")
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in entries:
        match = named.match(entry)
        if not match and not unnamed.match(entry):
            continue
        full = os.path.join(parent, entry)
        try:
            if os.path.islink(full) or not os.path.isdir(full):
                continue
            ours = match is not None and match.group(1) == _HOST
            if ours and _process_alive(int(match.group(2))):
                continue
            if not ours and time.time() - _newest_mtime(full) < STAGING_STALE_AFTER_S:
                continue
            previous = os.path.join(full, "previous")
            if os.path.exists(previous) and not os.path.exists(path):
                os.replace(previous, path)
            shutil.rmtree(full)
        except OSError:
            continue  # best effort: a leftover we cannot remove must not stop this export


def _exists_error(path, meanwhile=False):
    when = " (written by another export while this one ran)" if meanwhile else ""
    return FileExistsError(
        f"{path} already exists{when}: pass --overwrite to replace it (after the new export "
        "verifies); nothing was written."
    )


def _claim(staged, path):
    """Move `staged` to `path` only if `path` does not exist at that moment (atomic), else
    FileExistsError: of concurrent writers without --overwrite, exactly one succeeds.

    A file is hard-linked (link(2) fails with EEXIST, whoever came first), then its staged
    name removed. A directory is renamed: rename(2) onto a missing path is atomic and onto a
    non-empty directory (another export's) or a file fails; only an empty directory could
    be replaced, and one present now is refused first."""
    already = lambda: _exists_error(path, meanwhile=True)
    if os.path.isdir(staged):
        if os.path.lexists(path):
            raise already()
        try:
            os.rename(staged, path)
        except OSError as error:
            if error.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise already() from None
            raise
        return
    try:
        os.link(staged, path)
    except FileExistsError:
        raise already() from None
    except OSError:  # a file system without hard links: claim the name, then fill it atomically
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            raise already() from None
        os.replace(staged, path)
        return
    os.unlink(staged)


def _replace(staged, path, workdir):
    """Move `staged` to `path`, replacing what is there: the last of concurrent writers wins.

    A file is replaced in one rename(2). A directory cannot be renamed onto a non-empty one:
    what is at `path` is first moved into `workdir` (the first one as `previous`, put back if
    the move fails), and again if another export put its own there in between."""
    if not os.path.isdir(staged):
        os.replace(staged, path)
        return
    previous = os.path.join(workdir, "previous")
    for attempt in range(100):
        aside = previous if attempt == 0 else os.path.join(workdir, f"displaced-{attempt}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            pass  # nothing there (or another export moved it away first)
        try:
            os.rename(staged, path)
            return
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                if os.path.lexists(previous) and not os.path.lexists(path):
                    os.rename(previous, path)
                raise
    raise OSError(errno.EBUSY, f"{path} kept being replaced by other exports")


@contextlib.contextmanager
def atomic_output(path, overwrite=False):
    """Yield a temporary path beside `path`; move it into place only if the block succeeds.

    An existing `path` is refused unless `overwrite`, both before the work and at the final
    move, which claims `path` atomically (`_claim`): of concurrent exports to one target
    without `overwrite`, one succeeds and the others get FileExistsError. With `overwrite`
    the last one wins (`_replace`). The previous artifact is replaced only after the new one
    was written and verified, so a failure never leaves a half-written artifact or destroys
    the previous one. The staging directory `.NAME.tmp-HOST-PID-*` names its owner, so a
    later export removes it if this process is killed (remove_stale_staging). A `path` that
    is a symbolic link to nothing is refused (`refuse_dangling_link`).
    """
    path = os.path.abspath(path)
    refuse_dangling_link(path)
    remove_stale_staging(path)  # first: it may put back a previous artifact a killed export held
    if os.path.exists(path) and not overwrite:
        raise _exists_error(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    workdir = tempfile.mkdtemp(
        prefix=f".{os.path.basename(path)}.tmp-{_HOST}-{os.getpid()}-", dir=parent
    )
    staged = os.path.join(workdir, os.path.basename(path))
    try:
        yield staged
        if not os.path.exists(staged):
            raise RuntimeError(f"The exporter wrote nothing to {staged}.")
        if overwrite:
            _replace(staged, path, workdir)
        else:
            _claim(staged, path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# Below this many free bytes beside the staged artifact, a write that failed failed for space.
DISK_FULL_BELOW = 1 << 20


@contextlib.contextmanager
def disk_full_named(output, staged):
    """Turn a failed write into OSError(ENOSPC) naming `output` when the disk is full: an OSError
    with errno ENOSPC or EDQUOT, or any other error (converters report a full disk opaquely:
    OpenVINO's "basic_ios::clear: iostream error") while less than DISK_FULL_BELOW bytes are
    free where `staged` is written. Other errors pass unchanged."""
    try:
        yield
    except Exception as error:
        full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
        if not full:
            try:
                full = shutil.disk_usage(os.path.dirname(staged)).free < DISK_FULL_BELOW
            except OSError:
                pass
        if not full:
            raise
        raise OSError(errno.ENOSPC, "no space left on device", output) from error


def verified_export(
    output,
    write,
    run,
    reference,
    verify_inputs,
    *,
    precision,
    overwrite=False,
    tolerance=None,
    min_agreement=None,
    after=None,
    remedy=None,
):
    """Write an artifact to `output` only once it reproduces the Keras model `reference`.

    Inside `atomic_output(output, overwrite)`: `write(staged)` writes the artifact at the staged
    path; `run(staged)` yields one `(artifact, logits, classes)` per check (the name its report
    carries, its logits on the verification images, and its class-index output or None), each
    compared with `reference(verify_inputs)` as it comes (`verify.compare` at `precision`, with
    `tolerance`/`min_agreement`, then `verify.check`, and `verify.check_classes` where classes
    came back); `after(staged, report)`, if given, runs once every check passed, before the
    move. Returns the Report, the weakest of several (`verify.weakest`); VerificationError
    (nothing written, `remedy` as its advice when given) when one falls short.
    """
    with atomic_output(output, overwrite=overwrite) as staged:
        with disk_full_named(output, staged):
            write(staged)
        expected = np.asarray(reference(verify_inputs, training=False))
        if (
            remedy is None
            and isinstance(reference, keras.Model)
            and rk.is_quantize_aware(reference)
        ):
            remedy = verify.QAT_REMEDY
        size = verify.directory_size_mb(staged)
        reports = []
        for artifact, logits, classes in run(staged):
            report = verify.compare(
                artifact, precision, logits, expected, size, tolerance, min_agreement
            )
            reports.append(verify.check(report, remedy))
            if classes is not None:
                verify.check_classes(artifact, classes, logits)
        report = verify.weakest(reports)
        if after is not None:
            with disk_full_named(output, staged):
                after(staged, report)
    return report


def file_checks(artifact, opener, feed, segmentation=False):
    """The `run` of `verified_export` for a one-file artifact that `opener` (`runners.onnxruntime`,
    `runners.tflite`) opens: its logits on `feed`, and for a `segmentation` model its `classes`
    output as well."""

    def run(staged):
        if segmentation:
            logits, classes = opener(staged, output=("logits", "classes"))(feed)
            return [(artifact, logits, classes)]
        return [(artifact, opener(staged)(feed), None)]

    return run
