"""Export an OpenVINO IR directory (model.xml + model.bin), verified in OpenVINO on the CPU.

    python -m export.openvino --model RepVGG_A0 --weights a0.keras --output a0_openvino [--quantize int8]

The deploy model goes through our ONNX exporter (NCHW input `images`, dynamic batch),
OpenVINO converts that to its IR; --quantize int8 (or --precision int8) first quantizes the
ONNX graph (QDQ, per-channel, calibrated on real images). --precision names what the IR
computes in on the CPU, as in every exporter (export/precisions.py): fp32 or bf16 (OpenVINO's
inference precision: the file keeps fp32 weights), int8 (the QDQ IR); default: int8 for an int8
IR, bf16 where the CPU runs it natively, else fp32, as `export.fast_predictor` does.
Verification compiles the IR at that precision and compares with the Keras model by its
acceptance rule; --verify_precision verifies at another one (say, a float IR by int8's rule).
The directory also holds runtime.json: the settings it was verified with.

OpenVINO takes NCHW input: transpose NHWC batches with x.transpose(0, 3, 1, 2).
"""

import json
import os
import tempfile

import numpy as np
from absl import flags

from export import atomic, cli, precisions, runners
from export.onnx import onnx_file
from export.openvino_runtime import supports

FLAGS = flags.FLAGS
QUANTIZATIONS = ("none", "int8")


def default_precision(quantize="none"):
    """int8 for int8 IR; bf16 where this CPU runs it natively; fp32 otherwise."""
    if quantize == "int8":
        return "int8"
    return "bf16" if supports("bf16") else "fp32"


def convert(model, directory, quantize="none", calibration=None):
    """Write model.xml/model.bin for `model` (Keras, NHWC) into `directory`."""
    import openvino as ov

    if quantize not in QUANTIZATIONS:
        raise ValueError(
            f"Unknown --quantize {quantize!r}: choose one of {', '.join(QUANTIZATIONS)}."
        )
    if quantize == "int8" and (calibration is None or len(calibration) == 0):
        raise ValueError("--quantize int8 needs calibration images (--calibration_data).")
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        source = onnx_file(model, tmp, nchw=True, int8=quantize == "int8", calibration=calibration)
        # fp32 weights in the file: bf16 is chosen at compile time, where the CPU supports it.
        ov.save_model(
            ov.convert_model(source), os.path.join(directory, "model.xml"), compress_to_fp16=False
        )
    return os.path.join(directory, "model.xml")


def run(directory, inputs_nhwc, precision="fp32", threads=None):
    batch = np.transpose(np.asarray(inputs_nhwc, np.float32), (0, 3, 1, 2))
    return runners.openvino(os.path.join(directory, "model.xml"), precision, threads)(batch)


def export_openvino(
    model,
    output,
    *,
    quantize="none",
    precision=None,
    verify_inputs,
    calibration=None,
    reference=None,
    overwrite=False,
    tolerance=None,
    min_agreement=None,
):
    """Convert, verify at `precision` against `reference` (default `model`), move into `output`."""
    precision = precision or default_precision(quantize)
    artifact = f"OpenVINO {os.path.basename(os.path.normpath(output))}"

    def write_runtime_json(staged, report):
        with open(os.path.join(staged, "runtime.json"), "w") as f:
            json.dump(
                {
                    "precision": precision,
                    "input": "images",
                    "layout": "NCHW",
                    "verified_max_rel_diff": report.max_rel,
                    "verified_top1_agreement": report.top1_agreement,
                },
                f,
                indent=1,
            )

    return atomic.verified_export(
        output,
        lambda staged: convert(model, staged, quantize, calibration),
        lambda staged: [(artifact, run(staged, verify_inputs, precision), None)],
        reference or model,
        verify_inputs,
        precision=precision,
        overwrite=overwrite,
        tolerance=tolerance,
        min_agreement=min_agreement,
        after=write_runtime_json,
    )


def check_precision_flags():
    """ValueError where --precision (what the IR computes in) and --quantize disagree."""
    if FLAGS.precision is None:
        return
    int8_ir = precisions.of_quantize(FLAGS.quantize) == "int8"
    quantize_given = FLAGS["quantize"].present
    if (FLAGS.precision == "int8") != int8_ir and (int8_ir or quantize_given):
        raise ValueError(
            f"--precision {FLAGS.precision} and --quantize {FLAGS.quantize} disagree: --precision "
            "names what the IR computes in (int8: the --quantize int8 IR). Pass one of them, or "
            f"--verify_precision {FLAGS.precision} to verify the IR at {FLAGS.precision}."
        )


def main(argv):
    del argv
    int8_ir = FLAGS.precision == "int8" or precisions.of_quantize(FLAGS.quantize) == "int8"
    export = cli.exporter(
        export_openvino,
        quantize="int8" if int8_ir else "none",
        precision=FLAGS.verify_precision or FLAGS.precision,
    )
    checks = [
        check_precision_flags,
        cli.check_calibration_flags,
        cli.refuse_segmentation("export.openvino"),
    ]
    return cli.run_exporter(export, FLAGS.output, checks=checks, runtime="openvino")


if __name__ == "__main__":
    cli.define_model_flags()
    flags.DEFINE_string("output", None, "Directory to write (model.xml, model.bin, runtime.json).")
    flags.DEFINE_enum("quantize", "none", QUANTIZATIONS, "int8: QDQ-quantize before converting.")
    flags.DEFINE_enum(
        "precision",
        None,
        precisions.flag_choices("openvino"),
        "What the IR computes in on the CPU, as in every exporter: fp32 or bf16 (OpenVINO's "
        "inference precision, recorded in runtime.json; the file keeps fp32 weights), int8 (the "
        "QDQ IR: the same as --quantize int8). Verified at it. Default: int8 for an int8 IR, "
        "bf16 where the CPU runs it natively, else fp32.",
    )
    flags.DEFINE_enum(
        "verify_precision",
        None,
        precisions.flag_choices("openvino"),
        "Verify (and record in runtime.json) at this precision instead of --precision's, "
        "whatever the IR computes in (e.g. --verify_precision int8 judges a float IR by int8's "
        "top-1 agreement).",
    )
    cli.define_calibration_flags()
    flags.mark_flag_as_required("output")
    cli.start(main)
