"""RepVGG for Keras 3: train with three-branch blocks, deploy as a plain 3x3 conv stack.

import repvgg_keras as rk
model = rk.RepVGG_A0()            # training form
plain = rk.to_deploy(model)       # fused, built-in layers only
model = rk.model_from_source("RepVGG_A0", "a0.safetensors")  # any source, in its own form
seg = rk.PSPNet(backbone="RepVGG_A0", classes=19)            # semantic segmentation
qat = rk.quantize_aware(model, calibration_images)           # int8 quantization-aware training
"""

from repvgg_keras import builders, preprocessing  # rk.preprocessing.preprocess_for_eval
from repvgg_keras.builders import *  # noqa: F403  RepVGG_A0 ... RepVGG_D2se, one per row of SPECS
from repvgg_keras.builders import BUILDERS as BUILDERS  # rk.BUILDERS: name -> builder
from repvgg_keras.deploy import is_deploy_form, to_deploy
from repvgg_keras.errors import SourceError
from repvgg_keras.from_source import model_from_source
from repvgg_keras.layers import PlainBlock, RepVGGBlock
from repvgg_keras.models import RepVGG, get_model, list_models, load_weights
from repvgg_keras.pspnet import PSPNet
from repvgg_keras.quantize import is_quantize_aware, quantize_aware, quantize_scope
from repvgg_keras.sources import read_source
from repvgg_keras.specs import SPECS, RepVGGSpec, get_spec

__version__ = "0.1.0"

__all__ = [
    "RepVGG",
    "RepVGGBlock",
    "RepVGGSpec",
    "PlainBlock",
    "PSPNet",
    "SPECS",
    "get_model",
    "get_spec",
    "is_deploy_form",
    "list_models",
    "load_weights",
    "model_from_source",
    "preprocessing",
    "is_quantize_aware",
    "quantize_aware",
    "quantize_scope",
    "read_source",
    "SourceError",
    "to_deploy",
]
__all__ += builders.__all__
