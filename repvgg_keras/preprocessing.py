"""Input normalisation that matches each set of weights, as data and as built-in layers."""

import keras
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name -> (mean, std) applied to pixels scaled to [0, 1]; images arrive as 0..255 RGB.
MODES = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "unit": ((0.0,), (1.0,)),  # just /255
    "none": None,  # the model takes what the serving client sends
}


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"Unknown preprocessing {mode!r}: choose one of {', '.join(MODES)}.")
    return MODES[mode]


def scale_and_offset(mode="imagenet", channels=3):
    """(scale, offset) float32 arrays with model_input = pixels * scale + offset, or None."""
    stats = _check_mode(mode)
    if stats is None:
        return None
    mean, std = _broadcast(stats, channels)
    return (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)


def normalize(pixels, mode="imagenet", channels=3):
    """0..255 pixels (numpy or any tensor) -> model input for the given preprocessing mode."""
    affine = scale_and_offset(mode, channels)
    if affine is None:
        return pixels
    scale, offset = affine
    return pixels * scale + offset


def _broadcast(stats, channels):
    mean, std = (np.resize(np.asarray(v, np.float32), channels) for v in stats)
    if channels == 1 and len(stats[0]) == 3:  # grayscale: use the channel average
        mean, std = np.float32([np.mean(stats[0])]), np.float32([np.mean(stats[1])])
    return mean, std


def normalization_layer(mode="imagenet", channels=3, name="preprocessing"):
    """A built-in Keras layer doing `normalize` inside a model (0..255 pixels in)."""
    stats = _check_mode(mode)
    if stats is None:
        return keras.layers.Identity(name=name)
    mean, std = _broadcast(stats, channels)
    return keras.layers.Normalization(
        mean=mean * 255.0, variance=np.square(std * 255.0), axis=-1, name=name
    )


def preprocess_for_eval(images, size=224, crop_pct=0.875, mode="imagenet"):
    """The published weights' evaluation transform, on 0..255 RGB images [N, H, W, C].

    Resize (bilinear) so the shorter side is int(size / crop_pct), centre-crop size x size,
    normalise with `mode`. RepVGG A/B: size 224, crop_pct 0.875; D2se: 320, 1.0 (see
    `RepVGGSpec.default_size` / `crop_pct`). Works on numpy arrays or backend tensors.
    """
    images = keras.ops.convert_to_tensor(images, "float32")
    height, width = images.shape[1], images.shape[2]
    scale_to = int(size / crop_pct)
    if height <= width:
        new_h, new_w = scale_to, int(round(width * scale_to / height))
    else:
        new_h, new_w = int(round(height * scale_to / width)), scale_to
    resized = keras.ops.image.resize(
        images, (new_h, new_w), interpolation="bilinear", antialias=True
    )
    top, left = (new_h - size) // 2, (new_w - size) // 2
    cropped = resized[:, top : top + size, left : left + size, :]
    return normalize(cropped, mode, images.shape[-1])
