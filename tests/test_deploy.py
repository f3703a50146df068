"""to_deploy on models we did not build: heads on backbones, nesting, Sequential, errors."""

import keras
import numpy as np
import pytest

import repvgg_keras as rk
from repvgg_keras.parity import max_relative_difference, randomize_batchnorm
from repvgg_keras.structure import all_layers, custom_layer_names, layer_counts

SPEC = rk.RepVGGSpec(
    "tiny", num_blocks=(1, 2, 1, 1), width_multipliers=(0.25, 0.5), groups=2, grouped_layers=(2, 4)
)


def _backbone(**kwargs):
    model = rk.RepVGG(SPEC, input_shape=(64, 64, 3), include_top=False, **kwargs)
    return randomize_batchnorm(model, seed=5)


def _assert_same(model, plain, x):
    expected = keras.tree.flatten(model(x, training=False))
    actual = keras.tree.flatten(plain(x))
    assert len(expected) == len(actual)
    for a, e in zip(actual, expected):
        assert max_relative_difference(a, e) < 1e-5
    assert custom_layer_names(plain) == []


def test_classifier_on_nested_backbone(rng):
    backbone = _backbone(pooling="avg")
    inputs = keras.Input((64, 64, 3), name="images")
    x = keras.layers.Dropout(0.2)(backbone(inputs))
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(x)
    model = keras.Model(inputs, outputs)
    plain = rk.to_deploy(model)
    _assert_same(model, plain, rng.normal(size=(2, 64, 64, 3)).astype("float32"))
    # The head is a copy with the same weights, not the same layer object.
    assert plain.get_layer("head") is not model.get_layer("head")
    np.testing.assert_array_equal(
        plain.get_layer("head").get_weights()[0], model.get_layer("head").get_weights()[0]
    )


def test_segmentation_head_on_dilated_features(rng):
    backbone = _backbone(features_only=True, output_stride=8)
    inputs = keras.Input((64, 64, 3))
    stem, s1, s2, s3, s4 = backbone(inputs)
    x = keras.layers.Concatenate()([s2, keras.layers.Conv2D(16, 1)(s4)])
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Conv2D(4, 1, name="logits")(x)
    outputs = keras.layers.UpSampling2D(8, interpolation="bilinear")(x)
    model = keras.Model(inputs, [outputs, s1])
    plain = rk.to_deploy(model)
    assert plain.output_shape[0] == (None, 64, 64, 4)
    _assert_same(model, plain, rng.normal(size=(1, 64, 64, 3)).astype("float32"))


def test_blocks_used_directly_in_a_functional_graph_and_shared(rng):
    inputs = keras.Input((16, 16, 8))
    shared = rk.RepVGGBlock(8, name="shared")
    x = shared(shared(inputs))
    x = rk.RepVGGBlock(16, strides=2, name="down")(x)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    randomize_batchnorm(model)
    plain = rk.to_deploy(model)
    _assert_same(model, plain, rng.normal(size=(2, 16, 16, 8)).astype("float32"))
    assert len([l for l in plain.layers if l.name == "shared_reparam"]) == 1


def test_sequential_model(rng):
    model = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            rk.RepVGGBlock(8, strides=2, name="a"),
            rk.RepVGGBlock(8, name="b"),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    randomize_batchnorm(model)
    _assert_same(model, rk.to_deploy(model), rng.normal(size=(2, 16, 16, 3)).astype("float32"))


def test_input_model_is_left_untouched(rng):
    model = _backbone(pooling="avg")
    before = [w.copy() for w in model.get_weights()]
    layers_before = list(model.layers)
    plain = rk.to_deploy(model)
    plain.layers[1].set_weights([np.zeros_like(w) for w in plain.layers[1].get_weights()])
    assert list(model.layers) == layers_before
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert any(isinstance(l, rk.RepVGGBlock) for l in model.layers)


def _kinds(model):
    """Class names of every layer, nested models opened up."""
    return [type(l).__name__ for l in all_layers(model)]


def test_batchnorm_folds_into_its_conv_and_dropout_goes_anywhere(rng, tmp_path):
    """No RepVGG block here: conv+BN pairs fold (bias added where missing), dropouts go, in a
    Sequential model and the functional model nested in it; a BN whose conv has another
    consumer, or whose conv has its own activation, stays."""
    inputs = keras.Input((16, 16, 8))
    x = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="depthwise")(
        inputs
    )
    x = keras.layers.BatchNormalization(name="depthwise_bn")(x)
    x = keras.layers.GaussianNoise(0.3)(keras.layers.ReLU()(x))
    fanout = keras.layers.Conv2D(16, 1, use_bias=False, name="fanout")(x)
    kept = keras.layers.BatchNormalization(name="kept_bn")(fanout)
    x = keras.layers.Add()([kept, fanout])
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="activated")(x)
    x = keras.layers.BatchNormalization(name="after_activation_bn")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", name="biased")(keras.layers.Dropout(0.5)(x))
    x = keras.layers.BatchNormalization(name="biased_bn")(x)
    inner = keras.Model(inputs, keras.layers.ReLU(name="inner_out")(x), name="inner")
    model = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem"),
            keras.layers.BatchNormalization(name="stem_bn"),
            inner,
            keras.layers.SpatialDropout2D(0.3),
            keras.layers.Conv2D(4, 1, name="classifier"),
        ]
    )
    randomize_batchnorm(model, seed=2)
    before = [w.copy() for w in model.get_weights()]
    plain = rk.to_deploy(model)
    kinds = _kinds(plain)
    assert not {"Dropout", "SpatialDropout2D", "GaussianNoise"} & set(kinds)
    norms = [l.name for l in all_layers(plain) if isinstance(l, keras.layers.BatchNormalization)]
    assert sorted(norms) == ["after_activation_bn", "kept_bn"]
    inner_plain = plain.get_layer("inner")
    for name in ("stem", "depthwise", "biased"):
        layer = inner_plain.get_layer(name) if name != "stem" else plain.get_layer(name)
        assert layer.use_bias and len(layer.get_weights()) == 2
    assert not inner_plain.get_layer("fanout").use_bias  # its BN stays: the conv is not folded
    assert layer_counts(plain) == {
        "layers": layer_counts(model)["layers"] - 6,
        "Conv2D": 5,
        "BatchNormalization": 2,
    }
    x = rng.normal(size=(2, 16, 16, 3)).astype("float32")
    _assert_same(model, plain, x)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert "SpatialDropout2D" in _kinds(model) and "BatchNormalization" in _kinds(model)
    path = str(tmp_path / "plain.keras")
    plain.save(path)
    np.testing.assert_array_equal(
        np.asarray(keras.models.load_model(path)(x)), np.asarray(plain(x))
    )


def test_classifier_deploy_form_is_the_built_plain_model():
    """RepVGG classifiers have no BN outside blocks: to_deploy gives the deploy=True layers."""
    model = rk.RepVGG(SPEC, input_shape=(64, 64, 3), classes=3)
    built = rk.RepVGG(SPEC, input_shape=(64, 64, 3), classes=3, deploy=True)
    assert layer_counts(rk.to_deploy(model)) == layer_counts(built)
    assert layer_counts(built)["BatchNormalization"] == 0


def test_deploy_form_converts_to_itself():
    plain = rk.to_deploy(_backbone())
    assert rk.is_deploy_form(plain)
    assert rk.to_deploy(plain) is plain
    built = rk.RepVGG(SPEC, input_shape=(64, 64, 3), deploy=True)
    assert rk.to_deploy(built) is built


def test_model_without_blocks_is_an_error():
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3)])
    with pytest.raises(ValueError, match="contains no RepVGGBlock"):
        rk.to_deploy(model)


def test_subclassed_model_is_a_clear_error():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.block = rk.RepVGGBlock(4)

        def call(self, x):
            return self.block(x)

    net = Net()
    net(np.zeros((1, 8, 8, 4), "float32"))
    with pytest.raises(TypeError, match="subclassed"):
        rk.to_deploy(net)


def test_not_a_model_is_a_type_error():
    with pytest.raises(TypeError, match="keras.Model"):
        rk.to_deploy(rk.RepVGGBlock(4))


@pytest.mark.parametrize("dtype,tolerance", [("bfloat16", 3e-2), ("float16", 5e-3)])
def test_low_precision_deploy_form_casts_once(dtype, tolerance):
    """to_deploy(dtype=...): fused blocks hold and compute `dtype`, the classifier stays float32,
    and the traced graph casts at the boundaries only (not at every layer, as mixed policies do)."""
    import tensorflow as tf

    model = randomize_batchnorm(rk.RepVGG_A0(input_shape=(64, 48, 3), classes=10))
    x = np.random.default_rng(0).normal(size=(4, 64, 48, 3)).astype("float32")
    reference = np.asarray(model(x, training=False))
    low = rk.to_deploy(model, dtype=dtype)
    assert low.get_layer("stage3_5_reparam").kernel.dtype == dtype
    assert low.get_layer("predictions").kernel.dtype == "float32"
    out = low(x, training=False)
    assert out.dtype == "float32"
    assert 0 < max_relative_difference(out, reference) < tolerance
    again = rk.to_deploy(rk.to_deploy(model), dtype=dtype)  # from the fp32 deploy form: same model
    np.testing.assert_array_equal(np.asarray(again(x)), np.asarray(out))

    graph = (
        tf.function(lambda t: low(t, training=False))
        .get_concrete_function(tf.TensorSpec((None, 64, 48, 3), tf.float32))
        .graph
    )
    casts = [op for op in graph.get_operations() if op.type == "Cast"]
    assert len(casts) <= 3, [op.name for op in casts]


def test_to_deploy_refuses_an_unknown_precision():
    with pytest.raises(ValueError, match="dtype must be one of"):
        rk.to_deploy(rk.RepVGG_A0(input_shape=(32, 32, 3), classes=4), dtype="int8")
