"""A serving signature's request, checked inside the graph before any convolution sees it.

TF Serving feeds a request's tensor to the graph by name without checking it against the
signature's shape, and a tensor of another rank reaching a oneDNN convolution aborts the whole
process: so every SavedModel signature (export/savedmodel.py) passes its input through
`checked`, which fails with InvalidArgument naming what was expected and received.
"""

from repvgg_keras.errors import shape_text


def _shape_tensor_text(shape):
    """A shape tensor as the string tensor "[1, 32, 32, 3]", for the graph's error messages."""
    import tensorflow as tf

    joined = tf.strings.reduce_join(tf.strings.as_string(shape), separator=", ")
    return tf.strings.join(["[", joined, "]"])


def checked(images, expected, description, finite=False):
    """`images`, passed on only after the graph has checked it: InvalidArgument otherwise.

    TF Serving feeds a request's tensor to the graph by name without checking it against the
    signature's shape, and a tensor of another rank reaching a oneDNN convolution aborts
    the whole process. So the shape is checked here, as a control dependency of everything
    after it. `expected` is the shape wanted, None for the batch.
    `finite`: also reject NaN and Inf (a float request with them has no meaningful answer,
    and they would come back as NaN logits that look like a model fault).
    """
    import tensorflow as tf

    shape = tf.raw_ops.Shape(input=images, out_type=tf.int32)
    rank = tf.raw_ops.Rank(input=images)
    fixed = [(axis, size) for axis, size in enumerate(expected) if size is not None]
    # Pad so that the lookups below exist whatever the rank; the rank test rejects the padding.
    padded = tf.concat([shape, tf.zeros([len(expected)], tf.int32)], 0)
    ok = tf.equal(rank, len(expected))
    for axis, size in fixed:
        ok = tf.logical_and(ok, tf.equal(padded[axis], size))
    wanted = shape_text(expected)
    message = tf.strings.join(
        [f"{description}: expected shape {wanted}, received shape ", _shape_tensor_text(shape)]
    )
    shape_check = tf.debugging.Assert(ok, [message])
    checks = [shape_check]
    if finite:
        with tf.control_dependencies([shape_check]):  # a wrong shape is reported first
            checks.append(
                tf.debugging.Assert(
                    tf.reduce_all(tf.math.is_finite(images)),
                    [f"{description}: received NaN or Inf values; expected finite numbers"],
                )
            )
    with tf.control_dependencies(checks):
        images = tf.identity(images)
    images.set_shape(expected)  # no EnsureShape op: its error would not name what was expected
    return images
