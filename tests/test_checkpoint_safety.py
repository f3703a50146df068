"""Every file the library reads is checked before use: an empty or truncated file, content
unlike its suffix, or a checkpoint of the wrong structure, type or shape is one SourceError
naming the file (and the key); a PSPNet lends its backbone; the PSPNet deploy form of a fixed
input size loads without this package."""

import os
import subprocess
import sys

import numpy as np
import pytest

import repvgg_keras as rk
from repvgg_keras import parity, pspnet, structure
from repvgg_keras.errors import SourceError
from tests.helpers import REPO, cli_env, random_images, run_cli

FIXTURES = os.path.join(REPO, "tests", "fixtures")
GOLDEN = os.path.join(FIXTURES, "golden_tiny.safetensors")
GOLDEN_SPEC = rk.RepVGGSpec(
    "golden_tiny",
    num_blocks=(1, 1, 2, 1),
    width_multipliers=(0.125, 0.125),
    groups=2,
    grouped_layers=(4,),
    use_se=True,
)
TINY = rk.RepVGGSpec("tiny", num_blocks=(1, 1, 1, 1), width_multipliers=(0.25, 0.25))
KW = dict(input_shape=(32, 32, 3), classes=4)


def _golden_state():
    import safetensors.numpy

    return safetensors.numpy.load_file(GOLDEN)


def _torch_save(state, path, **kwargs):
    import torch

    torch.save(state, path, **kwargs)
    return str(path)


def _tensors(state):
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


def _error(path, spec=TINY, **kwargs):
    with pytest.raises(SourceError) as caught:
        rk.model_from_source(spec, str(path), **(kwargs or KW))
    return str(caught.value)


# ---------------------------------------------------------------- empty and truncated files


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".safetensors", ".keras", ".weights.h5"])
def test_an_empty_file_of_every_format_is_named(tmp_path, suffix):
    path = tmp_path / f"zero{suffix}"
    path.write_bytes(b"")
    message = _error(path)
    assert f"zero{suffix}' is empty (0 bytes)" in message


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy_pickle"])
def test_a_truncated_torch_file_is_not_a_valid_checkpoint(tmp_path, legacy):
    whole = _torch_save(
        _tensors(_golden_state()), tmp_path / "whole.pth", _use_new_zipfile_serialization=not legacy
    )
    cut = tmp_path / "cut.pt"
    cut.write_bytes(open(whole, "rb").read()[:2000])
    message = _error(cut, GOLDEN_SPEC, classes=10)
    assert "cut.pt' is not a valid PyTorch checkpoint" in message and "truncated" in message


def test_the_content_decides_the_format_never_weights_only_false(tmp_path):
    """safetensors data named .pth and torch data named .safetensors load as what they are;
    torch's advice to load with weights_only=False is never passed on."""
    golden = np.load(os.path.join(FIXTURES, "golden_tiny.npz"))
    misnamed = tmp_path / "golden.pth"
    misnamed.write_bytes(open(GOLDEN, "rb").read())
    torch_data = _torch_save(_tensors(_golden_state()), tmp_path / "golden.safetensors")
    for path in (str(misnamed), torch_data):
        model = rk.model_from_source(
            GOLDEN_SPEC, path, input_shape=golden["images"].shape[1:], classes=10
        )
        logits = model(golden["images"], training=False)
        assert parity.max_relative_difference(logits, golden["logits"]) < 1e-4
    garbage = tmp_path / "garbage.pth"  # a pickle opcode, then nonsense
    garbage.write_bytes(b"\x80\x02" + np.random.default_rng(0).bytes(300))
    message = _error(garbage)
    assert "garbage.pth'" in message and "False" not in message


# ---------------------------------------------------------------- structure, type and shape


def _bad_contents():
    state = _golden_state()
    key = "stages.0.0.conv_kxk.conv.weight"  # authors' name: stage1.0.rbr_dense.conv.weight
    return {
        "list": ([np.zeros(3, np.float32)], "holds a list, not a state dict"),
        "not_tensors": ({"epoch": 3, "arch": "a0"}, "holds no tensors (2 entries: 'epoch': int"),
        "int_keys": ({1: np.zeros(3, np.float32)}, "has the key 1 (int)"),
        "flat_kernel": (
            {**state, key: state[key].reshape(-1)},
            "stage1.0.rbr_dense.conv.weight: checkpoint shape (576,) (1-D)",
        ),
        "int_kernel": (
            {**state, key: state[key].astype(np.int64)},
            "stage1.0.rbr_dense.conv.weight: checkpoint int64 values",
        ),
        "narrow_kernel": (
            {**state, key: state[key][:, :1]},
            "stage1.0.rbr_dense.conv.weight: checkpoint (3, 3, 1, 8) vs model (3, 3, 8, 8)",
        ),
    }


@pytest.mark.parametrize("case", list(_bad_contents()))
def test_checkpoint_content_is_checked_before_use(tmp_path, case):
    import torch

    content, fragment = _bad_contents()[case]
    if isinstance(content, dict):
        content = {
            k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in content.items()
        }
    else:
        content = [torch.from_numpy(v) for v in content]
    path = _torch_save(content, tmp_path / f"{case}.pth")
    model = rk.RepVGG(GOLDEN_SPEC, classes=10)
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(SourceError) as caught:
        rk.load_weights(model, path)
    assert f"{case}.pth'" in str(caught.value) and fragment in str(caught.value), str(caught.value)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_convert_checkpoint_names_an_empty_checkpoint(tmp_path):
    (tmp_path / "zero.pth").write_bytes(b"")
    result = run_cli(
        "repvgg_keras.convert_checkpoint",
        "--model",
        "RepVGG_A0",
        "--checkpoint",
        tmp_path / "zero.pth",
        "--output",
        tmp_path / "out.weights.h5",
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "zero.pth' is empty (0 bytes)" in errors[0], result.stderr[-2000:]
    assert not (tmp_path / "out.weights.h5").exists()


# ---------------------------------------------------------------- PSPNet files


def _tiny_pspnet(input_shape=(56, 40, 3)):
    model = pspnet.PSPNet(TINY, classes=3, input_shape=input_shape, head_channels=8)
    return parity.randomize_batchnorm(model, seed=2)


def test_a_classifier_starts_from_a_pspnets_backbone(tmp_path):
    from train import pretrained

    seg = _tiny_pspnet()
    seg.save(tmp_path / "seg.keras")
    rk.to_deploy(seg).save(tmp_path / "seg_deploy.keras")

    def build(include_top):
        return rk.RepVGG(
            TINY,
            input_shape=(32, 32, 3),
            include_top=include_top,
            classes=4 if include_top else None,
        )

    model = build(True)
    fresh = pretrained.copy_weights(
        model, pretrained.load_donor(str(tmp_path / "seg.keras"), build)
    )
    assert fresh == ["predictions"]
    trunk = seg.get_layer("backbone")
    for name in ("stage0", "stage1_0", "stage4_0"):
        for ours, theirs in zip(
            model.get_layer(name).get_weights(), trunk.get_layer(name).get_weights()
        ):
            np.testing.assert_array_equal(ours, theirs)
    with pytest.raises(SourceError, match="seg_deploy.keras' holds a deploy-form"):
        pretrained.load_donor(str(tmp_path / "seg_deploy.keras"), build)
    with pytest.raises(SourceError, match="seg.keras' is a PSPNet segmentation model"):
        rk.RepVGG(TINY, weights=str(tmp_path / "seg.keras"), **KW)


LOAD_WITHOUT_PACKAGE = r"""
import sys
import keras
import numpy as np
model = keras.saving.load_model(sys.argv[1], compile=False)
assert not any(name.split(".")[0] == "repvgg_keras" for name in sys.modules), "imported repvgg_keras"
np.save(sys.argv[3], np.asarray(model(np.load(sys.argv[2]))))
"""


def test_pspnet_deploy_form_loads_without_the_package(tmp_path, rng):
    # A 7 x 5 stride-8 map: uneven cells for bins 2, 3 and 6 (overlapping, as PyTorch's).
    model = _tiny_pspnet((56, 40, 3))
    plain = rk.to_deploy(model)
    assert structure.custom_layer_names(plain) == []
    x = random_images(rng, (2, 56, 40, 3))
    reference = np.asarray(model(x, training=False))
    assert np.abs(np.asarray(plain(x)) - reference).max() <= 1e-5
    plain.save(tmp_path / "deploy.keras")
    np.save(tmp_path / "x.npy", x)
    env = {k: v for k, v in cli_env().items() if k != "PYTHONPATH"}  # this checkout unreachable
    done = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_PACKAGE, "deploy.keras", "x.npy", "y.npy"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert np.abs(np.load(tmp_path / "y.npy") - reference).max() <= 1e-5


def test_pspnet_of_unknown_input_size_keeps_its_two_layers():
    """Built-in pooling and resizing need fixed sizes: with None sizes the deploy form keeps
    AdaptiveAveragePooling2D and ResizeLike (it loads with repvgg_keras imported)."""
    plain = rk.to_deploy(_tiny_pspnet((None, None, 3)))
    assert structure.custom_layer_names(plain) == ["AdaptiveAveragePooling2D", "ResizeLike"]


def test_a_weights_file_of_another_class_count_or_variant_says_what_differs(tmp_path):
    import repvgg_keras as rk
    from repvgg_keras.errors import ClassifierMismatchError, SourceError

    seven = tmp_path / "a0_7.weights.h5"
    rk.RepVGG_A0(input_shape=(32, 32, 3), classes=7).save_weights(seven)
    other = tmp_path / "b0.weights.h5"
    rk.RepVGG_B0(input_shape=(32, 32, 3), classes=10).save_weights(other)
    with pytest.raises(ClassifierMismatchError, match="holds a 7-class classifier.*classes=7"):
        rk.RepVGG_A0(input_shape=(32, 32, 3), classes=10, weights=str(seven))
    with pytest.raises(SourceError) as error:
        rk.RepVGG_A0(input_shape=(32, 32, 3), classes=10, weights=str(other))
    message = str(error.value)
    assert "\n" not in message and "value=" not in message and len(message) < 800
    assert "shapes only in the file: [64]" in message
