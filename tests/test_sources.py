"""Model sources: one path from a name or file to a model, one family of errors, and bad input
to the export and conversion CLIs ending in one `error:` line."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

import repvgg_keras as rk
from repvgg_keras import checkpoints, sources
from repvgg_keras.errors import SourceError, SourceNotFoundError
from repvgg_keras.parity import max_relative_difference, randomize_batchnorm
from tests.helpers import REPO, run_cli

FIXTURES = os.path.join(REPO, "tests", "fixtures")
GOLDEN_SPEC = rk.RepVGGSpec(
    "golden_tiny",
    num_blocks=(1, 1, 2, 1),
    width_multipliers=(0.125, 0.125),
    groups=2,
    grouped_layers=(4,),
    use_se=True,
)
TINY = rk.RepVGGSpec("tiny", num_blocks=(1, 2, 1, 1), width_multipliers=(0.25, 0.25))
KW = dict(input_shape=(32, 32, 3), classes=4)


@pytest.fixture
def x(rng):
    return rng.normal(size=(2, 32, 32, 3)).astype("float32")


# ---------------------------------------------------------------- one path from a source to a model


@pytest.mark.parametrize(
    "filename,deploy",
    [("golden_tiny.safetensors", False), ("golden_tiny_deploy.safetensors", True)],
)
def test_model_from_source_builds_the_checkpoints_form(filename, deploy):
    golden = np.load(os.path.join(FIXTURES, "golden_tiny.npz"))
    model = rk.model_from_source(
        GOLDEN_SPEC,
        os.path.join(FIXTURES, filename),
        input_shape=golden["images"].shape[1:],
        classes=10,
    )
    assert rk.is_deploy_form(model) == deploy
    assert max_relative_difference(model(golden["images"], training=False), golden["logits"]) < 1e-4


@pytest.mark.parametrize(
    "options", [dict(quant_friendly=True), dict(use_1x1=False), dict(use_identity=False)]
)
def test_model_from_source_rebuilds_keras_files_with_their_form_and_blocks(tmp_path, x, options):
    """.keras and .weights.h5 files of QARepVGG/ablation models and of their deploy form load
    without the caller knowing how they were built."""
    trained = randomize_batchnorm(rk.RepVGG(TINY, **KW, **options), seed=3)
    plain = rk.to_deploy(trained)
    trained.save(tmp_path / "t.keras")
    trained.save_weights(tmp_path / "t.weights.h5")
    plain.save(tmp_path / "d.keras")
    plain.save_weights(tmp_path / "d.weights.h5")
    for name, reference in (("t", trained), ("d", plain)):
        for suffix in (".keras", ".weights.h5"):
            model = rk.model_from_source(TINY, str(tmp_path / f"{name}{suffix}"), **KW)
            assert rk.is_deploy_form(model) == (name == "d"), (name, suffix)
            np.testing.assert_array_equal(
                np.asarray(model(x, training=False)), np.asarray(reference(x, training=False))
            )
            if name == "t":
                assert sources.block_options(model) == sources.block_options(trained)


def test_a_checkpoint_is_read_once_by_the_exporters(monkeypatch):
    from export import loading

    reads = []
    original = checkpoints.read_state_dict
    monkeypatch.setattr(
        checkpoints, "read_state_dict", lambda path: reads.append(path) or original(path)
    )
    with pytest.raises(SourceError, match="does not match model"):
        loading.load_model(
            "RepVGG_A0", os.path.join(FIXTURES, "golden_tiny_deploy.safetensors"), 32, 10
        )
    assert len(reads) == 1


@pytest.mark.slow
def test_every_caller_reports_a_bad_source_the_same_way(tmp_path):
    from export import loading
    from train import pretrained

    missing = str(tmp_path / "nope.keras")
    callers = [
        lambda: rk.RepVGG(TINY, weights=missing, **KW),
        lambda: rk.model_from_source(TINY, missing, **KW),
        lambda: loading.load_model("RepVGG_A0", missing, 32, 4),
        lambda: pretrained.load_donor(missing, build=lambda include_top: rk.RepVGG(TINY, **KW)),
    ]
    messages = set()
    for call in callers:
        with pytest.raises(SourceNotFoundError) as caught:
            call()
        messages.add(str(caught.value))
    assert len(messages) == 1 and "nope.keras' does not exist" in messages.pop()


def test_fine_tuning_refuses_a_deploy_form_source():
    from train import pretrained

    build = lambda include_top: rk.RepVGG(
        GOLDEN_SPEC,
        input_shape=(None, None, 3),
        include_top=include_top,
        classes=10 if include_top else None,
    )
    with pytest.raises(SourceError, match="deploy-form .* cannot be trained"):
        pretrained.load_donor(os.path.join(FIXTURES, "golden_tiny_deploy.safetensors"), build)
    with pytest.raises(SourceError, match="training form is needed|training form"):
        rk.model_from_source(
            GOLDEN_SPEC,
            os.path.join(FIXTURES, "golden_tiny_deploy.safetensors"),
            form="training",
            classes=10,
        )


# ---------------------------------------------------------------- bad input to the library


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(classes=0), "classes must be a positive integer.*got 0"),
        (dict(classes=-3), "classes must be a positive integer.*got -3"),
        (dict(classes=2.5), "classes must be a positive integer"),
        (dict(pooling="median"), "pooling must be None, 'avg' or 'max', got 'median'"),
    ],
)
def test_builder_names_the_bad_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rk.RepVGG(TINY, input_shape=(32, 32, 3), **kwargs)


def _truncated_safetensors(tmp_path):
    path = tmp_path / "cut.safetensors"
    with open(os.path.join(FIXTURES, "golden_tiny.safetensors"), "rb") as f:
        path.write_bytes(f.read()[:-100])
    return str(path)


def test_corrupt_files_are_one_clear_source_error(tmp_path):
    cut = _truncated_safetensors(tmp_path)
    with pytest.raises(
        SourceError,
        match=r"'.*cut\.safetensors' is not a readable .safetensors file.*truncated",
    ):
        rk.RepVGG(GOLDEN_SPEC, classes=10, weights=cut)
    noise = tmp_path / "noise.keras"
    noise.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(SourceError, match=r"noise\.keras' is not a valid .keras file"):
        rk.model_from_source(TINY, str(noise), **KW)
    h5 = tmp_path / "noise.weights.h5"
    h5.write_bytes(np.random.default_rng(1).bytes(2000))
    with pytest.raises(SourceError, match=r"noise\.weights\.h5' is not a valid .weights.h5 file"):
        rk.model_from_source(TINY, str(h5), **KW)


# ---------------------------------------------------------------- export leftovers and messages


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_staging_directories_are_removed_and_live_ones_kept(tmp_path):
    from export import atomic

    target = tmp_path / "a.onnx"
    host = atomic._HOST
    dead = tmp_path / f".a.onnx.tmp-{host}-{_dead_pid()}-abc123de"
    live = tmp_path / f".a.onnx.tmp-{host}-{os.getpid()}-xyz789ab"
    old_unnamed, fresh_unnamed = (
        tmp_path / ".a.onnx.tmp-oldoldol",
        tmp_path / ".a.onnx.tmp-freshfre",
    )
    other_target = tmp_path / f".b.onnx.tmp-{host}-{_dead_pid()}-abc123de"
    for directory in (dead, live, old_unnamed, fresh_unnamed, other_target):
        directory.mkdir()
        (directory / "a.onnx").write_bytes(b"partial")
    day_ago = time.time() - 2 * atomic.STAGING_STALE_AFTER_S
    os.utime(old_unnamed / "a.onnx", (day_ago, day_ago))
    os.utime(old_unnamed, (day_ago, day_ago))
    with atomic.atomic_output(str(target)) as staged:
        with open(staged, "wb") as f:
            f.write(b"new")
    assert target.read_bytes() == b"new"
    assert not dead.exists() and not old_unnamed.exists()
    assert live.exists() and fresh_unnamed.exists() and other_target.exists()


def test_a_previous_artifact_left_in_a_killed_staging_directory_is_put_back(tmp_path):
    from export import atomic

    target = tmp_path / "model_openvino"
    stale = tmp_path / f".model_openvino.tmp-{atomic._HOST}-{_dead_pid()}-abc123de"
    (stale / "previous").mkdir(parents=True)
    (stale / "previous" / "model.xml").write_text("old")
    atomic.remove_stale_staging(str(target))
    assert (target / "model.xml").read_text() == "old" and not stale.exists()


def test_int8_hint_holds_whatever_the_training(capsys):
    from export import verify

    report = verify.Report("x.tflite", "int8", 0.1, 0.1, 0.9, 0.25)
    verify.check(report)
    out = capsys.readouterr().out
    note = out[out.index("note:") :].strip().splitlines()
    assert len(note) <= 2 and "--quant_friendly" in out and "if this model was not" in out
    assert "unless this model was trained" not in out and "99.5" not in out


# ---------------------------------------------------------------- CLIs: one error line, exit 1


def _assert_one_error_line(result, *fragments):
    assert result.returncode == 1, result.stdout[-1000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert ".tmp-" not in errors[0]
    return errors[0]


@pytest.mark.parametrize(
    "args,fragments",
    [
        (
            ["export.onnx", "--output", "{tmp}/a.onnx", "--image_size", "0"],
            ["--image_size 0 is too small"],
        ),
        (
            ["export.onnx", "--output", "{tmp}/a.onnx", "--classes", "0"],
            ["--classes must be at least 1"],
        ),
        (
            ["export.onnx", "--output", "{tmp}/a.onnx", "--opset", "3"],
            ["--opset 3 is not supported"],
        ),
        (
            ["export.tflite", "--output", "{tmp}/a.tflite", "--calibration_count", "0"],
            ["--calibration_count"],
        ),
        (
            ["export.savedmodel", "--export_dir", "{tmp}/sm", "--version", "-1"],
            ["--version must be a non-negative"],
        ),
        (["export.savedmodel", "--export_dir", "{tmp}/file"], ["is a file"]),
        (
            ["export.onnx", "--output", "/sys/repvgg_keras_test/a.onnx", "--image_size", "32"],
            ["/sys/repvgg_keras_test/a.onnx"],
        ),
        (
            ["export.onnx", "--output", "{tmp}/a.onnx", "--weights", "{tmp}/noise.keras"],
            ["not a valid .keras file"],
        ),
        (
            ["export.openvino", "--output", "{tmp}/ov", "--weights", "{tmp}/cut.safetensors"],
            ["cut.safetensors' is not a readable .safetensors file"],
        ),
        (
            [
                "repvgg_keras.convert_checkpoint",
                "--model",
                "RepVGG_A0",
                "--checkpoint",
                "{tmp}/cut.safetensors",
                "--output",
                "{tmp}/out.weights.h5",
            ],
            ["cut.safetensors"],
        ),
        (
            [
                "repvgg_keras.convert_checkpoint",
                "--model",
                "RepVGG_A0",
                "--checkpoint",
                "{tmp}/cut.safetensors",
                "--output",
                "{tmp}/out.weights.h5",
                "--classes",
                "0",
            ],
            ["--classes must be at least 1"],
        ),
    ],
)
@pytest.mark.slow
def test_cli_bad_input_is_one_error_line(tmp_path, args, fragments):
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "noise.keras").write_bytes(np.random.default_rng(0).bytes(2000))
    _truncated_safetensors(tmp_path)
    _assert_one_error_line(run_cli(*[a.replace("{tmp}", str(tmp_path)) for a in args]), *fragments)
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "sm").exists()
