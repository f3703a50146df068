"""GPTQ rounding of int8 kernels (export/gptq.py): on the runtimes' grid, the scale kept, less
output error than rounding to nearest, the input model untouched, and taken as-is by LiteRT."""

import keras
import numpy as np
import pytest

import repvgg_keras as rk
from export import gptq, tflite
from repvgg_keras import preprocessing, structure
from repvgg_keras.parity import randomize_batchnorm
from tests.helpers import random_images


def _nearest(weights):
    scale = gptq.channel_scales(weights)
    return np.round(weights / scale) * scale


def _correlated_inputs(rng, rows, size):
    """Inputs whose features are strongly correlated, as neighbouring pixels are."""
    mixing = rng.normal(size=(size, size)) * 0.3 + np.eye(size)
    return np.maximum(rng.normal(size=(rows, size)) @ mixing, 0)


# One matrix; four blocks (a wide kernel: less gain, the blocks do not see each other).
@pytest.mark.parametrize("block, gain", [(gptq.BLOCK, 0.75), (20, 0.9)])
def test_weights_land_on_the_grid_with_the_scale_kept_and_less_output_error(
    rng, monkeypatch, block, gain
):
    monkeypatch.setattr(gptq, "BLOCK", block)
    size, outputs = 72, 16
    weights = rng.normal(0, 0.05, (size, outputs))
    weights[rng.integers(0, size, outputs), np.arange(outputs)] = 1.0  # a dominant centre tap
    inputs = _correlated_inputs(rng, 4000, size)
    moments = [inputs[:, part].T @ inputs[:, part] / len(inputs) for part in gptq.blocks(size)]
    rounded = gptq.round_matrix(weights, moments)

    scale = gptq.channel_scales(weights)
    np.testing.assert_allclose(gptq.channel_scales(rounded), scale, rtol=1e-12)
    steps = rounded / scale
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-9)
    assert np.abs(steps).max() <= gptq.LEVELS + 1e-9
    error = lambda w: np.mean((inputs @ (w - weights)) ** 2)
    assert error(rounded) < gain * error(_nearest(weights)), (
        error(rounded),
        error(_nearest(weights)),
    )


def test_a_zero_channel_stays_zero(rng):
    weights = rng.normal(0, 0.05, (9, 3))
    weights[:, 1] = 0
    inputs = _correlated_inputs(rng, 500, 9)
    rounded = gptq.round_matrix(weights, [inputs.T @ inputs / len(inputs)])
    assert np.all(rounded[:, 1] == 0) and np.all(np.isfinite(rounded))


def _tiny_deploy(seed=0):
    spec = rk.RepVGGSpec("gptq_tiny", num_blocks=(1, 2, 2, 1), width_multipliers=(0.25, 0.25))
    model = rk.RepVGG(spec, input_shape=(32, 32, 3), classes=10, quant_friendly=True)
    return rk.to_deploy(randomize_batchnorm(model, seed=seed))


def _kernels(model):
    return {
        layer.name: layer.kernel.numpy()
        for layer in model.layers
        if isinstance(layer, keras.layers.Conv2D)
    }


def test_round_kernels_rounds_every_conv_of_a_copy_and_keeps_its_outputs_closer(rng):
    deploy = _tiny_deploy()
    before = _kernels(deploy)
    calibration = random_images(rng, (48, 32, 32, 3))
    rounded = gptq.round_kernels(deploy, calibration)

    for name, kernel in _kernels(deploy).items():
        np.testing.assert_array_equal(kernel, before[name])  # the input model is untouched
    assert gptq.round_kernels(deploy, calibration) is rounded  # several int8 files, one rounding
    assert gptq.round_kernels(deploy, calibration[:40]) is not rounded
    nearest = keras.models.clone_model(deploy)
    nearest.set_weights(deploy.get_weights())
    for name, kernel in _kernels(rounded).items():
        scale = gptq.channel_scales(before[name])
        np.testing.assert_allclose(gptq.channel_scales(kernel), scale, rtol=1e-6)
        np.testing.assert_allclose(kernel / scale, np.round(kernel / scale), atol=1e-3)
        nearest.get_layer(name).kernel.assign(_nearest(before[name]))
    held_out = random_images(rng, (64, 32, 32, 3))
    reference = np.asarray(deploy(held_out, training=False))
    error = lambda m: np.mean((np.asarray(m(held_out, training=False)) - reference) ** 2)
    assert error(rounded) < error(nearest), (error(rounded), error(nearest))


def test_grouped_convolutions_are_left_as_they_are(rng):
    inputs = keras.Input((8, 8, 4))
    hidden = keras.layers.Conv2D(4, 3, padding="same", groups=2, name="grouped")(inputs)
    out = keras.layers.Conv2D(6, 3, strides=2, padding="same", name="plain")(hidden)
    model = keras.Model(inputs, out)
    rounded = gptq.round_kernels(model, random_images(rng, (8, 8, 8, 4)))
    np.testing.assert_array_equal(
        rounded.get_layer("grouped").kernel.numpy(), model.get_layer("grouped").kernel.numpy()
    )
    kernel = rounded.get_layer("plain").kernel.numpy()
    assert not np.array_equal(kernel, model.get_layer("plain").kernel.numpy())
    steps = kernel / gptq.channel_scales(kernel)
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)


@pytest.mark.slow
def test_litert_keeps_the_rounded_weights_as_they_are(rng):
    """The int8 weights in the .tflite file are GPTQ's, step for step: the converter derived the
    same per-channel scales and had nothing left to round."""
    from ai_edge_litert.interpreter import Interpreter

    deploy = _tiny_deploy(seed=1)
    calibration = preprocessing.normalize(rng.uniform(0, 255, (32, 32, 32, 3)).astype(np.float32))
    expected = gptq.round_kernels(deploy, calibration)
    interpreter = Interpreter(model_content=tflite.convert(deploy, "int8", calibration))
    int8_kernels = {}
    for detail in interpreter.get_tensor_details():
        scales = detail["quantization_parameters"]["scales"]
        if detail["dtype"] == np.int8 and len(detail["shape"]) == 4 and len(scales) > 1:
            values = interpreter.get_tensor(detail["index"]).astype(np.float64)
            int8_kernels[tuple(detail["shape"])] = int8_kernels.get(tuple(detail["shape"]), [])
            int8_kernels[tuple(detail["shape"])].append(values * scales[:, None, None, None])
    compared = 0
    for kernel in _kernels(expected).values():
        # LiteRT stores a conv kernel as [out, kh, kw, in].
        candidates = int8_kernels.get(tuple(np.transpose(kernel, (3, 0, 1, 2)).shape), [])
        ohwi = np.transpose(kernel, (3, 0, 1, 2))
        assert any(np.allclose(c, ohwi, rtol=0, atol=1e-6 * np.abs(ohwi).max()) for c in candidates)
        compared += 1
    assert compared >= 5


def test_pspnet_backbone_and_head_are_rounded(rng):
    spec = rk.RepVGGSpec("gptq_tiny", num_blocks=(1, 1, 1, 1), width_multipliers=(0.25, 0.25))
    model = rk.PSPNet(spec, input_shape=(32, 32, 3), classes=5, low_level_skip=True)
    deploy = rk.to_deploy(randomize_batchnorm(model, seed=0))
    rounded = gptq.round_kernels(deploy, random_images(rng, (8, 32, 32, 3)))
    convs = [
        layer
        for layer in structure.all_layers(rounded)
        if isinstance(layer, keras.layers.Conv2D) and layer.groups == 1
    ]
    assert any(layer.name.startswith("stage") for layer in convs)  # the nested backbone's
    assert any(layer.name.startswith("ppm") for layer in convs)  # the head's
    for layer in convs:
        kernel = layer.kernel.numpy()
        steps = kernel / gptq.channel_scales(kernel)
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-3, err_msg=layer.name)
