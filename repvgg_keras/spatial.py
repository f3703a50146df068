"""Layers a dense-prediction head needs and Keras does not ship in the form PSPNet uses.

`AdaptiveAveragePooling2D` pools to a fixed `bins x bins` grid whatever the input size;
`ResizeLike` resizes a map to the spatial size of another tensor. Both are built from
matrix products, reshapes and the standard bilinear resize, which the SavedModel, TFLite
and ONNX exporters all convert, and both accept inputs of unknown size.

Where the sizes are known, `builtin_call` computes either with built-in Keras layers only
(`to_deploy` uses it), so a deploy-form model of a fixed input size loads without this package.
"""

import keras
from keras import layers, ops


def pooling_matrix(bins, size, dtype="float32"):
    """[bins, size] averaging weights of PyTorch's adaptive average pooling along one axis.

    Cell i covers [floor(i * size / bins), ceil((i + 1) * size / bins)): the cells tile the
    axis exactly when `size` is a multiple of `bins` and overlap by one position otherwise,
    so every position is used and no cell is empty for size >= bins.
    """
    index = ops.arange(bins, dtype="int32")[:, None]
    position = ops.arange(size, dtype="int32")[None, :]
    start = ops.floor_divide(index * size, bins)
    end = ops.floor_divide((index + 1) * size + bins - 1, bins)
    inside = ops.cast(ops.logical_and(position >= start, position < end), dtype)
    return inside / ops.sum(inside, axis=1, keepdims=True)


def _spatial_size(x):
    """(height, width) of an NHWC tensor: Python ints where static, scalar tensors otherwise."""
    shape = ops.shape(x)
    return shape[1], shape[2]


@keras.saving.register_keras_serializable(package="repvgg_keras")
class AdaptiveAveragePooling2D(layers.Layer):
    """Average pooling of NHWC maps to a `bins x bins` grid (PyTorch's AdaptiveAvgPool2d).

    Any input size works, including sizes that are not multiples of `bins` (see
    `pooling_matrix`). Computed as two matrix products with reshapes, no transposes:
    the height is pooled on [N, H, W*C], then the width on [N*bins, W, C].
    """

    def __init__(self, bins, **kwargs):
        super().__init__(**kwargs)
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"bins must be a positive integer, got {bins!r}.")
        self.bins = bins

    def call(self, inputs):
        height, width = _spatial_size(inputs)
        channels = inputs.shape[-1]
        pool_h = pooling_matrix(self.bins, height, self.compute_dtype)
        pool_w = pooling_matrix(self.bins, width, self.compute_dtype)
        x = ops.reshape(inputs, (-1, height, width * channels))
        x = ops.matmul(pool_h, x)  # [N, bins, W*C]
        x = ops.reshape(x, (-1, width, channels))
        x = ops.matmul(pool_w, x)  # [N*bins, bins, C]
        return ops.reshape(x, (-1, self.bins, self.bins, channels))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.bins, self.bins, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "bins": self.bins}


@keras.saving.register_keras_serializable(package="repvgg_keras")
class ResizeLike(layers.Layer):
    """Resize `inputs[0]` (NHWC) bilinearly to the height and width of `inputs[1]`.

    Half-pixel centres (TensorFlow's and ONNX's default, PyTorch's align_corners=False),
    so any pair of sizes works; the reference tensor only lends its shape.
    """

    def call(self, inputs):
        images, reference = inputs
        size = tuple(reference.shape[1:3])
        if None in size:  # unknown at trace time: only the TensorFlow backend gets here
            import tensorflow as tf  # lazy: the other backends run without TensorFlow

            resized = tf.image.resize(images, tf.shape(reference)[1:3], method="bilinear")
            return ops.cast(resized, images.dtype)
        return ops.image.resize(images, size, interpolation="bilinear")

    def compute_output_shape(self, input_shape):
        images, reference = input_shape
        return (images[0], reference[1], reference[2], images[3])


def builtin_call(layer, inputs):
    """`layer` (an AdaptiveAveragePooling2D or ResizeLike) applied to `inputs` with built-in
    Keras layers only, the last one named as `layer`; None where a spatial size is unknown
    (the built-in layers need it fixed) or `layer` is another layer."""
    if isinstance(layer, ResizeLike):
        images, reference = inputs
        size = tuple(reference.shape[1:3])
        if None in size:
            return None
        resize = layers.Resizing(
            *size, interpolation="bilinear", name=layer.name, dtype=layer.dtype_policy
        )
        return resize(images)
    if isinstance(layer, AdaptiveAveragePooling2D) and None not in inputs.shape[1:3]:
        return _builtin_adaptive_pooling(inputs, layer.bins, layer.name, layer.dtype_policy)
    return None


def _cells(size, bins):
    """[start, end) of each adaptive pooling cell along an axis (see `pooling_matrix`)."""
    return [(i * size // bins, -(-(i + 1) * size // bins)) for i in range(bins)]


def _even_cells(size, bins):
    """(pool size, stride) when the cells along an axis are of one size and evenly spaced
    (e.g. size a multiple of bins, or 64 into 3: [0, 22), [21, 43), [42, 64)), else None."""
    cells = _cells(size, bins)
    lengths = {end - start for start, end in cells}
    steps = {b[0] - a[0] for a, b in zip(cells, cells[1:])} or {size}
    return (lengths.pop(), steps.pop()) if len(lengths) == len(steps) == 1 else None


def _builtin_adaptive_pooling(x, bins, name, dtype):
    """Adaptive average pooling of a fixed-size map: one AveragePooling2D where the cells along
    both axes are even; otherwise an axis at a time, uneven cells cropped and averaged one by one
    (a few small layers, exact, and every exporter converts them)."""
    height, width = x.shape[1:3]
    even_h, even_w = _even_cells(height, bins), _even_cells(width, bins)
    if even_h and even_w:
        return layers.AveragePooling2D(
            (even_h[0], even_w[0]), strides=(even_h[1], even_w[1]), name=name, dtype=dtype
        )(x)
    x = _pool_axis(x, bins, 1, f"{name}_rows", dtype)
    return _pool_axis(x, bins, 2, name, dtype)


def _pool_axis(x, bins, axis, name, dtype):
    size = x.shape[axis]

    def window(length):
        return (length, 1) if axis == 1 else (1, length)

    even = _even_cells(size, bins)
    if even:
        return layers.AveragePooling2D(
            window(even[0]), strides=window(even[1]), name=name, dtype=dtype
        )(x)
    cells = []
    for i, (start, end) in enumerate(_cells(size, bins)):
        crop = ((start, size - end), (0, 0)) if axis == 1 else ((0, 0), (start, size - end))
        cell = layers.Cropping2D(crop, name=f"{name}_crop{i}", dtype=dtype)(x)
        cells.append(
            layers.AveragePooling2D(window(end - start), name=f"{name}_mean{i}", dtype=dtype)(cell)
        )
    return layers.Concatenate(axis=axis, name=name, dtype=dtype)(cells)
