"""RepVGGBlock and its fusion. Backend-neutral: test_jax_backend.py reruns this file under JAX."""

import os

import keras
import numpy as np
import pytest

from repvgg_keras import PlainBlock, RepVGGBlock
from repvgg_keras.parity import max_relative_difference, randomize_batchnorm


def _model_of(block, input_shape):
    inputs = keras.Input(input_shape)
    model = keras.Model(inputs, block(inputs))
    randomize_batchnorm(model, seed=7)
    return model


def _plain_output(block, x):
    plain = PlainBlock(**block.plain_config())
    inputs = keras.Input(x.shape[1:])
    model = keras.Model(inputs, plain(inputs))
    plain.load_from(block)
    return np.asarray(model(x))


def _np_conv(x, kernel, stride, pad, groups=1, dilation=1):
    """Direct float64 convolution with PyTorch semantics (symmetric zero padding)."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw, cin_g, cout = kernel.shape
    n, h, w, _ = x.shape
    out_h = (h - dilation * (kh - 1) - 1) // stride + 1
    out_w = (w - dilation * (kw - 1) - 1) // stride + 1
    cout_g = cout // groups
    out = np.zeros((n, out_h, out_w, cout))
    for g in range(groups):
        xg = x[..., g * cin_g : (g + 1) * cin_g]
        kg = kernel[..., g * cout_g : (g + 1) * cout_g]
        for i in range(kh):
            for j in range(kw):
                patch = xg[
                    :,
                    i * dilation : i * dilation + stride * (out_h - 1) + 1 : stride,
                    j * dilation : j * dilation + stride * (out_w - 1) + 1 : stride,
                ]
                out[..., g * cout_g : (g + 1) * cout_g] += patch @ kg[i, j]
    return out


BLOCK_CASES = [
    dict(filters=8, strides=1),
    dict(filters=8, strides=2),
    dict(filters=12, strides=2),
    dict(filters=8, strides=1, groups=2),
    dict(filters=8, strides=1, groups=4),
    dict(filters=8, strides=1, dilation_rate=2),
    dict(filters=8, strides=1, se_channels=2),
    dict(filters=8, strides=2, se_channels=2),
    dict(filters=8, strides=1, use_identity=False),
    dict(filters=8, strides=1, use_1x1=False),
    dict(filters=8, strides=1, use_identity=False, use_1x1=False),
    dict(filters=8, strides=1, quant_friendly=True),
    dict(filters=12, strides=2, quant_friendly=True),
    dict(filters=8, strides=1, groups=2, quant_friendly=True),
    dict(filters=8, strides=1, se_channels=2, quant_friendly=True),
]


@pytest.mark.parametrize(
    "kwargs", BLOCK_CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items())
)
@pytest.mark.parametrize("spatial", [(10, 10), (9, 12)])
def test_fused_block_equals_three_branch_block(rng, kwargs, spatial):
    block = RepVGGBlock(name="b", **kwargs)
    model = _model_of(block, spatial + (8,))
    x = rng.normal(size=(2,) + spatial + (8,)).astype("float32")
    expected = np.asarray(model(x, training=False))
    fused = _plain_output(block, x)
    assert fused.shape == expected.shape
    assert max_relative_difference(fused, expected) < 1e-5


def test_get_deploy_weights_types_and_shapes():
    block = RepVGGBlock(12, groups=4, name="g")
    _model_of(block, (8, 8, 12))
    kernel, bias = block.get_deploy_weights()
    assert kernel.dtype == np.float32 and bias.dtype == np.float32
    assert kernel.shape == (3, 3, 3, 12) and bias.shape == (12,)


@pytest.mark.parametrize("strides,groups", [(2, 1), (1, 2), (1, 1)])
def test_block_matches_pytorch_style_reference(rng, strides, groups):
    """Symmetric padding on even inputs: the pitfall of padding='same' with stride 2."""
    block = RepVGGBlock(8, strides=strides, groups=groups, name="r")
    _model_of(block, (8, 8, 8))
    x = rng.normal(size=(1, 8, 8, 8))
    bn = lambda layer, y: (
        (y - layer.moving_mean.numpy())
        / np.sqrt(layer.moving_variance.numpy() + layer.epsilon)
        * layer.gamma.numpy()
        + layer.beta.numpy()
    )
    to_np = lambda v: np.asarray(keras.ops.convert_to_numpy(v), np.float64)
    dense = _np_conv(x, to_np(block.dense_conv.kernel), strides, 1, groups)
    pointwise = _np_conv(x, to_np(block.pointwise_conv.kernel), strides, 0, groups)
    out = bn(block.dense_bn, dense) + bn(block.pointwise_bn, pointwise)
    if block.identity_bn is not None:
        out = out + bn(block.identity_bn, x)
    reference = np.maximum(out, 0)
    actual = np.asarray(block(x.astype("float32"), training=False))
    assert max_relative_difference(actual, reference) < 1e-5
    # The fused single conv agrees with the same reference.
    kernel, bias = block.get_deploy_weights()
    fused = np.maximum(_np_conv(x, kernel.astype(np.float64), strides, 1, groups) + bias, 0)
    assert max_relative_difference(fused, reference) < 1e-5


@pytest.mark.parametrize("strides,groups", [(1, 1), (1, 2), (2, 1)])
def test_quant_friendly_block_matches_qarepvgg_reference(rng, strides, groups):
    """QARepVGG: relu(post_bn(bn(conv3x3(x)) + conv1x1(x) + x)), and its fused conv agrees."""
    block = RepVGGBlock(8, strides=strides, groups=groups, quant_friendly=True, name="q")
    _model_of(block, (8, 8, 8))
    assert block.pointwise_bn is None and block.identity_bn is None and block.post_bn is not None
    x = rng.normal(size=(1, 8, 8, 8))
    to_np = lambda v: np.asarray(keras.ops.convert_to_numpy(v), np.float64)
    bn = lambda layer, y: (
        (y - to_np(layer.moving_mean))
        / np.sqrt(to_np(layer.moving_variance) + layer.epsilon)
        * to_np(layer.gamma)
        + to_np(layer.beta)
    )
    out = bn(block.dense_bn, _np_conv(x, to_np(block.dense_conv.kernel), strides, 1, groups))
    out = out + _np_conv(x, to_np(block.pointwise_conv.kernel), strides, 0, groups)
    if strides == 1:
        out = out + x
    reference = np.maximum(bn(block.post_bn, out), 0)
    assert (
        max_relative_difference(np.asarray(block(x.astype("float32"), training=False)), reference)
        < 1e-5
    )
    kernel, bias = block.get_deploy_weights()
    fused = np.maximum(_np_conv(x, kernel.astype(np.float64), strides, 1, groups) + bias, 0)
    assert max_relative_difference(fused, reference) < 1e-5


def test_identity_branch_only_where_shapes_allow():
    cases = [
        ((8, 8, 8), dict(filters=8), True),
        ((8, 8, 4), dict(filters=8), False),
        ((8, 8, 8), dict(filters=8, strides=2), False),
        ((8, 8, 8), dict(filters=8, use_identity=False), False),
    ]
    for shape, kwargs, expected in cases:
        block = RepVGGBlock(**kwargs)
        block.build((None,) + shape)
        assert (block.identity_bn is not None) == expected, (shape, kwargs)


def test_training_mode_uses_batch_statistics_and_inference_does_not(rng):
    block = RepVGGBlock(8, name="t")
    _model_of(block, (6, 6, 8))
    x = rng.normal(size=(4, 6, 6, 8)).astype("float32")
    assert max_relative_difference(block(x, training=True), block(x, training=False)) > 1e-3


def test_config_round_trip(rng):
    for kwargs in (dict(use_1x1=False), dict(quant_friendly=True)):
        block = RepVGGBlock(8, strides=1, groups=2, se_channels=2, name="c", **kwargs)
        _model_of(block, (6, 6, 8))
        clone = RepVGGBlock.from_config(block.get_config())
        x = rng.normal(size=(1, 6, 6, 8)).astype("float32")
        clone.build(x.shape)
        clone.set_weights(block.get_weights())
        np.testing.assert_allclose(np.asarray(clone(x)), np.asarray(block(x)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(filters=8, strides=3), "strides must be 1 or 2"),
        (dict(filters=8, strides=2, dilation_rate=2), "dilation_rate"),
        (dict(filters=6, groups=4), "divisible"),
        (dict(filters=8, quant_friendly=True, kernel_l2=1e-4), "plain weight decay"),
    ],
)
def test_bad_block_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RepVGGBlock(**kwargs)


def test_runs_on_the_expected_backend():
    expected = os.environ.get("REPVGG_EXPECT_BACKEND")
    if expected:
        assert keras.backend.backend() == expected
