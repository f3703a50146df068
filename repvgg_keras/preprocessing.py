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


def _check_mode(mode, channels=None):
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"Unknown preprocessing {mode!r}: choose one of {', '.join(MODES)}.")
    if channels is not None:
        if (
            isinstance(channels, bool)
            or not isinstance(channels, (int, np.integer))
            or channels < 1
        ):
            raise ValueError(f"channels must be a positive integer, not {channels!r}.")
        stats = MODES[mode]
        if stats is not None and len(stats[0]) not in (1, channels) and channels != 1:
            raise ValueError(
                f"Preprocessing {mode!r} has statistics for {len(stats[0])} channels (or 1, "
                f"averaged): not for {channels}."
            )
    return MODES[mode]


def _static_shape(tensor):
    shape = getattr(tensor, "shape", None)
    if shape is None:
        shape = np.shape(tensor)
    try:
        return tuple(None if d is None else int(d) for d in shape)
    except (TypeError, ValueError):  # a shape of unknown rank
        return None


def scale_and_offset(mode="imagenet", channels=3):
    """(scale, offset) float32 arrays with model_input = pixels * scale + offset, or None.

    Raises ValueError for an unknown mode, a channel count that is not a positive integer, or
    one the mode has no statistics for (imagenet: 1 or 3)."""
    stats = _check_mode(mode, channels)
    if stats is None:
        return None
    mean, std = _broadcast(stats, channels)
    return (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)


def normalize(pixels, mode="imagenet", channels=3):
    """0..255 pixels (numpy or any tensor) -> model input for the given preprocessing mode.

    Raises ValueError as `scale_and_offset` does, and when the pixels' last axis (channels, where
    known) is not `channels`."""
    affine = scale_and_offset(mode, channels)
    shape = _static_shape(pixels)
    if shape and shape[-1] is not None and shape[-1] != channels:
        raise ValueError(
            f"pixels of shape {shape} have {shape[-1]} channels on the last axis, not {channels}."
        )
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
    """A built-in Keras layer doing `normalize` inside a model (0..255 pixels in); raises ValueError
    as `scale_and_offset` does."""
    stats = _check_mode(mode, channels)
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
    `RepVGGSpec.default_size` / `crop_pct`). Works on numpy arrays or backend tensors. One image
    [H, W, C] is accepted too and comes back as [size, size, C].

    Raises ValueError for images of another rank or without pixels, a size that is not a
    positive integer, a crop_pct outside (0, 1] (above 1 the resized image would be smaller
    than the crop), or an unknown mode.
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, not {size!r}.")
    if (
        isinstance(crop_pct, bool)
        or not isinstance(crop_pct, (int, float, np.number))
        or not 0 < crop_pct <= 1
    ):
        raise ValueError(f"crop_pct must be in (0, 1], not {crop_pct!r}.")
    if not hasattr(images, "shape"):  # a list
        images = np.asarray(images, np.float32)
    shape = _static_shape(images)
    if shape is None or len(shape) not in (3, 4):
        raise ValueError(
            "images must be [N, H, W, C] (or one image [H, W, C]), not of shape "
            f"{shape if shape is not None else 'unknown'}."
        )
    if len(shape) == 3:
        return preprocess_for_eval(images[None], size, crop_pct, mode)[0]
    if any(d is None or d < 1 for d in shape[1:]):
        raise ValueError(f"images of shape {shape} have no pixels (or an unknown size).")
    _check_mode(mode, shape[-1])
    images = keras.ops.convert_to_tensor(images, "float32")
    height, width = images.shape[1], images.shape[2]
    scale_to = max(size, int(size / crop_pct))
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
