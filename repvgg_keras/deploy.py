"""`to_deploy(model)`: clone a Keras model into its inference form, with nothing left to fold.

One graph walk (`keras.models.clone_model`): every `RepVGGBlock` becomes a `PlainBlock`
of built-in layers with the fused weights; a BatchNormalization that is the only consumer
of a linear Conv2D/DepthwiseConv2D is folded into that conv; dropout and noise layers (the
identity at inference) are left out; PSPNet's AdaptiveAveragePooling2D and ResizeLike become
built-in layers where the sizes are fixed (`spatial.builtin_call`); every other layer is cloned
from its config and gets a copy of its weights. The input model is left untouched.
"""

import keras
import numpy as np

from repvgg_keras import compat, fusion, spatial
from repvgg_keras.layers import PlainBlock, RepVGGBlock, all_layers, contains_blocks


def is_deploy_form(model):
    """True when `model` holds no RepVGGBlock but plain RepVGG convs (`*_reparam`)."""
    return not contains_blocks(model) and any(
        isinstance(l, keras.layers.Conv2D) and l.name.endswith("_reparam")
        for l in all_layers(model)
    )


COMPUTE_DTYPES = (None, "float32", "bfloat16", "float16")

# The identity at inference: left out of the deploy graph. Dropout covers SpatialDropout1D/2D/3D
# (its subclasses).
INFERENCE_IDENTITY = tuple(
    getattr(keras.layers, name)
    for name in ("Dropout", "GaussianNoise", "GaussianDropout", "AlphaDropout")
    if hasattr(keras.layers, name)
)
FOLDABLE_CONVS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)


def to_deploy(model, dtype=None):
    """Return a new model computing `model` in inference mode, with nothing left to fold.

    Every RepVGG block becomes one plain conv; every BatchNormalization whose input is a
    Conv2D or DepthwiseConv2D without activation, used by nothing else, is folded into that
    conv (which gains a bias); Dropout, SpatialDropout*, GaussianNoise, GaussianDropout and
    AlphaDropout are left out; a layer that makes a model output stays (the outputs keep
    their names). Works on functional and Sequential models, nested models
    included (e.g. a head on a RepVGG backbone). A model already in deploy form with nothing
    to fold is returned as it is (unless `dtype` asks for another precision).

    dtype: None (each block keeps its own policy), "float32", "bfloat16" or "float16": the
    fused blocks hold their weights and compute in that type, so the input is cast once at
    the first block and the stack runs without a cast per layer (Keras's "mixed_*" policies
    cast at every layer, which costs what the lower precision saves at small batches). The
    layers around the blocks (pooling, classifier, heads) keep their own policy: float32
    logits from a low-precision backbone.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"to_deploy expects a keras.Model, got {type(model).__name__}.")
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be one of {COMPUTE_DTYPES[1:]} or None, got {dtype!r}.")
    deploy_form = is_deploy_form(model)
    if not contains_blocks(model):
        if deploy_form and dtype is None and not _has_foldable_layers(model):
            return model
        if not deploy_form and not _has_foldable_layers(model):
            raise ValueError(
                f"Model {model.name!r} contains no RepVGGBlock, BatchNormalization or dropout "
                "layer, so there is nothing to fuse. to_deploy converts models built with "
                "repvgg_keras (training form, deploy=False) or models that use "
                "repvgg_keras.RepVGGBlock layers."
            )
    if not model.built:
        raise ValueError(f"Model {model.name!r} is not built: call it on data or build it first.")
    kept = set()  # ids of layers left as they are: outputs, convs with another consumer
    while True:
        try:
            return _Converter(dtype, retype_plain=deploy_form, kept=kept).convert(model)
        except _SharedConv as shared:  # a folded conv had another consumer: walk again without
            kept.add(id(shared.conv))


def _has_foldable_layers(model):
    return any(
        isinstance(l, (keras.layers.BatchNormalization, *INFERENCE_IDENTITY)) or _has_replacement(l)
        for l in all_layers(model)
    )


def _has_replacement(layer):
    """A layer that names its own deploy form (`deploy_replacement()`: a layer and its
    weights, or None where the deploy form computes without it): the QAT layers."""
    return callable(getattr(layer, "deploy_replacement", None))


def _needs_conversion(model):
    return contains_blocks(model) or _has_foldable_layers(model)


def _is_plain_block_layer(layer):
    """A layer a PlainBlock is made of (named after its block: `<block>_reparam`, `_pad`, `_se_*`, `_relu`)."""
    suffixes = ("_reparam", "_pad", "_relu", "_se_pool", "_se_reduce", "_se_expand", "_se_scale")
    return layer.name.endswith(suffixes)


class _SharedConv(Exception):
    """A conv whose BatchNorm was folded turned out to have another consumer."""

    def __init__(self, conv):
        super().__init__(conv.name)
        self.conv = conv


def _numpy(value):
    return np.asarray(keras.ops.convert_to_numpy(value), np.float64)


def _fold_weights(conv, bn):
    """float32 (kernel, bias) of `conv` followed by the inference-mode BatchNorm `bn`."""
    weights = conv.get_weights()
    kernel = np.asarray(weights[0], np.float64)
    bias = weights[1] if conv.use_bias else 0.0
    if isinstance(conv, keras.layers.DepthwiseConv2D):  # output channel c * multiplier + m
        kernel = kernel.reshape(*kernel.shape[:-2], -1)
    channels = kernel.shape[-1]
    gamma = _numpy(bn.gamma) if bn.scale else np.ones(channels)
    beta = _numpy(bn.beta) if bn.center else np.zeros(channels)
    mean, variance = _numpy(bn.moving_mean), _numpy(bn.moving_variance)
    kernel, bias = fusion.fold_batchnorm(kernel, gamma, beta, mean, variance, bn.epsilon, bias)
    kernel = kernel.reshape(weights[0].shape)
    return [kernel.astype(np.float32), bias.astype(np.float32)]


class _Converter:
    """Holds the maps from cloned layers back to their originals during one conversion."""

    def __init__(self, dtype=None, retype_plain=False, kept=()):
        self.dtype = dtype
        self.retype_plain = retype_plain  # a deploy-form input: its plain block layers take dtype
        self.kept = kept  # ids of original layers left as they are (outputs, shared convs)
        self.originals = {}  # id(clone) -> (clone, original layer), for weight copying
        self.plain_blocks = {}  # id(block) -> PlainBlock, so a shared block stays shared
        self.loaded = set()
        self.conv_outputs = {}  # id(tensor) -> (tensor, original conv, args, kwargs)
        self.folded = {}  # id(tensor) -> (tensor, original conv): unfused outputs, unused
        self.conv_calls = {}  # id(original conv) -> times called in the new graph
        self.replaced_weights = {}  # id(replacement layer) -> its weights (QAT layers)

    def convert(self, model):
        """The deploy form of a functional or Sequential `model` (nested models included)."""
        if isinstance(model, keras.Sequential):
            return self._convert_sequential(model)
        if not compat.is_graph_model(model):
            raise TypeError(
                f"to_deploy supports functional and Sequential models; {model.name!r} is a "
                f"subclassed {type(model).__name__}. Build it functionally, or convert its "
                "RepVGG backbone (a functional model) and reuse it in your subclass."
            )
        # Layers that make an output stay, so the outputs keep their names.
        self.kept.update(id(model.get_layer(name)) for name in model.output_names)
        return keras.models.clone_model(
            model,
            clone_function=self._clone,
            call_function=self._call,
            recursive=False,  # nested models go through _clone, blocks and all
        )

    def _convert_sequential(self, model):
        self.kept.add(id(model.layers[-1]))
        inputs = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype)
        x = inputs
        for layer in model.layers:
            x = self._call(self._clone(layer), x)
        return keras.Model(inputs, x, name=model.name)

    def _clone(self, layer):
        if isinstance(layer, RepVGGBlock):
            return layer  # replaced in _call
        if isinstance(layer, keras.Model) and (
            _needs_conversion(layer) or (self.retype_plain and compat.is_graph_model(layer))
        ):
            return self.convert(layer)
        if _has_replacement(layer):
            clone, weights = layer.deploy_replacement()
            if clone is None:
                return layer  # left out in _call
            self.replaced_weights[id(clone)] = weights
            return clone
        clone = layer.__class__.from_config(self._config(layer))
        self.originals[id(clone)] = (clone, layer)
        return clone

    def _config(self, layer, **changes):
        config = {**layer.get_config(), **changes}
        if self.retype_plain and self.dtype is not None and _is_plain_block_layer(layer):
            config["dtype"] = self.dtype
        return config

    def _call(self, layer, *args, **kwargs):
        for tensor in keras.tree.flatten((args, kwargs)):
            folded = self.folded.get(id(tensor))
            if folded is not None and folded[0] is tensor:
                raise _SharedConv(folded[1])
        if isinstance(layer, RepVGGBlock):
            return self._call_block(layer, *args, **kwargs)
        if _has_replacement(layer):  # one whose deploy form computes without it
            return args[0] if args else kwargs["inputs"]
        if id(layer) in self.replaced_weights:
            outputs = layer(*args, **kwargs)
            layer.set_weights(self.replaced_weights[id(layer)])
            return outputs
        original = self.originals.get(id(layer), (None, None))[1]
        inference = kwargs.get("training") is not True  # training=True in the graph: keep it
        if inference and isinstance(layer, INFERENCE_IDENTITY) and id(original) not in self.kept:
            return args[0] if args else kwargs["inputs"]
        if inference and isinstance(layer, keras.layers.BatchNormalization):
            fused = self._fold(original, args[0] if args else kwargs["inputs"])
            if fused is not None:
                return fused
        if original is not None and len(args) == 1 and not kwargs:  # fixed sizes: built-in layers
            builtin = spatial.builtin_call(original, *args)
            if builtin is not None:
                return builtin
        outputs = layer(*args, **kwargs)
        if original is not None and id(layer) not in self.loaded:
            layer.set_weights(original.get_weights())
            self.loaded.add(id(layer))
        if type(original) in FOLDABLE_CONVS:
            self._note_conv_call(original, outputs, args, kwargs)
        return outputs

    def _call_block(self, block, *args, **kwargs):
        plain = self.plain_blocks.get(id(block))
        first_call = plain is None
        if first_call:
            plain = PlainBlock(dtype=self.dtype or block.dtype_policy, **block.plain_config())
            self.plain_blocks[id(block)] = plain
        outputs = plain(args[0] if args else kwargs["inputs"])
        if first_call:
            plain.load_from(block)
        return outputs

    def _note_conv_call(self, conv, outputs, args, kwargs):
        calls = self.conv_calls.get(id(conv), 0) + 1
        self.conv_calls[id(conv)] = calls
        if calls > 1:  # a shared conv: folding one call's BatchNorm would change the others
            if any(entry[1] is conv for entry in self.folded.values()):
                raise _SharedConv(conv)
            self.kept.add(id(conv))
        self.conv_outputs[id(outputs)] = (outputs, conv, args, kwargs)

    def _fold(self, bn, inputs):
        """The output of a new conv with `bn` folded in, or None where `bn` must stay."""
        entry = self.conv_outputs.get(id(inputs))
        if bn is None or entry is None or entry[0] is not inputs or id(bn) in self.kept:
            return None
        _, conv, args, kwargs = entry
        if (
            id(conv) in self.kept
            or conv.get_config()["activation"] != "linear"
            or conv.data_format != "channels_last"
            or bn.axis not in (-1, len(inputs.shape) - 1)
            or conv.dtype_policy.quantization_mode is not None
            or bn.compute_dtype != conv.compute_dtype
        ):
            return None
        fused = conv.__class__.from_config(self._config(conv, use_bias=True))
        outputs = fused(*args, **kwargs)
        fused.set_weights(_fold_weights(conv, bn))
        self.folded[id(inputs)] = (inputs, conv)  # the unfused conv output: nothing may use it
        return outputs
