"""rk.quantize_aware: the QAT model computes on the int8 grid, trains, saves, and deploys."""

import keras
import numpy as np
import pytest

import repvgg_keras as rk
from repvgg_keras.parity import randomize_batchnorm
from repvgg_keras.quantize import ActivationQuantizer, QuantizedConv2D, QuantizedDense
from repvgg_keras.structure import all_layers

SPEC = rk.RepVGGSpec("tiny", num_blocks=(1, 2, 1, 1), width_multipliers=(0.25, 0.5))


@pytest.fixture(scope="module")
def model():
    return randomize_batchnorm(rk.RepVGG(SPEC, input_shape=(32, 32, 3), classes=5), seed=3)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(7).normal(size=(24, 32, 32, 3)).astype("float32")


def _on_grid(values, step, codes=(-127, 127)):
    steps = np.asarray(values, np.float64) / np.asarray(step, np.float64)
    inside = codes[0] - 1e-3 <= steps.min() and steps.max() <= codes[1] + 1e-3
    return np.abs(steps - np.round(steps)).max() < 1e-3 and inside


def test_every_conv_quantized_and_every_relu_followed_by_a_quantizer(model, images):
    qat = rk.quantize_aware(model, images)
    plain = rk.to_deploy(model)
    convs = [l for l in all_layers(plain) if isinstance(l, keras.layers.Conv2D)]
    qconvs = [l for l in qat.layers if isinstance(l, QuantizedConv2D)]
    assert len(qconvs) == len(convs) > 0
    relus = [l.name for l in plain.layers if isinstance(l, keras.layers.ReLU)]
    quantizers = [l.name for l in qat.layers if isinstance(l, ActivationQuantizer)]
    assert quantizers == ["images_quant"] + [f"{name}_quant" for name in relus]
    # The classifier stays float in the default scope.
    assert type(qat.get_layer("predictions")) is keras.layers.Dense
    assert rk.is_quantize_aware(qat) and not rk.is_quantize_aware(model)


def test_ranges_start_at_the_calibration_maxima(model, images):
    qat = rk.quantize_aware(model, images)
    plain = rk.to_deploy(model)
    relu = plain.get_layer("stage2_0_relu")
    probe = keras.Model(plain.inputs, relu.output)
    expected = np.abs(keras.ops.convert_to_numpy(probe(images))).max()
    np.testing.assert_allclose(float(qat.get_layer("stage2_0_relu_quant").range), expected, 1e-5)
    np.testing.assert_allclose(
        float(qat.get_layer("images_quant").range), np.abs(images).max(), 1e-6
    )


def test_activations_and_deployed_weights_lie_on_the_int8_grid(model, images):
    qat = rk.quantize_aware(model, images)
    quantizer = qat.get_layer("stage2_1_relu_quant")
    probe = keras.Model(qat.inputs, quantizer.output)
    values = keras.ops.convert_to_numpy(probe(images))
    grid = quantizer.grid()
    assert grid.unsigned and grid.step == pytest.approx(float(quantizer.range) / 255, rel=1e-4)
    assert _on_grid(values, grid.step, grid.codes)
    assert len(np.unique(values)) > 20  # not collapsed to a few levels

    deployed = rk.to_deploy(qat)
    assert not rk.is_quantize_aware(deployed)
    for layer in deployed.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kernel = layer.get_weights()[0]
            step = np.abs(kernel).max(axis=(0, 1, 2)) / 127
            assert _on_grid(kernel, step), layer.name
    # The QAT model is the deployed float model with its activations rounded.
    qat_logits = keras.ops.convert_to_numpy(qat(images))
    float_logits = keras.ops.convert_to_numpy(deployed(images))
    assert 0 < np.abs(qat_logits - float_logits).max() < 0.1 * np.abs(float_logits).max()


def test_qat_model_stays_close_to_the_float_model(model, images):
    qat = rk.quantize_aware(model, images)
    expected = keras.ops.convert_to_numpy(model(images, training=False))
    actual = keras.ops.convert_to_numpy(qat(images))
    assert np.abs(actual - expected).max() < 0.1 * np.abs(expected).max()


def test_every_op_scope_quantizes_pooling_and_classifier(model, images):
    qat = rk.quantize_aware(model, images, scope="every_op")
    assert isinstance(qat.get_layer("predictions"), QuantizedDense)
    names = [l.name for l in qat.layers if isinstance(l, ActivationQuantizer)]
    assert names[-2:] == ["avg_pool_quant", "predictions_quant"]
    deployed = rk.to_deploy(qat)
    kernel = deployed.get_layer("predictions").get_weights()[0]
    assert _on_grid(kernel, np.abs(kernel).max() / 127)


def test_fit_moves_weights_and_ranges(model, images):
    qat = rk.quantize_aware(model, images)
    before = [w.copy() for w in qat.get_weights()]
    labels = np.arange(len(images)) % 5
    qat.compile(
        optimizer=keras.optimizers.SGD(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = qat.fit(images, labels, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    after = qat.get_weights()
    conv_kernel = qat.get_layer("stage1_0_reparam").kernel
    index = [id(v) for v in qat.weights].index(id(conv_kernel))
    assert not np.array_equal(before[index], after[index])
    ranges = [l.range for l in qat.layers if isinstance(l, ActivationQuantizer)]
    moved = [float(r) != before[[id(v) for v in qat.weights].index(id(r))] for r in ranges]
    assert any(moved)


def test_saved_and_loaded_as_keras(model, images, tmp_path):
    qat = rk.quantize_aware(model, images)
    path = tmp_path / "qat.keras"
    qat.save(path)
    loaded = keras.models.load_model(path)
    assert rk.is_quantize_aware(loaded)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(images)), keras.ops.convert_to_numpy(qat(images)), 0, 1e-6
    )


def test_input_model_left_untouched(model, images):
    before = [w.copy() for w in model.get_weights()]
    rk.quantize_aware(model, images)
    for b, a in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "make, calibration, message",
    [
        (lambda m: m, None, "calibration images"),
        (lambda m: m, np.zeros((0, 32, 32, 3)), "non-empty"),
        (lambda m: m, np.zeros((4, 16, 16, 3)), "the model takes"),
        (lambda m: m, np.full((4, 32, 32, 3), np.nan), "NaN"),
        (
            lambda m: keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)]),
            np.zeros((4, 8)),
            "no Conv2D",
        ),
        (
            lambda m: rk.RepVGG(SPEC, input_shape=(32, 32, 3), include_top=False),
            np.zeros((4, 32, 32, 3)),
            "classifier with its Dense top",
        ),
        (
            lambda m: rk.PSPNet(SPEC, input_shape=(32, 32, 3), classes=3, head_channels=8),
            np.zeros((4, 32, 32, 3)),
            "segmentation model.*--task segmentation --precision int8.*--quant_friendly",
        ),
    ],
)
def test_bad_input_is_one_clear_error(model, make, calibration, message):
    with pytest.raises(ValueError, match=message):
        rk.quantize_aware(make(model), calibration)


def test_unknown_scope_and_double_quantization(model, images):
    with pytest.raises(ValueError, match="Unknown scope 'all'"):
        rk.quantize_aware(model, images, scope="all")
    with pytest.raises(ValueError, match="already quantization-aware"):
        rk.quantize_aware(rk.quantize_aware(model, images), images)
    conv_free = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten()])
    with pytest.raises(ValueError, match="no Conv2D"):
        rk.quantize_aware(conv_free, images)


@pytest.mark.parametrize("quant_friendly", [False, True])
def test_training_form_computes_the_fused_kernel_quantized(images, quant_friendly):
    trained = randomize_batchnorm(
        rk.RepVGG(SPEC, input_shape=(32, 32, 3), classes=5, quant_friendly=quant_friendly), seed=4
    )
    branches = rk.quantize_aware(trained, images, form="training")
    fused = rk.quantize_aware(trained, images)
    assert any(isinstance(l, rk.quantize.QuantizedRepVGGBlock) for l in branches.layers)
    # The same kernels and ranges: equal but for a value on a rounding boundary in one of them.
    expected = keras.ops.convert_to_numpy(fused(images))
    actual = keras.ops.convert_to_numpy(branches(images))
    assert np.median(np.abs(actual - expected)) < 1e-5
    assert np.abs(actual - expected).max() < 0.05 * np.abs(expected).max()
    # Its deploy-form twin (what the converters read) and its float form compute the same.
    twin = rk.quantize.fused(branches)
    assert not any(isinstance(l, rk.quantize.QuantizedRepVGGBlock) for l in twin.layers)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(twin(images)),
        keras.ops.convert_to_numpy(branches(images)),
        rtol=0,
        atol=1e-5,
    )
    deployed = rk.to_deploy(branches)
    assert not rk.is_quantize_aware(deployed)
    kernel = deployed.get_layer("stage2_1_reparam").get_weights()[0]
    assert _on_grid(kernel, np.abs(kernel).max(axis=(0, 1, 2)) / 127)


def test_training_form_trains_the_branches_with_frozen_statistics(images):
    trained = randomize_batchnorm(rk.RepVGG(SPEC, input_shape=(32, 32, 3), classes=5), seed=4)
    qat = rk.quantize_aware(trained, images, form="training")
    block = qat.get_layer("stage2_1")
    kernel, mean = block.pointwise_conv.kernel.numpy().copy(), block.dense_bn.moving_mean.numpy()
    qat.compile(
        optimizer=keras.optimizers.SGD(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    qat.fit(images, np.arange(len(images)) % 5, batch_size=8, epochs=1, verbose=0)
    assert not np.array_equal(block.pointwise_conv.kernel.numpy(), kernel)
    np.testing.assert_array_equal(block.dense_bn.moving_mean.numpy(), mean)
    with pytest.raises(ValueError, match="Unknown form"):
        rk.quantize_aware(trained, images, form="fused")
    with pytest.raises(ValueError, match="no RepVGG block in training form"):
        rk.quantize_aware(rk.to_deploy(trained), images, form="training")


def test_relu_outputs_are_unsigned_unless_symmetric_is_asked_for(model, images):
    """A ReLU's output takes [0, r] in 255 steps by default (the CPU runtimes' form) and
    [-r, r] with activations="symmetric" (TensorRT's); the model input is signed either way."""
    for activations, unsigned in (("unsigned", True), ("symmetric", False)):
        qat = rk.quantize_aware(model, images, activations=activations)
        grids = rk.quantize.activation_grids(qat)
        assert not grids.pop("images_quant").unsigned
        assert grids and all(grid.unsigned == unsigned for grid in grids.values())
        every_op = rk.quantize_aware(model, images, scope="every_op", activations=activations)
        assert every_op.get_layer("avg_pool_quant").grid().unsigned == unsigned
        assert not every_op.get_layer("predictions_quant").grid().unsigned  # logits: signed
    # A symmetric quantizer clips a ReLU's output at r with half the unsigned resolution.
    relu = np.concatenate([[0.0, 2.0], np.random.default_rng(1).uniform(0, 2, 4000)])
    relu = relu.astype("float32")
    for unsigned, steps in ((True, 255), (False, 127)):
        quantizer = ActivationQuantizer(initial_range=1.0, unsigned=unsigned)
        values = keras.ops.convert_to_numpy(quantizer(relu))
        assert values.max() == pytest.approx(1.0, rel=1e-4)  # clipped at r
        step = quantizer.grid().step
        assert step == pytest.approx(1.0 / steps, rel=1e-4)
        assert _on_grid(values, step, (0, steps)) and len(np.unique(values)) > 0.9 * steps
        # each value is its code times the step exactly (STEP_BITS): no float32 rounding
        codes = np.round(values / np.float32(step)).astype(np.float32)
        np.testing.assert_array_equal(codes * np.float32(step), values)
        training = keras.ops.convert_to_numpy(quantizer(relu, training=True))
        assert np.abs(training - values).max() < 1e-6  # the fake-quant op: the same grid
    with pytest.raises(ValueError, match="Unknown activations"):
        rk.quantize_aware(model, images, activations="int8")


@pytest.mark.parametrize("form", ["deploy", "training"])
def test_snapped_biases_lie_on_the_runtimes_int32_grid(model, images, form):
    qat = rk.quantize_aware(model, images, form=form)
    snapped = rk.quantize.snap_biases(qat)
    grids = rk.quantize.activation_grids(snapped)
    convs = [l for l in snapped.layers if isinstance(l, QuantizedConv2D)]
    assert convs and all(l.input_quantizer in grids for l in convs)
    assert convs[0].input_quantizer == "images_quant"
    for layer in convs:
        kernel, bias = layer.get_weights()
        weight_step = rk.quantize.grid_step(np.abs(kernel).max(axis=(0, 1, 2)), 127)
        step = grids[layer.input_quantizer].step * keras.ops.convert_to_numpy(weight_step)
        steps = bias / step  # int32 steps: any size
        # float32 holds k x step to its own precision: what the runtime rounds back to k
        assert (np.abs(steps - np.round(steps)) < 1e-2 + 1e-6 * np.abs(steps)).all(), layer.name
    expected = keras.ops.convert_to_numpy(qat(images))
    actual = keras.ops.convert_to_numpy(snapped(images))
    assert np.abs(actual - expected).max() < 0.05 * np.abs(expected).max()


def test_each_runtimes_reference_rounds_the_input_as_that_runtime(model, images):
    """An input below the learned range: TFLite, onnxruntime and OpenVINO saturate at int8's -128,
    TensorFlow's narrow-range QuantizeV2 at -127; OpenVINO scales and shifts in one fused
    multiply-add, which rounds some values other than a division does."""
    qat = rk.quantize_aware(model, images)
    step = qat.get_layer("images_quant").grid().step
    below = np.full((1, 32, 32, 3), -200 * step, np.float32)
    quantizers = {
        runtime: rk.quantize.snap_biases(qat, runtime=runtime).get_layer("images_quant")
        for runtime in rk.quantize.ROUNDINGS
    }
    codes = lambda runtime, x: keras.ops.convert_to_numpy(quantizers[runtime](x)) / step
    floors = {runtime: float(codes(runtime, below).min()) for runtime in quantizers}
    assert floors == {"tflite": -128, "onnxruntime": -128, "openvino": -128, "tensorflow": -127}
    # values a hair from a midpoint: x / step and OpenVINO's x x (1 / step) + 128 part ways
    hair = 1 + np.float32(2**-22) * np.arange(-3, 4)[:, None]
    near = np.resize(((np.arange(-100, 100) + 0.5) * step * hair).astype(np.float32), below.shape)
    codes = {runtime: codes(runtime, near) for runtime in ("tflite", "openvino")}
    assert np.any(codes["tflite"] != codes["openvino"])
    with pytest.raises(ValueError, match="Unknown int8 runtime 'tensorrt'"):
        rk.quantize.snap_biases(qat, runtime="tensorrt")


def test_inference_sums_int8_products_exactly_as_the_runtimes_int32_accumulators_do():
    """8192 products of int8 codes: float32 rounds their sum, the int8 runtimes do not; the QAT
    model's inference gives the exact sum (training keeps float32 for speed)."""
    rng = np.random.default_rng(7)
    channels, step = 8192, 0.037
    conv = QuantizedConv2D(1, 1, use_bias=False)
    conv.build((None, 1, 1, channels))
    codes = rng.integers(-127, 128, size=(1, 1, channels, 1))
    codes[0, 0, 0, 0] = 127  # max |w| = 1: the weight grid is codes / 127
    conv.set_weights([(codes / 127).astype("float32")])
    inputs = (rng.integers(-127, 128, size=(16, 1, 1, channels)) * step).astype("float32")
    kernel = keras.ops.convert_to_numpy(rk.quantize.quantize_weights(conv.kernel))
    exact = np.einsum("nhwc,hwco->nhwo", inputs.astype(np.float64), kernel.astype(np.float64))
    inference = keras.ops.convert_to_numpy(conv(inputs, training=False))
    training = keras.ops.convert_to_numpy(conv(inputs, training=True))
    np.testing.assert_array_equal(inference, exact.astype(np.float32))
    assert np.any(training != exact.astype(np.float32))  # what float32 sums would give


def test_global_pool_rounds_to_the_last_activation_grid(images):
    """The int8 runtimes pool on their input's grid: in scope "convolutions" the pooled features
    pass the last ReLU's quantizer again (the same range), so the QAT model pools as they do."""
    model = rk.RepVGG(SPEC, input_shape=(64, 64, 3), classes=5, deploy=True)
    larger = np.resize(images, (8, 64, 64, 3))
    qat = rk.quantize_aware(model, larger)
    assert rk.quantize.pools_on_grid(qat)
    (node,) = qat.get_layer("avg_pool")._outbound_nodes
    assert node.operation is qat.get_layer("stage4_0_relu_quant")
    features = keras.Model(qat.inputs, qat.get_layer("predictions").input)(larger)
    grid = node.operation.grid()
    assert _on_grid(keras.ops.convert_to_numpy(features), grid.step, grid.codes)
    assert not rk.quantize.pools_on_grid(model)
