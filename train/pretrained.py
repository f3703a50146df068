"""Start training from pretrained weights (`python -m train --init_weights ...`): fine-tuning.

Every block comes from the source; the classifier too when its shape fits (same number of
classes), otherwise it stays freshly initialised. A block the source lacks or has with another
shape is an error: a silently half-initialised backbone would just look like a bad run.
"""

from repvgg_keras import sources


def load_donor(source, build):
    """The model to copy from, read through the library's one source path (`repvgg_keras.sources`):
    a saved `.keras` model as it is; else `build(include_top)` (a model without weights) loaded
    with the checkpoint ("imagenet" or an authors'/timm file, read once): with its classifier when
    that fits the model's classes, else without. Sources in deploy (fused) form are refused: they
    cannot be trained."""
    if isinstance(source, str) and source.endswith(".weights.h5"):
        raise sources.SourceError(
            f"--init_weights {source!r}: a .weights.h5 file has no architecture to read the classifier from; "
            "pass the .keras model it came from, a .pth/.safetensors checkpoint or 'imagenet'."
        )
    src = sources.read_source(source)
    if src.deploy:
        raise sources.SourceError(
            f"--init_weights {src.describe()} holds a deploy-form (fused) model, which cannot be trained: "
            "pass the training-form file (model_train.keras, or a training-form checkpoint)."
        )
    if src.kind == "keras_model":
        return src.saved_model
    donor = build(include_top=True)
    try:
        sources.load_into(donor, src)
    except sources.ClassifierMismatchError:  # another class count (loading is strict): blocks only
        donor = build(include_top=False)
        sources.load_into(donor, src)
    return donor


def copy_weights(model, donor):
    """Copy every weighted layer of `donor` into the layer of the same name in `model`.

    Returns the names of `model`'s weighted layers left as they were (the classifier when
    the class count differs). Raises ValueError when a block is missing or does not fit.
    """
    donors = {layer.name: layer for layer in donor.layers if layer.weights}
    untouched, problems = [], []
    for layer in model.layers:
        if not layer.weights:
            continue
        source = donors.get(layer.name)
        target_shapes = [tuple(w.shape) for w in layer.weights]
        source_shapes = [tuple(w.shape) for w in source.weights] if source is not None else None
        if source_shapes == target_shapes:
            layer.set_weights(source.get_weights())
        elif layer.name == "predictions":  # a new task: fresh classifier
            untouched.append(layer.name)
        elif source is None:
            problems.append(f"{layer.name}: not in the source")
        else:
            problems.append(
                f"{layer.name}: source weights {source_shapes}, model weights {target_shapes}"
            )
    if problems:
        listing = "\n  ".join(problems[:8]) + ("\n  ..." if len(problems) > 8 else "")
        raise ValueError(
            f"--init_weights does not fit this model ({len(problems)} layer(s)):\n  {listing}\n"
            "Use a source of the same variant (--model, --num_blocks, --width_multipliers) and the same block "
            "options (--quant_friendly, --ablation), in training form."
        )
    return untouched
