"""One named builder per row of `specs.SPECS`: `rk.RepVGG_A0(...)` is `rk.RepVGG("RepVGG_A0", ...)`.

Written out, as in keras.applications, so that IDEs, go-to-definition, mypy/pyright and `help()`
know them; `tests/test_builders.py` keeps them and the table in step. Widths are those of the
stem and stages 1-4. Each takes the arguments of `repvgg_keras.RepVGG` except `spec`.
"""

import inspect
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec

import keras

from repvgg_keras.models import RepVGG

P = ParamSpec("P")


def _takes_arguments_of(
    builder: Callable[Concatenate[Any, P], Any],
) -> Callable[[Callable[..., Any]], Callable[P, keras.Model]]:
    """Give the named builders `builder`'s arguments but its first (`spec`), so that type
    checkers catch a misspelt argument, and IDEs and `help()` list them, not `**kwargs`."""
    signature = inspect.signature(builder)
    arguments = list(signature.parameters.values())[1:]

    def decorate(named):
        named.__signature__ = signature.replace(parameters=arguments, return_annotation=keras.Model)
        named.__doc__ += "\n\nTakes the arguments of `repvgg_keras.RepVGG` except `spec`."
        return named

    return decorate


_variant = _takes_arguments_of(RepVGG)

__all__ = [
    "RepVGG_A0",
    "RepVGG_A1",
    "RepVGG_A2",
    "RepVGG_B0",
    "RepVGG_B1",
    "RepVGG_B1g2",
    "RepVGG_B1g4",
    "RepVGG_B2",
    "RepVGG_B2g2",
    "RepVGG_B2g4",
    "RepVGG_B3",
    "RepVGG_B3g2",
    "RepVGG_B3g4",
    "RepVGG_D2se",
]


@_variant
def RepVGG_A0(*args, **kwargs):
    """RepVGG_A0: blocks (2, 4, 14, 1), widths (48, 48, 96, 192, 1280), trained at 224 px."""
    return RepVGG("RepVGG_A0", *args, **kwargs)


@_variant
def RepVGG_A1(*args, **kwargs):
    """RepVGG_A1: blocks (2, 4, 14, 1), widths (64, 64, 128, 256, 1280), trained at 224 px."""
    return RepVGG("RepVGG_A1", *args, **kwargs)


@_variant
def RepVGG_A2(*args, **kwargs):
    """RepVGG_A2: blocks (2, 4, 14, 1), widths (64, 96, 192, 384, 1408), trained at 224 px."""
    return RepVGG("RepVGG_A2", *args, **kwargs)


@_variant
def RepVGG_B0(*args, **kwargs):
    """RepVGG_B0: blocks (4, 6, 16, 1), widths (64, 64, 128, 256, 1280), trained at 224 px."""
    return RepVGG("RepVGG_B0", *args, **kwargs)


@_variant
def RepVGG_B1(*args, **kwargs):
    """RepVGG_B1: blocks (4, 6, 16, 1), widths (64, 128, 256, 512, 2048), trained at 224 px."""
    return RepVGG("RepVGG_B1", *args, **kwargs)


@_variant
def RepVGG_B1g2(*args, **kwargs):
    """RepVGG_B1g2: blocks (4, 6, 16, 1), widths (64, 128, 256, 512, 2048), groups 2, trained at 224 px."""
    return RepVGG("RepVGG_B1g2", *args, **kwargs)


@_variant
def RepVGG_B1g4(*args, **kwargs):
    """RepVGG_B1g4: blocks (4, 6, 16, 1), widths (64, 128, 256, 512, 2048), groups 4, trained at 224 px."""
    return RepVGG("RepVGG_B1g4", *args, **kwargs)


@_variant
def RepVGG_B2(*args, **kwargs):
    """RepVGG_B2: blocks (4, 6, 16, 1), widths (64, 160, 320, 640, 2560), trained at 224 px."""
    return RepVGG("RepVGG_B2", *args, **kwargs)


@_variant
def RepVGG_B2g2(*args, **kwargs):
    """RepVGG_B2g2: blocks (4, 6, 16, 1), widths (64, 160, 320, 640, 2560), groups 2, trained at 224 px."""
    return RepVGG("RepVGG_B2g2", *args, **kwargs)


@_variant
def RepVGG_B2g4(*args, **kwargs):
    """RepVGG_B2g4: blocks (4, 6, 16, 1), widths (64, 160, 320, 640, 2560), groups 4, trained at 224 px."""
    return RepVGG("RepVGG_B2g4", *args, **kwargs)


@_variant
def RepVGG_B3(*args, **kwargs):
    """RepVGG_B3: blocks (4, 6, 16, 1), widths (64, 192, 384, 768, 2560), trained at 224 px."""
    return RepVGG("RepVGG_B3", *args, **kwargs)


@_variant
def RepVGG_B3g2(*args, **kwargs):
    """RepVGG_B3g2: blocks (4, 6, 16, 1), widths (64, 192, 384, 768, 2560), groups 2, trained at 224 px."""
    return RepVGG("RepVGG_B3g2", *args, **kwargs)


@_variant
def RepVGG_B3g4(*args, **kwargs):
    """RepVGG_B3g4: blocks (4, 6, 16, 1), widths (64, 192, 384, 768, 2560), groups 4, trained at 224 px."""
    return RepVGG("RepVGG_B3g4", *args, **kwargs)


@_variant
def RepVGG_D2se(*args, **kwargs):
    """RepVGG_D2se: blocks (8, 14, 24, 1), widths (64, 160, 320, 640, 2560), SE, trained at 320 px."""
    return RepVGG("RepVGG_D2se", *args, **kwargs)


BUILDERS = {name: globals()[name] for name in __all__}
