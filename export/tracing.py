"""Tracing a Keras model for converters that read TensorFlow graphs."""

import contextlib

from export import compat


@contextlib.contextmanager
def plain_grouped_convs(dilated_as_conv2d=False):
    """While tracing, grouped Conv2D as a plain TF Conv2D op.

    Keras's TF backend wraps grouped convolutions in an XLA-compiled function (TF's own CPU
    kernel lacks them), which tf2onnx cannot convert and Neural Compressor cannot see into.
    The plain op converts to an ONNX Conv with `group`, and runs where TensorFlow's oneDNN
    is on.

    `dilated_as_conv2d`: a dilated convolution as one Conv2D op with `dilations` (oneDNN runs it;
    Neural Compressor quantizes it) instead of tf.nn.convolution's SpaceToBatchND, Conv2D,
    BatchToSpaceND, which stays float in an int8 graph. For the int8 SavedModel, which needs
    oneDNN anyway.
    """
    import tensorflow as tf

    def conv(
        original, inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1
    ):
        if data_format not in (None, "channels_last"):
            return original(inputs, kernel, strides, padding, data_format, dilation_rate)
        if dilated_as_conv2d and inputs.shape.rank == 4:
            return tf.nn.conv2d(inputs, kernel, strides, padding.upper(), dilations=dilation_rate)
        return tf.nn.convolution(inputs, kernel, strides, padding.upper(), dilations=dilation_rate)

    with compat.keras_tf_conv_replaced(conv):
        yield
