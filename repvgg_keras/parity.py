"""Parity checks between two forms of a model: trained-like BatchNorm statistics and the
relative difference every conversion and export is held to."""

import keras
import numpy as np

from repvgg_keras.layers import all_layers


def randomize_batchnorm(model, seed=0, gamma_range=(0.2, 0.5)):
    """Give every BatchNorm non-trivial statistics, as a trained model has.

    Fresh BatchNorms (gamma 1, mean 0, var 1) hide fusion bugs in the bias and
    variance terms; this is what parity checks should run on.
    """
    rng = np.random.default_rng(seed)
    for layer in all_layers(model):
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
