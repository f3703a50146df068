"""Load other people's RepVGG checkpoints (the authors' .pth, timm's .safetensors) strictly.

Formats are recognised from the keys; timm's names are first rewritten to the authors'
(the key maps below are data), then every tensor is mapped onto our layers: conv kernels
OIHW -> HWIO, Linear [out, in] -> Dense [in, out], BatchNorm statistics, SE convs.
Loading is strict: a missing, unexpected or mis-shaped tensor is an error listing them.

`.pth` files are pickles: they are read only with `torch.load(weights_only=True)`
(torch imported lazily), which refuses pickles that would run code.
"""

import hashlib
import os
import re
import zipfile

import keras
import numpy as np
import safetensors.numpy

from repvgg_keras.errors import (
    ClassifierMismatchError,
    MissingDependencyError,
    SourceError,
    SourceNotFoundError,
    check_not_empty,
    error_detail,
)
from repvgg_keras.layers import RepVGGBlock, all_layers, contains_blocks

# timm name -> authors' name, applied in order as regular expressions on whole keys.
TIMM_TO_AUTHORS = (
    (r"^stem\.", "stage0."),
    (r"^stages\.(\d+)\.", lambda m: f"stage{int(m.group(1)) + 1}."),
    (r"\.conv_kxk\.", ".rbr_dense."),
    (r"\.conv_1x1\.", ".rbr_1x1."),
    (r"\.identity\.", ".rbr_identity."),
    (r"\.attn\.fc1\.", ".se.down."),
    (r"\.attn\.fc2\.", ".se.up."),
    (r"\.reparam_conv\.", ".rbr_reparam."),
    (r"^head\.fc\.", "linear."),
)

# Our layer attribute / suffix <- authors' sub-key, per form. (variable, transform)
BN_VARIABLES = {
    "weight": "gamma",
    "bias": "beta",
    "running_mean": "moving_mean",
    "running_var": "moving_variance",
}
IGNORED_SUFFIXES = ("num_batches_tracked",)
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin")


def is_checkpoint_path(path):
    return str(path).endswith(CHECKPOINT_SUFFIXES)


TORCH_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
PICKLE_MAGIC = b"\x80"  # a pickle (protocol 2+): torch's legacy format


def sniff(path):
    """What the file's first bytes say it holds: "zip" or "pickle" (PyTorch's formats),
    "safetensors" (an 8-byte little-endian header length, then its JSON "{") or None.
    File names can lie (a .safetensors file saved as .pth); the content decides."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(TORCH_ZIP_MAGIC):
        return "zip"
    if head.startswith(PICKLE_MAGIC):
        return "pickle"
    if len(head) == 9 and head[8:] == b"{":
        return "safetensors"
    return None


def read_state_dict(path):
    """{name: numpy array} from a .pth/.pt/.bin (torch) or .safetensors file, read as what
    its content is; every problem is a SourceError naming the file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise SourceNotFoundError(f"Checkpoint {path!r} does not exist.")
    check_not_empty(path)
    kind = sniff(path)
    if kind == "safetensors" or (kind is None and path.endswith(".safetensors")):
        try:
            state = safetensors.numpy.load_file(path)
        except Exception as error:  # SafetensorError, or OSError for an unreadable file
            raise SourceError(
                f"{path!r} is not a readable .safetensors file ({error_detail(error)}); "
                "it may be truncated or corrupted: download or convert it again."
            ) from error
    else:
        state = _torch_load(path, kind)
    return unwrap(state, repr(path))


def _torch_load(path, kind):
    try:
        import torch  # lazy: PyTorch is optional and slow to import, needed only for .pth files
    except ImportError as error:
        raise MissingDependencyError(
            f"Reading {path!r} needs PyTorch (it is a pickle). Install the CPU build, e.g. "
            "`pip install torch==2.13.0`, or use timm's .safetensors file, which does not."
        ) from error
    corrupt = (
        f"{path!r} is not a valid PyTorch checkpoint ({{}}); it may be truncated or corrupted: "
        "download or convert it again."
    )
    if kind is None:
        raise SourceError(
            "Refused to load " + corrupt.format("it starts with neither a zip archive nor a pickle")
        )
    if kind == "zip" and not zipfile.is_zipfile(path):  # torch's own message is internal detail
        raise SourceError(corrupt.format("its zip archive is incomplete"))
    try:
        # A file object: torch would take a ".safetensors" name at its word.
        with open(path, "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as error:
        refused = _unpickler_refusal(error)
        if refused is None:  # EOFError, struct.error, a broken archive ...
            detail = error_detail(error)
            if "weights_only" in detail:  # torch's advice to load unsafely: never passed on
                detail = type(error).__name__
            raise SourceError(corrupt.format(detail)) from error
        raise SourceError(
            f"Refused to load {path!r}: it is not a plain state_dict of tensors "
            f"(torch.load(weights_only=True) said: {refused}). "
            "Checkpoints that need arbitrary code to unpickle are never loaded."
        ) from error
    return _tensors_to_numpy(state)


def _unpickler_refusal(error):
    """The reason torch's safe unpickler gave (e.g. "Unsupported global: GLOBAL
    __main__.Foo ..."), without torch's advice to retry unsafely; None for other errors."""
    match = re.search(r"WeightsUnpickler error: (.*?)(?:\. Please |$)", str(error), re.M)
    if match:
        return match.group(1).strip()
    return None


def _tensors_to_numpy(value):
    if isinstance(value, dict):
        return {k: _tensors_to_numpy(v) for k, v in value.items()}
    if hasattr(value, "detach"):
        return (
            value.detach().cpu().float().numpy()
            if value.is_floating_point()
            else value.cpu().numpy()
        )
    return value


def unwrap(state, source="The checkpoint"):
    """Strip the 'state_dict'/'model' wrappers and 'module.' prefixes trainers add; check
    that what is left is a state dict ({name: tensor}). `source` names it in errors."""
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise SourceError(
            f"{source} holds a {type(state).__name__}, not a state dict ({{name: tensor}}): "
            "save model.state_dict() (PyTorch) or use timm's .safetensors file."
        )
    arrays = {}
    for name, value in state.items():
        if not isinstance(name, str):
            raise SourceError(
                f"{source} has the key {name!r} ({type(name).__name__}): a state dict's keys "
                "are tensor names (strings)."
            )
        if isinstance(value, np.ndarray):
            arrays[name[len("module.") :] if name.startswith("module.") else name] = value
    if not arrays:
        sample = ", ".join(f"{k!r}: {type(v).__name__}" for k, v in list(state.items())[:3])
        raise SourceError(
            f"{source} holds no tensors ({len(state)} entr{'y' if len(state) == 1 else 'ies'}"
            f"{': ' + sample if sample else ''}); "
            "a checkpoint is a state dict of tensors (model.state_dict())."
        )
    return arrays


def detect_format(keys, source=None):
    """'authors-train', 'authors-deploy', 'timm-train' or 'timm-deploy'."""
    keys = list(keys)
    if any(k.startswith("stem.") or k.startswith("stages.") for k in keys):
        family = "timm"
    elif any(k.startswith("stage0.") for k in keys):
        family = "authors"
    else:
        raise SourceError(
            f"Unrecognised checkpoint{' ' + source if source else ''}: expected the authors' "
            "RepVGG keys ('stage0.rbr_dense...') or "
            f"timm's ('stem.conv_kxk...'); found e.g. {keys[:3]}."
        )
    deploy = any("rbr_reparam" in k or "reparam_conv" in k for k in keys)
    return f"{family}-{'deploy' if deploy else 'train'}"


def to_authors_names(state):
    """Rewrite timm's keys to the authors' naming (authors' keys pass unchanged)."""
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in TIMM_TO_AUTHORS:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def _conv(array):  # OIHW -> HWIO
    return np.transpose(array, (2, 3, 1, 0))


def _dense(array):  # [out, in] -> [in, out]
    return np.transpose(array)


def _identity(array):
    return array


def _block_prefix(layer_name):
    """Our block name 'stage2_3' -> checkpoint prefix 'stage2.3' (stem 'stage0')."""
    return layer_name.replace("_", ".") if layer_name != "stage0" else "stage0"


def expected_tensors(model):
    """{checkpoint key: (keras variable, transform)} for every weight of `model`."""
    targets = {}

    def add_bn(prefix, bn):
        for torch_name, attr in BN_VARIABLES.items():
            targets[f"{prefix}.{torch_name}"] = (getattr(bn, attr), _identity)

    def add_conv(key, conv, bias=True):
        targets[f"{key}.weight"] = (conv.kernel, _conv)
        if bias:
            targets[f"{key}.bias"] = (conv.bias, _identity)

    layers = {l.name: l for l in all_layers(model)}
    for name, layer in layers.items():
        if isinstance(layer, RepVGGBlock):
            if layer.quant_friendly:
                raise SourceError(
                    f"Block {name!r} is a quant_friendly (QARepVGG) block: the RepVGG checkpoint formats "
                    "(authors', timm) have no such layout. Load Keras weights (.weights.h5/.keras) into it, "
                    "or load the checkpoint into a model built with quant_friendly=False."
                )
            prefix = _block_prefix(name)
            add_conv(f"{prefix}.rbr_dense.conv", layer.dense_conv, bias=False)
            add_bn(f"{prefix}.rbr_dense.bn", layer.dense_bn)
            if layer.pointwise_conv is not None:
                add_conv(f"{prefix}.rbr_1x1.conv", layer.pointwise_conv, bias=False)
                add_bn(f"{prefix}.rbr_1x1.bn", layer.pointwise_bn)
            if layer.identity_bn is not None:
                add_bn(f"{prefix}.rbr_identity", layer.identity_bn)
            if layer.se_reduce is not None:
                add_conv(f"{prefix}.se.down", layer.se_reduce)
                add_conv(f"{prefix}.se.up", layer.se_expand)
        elif name.endswith("_reparam") and _block_name_pattern(name[: -len("_reparam")]):
            block = name[: -len("_reparam")]
            prefix = _block_prefix(block)
            add_conv(f"{prefix}.rbr_reparam", layer)
            if f"{block}_se_reduce" in layers:
                add_conv(f"{prefix}.se.down", layers[f"{block}_se_reduce"])
                add_conv(f"{prefix}.se.up", layers[f"{block}_se_expand"])
        elif name == "predictions":
            targets["linear.weight"] = (layer.kernel, _dense)
            targets["linear.bias"] = (layer.bias, _identity)
    return targets


def _block_name_pattern(name):
    return re.fullmatch(r"stage0|stage[1-9]\d*_\d+", name) is not None


def load_checkpoint(model, path_or_state, source=None):
    """Load a checkpoint (path or state dict) into `model`, strictly. Returns the format.
    `source` names a state dict in errors (a path names itself)."""
    if isinstance(path_or_state, (str, os.PathLike)):
        source = repr(os.fspath(path_or_state))
        state = read_state_dict(path_or_state)
    else:
        state = unwrap(path_or_state, source or "The checkpoint")
    form = detect_format(state, source)
    state = to_authors_names(state)
    targets = expected_tensors(model)
    if not targets:
        raise SourceError(f"Model {model.name!r} has no RepVGG layers to load a checkpoint into.")
    model_is_deploy = not contains_blocks(model)
    if form.endswith("deploy") != model_is_deploy:
        hint = "deploy=True" if form.endswith("deploy") else "deploy=False (then rk.to_deploy)"
        raise SourceError(
            f"The checkpoint{' ' + source if source else ''} is in {form.split('-')[1]} form but "
            f"the model is in {'deploy' if model_is_deploy else 'training'} form: build the "
            f"model with {hint}."
        )
    has_head = "predictions" in {l.name for l in model.layers}
    if not has_head:  # include_top=False: the classifier is dropped on purpose
        state = {k: v for k, v in state.items() if not k.startswith("linear.")}
    elif "linear.weight" not in state and "linear.weight" in targets:
        raise ClassifierMismatchError(
            "The checkpoint has no classifier (linear.weight) but the model has one: build with "
            "include_top=False and put your own head on top."
        )
    elif "linear.weight" in state and "linear.weight" in targets:
        ckpt_classes = state["linear.weight"].shape[0] if state["linear.weight"].ndim else None
        model_classes = targets["linear.weight"][0].shape[-1]
        if ckpt_classes is not None and ckpt_classes != model_classes:
            raise ClassifierMismatchError(
                f"The checkpoint's classifier has {ckpt_classes} classes but the model has "
                f"{model_classes}. Build with classes={ckpt_classes}, or include_top=False to "
                "drop the classifier and put your own head on top."
            )
    relevant = {k: v for k, v in state.items() if not k.endswith(IGNORED_SUFFIXES)}
    missing = sorted(set(targets) - set(relevant))
    unexpected = sorted(set(relevant) - set(targets))
    mismatched = [
        problem
        for key in sorted(set(targets) & set(relevant))
        if (problem := _misfit(key, relevant[key], *targets[key]))
    ]
    if missing or unexpected or mismatched:
        raise SourceError(
            f"Checkpoint{' ' + source if source else ''} ({form}) does not match model "
            f"{model.name!r}; nothing was loaded.\n"
            + _listing("missing from the checkpoint", missing)
            + _listing("unexpected in the checkpoint", unexpected)
            + _listing("shape mismatches", mismatched)
            + "Check the variant name (and groups/SE), deploy=, include_top and classes."
        )
    for key, (variable, transform) in targets.items():
        variable.assign(transform(relevant[key]).astype(np.float32))
    return form


def _misfit(key, value, variable, transform):
    """Why the checkpoint's `value` cannot fill `variable` ("key: ..."), or None when it fits:
    type and rank are checked before the layout transform, which would fail on them."""
    if value.dtype.kind != "f":
        return f"{key}: checkpoint {value.dtype} values, model float"
    if value.ndim != len(variable.shape):
        return f"{key}: checkpoint shape {tuple(value.shape)} ({value.ndim}-D) vs model {tuple(variable.shape)}"
    if tuple(transform(value).shape) != tuple(variable.shape):
        return f"{key}: checkpoint {tuple(transform(value).shape)} vs model {tuple(variable.shape)}"
    return None


def _listing(title, items, limit=12):
    if not items:
        return ""
    shown = ", ".join(items[:limit]) + (
        f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    )
    return f"  {title} ({len(items)}): {shown}\n"


# ImageNet weights: timm's republished files (the authors' weights, remapped).
IMAGENET_BASE_URL = "https://huggingface.co/timm/{timm_name}/resolve/main/model.safetensors"
BASE_URL_ENV = "REPVGG_KERAS_WEIGHTS_URL"  # e.g. a local mirror: "http://127.0.0.1:8000/{timm_name}.safetensors"
CACHE_DIR_ENV = "REPVGG_KERAS_CACHE_DIR"  # default: Keras's cache (~/.keras)
UNPUBLISHED = ("RepVGG_B1g2", "RepVGG_B2g2", "RepVGG_B3g2")


def imagenet_weights_path(model_name, cache_dir=None):
    """Download (once) timm's ImageNet .safetensors for `model_name` and return its local path.

    The file is cached by keras.utils.get_file; its SHA-256 is recorded beside it at
    first download and checked on every later use, so a corrupted or swapped cache file
    is an error rather than silently different weights.
    """
    if model_name in UNPUBLISHED:
        raise SourceError(
            f"No ImageNet weights are published for {model_name} (timm republished the authors' "
            "weights except the g2 variants). Use RepVGG_B1g4/B2g4/B3g4, or pass a checkpoint path."
        )
    timm_name = model_name.replace("RepVGG_", "repvgg_").lower() + ".rvgg_in1k"
    url = os.environ.get(BASE_URL_ENV, IMAGENET_BASE_URL).format(timm_name=timm_name)
    cache_dir = cache_dir or os.environ.get(CACHE_DIR_ENV)
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)  # get_file falls back to /tmp for a missing dir
    try:
        path = keras.utils.get_file(
            fname=f"{timm_name}.safetensors",
            origin=url,
            cache_dir=cache_dir,
            cache_subdir="repvgg_keras",
        )
    except Exception as error:  # URLError, HTTPError, OSError: one message naming the URL
        raise SourceError(
            f"Could not download the ImageNet weights of {model_name} from {url} ({error}). Check the "
            f"network, set {BASE_URL_ENV} to a mirror, or pass a downloaded checkpoint path."
        ) from error
    _check_recorded_hash(path)
    return path


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_recorded_hash(path):
    record = path + ".sha256"
    actual = _sha256(path)
    if not os.path.exists(record):
        with open(record, "w") as f:
            f.write(actual + "\n")
        return
    with open(record) as f:
        expected = f.read().strip()
    if expected != actual:
        raise SourceError(
            f"Cached weights {path} changed since they were downloaded (SHA-256 {actual} != {expected}). "
            "Delete the file and its .sha256 to download it again."
        )
