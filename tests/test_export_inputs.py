"""What the exporters do with the inputs they are given: custom-spec `.keras` files, concurrent
writers of one target, broken weights, counts that cannot be honoured, one-class models."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

import repvgg_keras as rk
from export import atomic, cli, loading, verify
from repvgg_keras.parity import randomize_batchnorm
from tests.helpers import REPO, run_cli

SIZE = 32
CLASSES = 10
# What `python -m train --num_blocks 1,1,1,1 --width_multipliers 0.25,0.25` builds.
CUSTOM = dataclasses.replace(
    rk.get_spec("RepVGG_A0"),
    name="RepVGG_A0_custom",
    num_blocks=(1, 1, 1, 1),
    width_multipliers=(0.25, 0.25),
)


@pytest.fixture(scope="module")
def custom_files(tmp_path_factory):
    """(training-form model, {form: path}) of a tiny custom-spec classifier saved as .keras."""
    directory = tmp_path_factory.mktemp("custom")
    trained = randomize_batchnorm(
        rk.RepVGG(CUSTOM, input_shape=(SIZE, SIZE, 3), classes=CLASSES), seed=1
    )
    paths = {"training": str(directory / "model_train.keras")}
    paths["deploy"] = str(directory / "model_deploy.keras")
    trained.save(paths["training"])
    rk.to_deploy(trained).save(paths["deploy"])
    return trained, paths


# ---------------------------------------------------------------- a .keras file is taken as it is


@pytest.mark.parametrize("form", ["training", "deploy"])
def test_a_custom_spec_keras_file_loads_as_it_is(custom_files, form):
    trained, paths = custom_files
    loaded = loading.load_model(None, paths[form])  # no --model/--classes/--image_size/--channels
    assert loaded.input_shape == (None, SIZE, SIZE, 3) and loaded.output_shape == (None, CLASSES)
    assert rk.is_deploy_form(loaded) == (form == "deploy")
    x = np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 3)).astype("float32")
    np.testing.assert_allclose(
        np.asarray(loaded(x, training=False)), np.asarray(trained(x, training=False)), atol=1e-5
    )
    # Flags given explicitly are checked against the file: equal ones pass ...
    assert loading.load_model(None, paths[form], SIZE, CLASSES, 3).output_shape[-1] == CLASSES


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(name="RepVGG_A0"), "--model RepVGG_A0 does not match .* Leave --model unset"),
        (dict(classes=1000), "--classes 1000 does not match .* Pass --classes 10"),
        (dict(image_size=64), "--image_size 64 does not match .* pass --image_size 32"),
        (dict(channels=1), "--channels 1 does not match .* Pass --channels 3"),
    ],
)
def test_explicit_flags_that_contradict_the_keras_file_are_one_error(custom_files, kwargs, message):
    _, paths = custom_files
    name = kwargs.pop("name", None)
    with pytest.raises(ValueError, match=message) as caught:
        loading.load_model(name, paths["deploy"], **kwargs)
    assert "\n" not in str(caught.value)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["training", "deploy"])
def test_cli_exports_a_custom_spec_keras_file_without_model_flags(tmp_path, custom_files, form):
    _, paths = custom_files
    output = tmp_path / "custom.onnx"
    result = run_cli(
        "export.onnx", "--weights", paths[form], "--output", str(output), "--verify_count", "70"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1].startswith("verified:")
    assert "on 64 images" in result.stdout.splitlines()[-1]
    # More images than the 64 'sample' photos: verified on those, and said so in one line.
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: --verify_images sample holds 64 images; verifying on 64, not 70 (--verify_count)"
    ]
    assert output.exists()


# ---------------------------------------------------------------- concurrent writers of one target


def _write(staged, kind, content):
    if kind == "file":
        with open(staged, "w") as f:
            f.write(content)
    else:  # a directory, as the SavedModel <export_dir>/<version>/ and OpenVINO write
        os.makedirs(os.path.join(staged, "variables"))
        for name in ("saved_model.pb", os.path.join("variables", "data")):
            with open(os.path.join(staged, name), "w") as f:
                f.write(content)


def _read(path, kind):
    if kind == "file":
        with open(path) as f:
            return f.read()
    contents = set()
    for name in ("saved_model.pb", os.path.join("variables", "data")):
        with open(os.path.join(path, name)) as f:
            contents.add(f.read())
    assert len(contents) == 1, "a directory mixes two writers' files"
    return contents.pop()


def _race(path, kind, overwrite, writers=2):
    """`writers` threads export to `path` at once: each has passed atomic_output's existence check
    and written its artifact before any of them moves it into place. Returns {writer: error}."""
    import threading

    barrier = threading.Barrier(writers)
    outcome = {}

    def writer(index):
        try:
            with atomic.atomic_output(path, overwrite=overwrite) as staged:
                _write(staged, kind, f"writer {index}")
                barrier.wait(timeout=30)
            outcome[index] = None
        except Exception as error:
            outcome[index] = error

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return outcome


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_concurrent_writers_without_overwrite_cannot_both_succeed(tmp_path, kind):
    target = tmp_path / "export_dir" / ("model.onnx" if kind == "file" else "1")
    outcome = _race(str(target), kind, overwrite=False, writers=3)
    winners = [i for i, error in outcome.items() if error is None]
    losers = [error for error in outcome.values() if error is not None]
    assert len(winners) == 1 and len(losers) == 2, outcome
    for error in losers:
        assert isinstance(error, FileExistsError) and "--overwrite" in str(error)
        assert "\n" not in str(error)
    assert _read(str(target), kind) == f"writer {winners[0]}"
    assert os.listdir(target.parent) == [target.name]  # no staging left behind


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_concurrent_writers_with_overwrite_leave_one_whole_artifact(tmp_path, kind):
    target = tmp_path / ("model.onnx" if kind == "file" else "1")
    _write(str(target), kind, "previous")
    outcome = _race(str(target), kind, overwrite=True, writers=3)
    assert all(error is None for error in outcome.values()), outcome
    assert _read(str(target), kind) in {f"writer {i}" for i in outcome}
    assert os.listdir(tmp_path) == [target.name]


@pytest.mark.slow
def test_two_cli_exports_to_one_path_one_wins(tmp_path, custom_files):
    _, paths = custom_files
    output = tmp_path / "same.onnx"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    args = [sys.executable, "-m", "export.onnx", "--weights", paths["deploy"]]
    args += ["--output", str(output), "--verify_count", "2"]
    started = [
        subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=600), p.stderr.read().decode()) for p in started]
    assert sorted(code for code, _ in results) == [0, 1], results
    (loser,) = [stderr for code, stderr in results if code == 1]
    errors = [line for line in loser.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--overwrite" in errors[0], loser[-2000:]
    assert output.exists() and os.listdir(tmp_path) == ["same.onnx"]


# ---------------------------------------------------------------- broken weights, bad check images


def _broken(model, value=np.nan):
    """A copy of `model` with one classifier bias set to `value`: its outputs are not finite."""
    import keras

    model, original = keras.models.clone_model(model), model
    model.set_weights(original.get_weights())
    dense = model.layers[-1]
    kernel, bias = dense.get_weights()
    bias[0] = value
    dense.set_weights([kernel, bias])
    return model


@pytest.fixture(scope="module")
def tiny():
    return randomize_batchnorm(
        rk.RepVGG(CUSTOM, input_shape=(SIZE, SIZE, 3), classes=CLASSES, deploy=True), seed=2
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(check_images=np.zeros((0, SIZE, SIZE, 3))), "check_images holds no images"),
        (dict(check_images=np.full((2, SIZE, SIZE, 3), np.nan)), "NaN or Inf values in 2 of 2"),
        (dict(check_images=np.zeros((2, SIZE, SIZE))), r"shape \[N, 32, 32, 3\]"),
        (dict(calibration_images=np.zeros((0, SIZE, SIZE, 3))), "calibration_images holds no"),
        (dict(min_agreement=1.5), "min_agreement is a fraction"),
        (dict(threads=0), "threads must be a positive integer"),
    ],
)
def test_fast_predictor_checks_its_arguments(tiny, kwargs, message):
    from export import fast_predictor

    with pytest.raises(ValueError, match=message):
        fast_predictor.fast_predictor(tiny, runtime="keras", **kwargs)


def test_fast_predictor_refuses_a_model_with_non_finite_outputs(tiny):
    from export import fast_predictor

    broken = _broken(tiny)
    with pytest.raises(ValueError, match="own outputs are NaN on 2 of 2 check images.*broken"):
        fast_predictor.fast_predictor(
            broken, runtime="keras", check_images=np.zeros((2, SIZE, SIZE, 3))
        )


def test_reference_outputs_must_be_finite(tiny):
    x = np.zeros((3, SIZE, SIZE, 3), np.float32)
    assert verify.check_reference_outputs(tiny, x).shape == (3, CLASSES)
    for value, kind in ((np.nan, "NaN"), (np.inf, "inf")):
        broken = _broken(tiny, value)
        with pytest.raises(ValueError, match=f"own outputs are {kind} on 3 of 3 verification"):
            verify.check_reference_outputs(broken, x)


@pytest.mark.slow
def test_cli_refuses_to_export_a_model_whose_outputs_are_nan(tmp_path, tiny):
    path = str(tmp_path / "diverged.keras")
    _broken(tiny).save(path)
    output = tmp_path / "x.onnx"
    result = run_cli(
        "export.onnx", "--weights", path, "--output", str(output), "--verify_count", "2"
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "own outputs are NaN" in errors[0] and "diverged" in errors[0]
    assert "differs by nan" not in result.stdout + result.stderr
    assert not output.exists() and os.listdir(tmp_path) == ["diverged.keras"]


# ---------------------------------------------------------------- counts that cannot be honoured


def test_a_count_the_source_cannot_honour_is_noted_in_one_line(capsys, tmp_path):
    from export import images

    held = len(images.sample_files())
    pixels = cli.load_counted_images(
        "sample",
        held + 100,
        (SIZE, SIZE, 3),
        flags=("--verify_images", "--verify_count"),
        purpose="verifying",
    )
    assert len(pixels) == held
    notes = capsys.readouterr().err.splitlines()
    assert notes == [
        f"note: --verify_images sample holds {held} images; verifying on {held}, not "
        f"{held + 100} (--verify_count)"
    ]
    folder = tmp_path / "two"
    folder.mkdir()
    import tensorflow as tf

    for i in range(2):
        tf.io.write_file(str(folder / f"{i}.png"), tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)))
    pixels = cli.load_counted_images(
        str(folder),
        5,
        (SIZE, SIZE, 3),
        flags=("--calibration_data", "--calibration_count"),
        purpose="calibrating",
    )
    assert len(pixels) == 2
    (note,) = capsys.readouterr().err.splitlines()
    assert note.endswith("holds 2 images; calibrating on 2, not 5 (--calibration_count)")
    cli.load_counted_images(  # a count the source holds: nothing to note
        "sample", 4, (SIZE, SIZE, 3), flags=("--verify_images", "--verify_count"), purpose="v"
    )
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- one-class models


def test_auto_precision_never_chooses_on_a_one_class_agreement(monkeypatch):
    from export import savedmodel
    from repvgg_keras import cpu_features

    monkeypatch.setattr(cpu_features, "native_bf16", lambda: "avx512_bf16")  # bf16 is an option

    one = randomize_batchnorm(
        rk.RepVGG(CUSTOM, input_shape=(SIZE, SIZE, 3), classes=1, deploy=True), seed=3
    )
    x = np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 3)).astype("float32")
    precision, reason = savedmodel.choose_precision("auto", one, one, x)
    assert precision == "fp32" and "one-class" in reason


@pytest.mark.slow
def test_one_class_models_are_refused_in_one_line(tmp_path):
    one = rk.RepVGG(CUSTOM, input_shape=(SIZE, SIZE, 3), classes=1)
    path = str(tmp_path / "one.keras")
    one.save(path)
    runs = {
        "flag": run_cli(
            "export.savedmodel",
            *("--task", "segmentation", "--classes", "1", "--image_size", str(SIZE)),
            *("--export_dir", str(tmp_path / "seg")),
        ),
        "file": run_cli("export.onnx", "--weights", path, "--output", str(tmp_path / "one.onnx")),
    }
    for name, result in runs.items():
        assert result.returncode == 1, (name, result.stderr[-2000:])
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "one-class model" in errors[0], (name, result.stderr[-2000:])
        assert "agreement 100" not in result.stdout
    assert os.listdir(tmp_path) == ["one.keras"]
