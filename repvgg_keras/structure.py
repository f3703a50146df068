"""What a model is made of: layer counts and non-built-in layers (the deploy form should have none)."""

import keras

from repvgg_keras.layers import RepVGGBlock, all_layers

__all__ = ["all_layers", "custom_layer_names", "is_segmentation", "layer_counts"]


def layer_counts(model):
    """Counts of the computing layers (nested models and blocks opened up, inputs left out).

    Returns a dict: {"layers": ..., "Conv2D": ..., "BatchNormalization": ...}.
    """
    counts = {"layers": 0, "Conv2D": 0, "BatchNormalization": 0}
    for layer in all_layers(model):
        if isinstance(layer, (keras.layers.InputLayer, keras.Model, RepVGGBlock)):
            continue
        counts["layers"] += 1
        for kind in ("Conv2D", "BatchNormalization"):
            if isinstance(layer, getattr(keras.layers, kind)):
                counts[kind] += 1
    return counts


def custom_layer_names(model):
    """Class names of layers that are not Keras built-ins (should be empty after to_deploy)."""
    return sorted(
        {
            type(layer).__name__
            for layer in all_layers(model)
            if not type(layer).__module__.startswith("keras.")
        }
    )


def is_segmentation(model):
    """Whether `model` predicts per pixel: logits [N, H, W, classes] at its input's size, rather
    than [N, classes] (or a backbone's smaller feature maps)."""
    output = model.outputs[0].shape
    return len(output) == 4 and tuple(output[1:3]) == tuple(model.inputs[0].shape[1:3])
