"""The model under test: both Keras forms with the same weights as timm's peer, plus images.

Without --weights, the weights come from timm's own RepVGG (random init, trained-like
BatchNorm statistics) through our checkpoint importer, so the Keras and PyTorch models
compute the same function and their outputs can be compared. With --weights (a trained
.keras/.weights.h5/.pth/.safetensors file), timm gets the file only if it is a
checkpoint it can read; otherwise its peer runs with its own weights and is not compared.
"""

import dataclasses
import os

import numpy as np

import repvgg_keras as rk
from repvgg_keras import preprocessing

TIMM_NAMES = {name: name.lower() for name in rk.list_models()}  # RepVGG_A0 -> repvgg_a0


@dataclasses.dataclass
class Subject:
    name: str
    image_size: int
    classes: int
    keras_train: object
    keras_deploy: object
    images: np.ndarray  # normalised float32 NHWC real images: the agreement check
    calibration: np.ndarray  # other real images of the same source: int8 calibration
    workdir: str
    weights: str  # where the weights came from, for the records
    timm_model: object = None  # training form, or None without torch/timm
    timm_matches: bool = False  # timm holds the same weights as the Keras model

    @property
    def macs(self):
        """Multiply-adds of one image through the deploy form (convs and the classifier)."""
        from bench.flops import multiply_adds

        return multiply_adds(self.keras_deploy)


def import_timm():
    """timm (with the torchvision stand-in where torchvision cannot load), or None."""
    try:
        from bench.timm_import import import_timm as load

        return load()
    except ImportError:
        return None


def build(name, image_size, classes, weights, images_source, image_count, workdir):
    """A Subject for variant `name`. `images_source` as in export.images.load_images."""
    from export import images, loading

    os.makedirs(workdir, exist_ok=True)
    timm = import_timm()
    timm_model, timm_matches = None, False
    if timm is not None:
        from bench.timm_import import randomize_torch_batchnorm

        timm_model = timm.create_model(TIMM_NAMES[name], num_classes=classes).eval()
        if weights is None:
            randomize_torch_batchnorm(timm_model)
    if weights is None and timm_model is not None:
        from safetensors.torch import save_file

        path = os.path.join(workdir, f"{name}_timm.safetensors")
        save_file({k: v.contiguous() for k, v in timm_model.state_dict().items()}, path)
        keras_train = loading.load_model(name, path, image_size, classes)
        source, timm_matches = "timm init (random, trained-like BN statistics)", True
    elif weights is None:
        from repvgg_keras.parity import randomize_batchnorm

        keras_train = randomize_batchnorm(loading.load_model(name, None, image_size, classes))
        source = "random (trained-like BN statistics)"
    else:
        read = rk.read_source(weights)  # once: the Keras model and timm's peer share the tensors
        keras_train = loading.load_model(name, read, image_size, classes)
        source = weights
        if timm_model is not None and read.format == "timm-train":
            import torch

            timm_model.load_state_dict({k: torch.from_numpy(v) for k, v in read.state.items()})
            timm_matches = True
    if rk.is_deploy_form(keras_train):
        raise ValueError(
            f"--weights {weights!r} holds a deploy-form model: the benchmark needs the training "
            "form (it measures both)."
        )
    keras_deploy = rk.to_deploy(keras_train)
    pixels = images.load_images(images_source, 2 * image_count, image_size, image_size, 3)
    normalised = np.asarray(
        preprocessing.normalize(pixels.astype(np.float32), "imagenet", 3), np.float32
    )
    # Calibrate int8 on other images than those the agreement is measured on.
    return Subject(
        name,
        image_size,
        classes,
        keras_train,
        keras_deploy,
        normalised[image_count:],
        normalised[:image_count],
        workdir,
        source,
        timm_model,
        timm_matches,
    )
