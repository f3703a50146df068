"""`to_deploy(model)`: clone any Keras model holding RepVGG blocks into its plain form.

One graph walk (`keras.models.clone_model`): every `RepVGGBlock` becomes a `PlainBlock`
of built-in layers with the fused weights; every other layer is cloned from its
config and gets a copy of its weights. The input model is left untouched.
"""

import keras

from repvgg_keras.layers import PlainBlock, RepVGGBlock, contains_blocks


def is_deploy_form(model):
    """True when `model` holds no RepVGGBlock but plain RepVGG convs (`*_reparam`)."""
    return not contains_blocks(model) and any(
        isinstance(l, keras.layers.Conv2D) and l.name.endswith("_reparam")
        for l in model._flatten_layers()
    )


COMPUTE_DTYPES = (None, "float32", "bfloat16", "float16")


def to_deploy(model, dtype=None):
    """Return a new model computing `model` in inference mode with fused plain convs.

    Works on functional and sequential models, with RepVGG blocks at the top level or
    inside nested models (e.g. a head on a RepVGG backbone). A model already in deploy
    form is returned as it is (unless `dtype` asks for another precision).

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
    if not contains_blocks(model):
        if is_deploy_form(model) and dtype is None:
            return model
        if is_deploy_form(model):
            return _Converter(dtype).convert_plain(model)
        raise ValueError(
            f"Model {model.name!r} contains no RepVGGBlock, so there is nothing to fuse. "
            "to_deploy converts models built with repvgg_keras (training form, deploy=False) "
            "or models that use repvgg_keras.RepVGGBlock layers."
        )
    if not model.built:
        raise ValueError(f"Model {model.name!r} is not built: call it on data or build it first.")
    return _Converter(dtype).convert(model)


def _is_plain_block_layer(layer):
    """A layer a PlainBlock is made of (named after its block: `<block>_reparam`, `_pad`, `_se_*`, `_relu`)."""
    suffixes = ("_reparam", "_pad", "_relu", "_se_pool", "_se_reduce", "_se_expand", "_se_scale")
    return layer.name.endswith(suffixes)


class _Converter:
    """Holds the maps from cloned layers back to their originals during one conversion."""

    def __init__(self, dtype=None):
        self.dtype = dtype
        self.originals = {}  # id(clone) -> original layer, for weight copying
        self.plain_blocks = {}  # id(block) -> PlainBlock, so a shared block stays shared
        self.loaded = set()

    def convert_plain(self, model):
        """A deploy-form model again, its plain block layers in `self.dtype`."""
        return keras.models.clone_model(
            model, clone_function=self._clone_plain, call_function=self._call
        )

    def _clone_plain(self, layer):
        if isinstance(layer, keras.Model):
            return self.convert_plain(layer)
        config = layer.get_config()
        if _is_plain_block_layer(layer):
            config["dtype"] = self.dtype
        clone = layer.__class__.from_config(config)
        self.originals[id(clone)] = layer
        return clone

    def convert(self, model):
        if isinstance(model, keras.Sequential):
            return self._convert_sequential(model)
        if not hasattr(model, "_run_through_graph"):
            raise TypeError(
                f"to_deploy supports functional and Sequential models; {model.name!r} is a "
                f"subclassed {type(model).__name__}. Build it functionally, or convert its "
                "RepVGG backbone (a functional model) and reuse it in your subclass."
            )
        return keras.models.clone_model(
            model,
            clone_function=self._clone,
            call_function=self._call,
            recursive=False,  # nested models go through _clone, blocks and all
        )

    def _convert_sequential(self, model):
        inputs = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype)
        x = inputs
        for layer in model.layers:
            if isinstance(layer, keras.Model) and contains_blocks(layer):
                x = self.convert(layer)(x)
            else:
                x = self._call(self._clone(layer), x)
        return keras.Model(inputs, x, name=model.name)

    def _clone(self, layer):
        if isinstance(layer, RepVGGBlock):
            return layer  # replaced in _call
        if isinstance(layer, keras.Model) and contains_blocks(layer):
            return self.convert(layer)
        clone = layer.__class__.from_config(layer.get_config())
        self.originals[id(clone)] = layer
        return clone

    def _call(self, layer, *args, **kwargs):
        if isinstance(layer, RepVGGBlock):
            plain = self.plain_blocks.get(id(layer))
            first_call = plain is None
            if first_call:
                plain = PlainBlock(dtype=self.dtype or layer.dtype_policy, **layer.plain_config())
                self.plain_blocks[id(layer)] = plain
            inputs = args[0] if args else kwargs["inputs"]
            outputs = plain(inputs)
            if first_call:
                plain.load_from(layer)
            return outputs
        outputs = layer(*args, **kwargs)
        original = self.originals.get(id(layer))
        if original is not None and id(layer) not in self.loaded:
            layer.set_weights(original.get_weights())
            self.loaded.add(id(layer))
        return outputs
