"""Compare an exported artifact's outputs with the Keras model's: one report for all formats."""

import dataclasses
import os

import numpy as np

from export.precisions import PRECISIONS

# Each precision's acceptance rule and its default bounds: export/precisions.py.
TOLERANCES = {name: precision.tolerance for name, precision in PRECISIONS.items()}
MIN_INT8_AGREEMENT = PRECISIONS["int8"].min_agreement
# A quantization-aware model (rk.quantize_aware) already computes in int8, with the arithmetic of
# the runtime it is exported to (rk.quantize.ROUNDINGS): its export keeps its top-1 everywhere
# unless that runtime rounds differently (another version, another CPU kernel).
MIN_QAT_AGREEMENT = 0.998
INT8_PERCENTILE = 99
INT8_HINT_BELOW = 0.995  # top-1 agreement under which an int8 export suggests QARepVGG training
QAT_REMEDY = (
    "The quantization-aware model computes as this runtime's int8 kernels were measured to "
    "compute (rk.quantize.ROUNDINGS); this runtime rounds some values its own way (another "
    "version, or another CPU's kernels), which turns images whose top classes nearly tie: "
    "measure on more images (--verify_count 200), or set the floor with --min_agreement."
)
INT8_REMEDIES = (
    "calibrate on more images like the real inputs (--calibration_data, --calibration_count), "
    "train with `python -m train --quant_friendly` (QARepVGG blocks) if this model was not, or "
    "ship bf16/float16"
)


def judged_by_agreement(precision):
    """Whether `precision` is accepted by its top-1 agreement (int8) rather than by its largest
    difference (the float precisions)."""
    return precision in PRECISIONS and PRECISIONS[precision].judged_by_agreement


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
    percentile_rel: float = float("nan")  # per-image relative difference, INT8_PERCENTILE-th
    min_agreement: float | None = None  # the top-1 floor (int8); None: judged by max_rel

    @property
    def finite(self):
        return bool(np.isfinite(self.max_rel))

    @property
    def ok(self):
        if not self.finite:
            return False
        if self.min_agreement is None:
            return bool(self.max_rel <= self.tolerance)
        return bool(
            self.top1_agreement >= self.min_agreement and self.percentile_rel <= self.tolerance
        )

    def reason(self):
        """Why the artifact was refused, in a phrase ('' when it was accepted)."""
        if self.ok:
            return ""
        if not self.finite:
            return "its outputs are not finite (NaN or inf) where the Keras model's are"
        if self.min_agreement is None:
            return (
                f"max relative difference {self.max_rel:.3g} is beyond the {self.precision} "
                f"tolerance {self.tolerance:g}"
            )
        if self.top1_agreement < self.min_agreement:
            return (
                f"{self._per()} agreement {self.top1_agreement:.2%} on {self._where()} is below "
                f"the floor {self.min_agreement:.2%}"
            )
        return (
            f"{INT8_PERCENTILE}th-percentile relative difference {self.percentile_rel:.3g} is "
            f"beyond the int8 tolerance {self.tolerance:g}"
        )

    def _per(self):
        return "per-pixel top-1" if self.pixels > 1 else "top-1"

    def _where(self):
        return f"{self.images} images" + (f" x {self.pixels} pixels" if self.pixels > 1 else "")

    def line(self):
        """A table row: every measure, the tolerances applied, OK or REFUSED."""
        if self.min_agreement is None:
            rule = f"max_rel={self.max_rel:.3e} (tol {self.tolerance:g})"
        else:
            rule = (
                f"p{INT8_PERCENTILE}_rel={self.percentile_rel:.3e} (tol {self.tolerance:g}) "
                f"max_rel={self.max_rel:.3e}"
            )
        floor = "" if self.min_agreement is None else f" (floor {self.min_agreement:.4f})"
        return (
            f"{self.artifact:<28} {self.precision:<8} max_abs={self.max_abs:.3e} {rule} "
            f"top1={self.top1_agreement:.4f}{floor} size={self.size_mb:.2f}MB "
            f"{'OK' if self.ok else 'REFUSED'}"
        )

    def summary(self):
        """The one-line verdict every exporter ends with, in one format for all precisions and
        tasks: `verified: <per> agreement ... on N images[ x P pixels][ (floor F)], <difference>`."""
        agreement = f"{self._per()} agreement {self.top1_agreement:.2%} on {self._where()}"
        if self.min_agreement is None:
            return (
                f"verified: {agreement}, max relative difference {self.max_rel:.1e} "
                f"(tolerance {self.tolerance:g})"
            )
        return (
            f"verified: {agreement} (floor {self.min_agreement:.2%}), "
            f"{INT8_PERCENTILE}th-percentile relative difference {self.percentile_rel:.1e} "
            f"(tolerance {self.tolerance:g}), max {self.max_rel:.1e}"
        )


def top1_agreement(actual, reference):
    """The fraction of images (pixels) whose top-1 class in `actual` is a top-1 class of
    `reference`. A float reference has one top class; a quantization-aware model's int8 logits
    can tie, and then either tied class is its answer."""
    chosen = np.take_along_axis(reference, actual.argmax(-1)[..., None], axis=-1)[..., 0]
    return float(np.mean(chosen == reference.max(-1)))


def compare(
    artifact,
    precision,
    actual,
    reference,
    size_mb=float("nan"),
    tolerance=None,
    min_agreement=None,
):
    """Report on `actual` vs `reference` logits, [N, classes] or per pixel [N, H, W, classes]:
    the top-1 agreement is over every image (classification) or every pixel (segmentation).
    `tolerance`/`min_agreement`: None for the precision's defaults."""
    actual = np.asarray(actual, np.float64)
    reference = np.asarray(reference, np.float64)
    if actual.shape != reference.shape:
        raise ValueError(
            f"{artifact}: output shape {actual.shape} != Keras output shape {reference.shape}."
        )
    if not np.all(np.isfinite(reference)):
        raise VerificationError(
            f"{artifact}: the Keras model's own outputs are not finite (NaN or inf) on the "
            "verification images, so there is nothing to verify against: its weights are broken "
            "(a diverged training run?); nothing was written."
        )
    difference = np.abs(actual - reference)
    max_abs = float(np.max(difference)) if difference.size else 0.0
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    top1 = top1_agreement(actual, reference) if reference.size else 1.0
    tol = TOLERANCES[precision] if tolerance is None else tolerance
    images = reference.shape[0] if reference.ndim else 0
    pixels = int(np.prod(reference.shape[1:-1])) if reference.ndim > 2 else 1
    per_image_axes = tuple(range(1, reference.ndim))
    percentile = float("nan")
    if images:
        per_image = np.max(difference, axis=per_image_axes) / np.maximum(
            np.max(np.abs(reference), axis=per_image_axes), np.finfo(np.float32).tiny
        )
        percentile = float(np.percentile(per_image, INT8_PERCENTILE))
    floor = None
    if judged_by_agreement(precision):
        floor = PRECISIONS[precision].min_agreement if min_agreement is None else min_agreement
        floor = float(floor)
    return Report(
        artifact,
        precision,
        max_abs,
        max_abs / (scale or 1.0),
        top1,
        tol,
        size_mb,
        images,
        pixels,
        percentile,
        floor,
    )


class VerificationError(RuntimeError):
    """An artifact that does not reproduce the Keras model; `report` says by how much."""

    def __init__(self, message, report=None):
        super().__init__(message)
        self.report = report


def check(report, remedy=None):
    """Print the report's row; raise VerificationError (one line: what fell short and the
    remedies) when it is refused. `remedy`: the exporter's own advice for this artifact, in
    place of the int8 remedies."""
    print(report.line(), flush=True)
    if judged_by_agreement(report.precision) and report.top1_agreement < INT8_HINT_BELOW:
        # A deploy model looks the same whether it was trained with QARepVGG blocks or not, so the
        # hint names every remedy without guessing which one was already taken.
        print(
            f"note: int8 keeps the top-1 class on {report.top1_agreement:.2%} of the verification "
            f"images. To keep more: {INT8_REMEDIES}.",
            flush=True,
        )
    if not report.ok:
        advice = ""
        if remedy is not None:
            advice = f" {remedy}"
        elif report.min_agreement is not None and report.finite:
            advice = f" To keep more: {INT8_REMEDIES}; or accept less with --min_agreement."
        raise VerificationError(
            f"{report.artifact} ({report.precision}) was refused: {report.reason()}; nothing was "
            f"written.{advice}",
            report,
        )
    return report


def weakest(reports):
    """The report of an export's checks (e.g. the three SavedModel signatures) that agrees
    least: the one its verdict states."""
    if isinstance(reports, Report):
        return reports
    return min(reports, key=lambda r: (r.top1_agreement, -r.max_rel))


def verdict(reports):
    """The `verified:` line an exporter prints last (for the weakest of `reports`)."""
    return weakest(reports).summary()


def check_reference_outputs(reference, model_input, images_name="verification images"):
    """ValueError unless the Keras `reference`'s own outputs on `model_input` are all finite:
    broken weights (NaN/Inf, e.g. from diverged training) have nothing an export could
    reproduce, and comparing NaN with NaN would report a meaningless difference."""
    outputs = np.asarray(reference(model_input, training=False))
    finite = np.isfinite(outputs.reshape(len(outputs), -1)).all(axis=1)
    if not finite.all():
        kinds = "/".join(
            kind
            for kind, found in (("NaN", np.isnan(outputs).any()), ("inf", np.isinf(outputs).any()))
            if found
        )
        raise ValueError(
            f"the Keras model's own outputs are {kinds} on {int((~finite).sum())} of "
            f"{len(outputs)} {images_name}: the weights are broken (diverged training?)."
        )
    return outputs


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
