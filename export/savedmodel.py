"""Export a SavedModel laid out for TensorFlow Serving, with three signatures and warm-up.

    python -m export.savedmodel --model RepVGG_A0 --weights a0.keras --export_dir models/repvgg_a0

Writes <export_dir>/<version>/ with signatures
  serving_default: float32 `images` [N, H, W, C] -> `logits`, `probabilities`
  serving_uint8:   uint8 `images` (0..255 pixels, normalised inside)
  serving_bytes:   string `images` [N] (encoded JPEG/PNG, decoded, resized, normalised inside)
and assets.extra/tf_serving_warmup_requests. The export is loaded back and verified
before it is moved into place.
"""

import os
import sys

import numpy as np
from absl import app, flags

from export import common, images, verify

FLAGS = flags.FLAGS
SIGNATURES = ("serving_default", "serving_uint8", "serving_bytes")


def save_serving_model(model, path, preprocessing_mode="imagenet", preprocessing_included=False):
    """Write a SavedModel of `model` with the three serving signatures to `path`.

    Uses tf.saved_model.save on a tf.Module rather than keras.export.ExportArchive:
    with Keras 3.15 the archive stores every variable twice (measured: 54 MB instead of
    27 MB of variables for RepVGG-A0 with 10 classes).
    """
    import tensorflow as tf

    from repvgg_keras import preprocessing

    _, height, width, channels = model.input_shape

    def outputs(model_input):
        logits = model(model_input, training=False)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits, axis=-1)}

    def from_pixels(pixels):
        pixels = tf.cast(pixels, tf.float32)
        if not preprocessing_included:
            pixels = preprocessing.normalize(pixels, preprocessing_mode, channels)
        return outputs(pixels)

    def decode(encoded):
        image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
        image = tf.image.resize(tf.cast(image, tf.float32), (height, width), method="bilinear")
        return tf.ensure_shape(image, (height, width, channels))

    image_spec = lambda dtype: tf.TensorSpec((None, height, width, channels), dtype, name="images")
    module = tf.Module()
    module.model = model
    signatures = {
        "serving_default": tf.function(outputs, input_signature=[image_spec(tf.float32)]),
        "serving_uint8": tf.function(from_pixels, input_signature=[image_spec(tf.uint8)]),
        "serving_bytes": tf.function(
            lambda images: from_pixels(tf.map_fn(decode, images, fn_output_signature=tf.float32)),
            input_signature=[tf.TensorSpec((None,), tf.string, name="images")],
        ),
    }
    tf.saved_model.save(module, path, signatures=signatures)


def write_warmup(export_path, model_name, pixels):
    """TF Serving warm-up: one PredictRequest per signature, replayed at model load."""
    import tensorflow as tf

    from export import predict_requests

    extra = os.path.join(export_path, "assets.extra")
    os.makedirs(extra, exist_ok=True)
    with tf.io.TFRecordWriter(os.path.join(extra, "tf_serving_warmup_requests")) as writer:
        for log in predict_requests.warmup_logs(model_name, pixels):
            writer.write(log.SerializeToString())


def export_savedmodel(model, version_dir, *, preprocessing_mode="imagenet",
                      preprocessing_included=False, verify_pixels=None, model_name="repvgg",
                      reference=None, overwrite=False):
    """Export `model` (already in the form to ship) to `version_dir`, verified, atomically.

    `reference` is the Keras model whose outputs the export must reproduce (default:
    `model`); returns the verification Report.
    """
    import tensorflow as tf

    from repvgg_keras import preprocessing

    reference = reference or model
    _, height, width, channels = model.input_shape
    if verify_pixels is None:
        verify_pixels = images.load_images("random", 4, height, width, channels)
    with common.atomic_output(version_dir, overwrite=overwrite) as staged:
        save_serving_model(model, staged, preprocessing_mode, preprocessing_included)
        write_warmup(staged, model_name, verify_pixels[:1])
        loaded = tf.saved_model.load(staged)
        missing = set(SIGNATURES) - set(loaded.signatures)
        if missing:
            raise verify.VerificationError(f"SavedModel lacks signatures {sorted(missing)}.")
        model_input = (
            verify_pixels.astype(np.float32) if preprocessing_included
            else preprocessing.normalize(verify_pixels.astype(np.float32), preprocessing_mode, channels)
        )
        expected = np.asarray(reference(model_input, training=False))
        size = verify.directory_size_mb(staged)
        got = loaded.signatures["serving_default"](images=tf.constant(model_input))["logits"]
        report = verify.check(verify.compare("SavedModel serving_default", "fp32", got, expected, size))
        got = loaded.signatures["serving_uint8"](images=tf.constant(verify_pixels))["logits"]
        verify.check(verify.compare("SavedModel serving_uint8", "fp32", got, expected, size))
        encoded = tf.stack([tf.io.encode_png(p) for p in verify_pixels])
        got = loaded.signatures["serving_bytes"](images=encoded)["logits"]
        verify.check(verify.compare("SavedModel serving_bytes", "fp32", got, expected, size))
    return report


def main(argv):
    del argv

    def export(shipped, reference, to_input, pixels):
        version_dir = os.path.join(FLAGS.export_dir, str(FLAGS.version))
        export_savedmodel(shipped, version_dir, preprocessing_mode=FLAGS.preprocessing,
                          preprocessing_included=FLAGS.include_preprocessing, verify_pixels=pixels,
                          model_name=FLAGS.serving_name or FLAGS.model.lower(), reference=reference,
                          overwrite=FLAGS.overwrite)
        return version_dir

    return common.run_exporter(export)


if __name__ == "__main__":
    common.define_model_flags()
    flags.DEFINE_string("export_dir", None, "TF Serving model base directory; the version goes below it.")
    flags.DEFINE_integer("version", 1, "Model version (the subdirectory TF Serving loads).")
    flags.DEFINE_string("serving_name", None, "Model name in TF Serving (default: the variant, lower case).")
    flags.mark_flag_as_required("export_dir")
    app.run(lambda argv: sys.exit(main(argv)))
