"""GPTQ rounding: convolution kernels put on the int8 grid so as to keep each layer's output.

Every int8 path we ship (TFLite, ONNX/OpenVINO QDQ, the SavedModel through Neural Compressor)
quantizes a convolution's weights per output channel, symmetrically, with scale max|w| / 127,
and rounds each weight to the nearest step. In a fused RepVGG kernel the identity branch puts one
large centre tap in every output channel: it sets the scale, and the many small taps are left with
a few steps each. Rounding each to the nearest step then shifts the layer's output more than it
must; that is most of what costs int8 its top-1 agreement (docs/int8.md).

GPTQ (Frantar et al., ICLR 2023) rounds the weights of a layer one input position at a time and
moves each rounding error onto the positions not yet rounded, weighted by the inverse of the
calibration inputs' second moments, so that the layer's output on real inputs changes least.
`round_kernels` does that on a copy of the model, on the same grid (each channel's largest weight
stays where it is, so the runtime computes the same scale and takes the rounded weights as they
are). Only the int8 artifact is built from the copy: it is verified against the float model.
"""

import hashlib

import numpy as np

import repvgg_keras as rk

MAX_ROWS = 8192  # calibration patches per layer (sampled): several per kernel weight
BLOCK = 2304  # kernel inputs rounded together (9 x 256): wider kernels are rounded in blocks
MAX_FLOATS = 1 << 26  # patch values held at once (256 MB)
DAMPING = 0.01  # of the mean diagonal, added to the second moment so that it inverts
LEVELS = 127  # symmetric int8: -127..127


def channel_scales(kernel):
    """The per-output-channel step every int8 runtime derives from a kernel (0 -> 1)."""
    scale = np.abs(kernel).reshape(-1, kernel.shape[-1]).max(axis=0) / LEVELS
    return np.where(scale > 0, scale, 1.0)


def blocks(size):
    """The slices of a kernel's inputs that are rounded together (BLOCK at a time)."""
    return [slice(start, min(start + BLOCK, size)) for start in range(0, size, BLOCK)]


def round_matrix(weights, moments, damping=DAMPING):
    """GPTQ on `weights` [inputs, outputs], given `moments`: E[x x^T] of the layer's inputs for each
    slice of `blocks(inputs)`. Weights on the grid of
    `channel_scales`, each channel's largest weight kept as it is."""
    weights = np.array(weights, np.float64)
    size, outputs = weights.shape
    scale = channel_scales(weights)
    largest, channels = np.abs(weights).argmax(axis=0), np.arange(outputs)
    kept = weights[largest, channels].copy()  # exactly +-127 steps: the scale stays
    rounded = np.empty_like(weights)
    for part, moment in zip(blocks(size), moments, strict=True):
        hessian = np.array(moment, np.float64)
        hessian += damping * max(np.mean(np.diag(hessian)), 1e-12) * np.eye(len(hessian))
        # Upper Cholesky factor of the inverse: row i holds how rounding input i moves the rest.
        factor = np.linalg.cholesky(np.linalg.inv(hessian)).T
        rounded[part] = _round_block(weights[part], factor, scale, largest - part.start, kept)
    rounded[largest, channels] = kept
    return rounded


def _round_block(weights, factor, scale, largest, kept, batch=128):
    """GPTQ's rounding of `weights` (changed in place) given the upper Cholesky factor of the
    inverse second moment; `largest[c]` (a row, if inside) of channel c stays `kept[c]`. Errors
    go to the next rows one at a time within a batch, and to the rows after it in one product."""
    size = len(weights)
    rounded = np.empty_like(weights)

    def keep(rows, start):
        inside = (largest >= start) & (largest < start + len(rows))
        rows[largest[inside] - start, np.flatnonzero(inside)] = kept[inside]

    for start in range(0, size, batch):
        stop = min(start + batch, size)
        local, errors = weights[start:stop], np.empty((stop - start, weights.shape[1]))
        for i in range(stop - start):
            row = start + i
            rounded[row] = np.clip(np.round(local[i] / scale), -LEVELS, LEVELS) * scale
            errors[i] = (local[i] - rounded[row]) / factor[row, row]
            local[i + 1 :] -= np.outer(factor[row, row + 1 : stop], errors[i])
            keep(local, start)
        if stop < size:
            weights[stop:] -= factor[start:stop, stop:].T @ errors
            keep(weights[stop:], stop)
    return rounded


def _patch_moments(layer, inputs_of, calibration, rng):
    """E[p p^T] over (sampled) input patches p of `layer`, flattened as its kernel is, for each
    slice of `blocks`; `inputs_of`: the model up to `layer`'s input."""
    import tensorflow as tf

    kh, kw = layer.kernel_size
    size = kh * kw * layer.kernel.shape[2]
    parts = blocks(size)
    totals, count = [np.zeros((p.stop - p.start,) * 2) for p in parts], 0
    positions = int(np.prod([d or 64 for d in layer.output.shape[1:3]]))
    batch = int(np.clip(MAX_FLOATS // (positions * size), 1, 32))
    chunks = range(0, len(calibration), batch)
    per_chunk = max(1, MAX_ROWS // len(chunks))
    for start in chunks:
        x = np.asarray(inputs_of(calibration[start : start + batch]), np.float32)
        patches = tf.image.extract_patches(
            x,
            sizes=[1, kh, kw, 1],
            strides=[1, *layer.strides, 1],
            rates=[1, *layer.dilation_rate, 1],
            padding=layer.padding.upper(),
        ).numpy()
        rows = patches.reshape(-1, size)
        if len(rows) > per_chunk:
            rows = rows[rng.choice(len(rows), per_chunk, replace=False)]
        for total, part in zip(totals, parts):
            total += (rows[:, part].T @ rows[:, part]).astype(np.float64)
        count += len(rows)
    return [total / max(count, 1) for total in totals]


def roundable(layer):
    """Conv2D layers without groups: the ones every int8 path quantizes per channel."""
    import keras

    return (
        type(layer) is keras.layers.Conv2D
        and layer.groups == 1
        and layer.data_format == "channels_last"
    )


_LAST = {}  # the last rounding: one export often makes several int8 files of one model


def _digest(model, calibration):
    digest = hashlib.sha256(np.ascontiguousarray(calibration).tobytes())
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


def _targets(model, feed=None):
    """(layer, function from the model's inputs to that layer's input) for every roundable layer,
    in order. A nested model (PSPNet's backbone) is entered when its input has the model's input
    shape, as when it takes the images; the layers of any other nested model keep nearest rounding
    (a wrong guess could only round worse: the export is verified either way)."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            if len(layer.inputs) == 1 and tuple(layer.inputs[0].shape) == tuple(model.input.shape):
                yield from _targets(layer, feed)
        elif roundable(layer):
            prefix = keras.Model(model.input, layer.input)
            if feed is None:
                yield layer, lambda x, prefix=prefix: prefix(x, training=False)
            else:
                yield layer, lambda x, prefix=prefix: prefix(feed(x), training=False)


def round_kernels(model, calibration, seed=0):
    """A copy of `model` whose Conv2D kernels are GPTQ-rounded onto the int8 grid, using
    `calibration` (model inputs, as the int8 converters get them). `model` is not changed; the
    copy must not be changed either (the same weights and images give the same copy back)."""
    import keras

    if rk.is_quantize_aware(model):  # its weights are on the grid, its ranges learned
        raise ValueError(
            "this quantization-aware model's weights lie on the int8 grid already: GPTQ rounding "
            "is for float models (the int8 exporters take a QAT model with its own ranges)."
        )
    calibration = np.asarray(calibration, np.float32)
    key = (_digest(model, calibration), seed)
    if key in _LAST:
        return _LAST[key]
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    rng = np.random.default_rng(seed)
    # Layer by layer, each seeing the inputs its rounded predecessors give it.
    for layer, inputs_of in _targets(copy):
        moments = _patch_moments(layer, inputs_of, calibration, rng)
        kernel = layer.kernel.numpy()
        rounded = round_matrix(kernel.reshape(-1, kernel.shape[-1]), moments)
        layer.kernel.assign(rounded.reshape(kernel.shape).astype(kernel.dtype))
    _LAST.clear()
    _LAST[key] = copy
    return copy
