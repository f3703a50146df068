"""The private and TF1-only TensorFlow and Keras API the exporters rely on, one function per use.

Written for tensorflow 2.21 and keras 3.15. tests/test_compat.py touches every name used here, so
an upgrade that removes one fails there, naming the function to update. Each function imports
TensorFlow or Keras when called, as the exporters do: the serving client, which imports export
modules, loads neither.
"""

import contextlib
import functools


def freeze(concrete_function):
    """`concrete_function` with its variables as constants (a graph Neural Compressor can read)."""
    # tensorflow.python...convert_variables_to_constants_v2: no public freeze in TF 2 (TF 2.21).
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    return convert_variables_to_constants_v2(concrete_function)


def silenced_deprecation():
    """A context in which TensorFlow's deprecation warnings stay quiet."""
    # tensorflow.python.util.deprecation.silence: TF1-style graph calls warn each call (TF 2.21).
    from tensorflow.python.util import deprecation

    return deprecation.silence()


def copy_graph_def(graph_def):
    """A copy of the GraphDef `graph_def`, to edit."""
    # tf.compat.v1.GraphDef: TF 2 exports the GraphDef message only under compat.v1 (TF 2.21).
    import tensorflow as tf

    copy = tf.compat.v1.GraphDef()
    copy.CopyFrom(graph_def)
    return copy


def import_graph_def(graph_def):
    """Import `graph_def` into the current graph, its names unprefixed."""
    # tf.compat.v1.import_graph_def: TF1 graph building, inside wrap_function (TF 2.21).
    import tensorflow as tf

    tf.compat.v1.import_graph_def(graph_def, name="")


def wrap_function(build_graph):
    """The graph `build_graph()` builds as a prunable function of no inputs."""
    # tf.compat.v1.wrap_function: the one way to run a GraphDef as a TF 2 function (TF 2.21).
    import tensorflow as tf

    return tf.compat.v1.wrap_function(build_graph, [])


def registered_kernels(op):
    """The kernels (with `device_type`) this TensorFlow registers for the op type `op`."""
    # tensorflow.python.framework.kernels: no public API lists an op's kernels (TF 2.21).
    from tensorflow.python.framework import kernels

    return kernels.get_registered_kernels_for_op(op).kernel


def onednn_enabled():
    """Whether this TensorFlow runs oneDNN's graph rewrite (TF_ENABLE_ONEDNN_OPTS, or the CPU's
    default)."""
    # tensorflow.python.util._pywrap_util_port.IsMklEnabled: no public query (TF 2.21).
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


@contextlib.contextmanager
def keras_tf_conv_replaced(conv):
    """While inside, Keras's TensorFlow backend computes every convolution with
    `conv(original, inputs, kernel, strides, padding, data_format, dilation_rate)`."""
    # keras.src.backend.tensorflow.nn.conv: where keras.ops.conv builds its TF op (Keras 3.15).
    from keras.src.backend.tensorflow import nn

    original = nn.conv
    nn.conv = functools.partial(conv, original)
    try:
        yield
    finally:
        nn.conv = original


def parents(layer):
    """The layers (operations) whose outputs `layer`'s first call takes in a functional model."""
    # Operation._inbound_nodes, Node.parent_nodes: Keras exports no graph traversal (Keras 3.15).
    return [node.operation for node in layer._inbound_nodes[0].parent_nodes]
