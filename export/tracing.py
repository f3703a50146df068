"""Tracing a Keras model for converters that read TensorFlow graphs."""

import contextlib


@contextlib.contextmanager
def plain_grouped_convs():
    """While tracing, grouped Conv2D as a plain TF Conv2D op.

    Keras's TF backend wraps grouped convolutions in an XLA-compiled function (TF's own CPU
    kernel lacks them), which tf2onnx cannot convert and Neural Compressor cannot see into.
    The plain op converts to an ONNX Conv with `group`, and runs where TensorFlow's oneDNN
    is on (the int8 SavedModel keeps it float).
    """
    import tensorflow as tf
    from keras.src.backend.tensorflow import nn as tf_nn

    original = tf_nn.conv

    def conv(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
        if data_format not in (None, "channels_last"):
            return original(inputs, kernel, strides, padding, data_format, dilation_rate)
        return tf.nn.convolution(inputs, kernel, strides, padding.upper(), dilations=dilation_rate)

    tf_nn.conv = conv
    try:
        yield
    finally:
        tf_nn.conv = original
