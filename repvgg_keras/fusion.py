"""Pure numpy maths of structural re-parameterisation.

Every function takes numpy arrays in Keras layouts (conv kernels HWIO, grouped kernels
(kh, kw, in/groups, out)), computes in float64 so that the fused model is as close to
the three-branch one as float32 allows, and `fuse_branches` returns float32.
"""

import numpy as np


def fold_batchnorm(kernel, gamma, beta, mean, variance, epsilon, bias=0.0):
    """Fold an inference-mode BatchNorm into the conv before it: returns (kernel, bias).

    bn(conv(x) + b) = conv(x) * t + (beta + (b - mean) * t), with t = gamma / sqrt(var + eps);
    `bias`: the conv's own bias b (0 for a conv without one).
    """
    kernel = np.asarray(kernel, np.float64)
    t = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(variance, np.float64) + epsilon)
    shift = np.asarray(bias, np.float64) - np.asarray(mean, np.float64)
    return kernel * t, np.asarray(beta, np.float64) + shift * t  # t: over the output channels


def pad_to_3x3(kernel):
    """Place a 1x1 kernel at the centre of an otherwise zero 3x3 kernel."""
    kernel = np.asarray(kernel, np.float64)
    if kernel.shape[:2] != (1, 1):
        raise ValueError(f"pad_to_3x3 expects a 1x1 kernel, got shape {kernel.shape}.")
    return np.pad(kernel, ((1, 1), (1, 1), (0, 0), (0, 0)))


def identity_kernel(channels, groups=1):
    """The 3x3 kernel of an identity map, for a conv with `groups` groups.

    Output channel i reads input channel i, which is channel i % (channels/groups)
    of its group.
    """
    if channels % groups:
        raise ValueError(f"channels ({channels}) must be divisible by groups ({groups}).")
    per_group = channels // groups
    kernel = np.zeros((3, 3, per_group, channels), np.float64)
    outputs = np.arange(channels)
    kernel[1, 1, outputs % per_group, outputs] = 1.0
    return kernel


def fuse_branches(branches, post_batchnorm=None):
    """Sum (kernel3x3, bias) pairs into one float32 (kernel, bias).

    Each branch is already BN-folded; 1x1 kernels are padded here. `post_batchnorm`:
    (gamma, beta, mean, variance, epsilon) of a BatchNorm applied to the sum (QARepVGG's
    post-BN), folded in after summing, still in float64.
    """
    if not branches:
        raise ValueError("fuse_branches needs at least one branch.")
    kernel = 0.0
    bias = 0.0
    for branch_kernel, branch_bias in branches:
        if branch_kernel.shape[:2] == (1, 1):
            branch_kernel = pad_to_3x3(branch_kernel)
        kernel = kernel + branch_kernel
        bias = bias + np.asarray(branch_bias, np.float64)
    if post_batchnorm is not None:
        # bn(Wx + b) = bn'(Wx) where bn' has mean (mean - b): fold it like any BN.
        gamma, beta, mean, variance, epsilon = post_batchnorm
        kernel, bias = fold_batchnorm(
            kernel, gamma, beta, np.asarray(mean, np.float64) - bias, variance, epsilon
        )
    return np.asarray(kernel, np.float32), np.asarray(bias, np.float32)
