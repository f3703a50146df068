"""Saving and loading both forms, and loading weights through the builders."""

import keras
import numpy as np
import pytest

import repvgg_keras as rk
from repvgg_keras.parity import randomize_batchnorm

KW = dict(input_shape=(32, 40, 3), classes=6)


@pytest.fixture(scope="module")
def trained():
    model = randomize_batchnorm(rk.RepVGG_A0(**KW), seed=9)
    return model, rk.to_deploy(model)


@pytest.fixture
def x(rng):
    return rng.normal(size=(2, 32, 40, 3)).astype("float32")


@pytest.mark.parametrize("form", [0, 1])
def test_keras_file_round_trip(tmp_path, trained, x, form):
    model = trained[form]
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x, training=False)))
    assert [type(l).__name__ for l in loaded.layers] == [type(l).__name__ for l in model.layers]


def test_weights_argument_loads_both_forms(tmp_path, trained, x):
    model, plain = trained
    model.save_weights(tmp_path / "train.weights.h5")
    plain.save_weights(tmp_path / "deploy.weights.h5")
    again = rk.RepVGG_A0(weights=tmp_path / "train.weights.h5", **KW)
    np.testing.assert_array_equal(
        np.asarray(again(x, training=False)), np.asarray(model(x, training=False))
    )
    deployed = rk.RepVGG_A0(deploy=True, weights=str(tmp_path / "deploy.weights.h5"), **KW)
    np.testing.assert_array_equal(np.asarray(deployed(x)), np.asarray(plain(x)))


def test_weights_from_a_keras_file(tmp_path, trained, x):
    model, _ = trained
    model.save(tmp_path / "m.keras")
    again = rk.get_model("RepVGG_A0", weights=tmp_path / "m.keras", **KW)
    np.testing.assert_array_equal(
        np.asarray(again(x, training=False)), np.asarray(model(x, training=False))
    )


@pytest.mark.parametrize(
    "build",
    [
        lambda w: rk.RepVGG_A1(weights=w["train"], **KW),  # another variant
        lambda w: rk.RepVGG_A0(
            weights=w["train"], input_shape=(32, 40, 3), classes=7
        ),  # other head
        lambda w: rk.RepVGG_A0(weights=w["deploy"], **KW),  # deploy weights, training model
        lambda w: rk.RepVGG_A0(weights=w["train"], deploy=True, **KW),  # and the reverse
    ],
)
def test_weights_of_another_architecture_are_refused(tmp_path, trained, build):
    model, plain = trained
    files = {"train": tmp_path / "t.weights.h5", "deploy": tmp_path / "d.weights.h5"}
    model.save_weights(files["train"])
    plain.save_weights(files["deploy"])
    # Another class count is named with the file's count; the rest as not fitting.
    with pytest.raises(ValueError, match="does not fit model|holds a 6-class classifier"):
        build(files)


def test_missing_and_unsupported_weights_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rk.RepVGG_A0(weights=tmp_path / "nope.weights.h5", **KW)
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not keras")
    with pytest.raises(ValueError, match="Unsupported weights file"):
        rk.RepVGG_A0(weights=bad, **KW)
    garbage = tmp_path / "model.pth"  # a checkpoint suffix, but not a readable state dict
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="Refused to load"):
        rk.RepVGG_A0(weights=garbage, **KW)
