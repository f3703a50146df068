"""Reading a model source once, and loading it into a built model, with one family of errors.

A *source* is what a user names to get weights from:

- "imagenet": timm's published weights for the variant (downloaded once, hash-checked);
- an authors' or timm checkpoint (`.pth`, `.pt`, `.bin`, `.safetensors`), training or
  deploy form (detected from the keys);
- a Keras `.weights.h5` file (form and block options read from its layout);
- a saved `.keras` model, training form (possibly QARepVGG or ablation blocks) or deploy form.

`read_source` + `load_into` serve the builders' `weights=` and `from_source.model_from_source`
(which builds the model in the source's form); `training_source` + `copy_layer_weights` serve
training from another model's weights (fine-tuning's donor, a segmentation backbone). A file is
read once, and every problem is a `SourceError` (a ValueError) worded the same for every caller.
This module sits below the builders (models.py, pspnet.py), which load their `weights=` with it.
"""

import collections
import dataclasses
import os
import re
import warnings
import zipfile

import h5py
import keras

from repvgg_keras import checkpoints
from repvgg_keras.errors import (
    ClassifierMismatchError,
    SourceError,
    SourceNotFoundError,
    check_not_empty,
    error_detail,
)
from repvgg_keras.layers import RepVGGBlock, all_layers, contains_blocks

KINDS = ("imagenet", "checkpoint", "keras_weights", "keras_model")
SUFFIXES = "a .keras or .weights.h5 file, a .pth/.pt/.bin/.safetensors checkpoint, or 'imagenet'"


@dataclasses.dataclass
class Source:
    """A source read once: what it is, its form and, for files, its content."""

    kind: str  # one of KINDS
    path: str = None  # None for "imagenet" (resolved per variant at load time)
    state: dict = None  # checkpoint tensors by name (kind "checkpoint")
    format: str = None  # "timm-train", "authors-deploy", ... (checkpoints)
    saved_model: object = None  # the loaded keras.Model (kind "keras_model")
    deploy: bool = None  # deploy (plain) form; None when the file does not say
    # quant_friendly, use_1x1, use_identity
    block_options: dict = dataclasses.field(default_factory=dict)

    @property
    def form(self):
        return {True: "deploy", False: "training", None: "unknown"}[self.deploy]

    def describe(self):
        return "'imagenet'" if self.path is None else repr(self.path)


def read_source(source):
    """Read `source` (see the module docstring) once into a `Source`; a `Source` passes through."""
    if isinstance(source, Source):
        return source
    if isinstance(source, str) and source == "imagenet":
        return Source("imagenet", deploy=False)
    if not isinstance(source, (str, os.PathLike)):
        raise SourceError(f"A model source is {SUFFIXES}; got {type(source).__name__} {source!r}.")
    path = os.fspath(source)
    if not os.path.exists(path):
        raise SourceNotFoundError(
            f"Weights file {path!r} does not exist. Pass {SUFFIXES} (or no weights for random initialisation)."
        )
    if os.path.isdir(path):
        raise SourceError(f"{path!r} is a directory; a model source is {SUFFIXES}.")
    if not os.access(path, os.R_OK):
        raise SourceError(f"{path!r} cannot be read (permission denied).")
    check_not_empty(path)
    if checkpoints.is_checkpoint_path(path):
        state = checkpoints.read_state_dict(path)
        form = checkpoints.detect_format(state, repr(path))
        return Source("checkpoint", path, state=state, format=form, deploy=form.endswith("deploy"))
    if path.endswith(".weights.h5"):
        deploy, options = _weights_file_layout(path)
        return Source("keras_weights", path, deploy=deploy, block_options=options)
    if path.endswith(".keras"):
        model = _load_keras_model(path)
        return Source(
            "keras_model",
            path,
            saved_model=model,
            deploy=not contains_blocks(model),
            block_options=block_options(model),
        )
    raise SourceError(f"Unsupported weights file {path!r}: expected {SUFFIXES}.")


def block_options(model):
    """The builder options (quant_friendly, use_1x1, use_identity) of a training-form model's blocks."""
    blocks = [l for l in all_layers(model) if isinstance(l, RepVGGBlock)]
    if not blocks:
        return {}
    return dict(
        quant_friendly=any(b.quant_friendly for b in blocks),
        use_1x1=any(b.use_1x1 for b in blocks),
        use_identity=any(b.use_identity for b in blocks),
    )


def _load_keras_model(path):
    # Keras reports any unreadable archive as "File not found", even when the file exists.
    if not zipfile.is_zipfile(path):
        raise SourceError(
            f"{path!r} is not a valid .keras file (not the zip archive model.save writes); it may be "
            "truncated or corrupted: save or copy it again."
        )
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as error:  # Keras raises many types with internal detail; one message instead
        raise SourceError(
            f"Could not load the saved model {path!r}: {error_detail(error)}"
        ) from error


def _weights_file_layout(path):
    """(deploy, block options) of a .weights.h5 file saved from a builder's model; (None, {}) when
    its layout is not a builder's (e.g. a nested model): the model decides then."""
    try:
        with h5py.File(path, "r") as f:
            if "layers" not in f:
                return None, {}
            groups = {
                name: set(f["layers"][name].keys())
                if isinstance(f["layers"][name], h5py.Group)
                else set()
                for name in f["layers"]
            }
    except OSError as error:
        raise SourceError(
            f"{path!r} is not a valid .weights.h5 file ({error}); it may be truncated or corrupted: save it again."
        ) from error
    blocks = [parts for name, parts in groups.items() if name.startswith("rep_vgg_block")]
    if blocks:
        options = dict(
            quant_friendly=any("post_bn" in b for b in blocks),
            use_1x1=any("pointwise_conv" in b for b in blocks),
        )
        # A QARepVGG identity branch has no weights: the caller says.
        if not options["quant_friendly"]:
            options["use_identity"] = any("identity_bn" in b for b in blocks)
        return False, options
    if any(name.startswith("conv2d") for name in groups):
        return True, {}
    return None, {}


def load_into(model, source, variant=None):
    """Load `source` into the built `model`, strictly (nothing is loaded unless everything fits).

    `variant` names the ImageNet weights for "imagenet" (default: `model.name`). Returns the `Source`.
    Raises `SourceError` (ClassifierMismatchError when only the class count differs).
    """
    src = read_source(source)
    if src.kind == "imagenet":
        path = checkpoints.imagenet_weights_path(variant or model.name)
        checkpoints.load_checkpoint(model, path)
    elif src.kind == "checkpoint":
        checkpoints.load_checkpoint(model, src.state, src.describe())
    elif src.kind == "keras_weights":
        _load_weights_file(model, src)
    else:
        _copy_saved_model(model, src)
    return src


def _model_form(model):
    return "training (three-branch)" if contains_blocks(model) else "deploy (plain)"


def _does_not_fit(model, src, detail):
    hint = ""
    if src.deploy is not None and src.deploy == contains_blocks(model):
        hint = f" The file holds the {src.form} form: build with deploy={src.deploy}" + (
            " (then rk.to_deploy)." if not src.deploy else "."
        )
    return SourceError(
        f"Weights file {src.path!r} does not fit model {model.name!r} in {_model_form(model)} form.{hint} "
        "The file must come from the same variant, the same form (training-form files need deploy=False, "
        "files saved from to_deploy(...) need deploy=True), the same block options (quant_friendly, "
        f"use_1x1/use_identity), the same include_top/classes and the same input channels. {detail}"
    )


def _load_weights_file(model, src):
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.load_weights(src.path)
        skipped = [str(w.message) for w in caught if "freshly-initialized" in str(w.message)]
        if skipped:  # Keras loaded only part of the model: never accept that silently
            raise ValueError(skipped[0])
    except Exception as error:  # Keras raises ValueError/KeyError with internal detail
        _check_weights_file_shapes(model, src)  # names the class count or the shapes that differ
        detail = " ".join(str(error).strip().splitlines()[:3]) or type(error).__name__
        detail = re.sub(r"value=\[.*", "...", detail)  # never weight values
        raise _does_not_fit(model, src, f"Keras said: {detail}") from error


def _check_weights_file_shapes(model, src):
    """Compare the tensor shapes a .weights.h5 file holds with the model's before Keras reads it:
    another class count is named with its count (ClassifierMismatchError), another variant or
    form by the shapes that differ, never by weight values."""
    shapes = []
    try:
        with h5py.File(src.path, "r") as f:
            f.visititems(
                lambda _, o: shapes.append(tuple(o.shape)) if isinstance(o, h5py.Dataset) else None
            )
    except OSError:
        return  # not HDF5 after all: Keras's own error names it
    theirs = collections.Counter(shapes)
    ours = collections.Counter(tuple(w.shape) for w in model.weights)
    if theirs == ours:
        return
    extra, missing = theirs - ours, ours - theirs
    classifier = [w for w in model.weights if w.path.startswith("predictions/")]
    if len(classifier) == 2 and sum(missing.values()) == 2 and sum(extra.values()) == 2:
        kernel = tuple(classifier[0].shape)
        found = [shape for shape in extra if len(shape) == 2 and shape[0] == kernel[0]]
        if found:
            classes = found[0][1]
            raise ClassifierMismatchError(
                f"Weights file {src.path!r} holds a {classes}-class classifier; model "
                f"{model.name!r} has {kernel[1]} classes: build it with classes={classes} "
                f"(the exporters: --classes {classes})."
            )
    listing = lambda counts: ", ".join(str(list(shape)) for shape in list(counts)[:3])
    raise _does_not_fit(
        model,
        src,
        f"The file holds {len(shapes)} tensors, the model {len(model.weights)}; shapes only in "
        f"the file: {listing(extra) or 'none'}; only in the model: {listing(missing) or 'none'}.",
    )


def _copy_saved_model(model, src):
    if _is_pspnet(src.saved_model) and not _is_pspnet(model):
        raise SourceError(
            f"{src.describe()} is a PSPNet segmentation model, not a {model.name} classifier: "
            "load it with keras.saving.load_model, or start a classifier from its backbone with "
            "`python -m train --init_weights` (blocks copied by name, a fresh classifier)."
        )
    ours, theirs = model.weights, src.saved_model.weights
    mismatched = [
        f"{a.path} {tuple(a.shape)} vs file {tuple(b.shape)}"
        for a, b in zip(ours, theirs)
        if tuple(a.shape) != tuple(b.shape)
    ]
    if len(ours) != len(theirs) or mismatched:
        counts = (
            f"model has {len(ours)} weights, file {len(theirs)}" if len(ours) != len(theirs) else ""
        )
        raise _does_not_fit(model, src, "; ".join(filter(None, [counts] + mismatched[:3])))
    model.set_weights(src.saved_model.get_weights())


def _is_pspnet(model):
    """A segmentation model built by rk.PSPNet: its RepVGG trunk is the nested "backbone"."""
    return any(l.name == "backbone" and isinstance(l, keras.Model) for l in model.layers)


def training_source(source, refusal):
    """`read_source(source)` for training from it: a source in the deploy (fused) form is
    refused, since fused weights cannot be trained (nor unfused again).

    `refusal`: the caller's SourceError message, "{source}" standing for `Source.describe()`,
    so each caller says what it was asked to do. A source whose form is unknown passes.
    """
    src = read_source(source)
    if src.deploy:
        raise SourceError(refusal.format(source=src.describe()))
    return src


def copy_layer_weights(model, donor_layers, fresh=()):
    """Copy into each weighted layer of `model` the weights of the donor layer of the same name.

    `donor_layers`: the layers of a training-form model to copy from (e.g. `donor.layers`);
    nested models among them are looked inside too, so a PSPNet's blocks (in its "backbone")
    are found by name, while a layer at the top keeps its name first. `fresh`: names of layers
    that keep their own weights when the donor lacks them or has them in another shape (a new
    classifier).

    Returns `(untouched, misfits)`: the `fresh` layers left as they were, and
    `[(name, donor weight shapes or None when the donor lacks it, model weight shapes)]` for the
    other layers that do not fit. Nothing is copied unless `misfits` is empty: a half-copied
    backbone would only show up as a bad training run.
    """
    donors = _layers_by_name(donor_layers)
    pairs, untouched, misfits = [], [], []
    for layer in model.layers:
        if not layer.weights:
            continue
        donor = donors.get(layer.name)
        shapes = [tuple(w.shape) for w in layer.weights]
        has_weights = donor is not None and donor.weights
        donor_shapes = [tuple(w.shape) for w in donor.weights] if has_weights else None
        if donor_shapes == shapes:
            pairs.append((layer, donor))
        elif layer.name in fresh:
            untouched.append(layer.name)
        else:
            misfits.append((layer.name, donor_shapes, shapes))
    if not misfits:
        for layer, donor in pairs:
            layer.set_weights(donor.get_weights())
    return untouched, misfits


def _layers_by_name(layers):
    """{name: layer} for `layers` and the layers of nested models among them, breadth first,
    so the shallowest layer of a name wins (blocks are left whole)."""
    found, level = {}, list(layers)
    while level:
        for layer in level:
            found.setdefault(layer.name, layer)
        level = [
            inner for layer in level if isinstance(layer, keras.Model) for inner in layer.layers
        ]
    return found
