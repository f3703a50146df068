"""Start training from pretrained weights (`python -m train --init_weights ...`): fine-tuning.

Every block comes from the source; the classifier too when its shape fits (same number of
classes), otherwise it stays freshly initialised. A block the source lacks or has with another
shape is an error: a silently half-initialised backbone would just look like a bad run.
"""

from repvgg_keras import sources
from repvgg_keras.errors import ClassifierMismatchError, SourceError

FUSED_DONOR = (
    "--init_weights {source} holds a deploy-form (fused) model, which cannot be trained: "
    "pass the training-form file (model_train.keras, or a training-form checkpoint)."
)


def load_donor(source, build):
    """The model to copy from, read through the library's one source path (`repvgg_keras.sources`):
    a saved `.keras` model as it is; else `build(include_top)` (a model without weights) loaded
    with the checkpoint ("imagenet" or an authors'/timm file, read once): with its classifier when
    that fits the model's classes, else without. Sources in deploy (fused) form are refused: they
    cannot be trained."""
    if isinstance(source, str) and source.endswith(".weights.h5"):
        raise SourceError(
            f"--init_weights {source!r}: a .weights.h5 file has no architecture to read the classifier from; "
            "pass the .keras model it came from, a .pth/.safetensors checkpoint or 'imagenet'."
        )
    src = sources.training_source(source, FUSED_DONOR)
    if src.kind == "keras_model":
        return src.saved_model
    donor = build(include_top=True)
    try:
        sources.load_into(donor, src)
    except ClassifierMismatchError:  # another class count (loading is strict): blocks only
        donor = build(include_top=False)
        sources.load_into(donor, src)
    return donor


def copy_weights(model, donor):
    """Copy every weighted layer of `donor` into the layer of the same name in `model`.

    Returns the names of `model`'s weighted layers left as they were (the classifier when
    the class count differs). Raises ValueError when a block is missing or does not fit.
    """
    # Another class count is a new task: its classifier starts fresh.
    untouched, misfits = sources.copy_layer_weights(model, donor.layers, fresh=("predictions",))
    if misfits:
        problems = [
            f"{name}: not in the source"
            if donor_shapes is None
            else f"{name}: source weights {donor_shapes}, model weights {shapes}"
            for name, donor_shapes, shapes in misfits
        ]
        listing = "\n  ".join(problems[:8]) + ("\n  ..." if len(problems) > 8 else "")
        raise ValueError(
            f"--init_weights does not fit this model ({len(problems)} layer(s)):\n  {listing}\n"
            "Use a source of the same variant (--model, --num_blocks, --width_multipliers) and the same block "
            "options (--quant_friendly, --ablation), in training form."
        )
    return untouched


def saved_deploy_form(source):
    """The model saved in `source` when it is a deploy-form .keras model (what --qat can start
    from as it is), else None."""
    src = sources.read_source(source)
    return src.saved_model if src.kind == "keras_model" and src.deploy else None
