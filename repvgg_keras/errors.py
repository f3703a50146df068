"""The bottom of the library: its error family and the wording every module shares.

Nothing here imports another `repvgg_keras` module, so any of them can raise these errors
without an import circle.
"""

import numbers
import os


class SourceError(ValueError):
    """A model source that cannot be read, or does not fit the model asked for."""


class SourceNotFoundError(SourceError, FileNotFoundError):
    """The named file does not exist (also a FileNotFoundError)."""


class MissingDependencyError(SourceError, ImportError):
    """Reading the source needs a package that is not installed (also an ImportError)."""


class ClassifierMismatchError(SourceError):
    """Everything fits but the classifier's class count: callers may drop the classifier."""


def check_classes(classes):
    """`classes` as an int >= 1, or a ValueError naming it (Keras's own error names `units`)."""
    if isinstance(classes, bool) or not isinstance(classes, numbers.Integral) or classes < 1:
        raise ValueError(
            f"classes must be a positive integer (the classifier's width), got {classes!r}."
        )
    return int(classes)


def shape_text(shape):
    """`shape` as messages write it, e.g. "[N, 32, 32, 3]": N for an unknown batch size, ? for
    any other unknown size, so every message shows a shape the same way."""
    sizes = (
        str(size) if size is not None else "N" if axis == 0 else "?"
        for axis, size in enumerate(shape)
    )
    return "[" + ", ".join(sizes) + "]"


def error_detail(error):
    """The first non-empty line of `error`'s message, or its type name when the message is
    empty (EOFError from an empty file has none), so a message never ends in "()"."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def check_not_empty(path):
    """Refuse a zero-byte file up front: readers' own errors for one are empty or misleading."""
    if os.path.getsize(path) == 0:
        raise SourceError(
            f"{path!r} is empty (0 bytes): an interrupted download, copy or save? "
            "Download, convert or save it again."
        )
