"""rk.PSPNet: shapes, the pyramid pooling against PyTorch, the -fast dilation plan, backbone
weights, and exact fusion for every backbone variant."""

import keras
import numpy as np
import pytest
import torch

import repvgg_keras as rk
from repvgg_keras import parity, pspnet, spatial, specs, structure
from repvgg_keras.structure import all_layers
from tests.helpers import every_variant, random_images


@pytest.mark.parametrize("size,bins", [((13, 17), 6), ((8, 8), 3), ((5, 9), 2), ((7, 7), 6)])
def test_adaptive_pooling_matches_pytorch_for_any_size(rng, size, bins):
    x = rng.normal(size=(2, *size, 5)).astype("float32")
    ours = np.asarray(spatial.AdaptiveAveragePooling2D(bins)(x))
    theirs = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), bins)
    np.testing.assert_allclose(ours, theirs.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_resize_like_matches_pytorch_half_pixel_bilinear(rng):
    x = rng.normal(size=(1, 5, 7, 3)).astype("float32")
    reference = np.zeros((1, 37, 41, 1), "float32")
    ours = np.asarray(spatial.ResizeLike()([x, reference]))
    theirs = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=(37, 41), mode="bilinear", align_corners=False
    )
    np.testing.assert_allclose(ours, theirs.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_output_is_per_pixel_logits_at_input_size(rng):
    model = pspnet.PSPNet("RepVGG_A0", classes=7, input_shape=(72, 56, 3), head_channels=32)
    assert model.input.name == "images" and model.output_shape == (None, 72, 56, 7)
    assert model.get_layer("backbone").get_layer("stage4_0").output.shape[1:3] == (9, 7)  # stride 8
    out = np.asarray(model(random_images(rng, (2, 72, 56, 3))))
    assert out.shape == (2, 72, 56, 7) and out.dtype == np.float32 and np.isfinite(out).all()


def test_aux_head_is_a_second_output_that_inference_model_drops(rng):
    model = pspnet.PSPNet("RepVGG_A0", classes=4, input_shape=(64, 64, 3), aux_head=True)
    assert [o.name for o in model.outputs] and len(model.outputs) == 2
    assert model.output_shape == [(None, 64, 64, 4), (None, 64, 64, 4)]
    inference = pspnet.inference_model(model)
    assert len(inference.outputs) == 1 and not any(
        l.name.startswith("aux") for l in inference.layers
    )
    x = random_images(rng, (1, 64, 64, 3))
    np.testing.assert_array_equal(np.asarray(inference(x)), np.asarray(model(x)[0]))


def test_unknown_input_size(rng):
    model = pspnet.PSPNet("RepVGG_A0", classes=3, input_shape=(None, None, 3), head_channels=16)
    for size in ((40, 48), (57, 33)):
        assert np.asarray(model(random_images(rng, (1, *size, 3)))).shape == (1, *size, 3)


def test_fast_variant_dilates_only_the_last_five_blocks():
    plans = specs.block_plan(rk.get_spec("RepVGG_B1g2"), 8, pspnet.FAST_DILATED_BLOCKS)
    dilated = [p.name for p in plans if p.dilation_rate > 1]
    assert dilated == ["stage3_12", "stage3_13", "stage3_14", "stage3_15", "stage4_0"]
    # Output stride stays 8: stages 3 and 4 lose their stride whether dilated or not.
    assert [p.strides for p in plans if p.name in ("stage3_0", "stage4_0")] == [1, 1]
    full = specs.block_plan(rk.get_spec("RepVGG_B1g2"), 8)
    assert sum(p.dilation_rate > 1 for p in full) == 17
    model = pspnet.PSPNet("RepVGG_A0", classes=3, input_shape=(64, 64, 3), fast=True)
    assert model.name == "PSPNet_RepVGG_A0_fast"
    assert model.get_layer("backbone").get_layer("stage4_0").output.shape[1:3] == (8, 8)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="output_stride must be 8 or 16"):
        pspnet.PSPNet(output_stride=32)
    with pytest.raises(ValueError, match="classes must be a positive integer"):
        pspnet.PSPNet(classes=0)
    with pytest.raises(ValueError, match="too small"):
        pspnet.PSPNet(input_shape=(16, 64, 3))
    with pytest.raises(ValueError, match="dilated_blocks"):
        specs.block_plan(rk.get_spec("RepVGG_A0"), 8, -1)


def test_backbone_weights_from_a_trained_classifier(tmp_path, rng):
    donor = rk.RepVGG_A0(input_shape=(32, 32, 3), classes=10)
    parity.randomize_batchnorm(donor)
    path = str(tmp_path / "a0.keras")
    donor.save(path)
    model = pspnet.PSPNet("RepVGG_A0", classes=5, input_shape=(64, 48, 3), backbone_weights=path)
    block = model.get_layer("backbone").get_layer("stage3_5")
    for ours, theirs in zip(block.get_weights(), donor.get_layer("stage3_5").get_weights()):
        np.testing.assert_array_equal(ours, theirs)
    plain = str(tmp_path / "a0_deploy.keras")
    rk.to_deploy(donor).save(plain)
    with pytest.raises(rk.SourceError, match="deploy-form"):
        pspnet.PSPNet("RepVGG_A0", classes=5, input_shape=(64, 64, 3), backbone_weights=plain)
    b0 = str(tmp_path / "b0.keras")
    rk.RepVGG_B0(input_shape=(32, 32, 3), classes=10).save(b0)
    with pytest.raises(rk.SourceError, match="does not fit the RepVGG_A0 backbone"):
        pspnet.PSPNet("RepVGG_A0", classes=5, input_shape=(64, 64, 3), backbone_weights=b0)


def test_saved_and_reloaded(tmp_path, rng):
    model = pspnet.PSPNet("RepVGG_A0", classes=3, input_shape=(40, 40, 3), head_channels=16)
    x = random_images(rng, (1, 40, 40, 3))
    for form in (model, rk.to_deploy(model)):
        path = str(tmp_path / f"{form.name}_{id(form)}.keras")
        form.save(path)
        reloaded = keras.models.load_model(path)
        np.testing.assert_allclose(np.asarray(reloaded(x)), np.asarray(form(x)), atol=1e-6)


@pytest.mark.parametrize("variant", every_variant())
def test_every_backbone_fuses_exactly(variant, rng):
    # Non-square input whose stride-8 map (7 x 5) is no multiple of the 2, 3 and 6 bins.
    model = pspnet.PSPNet(
        variant, classes=6, input_shape=(56, 40, 3), head_channels=16, aux_head=True
    )
    parity.randomize_batchnorm(model, seed=3)
    inference = pspnet.inference_model(model)
    plain = rk.to_deploy(inference)
    assert rk.is_deploy_form(plain.get_layer("backbone"))
    x = random_images(rng, (2, 56, 40, 3))
    reference = np.asarray(inference(x, training=False))
    assert parity.max_relative_difference(np.asarray(plain(x)), reference) < 1e-5


def test_low_level_skip_refines_at_stride_4_and_fuses_exactly(rng):
    model = pspnet.PSPNet(
        "RepVGG_A0", classes=5, input_shape=(72, 56, 3), head_channels=16, low_level_skip=True
    )
    assert model.get_layer("head_upsample").output.shape[1:3] == (18, 14)  # stride 4
    assert model.get_layer("head_refine_conv").output.shape[1:] == (18, 14, 16)
    assert model.output_shape == (None, 72, 56, 5)
    plain_head = pspnet.PSPNet("RepVGG_A0", classes=5, input_shape=(72, 56, 3), head_channels=16)
    assert model.count_params() > plain_head.count_params()
    parity.randomize_batchnorm(model, seed=5)
    x = random_images(rng, (2, 72, 56, 3))
    reference = np.asarray(model(x, training=False))
    assert parity.max_relative_difference(np.asarray(rk.to_deploy(model)(x)), reference) < 1e-5


def test_image_refine_starts_as_the_plain_upsampling_and_fuses_exactly(rng):
    kwargs = dict(classes=5, input_shape=(40, 56, 3), output_stride=16, head_channels=16)
    model = pspnet.PSPNet("RepVGG_A0", low_level_skip=True, image_refine=True, **kwargs)
    assert model.get_layer("image_refine_conv").output.shape[1:] == (40, 56, 16)  # full size
    assert model.get_layer("logits").output.shape[1:] == (40, 56, 5)
    x = random_images(rng, (2, 40, 56, 3))
    full_size = keras.Model(model.input, model.get_layer("head_full_size").output)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(full_size(x)))  # zero residual
    residual = model.get_layer("image_refine_residual")
    residual.set_weights([w + rng.normal(scale=0.1, size=w.shape) for w in residual.get_weights()])
    parity.randomize_batchnorm(model, seed=3)
    reference = np.asarray(model(x, training=False))
    assert not np.allclose(reference, np.asarray(full_size(x, training=False)))
    plain = rk.to_deploy(model)
    assert parity.max_relative_difference(np.asarray(plain(x)), reference) < 1e-5


def test_deploy_form_has_nothing_left_to_fold(rng):
    """Head and pyramid BatchNorms fold into their convs, the spatial dropout goes; the
    training form is untouched and both forms agree."""
    model = pspnet.PSPNet(
        "RepVGG_A0",
        classes=11,
        input_shape=(64, 64, 3),
        output_stride=16,
        low_level_skip=True,
        image_refine=True,
    )
    residual = model.get_layer("image_refine_residual")  # non-zero, so the refinement counts
    residual.set_weights([w + rng.normal(scale=0.1, size=w.shape) for w in residual.get_weights()])
    parity.randomize_batchnorm(model, seed=4)
    before = [w.copy() for w in model.get_weights()]
    plain = rk.to_deploy(model)
    kinds = {type(l).__name__ for l in all_layers(plain)}
    assert not kinds & {"BatchNormalization", "SpatialDropout2D", "Dropout"}
    # 8 head/pyramid BNs and the dropout gone (89 -> 80 layers); the 6-bin pooling of the 4x4
    # map, whose cells overlap, becomes crops and poolings of built-in layers (+25); no conv added.
    assert structure.layer_counts(plain) == {"layers": 105, "Conv2D": 32, "BatchNormalization": 0}
    assert plain.get_layer("head_conv").use_bias and plain.get_layer("ppm6_conv").use_bias
    x = random_images(rng, (2, 64, 64, 3))
    reference = np.asarray(model(x, training=False))
    assert parity.max_relative_difference(np.asarray(plain(x)), reference) < 1e-5
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert structure.layer_counts(model)["BatchNormalization"] == 69


def test_bn_synchronized_covers_the_head():
    model = pspnet.PSPNet(
        "RepVGG_A0", classes=3, input_shape=(64, 64, 3), aux_head=True, bn_synchronized=True
    )
    head_norms = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert {l.name for l in head_norms} >= {"head_bn", "aux_bn", "ppm6_bn"}
    assert all(l.synchronized for l in head_norms)
