"""The bottom of the library: its error family and the wording every module shares.

Nothing here imports another `repvgg_keras` module, so any of them can raise these errors
without an import circle.
"""

import numbers


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
