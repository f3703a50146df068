"""Helpers for parity checks, shared by the tests, the demo and the exporters."""

import keras
import numpy as np

from repvgg_keras.layers import RepVGGBlock


def randomize_batchnorm(model, seed=0, gamma_range=(0.2, 0.5)):
    """Give every BatchNorm non-trivial statistics, as a trained model has.

    Fresh BatchNorms (gamma 1, mean 0, var 1) hide fusion bugs in the bias and
    variance terms; this is what parity checks should run on.
    """
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights(
                [
                    rng.uniform(*gamma_range, n),
                    rng.normal(0.0, 0.1, n),
                    rng.normal(0.0, 0.1, n),
                    rng.uniform(0.5, 1.5, n),
                ]
            )
    return model


def max_relative_difference(actual, reference):
    """max |actual - reference| / max |reference| (robust to outputs near zero)."""
    actual = np.asarray(actual, np.float64)
    reference = np.asarray(reference, np.float64)
    scale = np.max(np.abs(reference))
    return float(np.max(np.abs(actual - reference)) / (scale if scale > 0 else 1.0))


def layer_counts(model):
    """Counts of the computing layers (nested models and blocks opened up, inputs left out).

    Returns a dict: {"layers": ..., "Conv2D": ..., "BatchNormalization": ...}.
    """
    counts = {"layers": 0, "Conv2D": 0, "BatchNormalization": 0}
    for layer in model._flatten_layers(include_self=False):
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
            for layer in model._flatten_layers()
            if not type(layer).__module__.startswith("keras.")
        }
    )
