"""The fusion maths on its own, checked against Keras layers computing the branches."""

import keras
import numpy as np
import pytest

from repvgg_keras import fusion


def test_fold_batchnorm_matches_keras_batchnorm(rng):
    kernel = rng.normal(size=(3, 3, 4, 6))
    gamma, beta = rng.uniform(0.2, 0.5, 6), rng.normal(size=6)
    mean, var = rng.normal(size=6), rng.uniform(0.5, 2.0, 6)
    x = rng.normal(size=(2, 8, 8, 4)).astype("float32")

    conv = keras.layers.Conv2D(6, 3, padding="same", use_bias=False)
    bn = keras.layers.BatchNormalization(epsilon=1e-5)
    conv.build(x.shape)
    conv.set_weights([kernel])
    bn.build((None, 8, 8, 6))
    bn.set_weights([gamma, beta, mean, var])
    expected = np.asarray(bn(conv(x), training=False))

    folded_kernel, folded_bias = fusion.fold_batchnorm(kernel, gamma, beta, mean, var, 1e-5)
    fused = keras.layers.Conv2D(6, 3, padding="same")
    fused.build(x.shape)
    fused.set_weights([folded_kernel.astype("float32"), folded_bias.astype("float32")])
    np.testing.assert_allclose(np.asarray(fused(x)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_identity_kernel_reproduces_input_with_groups(rng, groups):
    channels = 8
    x = rng.normal(size=(1, 5, 7, channels)).astype("float32")
    conv = keras.layers.Conv2D(channels, 3, padding="same", groups=groups, use_bias=False)
    conv.build(x.shape)
    kernel = fusion.identity_kernel(channels, groups)
    assert kernel.shape == (3, 3, channels // groups, channels)
    conv.set_weights([kernel.astype("float32")])
    np.testing.assert_allclose(np.asarray(conv(x)), x, atol=1e-6)


def test_identity_kernel_rejects_indivisible_groups():
    with pytest.raises(ValueError, match="divisible"):
        fusion.identity_kernel(6, 4)


def test_pad_to_3x3_puts_the_1x1_at_the_centre(rng):
    kernel = rng.normal(size=(1, 1, 2, 3))
    padded = fusion.pad_to_3x3(kernel)
    assert padded.shape == (3, 3, 2, 3)
    np.testing.assert_array_equal(padded[1, 1], kernel[0, 0])
    padded[1, 1] = 0
    assert not padded.any()


def test_fuse_branches_sums_in_float64_and_returns_float32(rng):
    k3, k1 = rng.normal(size=(3, 3, 2, 2)), rng.normal(size=(1, 1, 2, 2))
    b3, b1 = rng.normal(size=2), rng.normal(size=2)
    kernel, bias = fusion.fuse_branches([(k3, b3), (k1, b1)])
    assert kernel.dtype == np.float32 and bias.dtype == np.float32
    expected = k3.copy()
    expected[1, 1] += k1[0, 0]
    np.testing.assert_allclose(kernel, expected, rtol=1e-6)
    np.testing.assert_allclose(bias, b3 + b1, rtol=1e-6)
