"""The variant table as data: widths, groups, strides and dilation of every block."""

import pytest

from repvgg_keras import specs

EXPECTED_WIDTHS = {
    "RepVGG_A0": (48, 48, 96, 192, 1280),
    "RepVGG_A1": (64, 64, 128, 256, 1280),
    "RepVGG_A2": (64, 96, 192, 384, 1408),
    "RepVGG_B0": (64, 64, 128, 256, 1280),
    "RepVGG_B1": (64, 128, 256, 512, 2048),
    "RepVGG_B2g4": (64, 160, 320, 640, 2560),
    "RepVGG_B3": (64, 192, 384, 768, 2560),
    "RepVGG_D2se": (64, 160, 320, 640, 2560),
}


def test_all_fourteen_variants_are_listed():
    assert sorted(specs.SPECS) == sorted(
        "RepVGG_" + n for n in "A0 A1 A2 B0 B1 B1g2 B1g4 B2 B2g2 B2g4 B3 B3g2 B3g4 D2se".split()
    )


@pytest.mark.parametrize("name,widths", sorted(EXPECTED_WIDTHS.items()))
def test_stage_widths(name, widths):
    assert specs.SPECS[name].stage_widths == widths


def test_grouped_layers_are_the_even_stride1_blocks():
    plans = specs.block_plan(specs.SPECS["RepVGG_B1g4"])
    grouped = [i for i, p in enumerate(plans) if p.groups == 4]
    assert grouped == list(range(2, 27, 2))
    assert all(p.strides == 1 for p in plans if p.groups > 1)
    assert all(p.groups == 1 for p in plans if p.stage in (0, 4))


def test_block_counts_and_strides():
    plans = specs.block_plan(specs.SPECS["RepVGG_D2se"])
    assert len(plans) == 1 + 8 + 14 + 24 + 1
    assert [p.name for p in plans if p.strides == 2] == [
        "stage0",
        "stage1_0",
        "stage2_0",
        "stage3_0",
        "stage4_0",
    ]
    assert all(p.use_se and p.se_channels == p.filters // 16 for p in plans)


@pytest.mark.parametrize("output_stride,stage3,stage4", [(16, 1, 2), (8, 2, 4)])
def test_output_stride_turns_late_strides_into_dilation(output_stride, stage3, stage4):
    plans = specs.block_plan(specs.SPECS["RepVGG_A0"], output_stride)
    by_stage = {s: [p for p in plans if p.stage == s] for s in range(5)}
    assert {p.dilation_rate for p in by_stage[3]} == {stage3}
    assert {p.dilation_rate for p in by_stage[4]} == {stage4}
    total_stride = 1
    for p in plans:
        total_stride *= p.strides
    assert total_stride == output_stride
    # The first block of a stage keeps no identity, as in the stride-2 original.
    assert not by_stage[4][0].allow_identity


def test_get_spec_is_lenient_about_case_and_prefix():
    assert specs.get_spec("a0") is specs.SPECS["RepVGG_A0"]
    assert specs.get_spec("RepVGG_b1G4") is specs.SPECS["RepVGG_B1g4"]


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="Unknown RepVGG model 'RepVGG_Z9'.*RepVGG_A0"):
        specs.get_spec("RepVGG_Z9")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_blocks=(1, 1, 1)), "4 positive"),
        (dict(width_multipliers=(0.0, 1.0)), "two positive"),
        (dict(groups=0), "groups"),
    ],
)
def test_custom_spec_validation(kwargs, match):
    base = dict(name="custom", num_blocks=(1, 1, 1, 1), width_multipliers=(0.25, 0.25))
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        specs.RepVGGSpec(**base)
