"""int8 SavedModels (`export.savedmodel --precision int8`): Neural Compressor's graph in TensorFlow's
oneDNN int8 ops, verified through all three signatures, refused where this TensorFlow cannot run it."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

import repvgg_keras as rk
from export import images, quantized_pads, savedmodel, savedmodel_int8, split_groups, tracing
from repvgg_keras import preprocessing
from repvgg_keras.parity import randomize_batchnorm
from tests.helpers import cli_env, one_error_line, run_cli

SIZE = 32


def _graph_def(*ops):
    graph = tf.compat.v1.GraphDef()
    for i, op in enumerate(ops):
        graph.node.add(name=f"node{i}", op=op)
    return graph


def test_ops_without_a_cpu_kernel_are_named():
    graph = _graph_def("Placeholder", "NoSuchInt8Op", "QuantizeV2", "Identity")
    assert savedmodel_int8.missing_kernels(graph) == ["NoSuchInt8Op"]
    with pytest.raises(ValueError, match="NoSuchInt8Op") as refused:
        savedmodel_int8.check_runs_here(graph)
    assert "\n" not in str(refused.value)


def test_onednn_placeholders_are_refused_when_onednn_is_off():
    graph = _graph_def("QuantizeV2", "QuantizedConv2DWithBiasAndReluAndRequantize", "Dequantize")
    savedmodel_int8.check_runs_here(graph, onednn=True)
    with pytest.raises(ValueError, match="TF_ENABLE_ONEDNN_OPTS=1"):
        savedmodel_int8.check_runs_here(graph, onednn=False)
    savedmodel_int8.check_runs_here(_graph_def("QuantizeV2", "Dequantize"), onednn=False)


def test_convolutions_that_feed_no_relu_are_found():
    inputs = keras.Input((8, 8, 3))
    hidden = keras.layers.Conv2D(4, 3, padding="same", name="into_relu")(inputs)
    out = keras.layers.Conv2D(2, 1, name="classifier")(keras.layers.ReLU()(hidden))
    model = keras.Model(inputs, out)
    names = savedmodel_int8.float_convolutions(savedmodel.freeze(model).graph)
    assert len(names) == 1 and "classifier" in names[0]


def test_grouped_convolutions_stay_float():
    inputs = keras.Input((8, 8, 4))
    hidden = keras.layers.Conv2D(4, 3, padding="same", groups=2, name="grouped")(inputs)
    out = keras.layers.Conv2D(4, 3, padding="same", name="dense")(keras.layers.ReLU()(hidden))
    model = keras.Model(inputs, keras.layers.ReLU()(out))
    with tracing.plain_grouped_convs():
        graph = savedmodel.freeze(model).graph
    names = savedmodel_int8.float_convolutions(graph)
    assert len(names) == 1 and "grouped" in names[0]


@pytest.fixture(scope="module")
def model():
    built = rk.RepVGG_A0(input_shape=(SIZE, SIZE, 3), classes=10, quant_friendly=True)
    return randomize_batchnorm(built, seed=3)


def _model_inputs(pixels):
    return preprocessing.normalize(pixels.astype(np.float32), "imagenet", 3)


@pytest.mark.slow
def test_int8_savedmodel_runs_int8_convolutions_through_every_signature(tmp_path, model):
    deploy = rk.to_deploy(model)
    pixels = images.load_images("fashion_mnist", 64, SIZE, SIZE)
    calibration = _model_inputs(images.load_images("fashion_mnist", 96, SIZE, SIZE)[64:])
    function = savedmodel.int8_function(deploy, calibration)
    report = savedmodel.export_savedmodel(
        deploy,
        str(tmp_path / "int8" / "1"),
        verify_pixels=pixels,
        reference=model,
        precision="int8",
        function=function,
        min_agreement=0.5,  # random weights: near-ties, so int8 keeps less than trained ones
    )
    assert report.ok and report.precision == "int8" and report.top1_agreement >= 0.5
    loaded = tf.saved_model.load(str(tmp_path / "int8" / "1"))
    graph = loaded.signatures["serving_uint8"].graph.as_graph_def()
    counts = savedmodel_int8.op_counts(graph)
    # every block's 3x3 conv runs in int8; no float convolution is left
    assert counts.get("QuantizedConv2DWithBiasAndReluAndRequantize") == 22
    assert "Conv2D" not in counts
    # the stride-2 blocks pad inside their int8 convolutions: one QuantizeV2 (the images), one
    # Dequantize (before the pooled classifier)
    assert "Pad" not in counts and counts["QuantizeV2"] == counts["Dequantize"] == 1
    fp32 = savedmodel.export_savedmodel(deploy, str(tmp_path / "fp32" / "1"), verify_pixels=pixels)
    assert report.size_mb < 0.5 * fp32.size_mb


def _pads(*rows):
    const = tf.compat.v1.NodeDef(name="paddings", op="Const")
    const.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(np.array(rows, np.int32)))
    return const


def test_only_uniform_spatial_pads_are_absorbed():
    assert quantized_pads._uniform_spatial_pad(_pads([0, 0], [2, 2], [2, 2], [0, 0])) == 2
    for rows in (
        ([0, 0], [0, 1], [0, 1], [0, 0]),  # TensorFlow's SAME at stride 2: not symmetric
        ([0, 0], [1, 1], [2, 2], [0, 0]),
        ([1, 1], [1, 1], [1, 1], [0, 0]),
        ([0, 0], [1, 1], [1, 1], [1, 1]),
        ([0, 0], [0, 0], [0, 0], [0, 0]),
    ):
        assert quantized_pads._uniform_spatial_pad(_pads(*rows)) is None


@pytest.mark.slow
def test_absorbed_pads_give_the_same_int8_output(model, monkeypatch):
    deploy = rk.to_deploy(model)
    inputs = _model_inputs(images.load_images("fashion_mnist", 48, SIZE, SIZE))
    with tracing.plain_grouped_convs():
        frozen = savedmodel.freeze(deploy)
    absorbed, graph = savedmodel_int8.quantize(frozen, (SIZE, SIZE, 3), inputs[32:])
    monkeypatch.setattr(quantized_pads, "absorb_pads", lambda graph_def: graph_def)
    padded, padded_graph = savedmodel_int8.quantize(frozen, (SIZE, SIZE, 3), inputs[32:])
    before, after = savedmodel_int8.op_counts(padded_graph), savedmodel_int8.op_counts(graph)
    assert before["Pad"] == before["QuantizeV2"] == before["Dequantize"] == 5
    assert "Pad" not in after and after["QuantizeV2"] == after["Dequantize"] == 1
    x = tf.constant(inputs[:32])
    expected = padded(x).numpy()
    difference = np.abs(absorbed(x).numpy() - expected).max() / np.abs(expected).max()
    assert difference <= 1e-4


def test_grouped_convolutions_split_per_group_compute_the_same():
    inputs = keras.Input((8, 8, 8))
    # grouped conv on the model's input: its input is split
    hidden = keras.layers.Conv2D(8, 3, padding="same", groups=4, name="grouped")(inputs)
    hidden = keras.layers.ReLU(name="after_grouped")(hidden)
    # producer -> ReLU -> pad -> grouped stride-2 conv: the producer is split by output channel
    hidden = keras.layers.Conv2D(8, 3, padding="same", name="producer")(hidden)
    hidden = keras.layers.ZeroPadding2D(1, name="pad")(
        keras.layers.ReLU(name="after_producer")(hidden)
    )
    hidden = keras.layers.Conv2D(8, 3, strides=2, groups=2, name="grouped_s2")(hidden)
    hidden = keras.layers.ReLU(name="after_grouped_s2")(hidden)
    # a grouped conv whose output feeds no ReLU stays as it is
    out = keras.layers.Conv2D(4, 3, padding="same", groups=2, name="linear_grouped")(hidden)
    model = keras.Model(inputs, out)
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(size=w.shape) for w in model.get_weights()])
    before = [w.copy() for w in model.get_weights()]
    split = split_groups.split_grouped_convs(model)
    assert split.get_layer("grouped").producers is None
    assert len(split.get_layer("producer").producers) == 2
    assert type(split.get_layer("grouped_s2")) is keras.layers.Identity
    assert type(split.get_layer("linear_grouped")) is keras.layers.Conv2D
    x = rng.normal(size=(2, 8, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(split(x), model(x), rtol=1e-5, atol=1e-5)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), before))
    plain = keras.Model(inputs, keras.layers.Conv2D(4, 3, name="dense")(inputs))
    assert split_groups.split_grouped_convs(plain) is plain


@pytest.mark.slow
def test_int8_grouped_variant_runs_its_grouped_convolutions_in_int8():
    # B1g4's layout (groups 4 on every other block) at a quarter of A0's width: fast to quantize
    spec = dataclasses.replace(
        rk.get_spec("RepVGG_B1g4"), num_blocks=(2, 2, 2, 1), width_multipliers=(0.25, 0.25)
    )
    model = randomize_batchnorm(rk.RepVGG(spec, input_shape=(SIZE, SIZE, 3), classes=10), seed=2)
    deploy = rk.to_deploy(model)
    inputs = _model_inputs(images.load_images("fashion_mnist", 48, SIZE, SIZE))
    function = savedmodel.int8_function(deploy, inputs[32:])
    counts = savedmodel_int8.op_counts(function.graph.as_graph_def())
    grouped = sum(1 for layer in deploy.layers if getattr(layer, "groups", 1) > 1)
    # each grouped conv and the conv that makes its input: one int8 conv per group (4) each,
    # concatenated in int8; no float conv and no Split left
    assert "Conv2D" not in counts and "Split" not in counts
    assert counts.get("QuantizedConcatV2") == grouped > 0
    assert (
        counts.get("QuantizedConv2DWithBiasAndReluAndRequantize") == 8 - 2 * grouped + 8 * grouped
    )
    got = function(tf.constant(inputs[:32])).numpy()
    expected = np.asarray(model(inputs[:32], training=False))
    assert np.mean(got.argmax(-1) == expected.argmax(-1)) >= 0.5


@pytest.mark.slow
def test_int8_segmentation_savedmodel_keeps_its_classes_output(tmp_path):
    backbone = dataclasses.replace(
        rk.get_spec("RepVGG_A0"), num_blocks=(1, 1, 1, 1), width_multipliers=(0.25, 0.25)
    )
    pspnet = rk.PSPNet(
        backbone, classes=4, input_shape=(64, 64, 3), output_stride=16, head_channels=32
    )
    deploy = rk.to_deploy(randomize_batchnorm(pspnet, seed=1))
    pixels = images.load_images("sample", 6, 64, 64)
    calibration = _model_inputs(images.load_images("sample", 16, 64, 64))
    report = savedmodel.export_savedmodel(
        deploy,
        str(tmp_path / "seg" / "1"),
        verify_pixels=pixels,
        precision="int8",
        function=savedmodel.int8_function(deploy, calibration),
        min_agreement=0.5,
    )
    assert report.ok and report.pixels == 64 * 64
    loaded = tf.saved_model.load(str(tmp_path / "seg" / "1"))
    graph = loaded.signatures["serving_default"].graph.as_graph_def()
    counts = savedmodel_int8.op_counts(graph)
    assert "Pad" not in counts  # the stride-2 pads run in int8
    # the dilated stage is one int8 Conv2D, not SpaceToBatchND -> float Conv2D -> BatchToSpaceND
    assert "SpaceToBatchND" not in counts
    assert counts["Conv2D"] == 1  # only the classifier, which feeds no ReLU, stays float
    got = loaded.signatures["serving_uint8"](images=tf.constant(pixels))
    assert got["classes"].shape == (6, 64, 64) and got["classes"].dtype == tf.int32


def _export(tmp_path, *flags, env=None):
    weights = tmp_path / "a0.keras"
    if not weights.exists():
        model = rk.RepVGG_A0(input_shape=(SIZE, SIZE, 3), classes=10, quant_friendly=True)
        randomize_batchnorm(model, seed=3).save(weights)
    return run_cli(
        "export.savedmodel",
        f"--weights={weights}",
        "--verify_images=fashion_mnist",
        "--verify_count=32",
        "--calibration_data=fashion_mnist",
        "--calibration_count=32",
        "--min_agreement=0.5",
        f"--export_dir={tmp_path / 'sm'}",
        *flags,
        env=env,
    )


@pytest.mark.slow
def test_cli_int8_says_what_it_chose(tmp_path):
    done = _export(tmp_path, "--precision=int8")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "precision: int8 (asked for)" in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("verified: top-1 agreement ")


@pytest.mark.slow
def test_cli_refuses_int8_where_onednn_is_off(tmp_path):
    refused = _export(tmp_path, "--precision=int8", env=cli_env(TF_ENABLE_ONEDNN_OPTS="0"))
    assert "TF_ENABLE_ONEDNN_OPTS=1" in one_error_line(refused)
    assert not (tmp_path / "sm" / "1").exists()


@pytest.mark.slow
def test_auto_chooses_int8_only_when_it_keeps_the_answer(model):
    deploy = rk.to_deploy(model)
    inputs = _model_inputs(images.load_images("fashion_mnist", 48, SIZE, SIZE))
    function, reason = savedmodel.choose_int8(deploy, model, inputs[:32], inputs[32:], 0.5)
    assert function is not None and reason.startswith("auto, judging the exporting machine: ")
    function, reason = savedmodel.choose_int8(deploy, model, inputs[:32], inputs[32:], 1.01)
    assert function is None and reason.startswith("int8 would change the answer")
