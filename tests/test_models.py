"""Every variant: exact fusion, published parameter counts, builder arguments and errors."""

import keras
import numpy as np
import pytest

import repvgg_keras as rk
from repvgg_keras.parity import max_relative_difference, randomize_batchnorm
from repvgg_keras.structure import custom_layer_names
from tests.helpers import every_variant

# Deploy-form parameter counts in millions, as published (1000 classes).
PUBLISHED_PARAMS_M = {
    "RepVGG_A0": 8.30,
    "RepVGG_A1": 12.78,
    "RepVGG_A2": 25.49,
    "RepVGG_B0": 14.33,
    "RepVGG_B1": 51.82,
    "RepVGG_B1g2": 41.36,
    "RepVGG_B1g4": 36.12,
    "RepVGG_B2": 80.31,
    "RepVGG_B2g4": 55.77,
    "RepVGG_B3": 110.96,
    "RepVGG_B3g4": 75.62,
}


def _parity(model, plain, x):
    return max_relative_difference(plain(x), model(x, training=False))


@pytest.mark.parametrize("name", every_variant())
def test_every_variant_fuses_exactly_and_has_published_size(rng, name):
    model = rk.get_model(name, input_shape=(64, 48, 3))
    randomize_batchnorm(model, seed=1)
    plain = rk.to_deploy(model)
    x = rng.normal(size=(2, 64, 48, 3)).astype("float32")
    assert _parity(model, plain, x) < 1e-5
    assert custom_layer_names(plain) == []
    if name in PUBLISHED_PARAMS_M:
        assert abs(plain.count_params() / 1e6 - PUBLISHED_PARAMS_M[name]) <= 0.01
    blocks = [l for l in model.layers if isinstance(l, rk.RepVGGBlock)]
    convs = [
        l
        for l in plain.layers
        if isinstance(l, keras.layers.Conv2D) and l.name.endswith("_reparam")
    ]
    assert len(convs) == len(blocks) == 1 + sum(rk.get_spec(name).num_blocks)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["RepVGG_A0", "RepVGG_B1g4"])
def test_full_size_224_parity(rng, name):
    model = rk.get_model(name)
    assert model.input_shape == (None, 224, 224, 3)
    randomize_batchnorm(model, seed=2)
    plain = rk.to_deploy(model)
    x = rng.uniform(0, 1, size=(2, 224, 224, 3)).astype("float32")
    assert _parity(model, plain, x) < 1e-5
    assert plain.output_shape == (None, 1000)


@pytest.mark.slow
def test_d2se_defaults_to_320():
    assert rk.RepVGG_D2se(include_top=False).input_shape == (None, 320, 320, 3)


def test_input_is_named_images_and_model_named_after_variant():
    model = rk.RepVGG_A0(input_shape=(32, 32, 3), classes=3)
    assert model.inputs[0].name == "images" and model.name == "RepVGG_A0"
    assert rk.to_deploy(model).inputs[0].name == "images"


@pytest.mark.parametrize("shape", [(32, 32, 1), (40, 72, 3), (None, None, 3), (33, 35, 3)])
def test_input_shapes(rng, shape):
    model = rk.RepVGG_A0(input_shape=shape, classes=5)
    randomize_batchnorm(model)
    plain = rk.to_deploy(model)
    concrete = tuple(s or 64 for s in shape)
    x = rng.normal(size=(1,) + concrete).astype("float32")
    assert plain(x).shape == (1, 5)
    assert _parity(model, plain, x) < 1e-5


def test_input_tensor_and_head_options():
    inputs = keras.Input((64, 64, 3), name="images")
    model = rk.RepVGG_A0(input_tensor=inputs, include_top=False, pooling="avg")
    assert model.output_shape == (None, 1280)
    assert model.inputs[0] is inputs
    assert rk.RepVGG_A0(input_shape=(64, 64, 3), include_top=False).output_shape == (
        None,
        2,
        2,
        1280,
    )
    assert rk.RepVGG_A0(input_shape=(64, 64, 3), include_top=False, pooling="max").output_shape == (
        None,
        1280,
    )
    probs = rk.RepVGG_A0(input_shape=(32, 32, 3), classes=4, classifier_activation="softmax")
    out = np.asarray(probs(np.ones((1, 32, 32, 3), "float32")))
    np.testing.assert_allclose(out.sum(), 1.0, rtol=1e-5)


def test_custom_spec(rng):
    spec = rk.RepVGGSpec(
        "tiny",
        num_blocks=(1, 2, 2, 1),
        width_multipliers=(0.25, 0.25),
        groups=2,
        grouped_layers=(2, 4),
    )
    model = rk.RepVGG(spec, input_shape=(32, 32, 3), classes=3)
    assert model.name == "tiny"
    grouped = [l.name for l in model.layers if isinstance(l, rk.RepVGGBlock) and l.groups == 2]
    assert grouped == ["stage2_0", "stage3_0"]  # global layers 2 and 4
    randomize_batchnorm(model)
    x = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    assert _parity(model, rk.to_deploy(model), x) < 1e-5


def test_ablation_switches_drop_branches():
    full = rk.RepVGG_A0(input_shape=(32, 32, 3), classes=2)
    plain_ablation = rk.RepVGG_A0(
        input_shape=(32, 32, 3), classes=2, use_identity=False, use_1x1=False
    )
    blocks = [l for l in plain_ablation.layers if isinstance(l, rk.RepVGGBlock)]
    assert all(b.identity_bn is None and b.pointwise_conv is None for b in blocks)
    assert any(l.identity_bn is not None for l in full.layers if isinstance(l, rk.RepVGGBlock))


def test_quant_friendly_model_fuses_into_the_same_plain_model(rng):
    """QARepVGG blocks: BN only on the 3x3 branch and after the sum; the deploy form is the usual one."""
    from repvgg_keras import checkpoints
    from train import recipes

    model = randomize_batchnorm(
        rk.RepVGG_A0(input_shape=(32, 32, 3), classes=3, quant_friendly=True), seed=5
    )
    blocks = [l for l in model.layers if isinstance(l, rk.RepVGGBlock)]
    assert all(
        b.quant_friendly
        and b.post_bn is not None
        and b.pointwise_bn is None
        and b.identity_bn is None
        for b in blocks
    )
    x = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    plain = rk.to_deploy(model)
    assert _parity(model, plain, x) < 1e-5
    usual = rk.RepVGG_A0(input_shape=(32, 32, 3), classes=3, deploy=True)
    assert [w.shape for w in plain.get_weights()] == [w.shape for w in usual.get_weights()]
    with pytest.raises(ValueError, match="quant_friendly"):
        checkpoints.load_checkpoint(
            model, {"stage0.rbr_dense.conv.weight": np.zeros((48, 3, 3, 3))}
        )
    with pytest.raises(ValueError, match="drop --custom_l2"):
        recipes.use_custom_l2(model, 1e-4)
    post_gammas = {v.path for v in recipes.no_decay_variables(model) if "_post_bn/gamma" in v.path}
    assert len(post_gammas) == len(blocks)


@pytest.mark.parametrize("deploy", [False, True])
@pytest.mark.parametrize(
    "output_stride,strides",
    [(32, [2, 4, 8, 16, 32]), (16, [2, 4, 8, 16, 16]), (8, [2, 4, 8, 8, 8])],
)
def test_features_only_gives_every_stage(deploy, output_stride, strides):
    model = rk.RepVGG_A0(
        input_shape=(64, 96, 3), features_only=True, output_stride=output_stride, deploy=deploy
    )
    shapes = [tuple(o.shape[1:3]) for o in model.outputs]
    assert shapes == [(64 // s, 96 // s) for s in strides]
    assert [o.shape[-1] for o in model.outputs] == [48, 48, 96, 192, 1280]


@pytest.mark.slow
@pytest.mark.parametrize("output_stride", [8, 16])
def test_dilated_backbone_converts_exactly(rng, output_stride):
    model = rk.RepVGG_B1g2(input_shape=(64, 64, 3), features_only=True, output_stride=output_stride)
    randomize_batchnorm(model, seed=3)
    plain = rk.to_deploy(model)
    x = rng.normal(size=(1, 64, 64, 3)).astype("float32")
    for a, b in zip(model(x, training=False), plain(x)):
        assert max_relative_difference(b, a) < 1e-5


def test_deploy_builder_matches_to_deploy_layout(rng):
    spec = rk.RepVGGSpec(
        "tiny_se", (1, 1, 2, 1), (0.5, 0.5), groups=2, grouped_layers=(3,), use_se=True
    )
    model = rk.RepVGG(spec, input_shape=(64, 64, 3), classes=7)
    randomize_batchnorm(model)
    converted = rk.to_deploy(model)
    built = rk.RepVGG(spec, input_shape=(64, 64, 3), classes=7, deploy=True)
    assert [l.name for l in built.layers] == [l.name for l in converted.layers]
    built.set_weights(converted.get_weights())
    x = rng.normal(size=(1, 64, 64, 3)).astype("float32")
    np.testing.assert_array_equal(np.asarray(built(x)), np.asarray(converted(x)))


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: rk.get_model("RepVGG_Z1"), ValueError, "Unknown RepVGG model 'RepVGG_Z1'"),
        (lambda: rk.RepVGG_A0(input_shape=(31, 64, 3)), ValueError, "height 31 is too small"),
        (lambda: rk.RepVGG_A0(input_shape=(64, 16, 3)), ValueError, "width 16 is too small"),
        (lambda: rk.RepVGG_A0(include_top=False, classes=10), ValueError, "include_top=False"),
        (lambda: rk.RepVGG_A0(include_top=False, pooling="mean"), ValueError, "pooling"),
        (lambda: rk.RepVGG_A0(output_stride=4), ValueError, "output_stride must be 8, 16 or 32"),
        (lambda: rk.RepVGG_A0(input_shape=(64, 64)), ValueError, "height, width, channels"),
    ],
)
def test_bad_builder_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
