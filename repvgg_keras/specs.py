"""Every RepVGG variant as data, and the per-block plan a builder walks.

A variant is fully described by blocks per stage, width multipliers, the group count
for the grouped layers and whether blocks carry squeeze-excitation. Custom
architectures are just another `RepVGGSpec`.
"""

import dataclasses

# Layers 2, 4, ..., 26 (counted from 1 at stage 1's first block) are grouped in the
# g2/g4 variants, as in the authors' repository.
DEFAULT_GROUPED_LAYERS = tuple(range(2, 27, 2))

STAGE_BASE_WIDTHS = (64, 128, 256, 512)


@dataclasses.dataclass(frozen=True)
class RepVGGSpec:
    """Architecture of one RepVGG variant.

    Attributes:
        name: model name, e.g. "RepVGG_A0".
        num_blocks: blocks in stages 1..4 (the stem, stage 0, is always one block).
        width_multipliers: (a, b): stages 1-3 get int(64a), int(128a), int(256a)
            channels, stage 4 gets int(512b), the stem min(64, int(64a)).
        groups: group count used on the layers in `grouped_layers` (1 = dense).
        grouped_layers: global block indices (stage 1's first block is 1) that use
            `groups`.
        use_se: squeeze-excitation in every block (D2se), stem included.
        se_ratio: SE bottleneck is `filters * se_ratio` channels.
        default_size: input resolution the published weights were trained at.
        crop_pct: evaluation centre-crop fraction of the published weights (resize the
            shorter side to default_size / crop_pct, then crop default_size).
    """

    name: str
    num_blocks: tuple[int, int, int, int]
    width_multipliers: tuple[float, float]
    groups: int = 1
    grouped_layers: tuple[int, ...] = DEFAULT_GROUPED_LAYERS
    use_se: bool = False
    se_ratio: float = 1.0 / 16.0
    default_size: int = 224
    crop_pct: float = 0.875

    def __post_init__(self):
        if len(self.num_blocks) != 4 or any(int(n) < 1 for n in self.num_blocks):
            raise ValueError(
                f"RepVGGSpec.num_blocks must be 4 positive integers (stages 1-4), "
                f"got {self.num_blocks!r}."
            )
        if len(self.width_multipliers) != 2 or any(m <= 0 for m in self.width_multipliers):
            raise ValueError(
                "RepVGGSpec.width_multipliers must be two positive numbers (a, b), "
                f"got {self.width_multipliers!r}."
            )
        if int(self.groups) < 1:
            raise ValueError(f"RepVGGSpec.groups must be >= 1, got {self.groups!r}.")

    @property
    def stage_widths(self) -> tuple[int, int, int, int, int]:
        """Output channels of stage 0 (stem) to stage 4."""
        a, b = self.width_multipliers
        return (
            min(64, int(64 * a)),
            int(STAGE_BASE_WIDTHS[0] * a),
            int(STAGE_BASE_WIDTHS[1] * a),
            int(STAGE_BASE_WIDTHS[2] * a),
            int(STAGE_BASE_WIDTHS[3] * b),
        )


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """What one block of a built model looks like (the builder's input)."""

    name: str  # "stage0" for the stem, "stage{k}_{i}" otherwise (mirrors `stage{k}.{i}`)
    stage: int
    filters: int
    strides: int
    dilation_rate: int
    groups: int
    use_se: bool
    se_channels: int
    allow_identity: bool  # False where the block's nominal stride is 2


A_BLOCKS = (2, 4, 14, 1)
B_BLOCKS = (4, 6, 16, 1)
D_BLOCKS = (8, 14, 24, 1)


def _family(prefix, blocks, widths, group_options=(1,), **extra):
    specs = []
    for groups in group_options:
        name = f"RepVGG_{prefix}" + (f"g{groups}" if groups > 1 else "")
        specs.append(RepVGGSpec(name, blocks, widths, groups=groups, **extra))
    return specs


SPECS = {
    spec.name: spec
    for spec in (
        _family("A0", A_BLOCKS, (0.75, 2.5))
        + _family("A1", A_BLOCKS, (1.0, 2.5))
        + _family("A2", A_BLOCKS, (1.5, 2.75))
        + _family("B0", B_BLOCKS, (1.0, 2.5))
        + _family("B1", B_BLOCKS, (2.0, 4.0), (1, 2, 4))
        + _family("B2", B_BLOCKS, (2.5, 5.0), (1, 2, 4))
        + _family("B3", B_BLOCKS, (3.0, 5.0), (1, 2, 4))
        + _family("D2se", D_BLOCKS, (2.5, 5.0), use_se=True, default_size=320, crop_pct=1.0)
    )
}


def get_spec(name: str) -> RepVGGSpec:
    """Look a variant up by name ("RepVGG_A0", case and the `RepVGG_` prefix optional)."""
    key = name if name.startswith("RepVGG_") else f"RepVGG_{name}"
    for spec_name, spec in SPECS.items():
        if spec_name.lower() == key.lower():
            return spec
    raise ValueError(
        f"Unknown RepVGG model {name!r}. Known models: {', '.join(SPECS)}. "
        "For another architecture build a repvgg_keras.RepVGGSpec and pass it to "
        "repvgg_keras.RepVGG(spec=...)."
    )


def _dilations_for(output_stride: int) -> tuple[int, ...]:
    """Dilation per stage 0..4: late strides become dilation (authors' PSPNet recipe)."""
    table = {32: (1, 1, 1, 1, 1), 16: (1, 1, 1, 1, 2), 8: (1, 1, 1, 2, 4)}
    if output_stride not in table:
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}.")
    return table[output_stride]


def block_plan(spec: RepVGGSpec, output_stride: int = 32, dilated_blocks: int | None = None):
    """Return the BlockPlan of every block, stem first.

    dilated_blocks: with output_stride 8 or 16, dilate only the last N blocks (the others keep
    dilation 1 at the reduced stride); None dilates every block of the strided-out stages.
    The paper's "-fast" PSPNets use 5 (the last four blocks of stage 3 and stage 4's one).
    """
    dilations = _dilations_for(output_stride)
    if dilated_blocks is not None and (
        isinstance(dilated_blocks, bool)
        or not isinstance(dilated_blocks, int)
        or dilated_blocks < 0
    ):
        raise ValueError(f"dilated_blocks must be None or an integer >= 0, got {dilated_blocks!r}.")
    total_blocks = 1 + sum(spec.num_blocks)
    widths = spec.stage_widths
    se_channels = lambda filters: max(1, int(filters * spec.se_ratio)) if spec.use_se else 0
    plans = [BlockPlan("stage0", 0, widths[0], 2, 1, 1, spec.use_se, se_channels(widths[0]), False)]
    layer_index = 1
    for stage, count in enumerate(spec.num_blocks, start=1):
        for i in range(count):
            nominal_stride = 2 if i == 0 else 1
            dilation = dilations[stage]
            if dilated_blocks is not None and layer_index < total_blocks - dilated_blocks:
                dilation_skipped = dilation > 1
                dilation = 1
            else:
                dilation_skipped = False
            groups = spec.groups if layer_index in spec.grouped_layers else 1
            plans.append(
                BlockPlan(
                    name=f"stage{stage}_{i}",
                    stage=stage,
                    filters=widths[stage],
                    strides=nominal_stride if dilation == 1 and not dilation_skipped else 1,
                    dilation_rate=dilation,
                    groups=groups,
                    use_se=spec.use_se,
                    se_channels=se_channels(widths[stage]),
                    allow_identity=nominal_stride == 1,
                )
            )
            layer_index += 1
    return plans
