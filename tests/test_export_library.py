"""The exporters as a library: importing them leaves absl alone (no logging set-up, no flags
parsed or defined); every exporter runs through the one CLI runner (`cli.start`); one precision
table (export/precisions.py) is what every exporter, its flags and verify read; a SavedModel's
warm-up requests name the exported model's variant, not --model's default."""

import dataclasses
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from export import atomic, onnx, openvino, openvino_runtime, precisions, savedmodel, tflite, verify
from tests.helpers import REPO, cli_env, run_cli

SIZE = 32

IMPORT_ALONE = r"""
import json, logging
from absl import flags
from absl import logging as absl_logging
import repvgg_keras  # the library's own imports (TensorFlow, Keras) first
FLAGS = flags.FLAGS
def state():
    return dict(
        flags=sorted(FLAGS),
        parsed=FLAGS.is_parsed(),
        verbosity_default=FLAGS["verbosity"].using_default_value,
        absl_level=absl_logging.get_absl_logger().level,
        root_level=logging.getLogger().level,
    )
before = state()
from export import fast_predictor, onnx, openvino, savedmodel, tflite  # noqa: F401
print(json.dumps([before, state()]))
"""


@pytest.mark.slow  # starts a process
def test_importing_the_exporters_leaves_absl_logging_and_flags_alone():
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_ALONE],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=cli_env(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    before, after = json.loads(done.stdout.strip().splitlines()[-1])
    assert after == before
    assert not after["parsed"] and after["verbosity_default"]


FLAGS_OF_EACH = r"""
import json, runpy
from absl import flags
from export import cli
FLAGS = flags.FLAGS
found = {}
def start(main):  # each exporter's __main__ ends here: record its flags instead of running
    found[module] = {
        name: list(FLAGS[name].parser.enum_values)
        for name in ("precision", "verify_precision", "quantize")
        if name in FLAGS
    }
cli.start = start
baseline = set(FLAGS)
for module in ("export.savedmodel", "export.tflite", "export.onnx", "export.openvino"):
    namespace = runpy.run_module(module, run_name="__main__")
    if module == "export.openvino":
        found["refusals"] = []
        for given in (["--precision=fp32", "--quantize=int8"], ["--precision=int8", "--quantize=none"],
                      ["--precision=int8"], ["--quantize=int8", "--verify_precision=bf16"]):
            FLAGS.unparse_flags()
            FLAGS(["openvino", "--output=x", *given])
            try:
                namespace["check_precision_flags"]()
                found["refusals"].append("")
            except ValueError as error:
                found["refusals"].append(str(error))
    FLAGS.unparse_flags()
    for name in set(FLAGS) - baseline:
        delattr(FLAGS, name)
print(json.dumps(found))
"""


@pytest.mark.slow  # starts a process
def test_every_exporter_runs_through_cli_start_with_the_tables_precisions():
    done = subprocess.run(
        [sys.executable, "-c", FLAGS_OF_EACH],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=cli_env(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["export.savedmodel"]["precision"] == [
        "auto",
        *precisions.flag_choices("savedmodel"),
    ]
    openvino_flags = found["export.openvino"]
    assert openvino_flags["precision"] == precisions.flag_choices("openvino")
    assert openvino_flags["verify_precision"] == precisions.flag_choices("openvino")
    for module in ("export.tflite", "export.onnx", "export.openvino"):
        assert set(found[module]["quantize"]) <= set(precisions.QUANTIZE), module
    # --precision names what the IR computes in: int8 is the int8 IR, a float one contradicts it
    contradicts, quantize_none, int8_alone, old_meaning = found["refusals"]
    assert "disagree" in contradicts and "--verify_precision fp32" in contradicts
    assert "disagree" in quantize_none
    assert int8_alone == "" and old_meaning == ""


def test_verify_and_the_openvino_runtime_read_the_table():
    table = precisions.PRECISIONS
    assert verify.TOLERANCES == {name: p.tolerance for name, p in table.items()}
    assert verify.MIN_INT8_AGREEMENT == table["int8"].min_agreement
    assert [n for n in table if verify.judged_by_agreement(n)] == ["int8"]
    assert set(openvino_runtime.PRECISION_HINTS) == set(precisions.flag_choices("openvino"))
    assert tflite.PRECISION == {mode: precisions.QUANTIZE[mode] for mode in tflite.QUANTIZATIONS}
    report = verify.compare("x", "bf16", np.ones((2, 3)), np.ones((2, 3)))
    assert report.tolerance == table["bf16"].tolerance and report.min_agreement is None
    with pytest.raises(ValueError, match="Unknown precision 'fp64'"):
        precisions.get("fp64")


def _stub_model(classes=10):
    shape = types.SimpleNamespace
    return types.SimpleNamespace(
        inputs=[shape(shape=(None, SIZE, SIZE, 3))], outputs=[shape(shape=(None, classes))]
    )


def test_each_file_exporter_verifies_at_the_precision_its_quantize_mode_computes_in(monkeypatch):
    monkeypatch.setattr(atomic, "verified_export", lambda *args, precision, **kw: precision)
    inputs = np.zeros((1, SIZE, SIZE, 3), np.float32)
    for exporter, modes in (
        (tflite.export_tflite, tflite.QUANTIZATIONS),
        (onnx.export_onnx, onnx.QUANTIZATIONS),
    ):
        for mode in modes:
            got = exporter(_stub_model(), "m", quantize=mode, verify_inputs=inputs)
            assert got == precisions.of_quantize(mode), (exporter.__name__, mode)
    for mode in openvino.QUANTIZATIONS:
        got = openvino.export_openvino(
            _stub_model(), "ir", quantize=mode, precision="fp32", verify_inputs=inputs
        )
        assert got == "fp32"  # the library's `precision`: what it is compiled and verified at


def test_the_serving_name_is_the_variant_the_model_was_built_as():
    named = lambda name: types.SimpleNamespace(name=name)
    assert savedmodel.serving_name(named("RepVGG_B1g4")) == "repvgg_b1g4"
    assert savedmodel.serving_name(named("PSPNet_RepVGG_B0_fast")) == "repvgg_b0"


@pytest.mark.slow  # exports in a process
def test_warmup_requests_name_the_keras_files_variant_not_the_model_flags_default(tmp_path):
    import repvgg_keras as rk

    spec = dataclasses.replace(
        rk.get_spec("RepVGG_B0"), num_blocks=(1, 1, 1, 1), width_multipliers=(0.25, 0.25)
    )
    weights = str(tmp_path / "b0.keras")
    rk.to_deploy(rk.RepVGG(spec, input_shape=(SIZE, SIZE, 3), classes=4)).save(weights)
    export_dir = tmp_path / "served"
    done = run_cli(
        "export.savedmodel",
        *("--weights", weights, "--export_dir", export_dir, "--verify_count", 2),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    warmup = os.path.join(export_dir, "1", "assets.extra", "tf_serving_warmup_requests")
    with open(warmup, "rb") as f:
        records = f.read()
    assert records.count(b"repvgg_b0") == len(savedmodel.SIGNATURES)
    assert b"repvgg_a0" not in records
