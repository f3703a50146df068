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
    images: int = 0
    pixels: int = 1  # positions per image with their own logits: H*W for segmentation

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

    def summary(self):
        """The one-line verdict: per-pixel for segmentation, per-image for classification."""
        where = f"{self.images} images" + (f" x {self.pixels} pixels" if self.pixels > 1 else "")
        per = "per-pixel top-1" if self.pixels > 1 else "top-1"
        return (
            f"verified: max relative difference {self.max_rel:.1e} (tolerance "
            f"{self.tolerance:.0e}), {per} agreement {self.top1_agreement:.2%} on {where}"
        )


def compare(artifact, precision, actual, reference, size_mb=float("nan"), tolerance=None):
    """Report on `actual` vs `reference` logits, [N, classes] or per pixel [N, H, W, classes]:
    the top-1 agreement is over every image (classification) or every pixel (segmentation)."""
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
    images = reference.shape[0] if reference.ndim else 0
    pixels = int(np.prod(reference.shape[1:-1])) if reference.ndim > 2 else 1
    return Report(artifact, precision, max_abs, max_abs / scale, top1, tol, size_mb, images, pixels)


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


def print_verdict(reports):
    """After a segmentation export passed: the `verified:` line of its worst check (its per-pixel
    agreement is what a table row's top1 means there)."""
    worst = max(reports, key=lambda report: report.max_rel)
    if worst.pixels > 1:
        print(worst.summary(), flush=True)


def check_classes(artifact, classes, logits):
    """Raise VerificationError unless `classes` (an artifact's class-index output) is the argmax
    of the same artifact's `logits`: the two outputs a segmentation export ships must agree."""
    classes = np.asarray(classes)
    expected = np.asarray(logits).argmax(-1)
    if classes.shape != expected.shape or not np.issubdtype(classes.dtype, np.integer):
        raise VerificationError(
            f"{artifact}: classes output {classes.dtype} {list(classes.shape)} is not the argmax "
            f"of its logits ({list(expected.shape)} integers); nothing was written."
        )
    wrong = int(np.sum(classes != expected))
    if wrong:
        raise VerificationError(
            f"{artifact}: classes output differs from the argmax of its logits on {wrong} of "
            f"{expected.size} pixels; nothing was written."
        )


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
