"""`model_from_source`: a model built in its source's form and loaded from it.

The top of the library's import chain: it builds with models.py and reads with sources.py,
which the builders themselves use for `weights=`, so it has to sit above both.
"""

from repvgg_keras import models, specs
from repvgg_keras.errors import SourceError
from repvgg_keras.sources import load_into, read_source, training_source

FUSED_IS_NOT_TRAINABLE = (
    "{source} holds a deploy-form model, but the training form is needed here: fused "
    "(deploy-form) weights cannot be trained; use the training-form file (e.g. model_train.keras) "
    "or checkpoint."
)


def model_from_source(spec, source=None, *, form=None, **kwargs):
    """Build variant `spec` (a name or RepVGGSpec) with the weights of `source`, in the source's form.

    Args:
        spec: a variant name (`list_models()`) or a `RepVGGSpec`.
        source: None (random weights), "imagenet", a checkpoint (.pth/.pt/.bin/.safetensors,
            authors' or timm naming, training or deploy form), a `.weights.h5` file or a saved
            `.keras` model (see `repvgg_keras.sources`), or a `Source` from `read_source`.
        form: None (the source's form), "training" or "deploy": the form the caller needs; a
            source in the other form is an error (a fused model cannot be trained).
        **kwargs: `RepVGG`'s other arguments (input_shape, include_top, classes, pooling, ...).
            `deploy` and `weights` come from the source; so do the block options
            (quant_friendly, use_1x1, use_identity) of a `.keras` file and those a
            `.weights.h5` file shows (all but use_identity of QARepVGG blocks, which has no
            weights: pass it when it was False).

    The file is read once (a checkpoint's tensors stay in memory, its form comes from its
    keys); the model is built in that form and loaded strictly. Raises `SourceError`
    (a ValueError) with the same wording whichever caller asked.
    """
    for reserved in ("weights", "deploy"):
        if reserved in kwargs:
            raise TypeError(f"model_from_source takes no {reserved!r}: the source decides it.")
    if form not in (None, "training", "deploy"):
        raise ValueError(f"form must be None, 'training' or 'deploy', got {form!r}.")
    if isinstance(spec, str):
        spec = specs.get_spec(spec)
    if source is None:
        return models.RepVGG(spec, deploy=form == "deploy", **kwargs)
    if form == "training":
        src = training_source(source, FUSED_IS_NOT_TRAINABLE)
    else:
        src = read_source(source)
    # A file that does not say its form (a nested model's weights) is taken in the form asked for.
    deploy = src.deploy if src.deploy is not None else form == "deploy"
    if form == "deploy" and not deploy:
        raise SourceError(
            f"{src.describe()} holds a {src.form}-form model, but the deploy form is needed here."
        )
    model = models.RepVGG(spec, deploy=deploy, **{**kwargs, **src.block_options})
    load_into(model, src, variant=spec.name)
    return model
