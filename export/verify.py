"""Compare an exported artifact's outputs with the Keras model's: one report for all formats."""

import dataclasses
import os

import numpy as np

# Max relative difference (max|a-b| / max|ref|) each format must stay within.
# "dynamic": int8 weights with float activations (TFLite's dynamic-range quantization).
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1e-1, "dynamic": 1e-1, "int8": 2.5e-1}
INT8_HINT_BELOW = 0.995  # top-1 agreement under which an int8 export suggests QARepVGG training


@dataclasses.dataclass
class Report:
    artifact: str
    precision: str
    max_abs: float
    max_rel: float
    top1_agreement: float
    tolerance: float
    size_mb: float = float("nan")

    @property
    def ok(self):
        return bool(self.max_rel <= self.tolerance)

    def line(self):
        status = "OK" if self.ok else "FAILED"
        return (
            f"{self.artifact:<28} {self.precision:<8} max_abs={self.max_abs:.3e} "
            f"max_rel={self.max_rel:.3e} (tol {self.tolerance:.0e}) top1={self.top1_agreement:.4f} "
            f"size={self.size_mb:.2f}MB {status}"
        )


def compare(artifact, precision, actual, reference, size_mb=float("nan"), tolerance=None):
    actual = np.asarray(actual, np.float64)
    reference = np.asarray(reference, np.float64)
    if actual.shape != reference.shape:
        raise ValueError(
            f"{artifact}: output shape {actual.shape} != Keras output shape {reference.shape}."
        )
    max_abs = float(np.max(np.abs(actual - reference)))
    scale = float(np.max(np.abs(reference))) or 1.0
    top1 = float(np.mean(actual.argmax(-1) == reference.argmax(-1)))
    tol = TOLERANCES[precision] if tolerance is None else tolerance
    return Report(artifact, precision, max_abs, max_abs / scale, top1, tol, size_mb)


class VerificationError(RuntimeError):
    pass


def check(report):
    """Print the report; raise VerificationError when it is out of tolerance."""
    print(report.line(), flush=True)
    if report.precision == "int8" and report.top1_agreement < INT8_HINT_BELOW:
        # A deploy model looks the same whether it was trained with QARepVGG blocks or not, so the
        # hint names every remedy without guessing which one was already taken.
        print(
            f"note: int8 keeps the top-1 class on {report.top1_agreement:.2%} of the verification images.\n"
            "  To keep more: calibrate on more images like the real inputs, train with `python -m train "
            "--quant_friendly` (QARepVGG blocks) if this model was not, or ship bf16/float16.",
            flush=True,
        )
    if not report.ok:
        raise VerificationError(
            f"{report.artifact} differs from the Keras model by {report.max_rel:.3e} (relative), "
            f"beyond the {report.precision} tolerance {report.tolerance:.0e}; nothing was written."
        )
    return report


def directory_size_mb(path):
    if os.path.isfile(path):
        return os.path.getsize(path) / 2**20
    return (
        sum(
            os.path.getsize(os.path.join(root, f))
            for root, _, files in os.walk(path)
            for f in files
        )
        / 2**20
    )
