"""Convert an authors' (.pth) or timm (.safetensors) checkpoint into a Keras weights file.

    python -m repvgg_keras.convert_checkpoint --model RepVGG_D2se --checkpoint X.pth --output d2se.weights.h5

The output is in the checkpoint's form (training or deploy); load it with
`rk.RepVGG_D2se(weights=...)` (add deploy=True for deploy-form files). The saved file is
read back and its outputs compared with the converted model before it is moved into place.
"""

import os
import sys
import tempfile

import numpy as np
from absl import app, flags

from repvgg_keras import sources
from repvgg_keras.from_source import model_from_source
from repvgg_keras.models import get_model
from repvgg_keras.parity import max_relative_difference

FLAGS = flags.FLAGS


def convert(model_name, checkpoint, output, classes=1000, include_top=True, overwrite=False):
    """Load `checkpoint` strictly into `model_name` and save `output`; returns (form, max diff)."""
    if not output.endswith(".weights.h5"):
        raise ValueError(f"--output must end with .weights.h5, got {output!r}.")
    if os.path.exists(output) and not overwrite:
        raise FileExistsError(f"{output} exists: pass --overwrite to replace it.")
    source = sources.read_source(checkpoint)
    if source.kind != "checkpoint":
        raise ValueError(
            f"--checkpoint {checkpoint!r} is not a .pth/.pt/.bin/.safetensors checkpoint "
            "(Keras files load directly with weights=...)."
        )
    kwargs = dict(include_top=include_top)
    if include_top:
        kwargs["classes"] = classes
    model = model_from_source(model_name, source, **kwargs)
    kwargs["deploy"] = source.deploy
    directory = os.path.dirname(os.path.abspath(output))
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            staged = os.path.join(tmp, os.path.basename(output))
            model.save_weights(staged)
            reloaded = get_model(model_name, weights=staged, **kwargs)
            size = model.input_shape[1]
            images = (
                np.random.default_rng(0)
                .normal(size=(2, size, size, model.input_shape[-1]))
                .astype("float32")
            )
            diff = max_relative_difference(
                reloaded(images, training=False), model(images, training=False)
            )
            if diff != 0.0:
                raise RuntimeError(
                    f"The saved weights do not reproduce the model (max relative difference {diff:.3e})."
                )
            os.replace(staged, output)
    except OSError as error:  # the staging directory is ours: name the user's path instead
        raise ValueError(f"Cannot write --output {output}: {error.strerror or error}.") from error
    return source.format, diff


def main(argv):
    del argv
    try:
        if FLAGS.classes < 1:
            raise ValueError(
                f"--classes must be at least 1 (the checkpoint's classifier width), got {FLAGS.classes}."
            )
        form, diff = convert(
            FLAGS.model,
            FLAGS.checkpoint,
            FLAGS.output,
            FLAGS.classes,
            FLAGS.include_top,
            FLAGS.overwrite,
        )
    # OSError covers FileExistsError and FileNotFoundError.
    except (ValueError, OSError, ImportError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"checkpoint format: {form}; saved {FLAGS.output}; reload max relative difference {diff:.1e}"
    )
    return 0


if __name__ == "__main__":
    flags.DEFINE_string("model", None, "Variant name, e.g. RepVGG_A0.")
    flags.DEFINE_string("checkpoint", None, "The authors' .pth or timm's .safetensors file.")
    flags.DEFINE_string("output", None, "Keras weights file to write (.weights.h5).")
    flags.DEFINE_integer("classes", 1000, "Classes of the checkpoint's classifier.")
    flags.DEFINE_bool("include_top", True, "Keep the classifier (False: backbone weights only).")
    flags.DEFINE_bool("overwrite", False, "Replace an existing output file.")
    flags.mark_flags_as_required(["model", "checkpoint", "output"])
    app.run(lambda argv: sys.exit(main(argv)))
