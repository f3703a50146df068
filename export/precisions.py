"""Every precision an export can compute in, as data: the one table the exporters, their
`--precision` and `--quantize` flags, the OpenVINO runtime and `export/verify.py` read.

`--precision` means the same in every exporter that has it: what the exported model computes in
where it is served (a SavedModel's frozen graph, an OpenVINO IR compiled on the CPU), which also
picks the rule it is verified by. `--quantize` names a converter's mode; QUANTIZE says which
precision each mode computes in.

Verification (export/verify.py): a float precision is accepted when the largest relative
difference (max|a-b| / max|ref|) over every logit of every verification image stays within its
`tolerance`. int8 is judged by what it must keep: the top-1 class on at least `min_agreement` of
the images (--min_agreement) and a per-image relative difference at verify's INT8_PERCENTILE-th
percentile within `tolerance`; unlike the largest difference, neither grows with the number of
images. "dynamic" (TFLite's int8 weights with float activations) is judged like the floats.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Precision:
    name: str
    compute_dtype: str  # what the convolutions compute in (`rk.to_deploy(model, dtype=...)`)
    tolerance: float  # the default difference bound (--tolerance overrides it)
    min_agreement: float | None = None  # the default top-1 floor; None: judged by max_rel alone
    flag_of: tuple = ()  # the exporters whose --precision offers it
    openvino_hint: str | None = None  # OpenVINO's INFERENCE_PRECISION_HINT; None: not offered
    openvino_capability: str | None = None  # the CPU capability OpenVINO needs to run it natively

    @property
    def judged_by_agreement(self):
        """Accepted by its top-1 agreement (int8) rather than by its largest difference."""
        return self.min_agreement is not None


PRECISIONS = {
    p.name: p
    for p in (
        Precision("fp32", "float32", 1e-4, None, ("savedmodel", "openvino"), "f32", "FP32"),
        Precision("bf16", "bfloat16", 1e-1, None, ("savedmodel", "openvino"), "bf16", "BF16"),
        Precision("fp16", "float16", 2e-2, None, ("savedmodel",)),
        Precision("dynamic", "float32", 1e-1),  # int8 weights, float activations
        # OpenVINO's int8 comes from the QDQ graph: the rest computes in f32.
        Precision("int8", "int8", 2.5e-1, 0.99, ("savedmodel", "openvino"), "f32", "INT8"),
    )
}

# Each exporter's --quantize mode -> the precision it computes in (a mode means the same wherever
# it is offered: export.tflite takes them all, export.onnx and export.openvino none and int8).
QUANTIZE = {
    "none": "fp32",
    "float16": "fp16",
    "dynamic": "dynamic",
    "int8": "int8",
    "int8_full": "int8",
}


def get(name):
    """The Precision called `name`; ValueError naming the known ones otherwise."""
    if name not in PRECISIONS:
        raise ValueError(f"Unknown precision {name!r}: choose one of {', '.join(PRECISIONS)}.")
    return PRECISIONS[name]


def flag_choices(exporter):
    """The precisions `exporter`'s --precision offers, in the table's order."""
    return [p.name for p in PRECISIONS.values() if exporter in p.flag_of]


def of_quantize(mode):
    """The precision --quantize `mode` computes in; None for a mode no exporter has."""
    return QUANTIZE.get(mode)
