"""Checkpoint import: parity with timm (train/deploy, both namings), strictness, safety, download."""

import copy
import functools
import http.server
import os
import pickle
import threading

import numpy as np
import pytest

import repvgg_keras as rk
from repvgg_keras import checkpoints
from repvgg_keras.parity import max_relative_difference

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
# The reduced architecture of tests/fixtures/make_golden.py, in our terms.
GOLDEN_SPEC = rk.RepVGGSpec(
    "golden_tiny",
    num_blocks=(1, 1, 2, 1),
    width_multipliers=(0.125, 0.125),
    groups=2,
    grouped_layers=(4,),
    use_se=True,
)

# The authors' naming, written out from the facts sheet (independent of checkpoints.py).
AUTHORS_FROM_TIMM = [
    ("stem.", "stage0."),
    ("stages.0.", "stage1."),
    ("stages.1.", "stage2."),
    ("stages.2.", "stage3."),
    ("stages.3.", "stage4."),
    (".conv_kxk.", ".rbr_dense."),
    (".conv_1x1.", ".rbr_1x1."),
    (".identity.", ".rbr_identity."),
    (".attn.fc1.", ".se.down."),
    (".attn.fc2.", ".se.up."),
    (".reparam_conv.", ".rbr_reparam."),
    ("head.fc.", "linear."),
]


def _authors_key(key):
    for old, new in AUTHORS_FROM_TIMM:
        if key.startswith(old) or (old.startswith(".") and old in key):
            key = new + key[len(old) :] if key.startswith(old) else key.replace(old, new)
    return key


# ---------------------------------------------------------------- torch-free golden parity


@pytest.mark.parametrize(
    "filename,deploy",
    [("golden_tiny.safetensors", False), ("golden_tiny_deploy.safetensors", True)],
)
def test_golden_fixture_parity_without_torch(filename, deploy):
    golden = np.load(os.path.join(FIXTURES, "golden_tiny.npz"))
    images, logits = golden["images"], golden["logits"]
    model = rk.RepVGG(
        GOLDEN_SPEC,
        input_shape=images.shape[1:],
        classes=10,
        deploy=deploy,
        weights=os.path.join(FIXTURES, filename),
    )
    assert max_relative_difference(model(images, training=False), logits) < 1e-4
    if not deploy:
        assert max_relative_difference(rk.to_deploy(model)(images), logits) < 1e-4


def test_golden_fixture_format_detection():
    train = checkpoints.read_state_dict(os.path.join(FIXTURES, "golden_tiny.safetensors"))
    deploy = checkpoints.read_state_dict(os.path.join(FIXTURES, "golden_tiny_deploy.safetensors"))
    assert checkpoints.detect_format(train) == "timm-train"
    assert checkpoints.detect_format(deploy) == "timm-deploy"
    assert (
        checkpoints.detect_format({_authors_key(k): v for k, v in train.items()}) == "authors-train"
    )
    assert (
        checkpoints.detect_format({_authors_key(k): v for k, v in deploy.items()})
        == "authors-deploy"
    )


# ---------------------------------------------------------------- parity with timm itself


@functools.cache
def _timm_reference(name):
    """(train state dict, deploy state dict, NHWC input, logits) of timm's model, BN randomised."""
    import torch

    from bench.timm_import import import_timm, randomize_torch_batchnorm

    timm = import_timm()
    torch.manual_seed(0)
    model = timm.create_model(name.lower(), pretrained=False).eval()
    randomize_torch_batchnorm(model, seed=1)
    size = (96, 64) if name != "RepVGG_D2se" else (64, 80)
    images = np.random.default_rng(2).normal(size=(2,) + size + (3,)).astype(np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    train = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    deploy_model = copy.deepcopy(model)
    for module in deploy_model.modules():
        if hasattr(module, "reparameterize"):
            module.reparameterize()
    deploy = {k: v.numpy().copy() for k, v in deploy_model.state_dict().items()}
    return train, deploy, images, logits


@pytest.mark.slow
@pytest.mark.parametrize("name", ["RepVGG_A0", "RepVGG_B1g4", "RepVGG_D2se"])
@pytest.mark.parametrize("form", ["train", "deploy"])
@pytest.mark.parametrize("naming", ["timm", "authors"])
def test_parity_with_timm(tmp_path, name, form, naming):
    import torch

    train, deploy, images, logits = _timm_reference(name)
    state = train if form == "train" else deploy
    if naming == "authors":  # the authors' .pth, wrapped and prefixed as their trainer saves it
        state = {
            "state_dict": {
                "module." + _authors_key(k): torch.from_numpy(v) for k, v in state.items()
            }
        }
        path = tmp_path / "checkpoint.pth"
        torch.save(state, path)
    else:
        from safetensors.numpy import save_file

        path = tmp_path / "model.safetensors"
        save_file(state, str(path))
    model = rk.get_model(name, input_shape=images.shape[1:], deploy=form == "deploy", weights=path)
    assert max_relative_difference(model(images, training=False), logits) < 1e-4
    if form == "train":
        assert max_relative_difference(rk.to_deploy(model)(images), logits) < 1e-4


# ---------------------------------------------------------------- strictness


@pytest.fixture(scope="module")
def golden_state():
    return checkpoints.read_state_dict(os.path.join(FIXTURES, "golden_tiny.safetensors"))


def _golden_model(**kwargs):
    kwargs.setdefault("classes", 10)
    return rk.RepVGG(GOLDEN_SPEC, input_shape=(40, 56, 3), **kwargs)


def test_missing_tensor_is_listed_and_nothing_is_loaded(golden_state):
    model = _golden_model()
    before = [w.copy() for w in model.get_weights()]
    state = dict(golden_state)
    del state["stages.2.1.conv_1x1.bn.running_var"]
    with pytest.raises(
        ValueError, match=r"missing from the checkpoint \(1\): stage3\.1\.rbr_1x1\.bn\.running_var"
    ):
        checkpoints.load_checkpoint(model, state)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_unexpected_and_mismatched_tensors_are_listed(golden_state):
    state = dict(golden_state, **{"stages.0.0.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(
        ValueError, match=r"unexpected in the checkpoint \(1\): stage1\.0\.extra\.weight"
    ):
        checkpoints.load_checkpoint(_golden_model(), state)
    wider = rk.RepVGGSpec(
        "wider", (1, 1, 2, 1), (0.25, 0.125), groups=2, grouped_layers=(4,), use_se=True
    )
    with pytest.raises(ValueError, match="shape mismatches"):
        checkpoints.load_checkpoint(
            rk.RepVGG(wider, input_shape=(40, 56, 3), classes=10), golden_state
        )


def test_class_count_and_form_must_match(golden_state):
    with pytest.raises(ValueError, match="has 10 classes but the model has 7"):
        checkpoints.load_checkpoint(_golden_model(classes=7), golden_state)
    with pytest.raises(ValueError, match="build the model with deploy=False"):
        checkpoints.load_checkpoint(_golden_model(deploy=True), golden_state)


def test_include_top_false_drops_the_head(golden_state):
    golden = np.load(os.path.join(FIXTURES, "golden_tiny.npz"))
    full = _golden_model(weights=os.path.join(FIXTURES, "golden_tiny.safetensors"))
    backbone = rk.RepVGG(GOLDEN_SPEC, input_shape=(40, 56, 3), include_top=False, pooling="avg")
    checkpoints.load_checkpoint(backbone, golden_state)
    pooled = np.asarray(backbone(golden["images"], training=False))
    head = full.get_layer("predictions")
    np.testing.assert_allclose(
        pooled @ head.kernel.numpy() + head.bias.numpy(), golden["logits"], rtol=1e-4, atol=1e-5
    )


def test_unrecognised_checkpoint():
    with pytest.raises(ValueError, match="Unrecognised checkpoint"):
        checkpoints.load_checkpoint(_golden_model(), {"fc.weight": np.zeros((2, 2), np.float32)})


# ---------------------------------------------------------------- safety


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused(tmp_path):
    import torch

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"stage0.rbr_dense.conv.weight": _RunsCode(str(marker))}, path)
    with pytest.raises(ValueError, match="Refused to load"):
        rk.RepVGG_A0(input_shape=(32, 32, 3), weights=path)
    assert not marker.exists()
    raw = tmp_path / "raw.pth"  # a bare pickle (legacy format) too
    raw.write_bytes(pickle.dumps(_RunsCode(str(marker))))
    with pytest.raises(ValueError, match="Refused to load"):
        checkpoints.read_state_dict(raw)
    assert not marker.exists()


def test_missing_torch_gives_install_hint(tmp_path, monkeypatch):
    import sys

    path = tmp_path / "x.pth"
    path.write_bytes(b"whatever")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="pip install torch"):
        checkpoints.read_state_dict(path)


# ---------------------------------------------------------------- weights="imagenet", offline


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    hits = []

    def do_GET(self):
        type(self).hits.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_imagenet_download_from_loopback_is_cached_and_hash_checked(
    tmp_path, monkeypatch, golden_state
):
    from safetensors.numpy import save_file

    served = tmp_path / "served"
    served.mkdir()
    _, _, images, logits = _timm_reference("RepVGG_A0")
    train = _timm_reference("RepVGG_A0")[0]
    save_file(train, str(served / "repvgg_a0.rvgg_in1k.safetensors"))
    handler = functools.partial(_CountingHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv(
            checkpoints.BASE_URL_ENV,
            f"http://127.0.0.1:{server.server_port}/{{timm_name}}.safetensors",
        )
        monkeypatch.setenv(checkpoints.CACHE_DIR_ENV, str(tmp_path / "cache"))
        _CountingHandler.hits.clear()
        model = rk.RepVGG_A0(input_shape=images.shape[1:], weights="imagenet")
        assert max_relative_difference(model(images, training=False), logits) < 1e-4
        again = rk.RepVGG_A0(input_shape=images.shape[1:], weights="imagenet")
        assert len(_CountingHandler.hits) == 1  # second build used the cache
        assert max_relative_difference(again(images, training=False), logits) < 1e-4
        cached = tmp_path / "cache" / "repvgg_keras" / "repvgg_a0.rvgg_in1k.safetensors"
        with open(cached, "r+b") as f:  # corrupt the cached file
            f.seek(-4, 2)
            f.write(b"\0\0\0\1")
        with pytest.raises(ValueError, match="changed since they were downloaded"):
            rk.RepVGG_A0(input_shape=images.shape[1:], weights="imagenet")
    finally:
        server.shutdown()


def test_unpublished_variant_says_so():
    with pytest.raises(ValueError, match="No ImageNet weights are published for RepVGG_B1g2"):
        rk.RepVGG_B1g2(weights="imagenet")


# ---------------------------------------------------------------- CLI and preprocessing


@pytest.mark.slow
def test_convert_checkpoint_cli(tmp_path):
    import subprocess
    import sys

    output = tmp_path / "golden.weights.h5"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # The CLI builds named variants; the golden spec is custom, so drive convert() directly
    # for the content check and the CLI for its error path and exit codes.
    from repvgg_keras import convert_checkpoint

    with pytest.raises(ValueError, match="does not match model"):
        convert_checkpoint.convert(
            "RepVGG_A0", os.path.join(FIXTURES, "golden_tiny.safetensors"), str(output), classes=10
        )
    assert not output.exists()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "repvgg_keras.convert_checkpoint",
            "--model",
            "RepVGG_A0",
            "--checkpoint",
            os.path.join(FIXTURES, "golden_tiny_deploy.safetensors"),
            "--output",
            str(output),
            "--classes",
            "10",
        ],
        capture_output=True,
        text=True,
        cwd=repo,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert result.returncode == 1 and "shape mismatches" in result.stderr


def test_convert_checkpoint_writes_loadable_weights(tmp_path):
    from safetensors.numpy import save_file

    from repvgg_keras import convert_checkpoint

    train, _, images, logits = _timm_reference("RepVGG_A0")
    source = tmp_path / "a0.safetensors"
    save_file(train, str(source))
    output = tmp_path / "a0.weights.h5"
    form, diff = convert_checkpoint.convert("RepVGG_A0", str(source), str(output))
    assert form == "timm-train" and diff == 0.0
    model = rk.RepVGG_A0(input_shape=images.shape[1:], weights=output)
    assert max_relative_difference(model(images, training=False), logits) < 1e-4


def test_preprocess_for_eval_matches_the_published_transform():
    from repvgg_keras import preprocessing

    images = np.random.default_rng(0).uniform(0, 255, (1, 300, 400, 3)).astype(np.float32)
    out = np.asarray(preprocessing.preprocess_for_eval(images, 224, 0.875))
    assert out.shape == (1, 224, 224, 3)
    constant = np.full((1, 256, 300, 3), 255.0, np.float32)  # white: (1 - mean) / std per channel
    white = np.asarray(preprocessing.preprocess_for_eval(constant, 224, 0.875))
    expected = (1 - np.array(preprocessing.IMAGENET_MEAN)) / np.array(preprocessing.IMAGENET_STD)
    np.testing.assert_allclose(white[0, 100, 100], expected, rtol=1e-4)
    assert rk.RepVGG_D2se.__name__ == "RepVGG_D2se" and rk.get_spec("D2se").crop_pct == 1.0


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda p, x: p.preprocess_for_eval(x, 224, 1.5), r"crop_pct must be in \(0, 1\], not 1.5"),
        (lambda p, x: p.preprocess_for_eval(x, 224, 0), r"crop_pct must be in \(0, 1\], not 0"),
        (lambda p, x: p.preprocess_for_eval(x, 0), "size must be a positive integer, not 0"),
        (lambda p, x: p.preprocess_for_eval(x, 22.5), "size must be a positive integer"),
        (lambda p, x: p.preprocess_for_eval(x[0, 0]), r"images must be \[N, H, W, C\].*\(30, 3\)"),
        (lambda p, x: p.preprocess_for_eval(x[:, :0]), r"shape \(2, 0, 30, 3\) have no pixels"),
        (lambda p, x: p.preprocess_for_eval(x, mode="imagenet2"), "Unknown preprocessing"),
        (lambda p, x: p.preprocess_for_eval(np.zeros((1, 8, 8, 4))), "statistics for 3 channels"),
        (lambda p, x: p.normalize(x[..., :2]), "have 2 channels on the last axis, not 3"),
        (lambda p, x: p.normalize(x, channels=0), "channels must be a positive integer, not 0"),
        (lambda p, x: p.scale_and_offset("imagenet", 4), "statistics for 3 channels"),
        (lambda p, x: p.normalization_layer("imagenet", 2), "statistics for 3 channels"),
    ],
)
def test_preprocessing_refuses_bad_arguments_by_name(call, match):
    """A crop_pct above 1 used to return a 38 x 13 crop, crop_pct 0 a ZeroDivisionError."""
    from repvgg_keras import preprocessing

    images = np.random.default_rng(0).uniform(0, 255, (2, 40, 30, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=match):
        call(preprocessing, images)


def test_preprocess_for_eval_takes_one_image_as_a_batch_of_one():
    from repvgg_keras import preprocessing

    images = np.random.default_rng(0).uniform(0, 255, (2, 40, 30, 3)).astype(np.float32)
    one = np.asarray(preprocessing.preprocess_for_eval(images[1], 32, 1.0))
    batch = np.asarray(preprocessing.preprocess_for_eval(images, 32, 1.0))
    assert one.shape == (32, 32, 3)
    np.testing.assert_allclose(one, batch[1], rtol=1e-6, atol=1e-6)
    unit = preprocessing.preprocess_for_eval(images[:, :, :, :1], 32, 1.0, "unit")
    assert np.asarray(unit).shape == (2, 32, 32, 1)  # "unit" statistics suit any channel count
