"""Import timm for reference checks on machines where torchvision cannot be imported.

Used by the tests and by the benchmark's timm peer. timm imports torchvision (transforms,
datasets, ops.misc) at import time, but PyPI's torchvision does not import beside the CPU-only
torch wheel ("operator torchvision::nms does not exist"). RepVGG in timm needs none of it, so when the real
torchvision is missing we install a stand-in package whose every attribute is an inert
placeholder class. Nothing from it is called when building or running timm's RepVGG.
"""

import importlib.abc
import importlib.machinery
import sys
import types

import numpy as np


class _PlaceholderMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(name)


def _placeholder(name):
    def refuse(*args, **kwargs):
        raise RuntimeError(f"torchvision stand-in: {name} is not available in the tests.")

    return _PlaceholderMeta(name, (), {"__init__": refuse})


class _StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _placeholder(name)
        setattr(self, name, value)
        return value


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def import_timm():
    """Return the timm module, with the torchvision stand-in if needed."""
    try:
        import torchvision  # noqa: F401  (only whether it imports)
    except Exception:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _StandInFinder())
    import timm

    return timm


def randomize_torch_batchnorm(model, seed=0):
    """Trained-like BatchNorm statistics (gamma in [0.2, 0.5], non-zero means, varied variances)."""
    import torch

    generator = np.random.default_rng(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.from_numpy(generator.uniform(0.2, 0.5, n)))
                module.bias.copy_(torch.from_numpy(generator.normal(0, 0.1, n)))
                module.running_mean.copy_(torch.from_numpy(generator.normal(0, 0.1, n)))
                module.running_var.copy_(torch.from_numpy(generator.uniform(0.5, 1.5, n)))
    return model
