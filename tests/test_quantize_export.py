"""QAT models (rk.quantize_aware) through the exporters: int8 TFLite with the learned ranges and
grid weights, float exports of the float form, one error line where a path cannot take them."""

import keras
import numpy as np
import pytest

import repvgg_keras as rk
from export import onnx_int8, runners, tflite
from export.onnx import onnx_file
from repvgg_keras.parity import randomize_batchnorm
from tests.helpers import one_error_line, run_cli

SPEC = rk.RepVGGSpec("tiny", num_blocks=(1, 1, 1, 1), width_multipliers=(0.25, 0.25))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(3).normal(size=(48, 32, 32, 3)).astype("float32")


@pytest.fixture(scope="module")
def float_model():
    return randomize_batchnorm(rk.RepVGG(SPEC, input_shape=(32, 32, 3), classes=6), seed=2)


@pytest.fixture(scope="module")
def qat_files(float_model, images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("qat")
    files = {}
    for scope in rk.quantize.SCOPES:
        files[scope] = str(folder / f"{scope}.keras")
        rk.quantize_aware(float_model, images[:16], scope=scope).save(files[scope])
    files["training"] = str(folder / "training.keras")
    rk.quantize_aware(float_model, images[:16], form="training").save(files["training"])
    files["symmetric"] = str(folder / "symmetric.keras")
    rk.quantize_aware(float_model, images[:16], activations="symmetric").save(files["symmetric"])
    return files


def _interpreter(flatbuffer):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    return interpreter


def _op_input_types(interpreter, op_name):
    details = interpreter.get_tensor_details()
    kinds = set()
    for op in interpreter._get_ops_details():
        if op["op_name"] == op_name:
            kinds.add(details[op["inputs"][0]]["dtype"].__name__)
    return kinds


@pytest.mark.parametrize(
    "scope, quantize", [("convolutions", "int8"), ("every_op", "int8_full"), ("training", "int8")]
)
def test_int8_tflite_holds_the_qat_grid_and_agrees(qat_files, images, scope, quantize):
    qat = keras.models.load_model(qat_files[scope])
    flatbuffer = tflite.convert(qat, quantize)  # no calibration images: the ranges are learned
    interpreter = _interpreter(flatbuffer)
    assert _op_input_types(interpreter, "CONV_2D") == {"int8"}
    classifier = _op_input_types(interpreter, "FULLY_CONNECTED")
    assert classifier == ({"int8"} if scope == "every_op" else {"float32"})
    # The first conv's int8 weights times their scales are the QAT model's grid kernel.
    grid = rk.to_deploy(qat).get_layer("stage0_reparam").get_weights()[0]  # HWIO
    weights = [
        t
        for t in interpreter.get_tensor_details()
        if "stage0_reparam" in t["name"]
        and t["dtype"] == np.int8
        and len(t["quantization_parameters"]["scales"]) > 1  # per channel: a kernel
    ]
    assert len(weights) == 1
    quantized = interpreter.get_tensor(weights[0]["index"]).astype(np.float64)  # OHWI
    scales = weights[0]["quantization_parameters"]["scales"]
    restored = np.transpose(quantized * scales[:, None, None, None], (1, 2, 3, 0))
    np.testing.assert_allclose(restored, grid, rtol=0, atol=1e-6 * np.abs(grid).max())
    got = tflite.run(flatbuffer, images)
    expected = keras.ops.convert_to_numpy(qat(images))
    assert np.mean(got.argmax(-1) == expected.argmax(-1)) >= 0.95
    assert np.abs(got - expected).max() < 0.1 * np.abs(expected).max()


def test_float_export_of_a_qat_model_is_its_float_form(qat_files, images):
    qat = keras.models.load_model(qat_files["convolutions"])
    got = tflite.run(tflite.convert(qat, "none"), images)
    expected = keras.ops.convert_to_numpy(rk.to_deploy(qat)(images))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_a_scope_the_mode_cannot_express_is_refused(qat_files):
    qat = keras.models.load_model(qat_files["every_op"])
    with pytest.raises(ValueError, match="scope 'every_op'.*--quantize int8 needs"):
        tflite.convert(qat, "int8")


@pytest.mark.slow
def test_cli_exports_a_qat_file_to_every_int8_path_verified_in_its_runtimes_arithmetic(
    qat_files, tmp_path
):
    output = tmp_path / "qat.tflite"
    result = run_cli(
        "export.tflite",
        "--weights",
        qat_files["convolutions"],
        "--quantize",
        "int8",
        "--output",
        str(output),
    )
    assert result.returncode == 0, result.stderr
    assert output.exists()
    assert "floor 99.80%" in result.stdout  # the QAT floor: the export computes what QAT trained
    assert "computing as TFLite (XNNPACK) does" in result.stdout
    onnx_output = tmp_path / "qat.onnx"
    result = run_cli(
        "export.onnx",
        "--weights",
        qat_files["convolutions"],
        "--quantize",
        "int8",
        "--output",
        str(onnx_output),
    )
    assert result.returncode == 0, result.stderr
    assert onnx_output.exists() and "floor 99.80%" in result.stdout
    assert "computing as onnxruntime does" in result.stdout
    result = run_cli(
        "export.openvino",
        "--weights",
        qat_files["convolutions"],
        "--quantize",
        "int8",
        "--output",
        str(tmp_path / "qat_openvino"),
    )
    assert result.returncode == 0, result.stderr
    assert "floor 99.80%" in result.stdout and "computing as OpenVINO does" in result.stdout
    target = tmp_path / "qat_int8"
    result = run_cli(
        "export.savedmodel",
        "--weights",
        qat_files["convolutions"],
        "--precision",
        "int8",
        "--export_dir",
        str(target),
    )
    assert result.returncode == 0, result.stderr
    assert "floor 99.80%" in result.stdout and (target / "1" / "saved_model.pb").exists()
    assert "computing as TensorFlow's oneDNN does" in result.stdout
    refused = run_cli(
        "export.savedmodel",
        "--weights",
        qat_files["every_op"],
        "--precision",
        "int8",
        "--export_dir",
        str(tmp_path / "every_op"),
    )
    assert refused.returncode == 1
    assert "int8_full" in one_error_line(refused)
    assert not (tmp_path / "every_op").exists()


def test_a_refused_qat_export_gets_advice_for_a_qat_model(qat_files, images, tmp_path):
    """A QAT model's export differs from it only where the runtime rounds a tie its own way: the
    refusal says so and how to measure more, not to calibrate or retrain with QARepVGG."""
    from export import atomic, verify

    qat = rk.quantize.snap_biases(keras.models.load_model(qat_files["convolutions"]))
    logits = np.asarray(qat(images[:16]))
    flipped = logits.copy()
    flipped[0] = logits[0][::-1]  # one image of 16 changes its answer

    def write(staged):
        with open(staged, "w") as f:
            f.write("x")

    output = tmp_path / "x.bin"
    with pytest.raises(verify.VerificationError) as refused:
        atomic.verified_export(
            str(output),
            write,
            lambda staged: [("x.bin", flipped, None)],
            qat,
            images[:16],
            precision="int8",
            min_agreement=verify.MIN_QAT_AGREEMENT,
        )
    message = str(refused.value)
    assert "--verify_count" in message and "--min_agreement" in message
    assert "quant_friendly" not in message and not output.exists()


@pytest.mark.parametrize("form", ["convolutions", "training", "symmetric"])
def test_onnx_qdq_of_a_qat_model_holds_the_learned_grids(qat_files, images, tmp_path, form):
    """Zero point 0 everywhere; a ReLU's output uint8 (the default, unsigned grids) or int8
    (symmetric: TensorRT's form); each activation scale one of the QAT model's own steps."""
    import onnx

    qat = keras.models.load_model(qat_files[form])
    path = onnx_file(qat, str(tmp_path), nchw=True, int8=True, calibration=images[:8])
    graph = onnx.load(path).graph
    constants = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    grids = list(rk.quantize.activation_grids(qat).values())
    unsigned = form != "symmetric"
    assert {grid.unsigned for grid in grids} == {False, unsigned}  # the input: signed
    activations = 0
    for node in graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        scale, zero = constants[node.input[1]], constants[node.input[2]]
        assert not zero.any()
        if scale.ndim == 0:  # an activation: one of the QAT model's own grids
            grid = min(grids, key=lambda g: abs(float(scale) - g.step) / g.step)
            assert abs(float(scale) - grid.step) / grid.step < 1e-6, node.input[0]
            assert zero.dtype == (np.uint8 if grid.unsigned else np.int8), node.input[0]
            activations += 1
        else:
            assert zero.dtype == np.int8  # weights: symmetric int8 per channel
    assert activations >= len(grids)
    got = runners.onnxruntime(path)(np.transpose(images, (0, 3, 1, 2)))
    expected = keras.ops.convert_to_numpy(rk.quantize.snap_biases(qat)(images))
    assert np.mean(got.argmax(-1) == expected.argmax(-1)) >= 0.97
    assert np.median(np.abs(got - expected)) < 1e-4 * np.abs(expected).max()
    every_op = keras.models.load_model(qat_files["every_op"])
    with pytest.raises(ValueError, match="scope 'convolutions'"):
        onnx_file(every_op, str(tmp_path / "x"), nchw=True, int8=True, calibration=images[:8])
    assert onnx_int8.QUANTIZED_OPS == ["Conv", "Relu"]


def test_onnxruntime_runs_the_unsigned_qat_file_as_the_post_training_graph(
    qat_files, float_model, images, tmp_path
):
    """With unsigned ReLU outputs onnxruntime folds each ReLU into its int8 conv, as for the
    post-training file: after its optimisations one QLinearConv per convolution and nothing
    else between them (the speed bench/ measures); a symmetric file keeps a float ReLU each."""
    import collections

    import onnx
    import onnxruntime as ort

    def optimized_ops(name):
        qat = keras.models.load_model(qat_files[name])
        path = onnx_file(qat, str(tmp_path / name), nchw=True, int8=True, calibration=images[:8])
        options = ort.SessionOptions()
        options.optimized_model_filepath = f"{path}.optimized.onnx"
        ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        graph = onnx.load(f"{path}.optimized.onnx").graph
        return collections.Counter(n.op_type for n in graph.node)

    convs = sum(isinstance(l, keras.layers.Conv2D) for l in rk.to_deploy(float_model).layers)
    unsigned, symmetric = optimized_ops("convolutions"), optimized_ops("symmetric")
    assert unsigned["QLinearConv"] == convs and "Relu" not in unsigned
    # one QuantizeLinear (the images) and one DequantizeLinear (into the float classifier)
    assert unsigned["QuantizeLinear"] == 1 and unsigned["DequantizeLinear"] == 1
    assert symmetric["Relu"] == convs and symmetric["QuantizeLinear"] > convs


def test_a_tie_of_the_reference_counts_either_class_as_agreement():
    from export.verify import top1_agreement

    reference = np.array([[1.0, 1.0, 0.0], [2.0, 1.0, 0.0]])  # int8 logits can tie
    assert top1_agreement(np.array([[0.9, 1.1, 0.0], [2.0, 1.0, 0.0]]), reference) == 1.0
    assert top1_agreement(np.array([[0.9, 1.1, 0.0], [0.0, 1.0, 0.0]]), reference) == 0.5


def _pooling_in_float(qat):
    """`qat` with its global pool's output left off the grid (a QAT model that pools in float)."""
    pooled = set()

    def call(layer, *args, **kwargs):
        if isinstance(layer, rk.quantize.ActivationQuantizer) and id(args[0]) in pooled:
            return args[0]
        outputs = layer(*args, **kwargs)
        if isinstance(layer, keras.layers.GlobalAveragePooling2D):
            pooled.add(id(outputs))
        return outputs

    return keras.models.clone_model(qat, call_function=call)


def test_the_reference_gives_every_int8_files_own_logits(tmp_path):
    """The model each exporter verifies against (`snap_biases(..., runtime=)`) rounds as that
    runtime does (XNNPACK and onnxruntime: the int32 sum times one float32 scale; oneDNN in
    TensorFlow and OpenVINO: the sum dequantized, the float bias added, times the reciprocal
    step; OpenVINO's input: one fused multiply-add): on an 11-conv model every int8 file's
    logits (the NHWC ONNX file's too) equal its own reference's on every image, where another
    runtime's reference leaves some images a step off. Its last map is 2x2: the QAT model rounds
    its pool to the last activation's grid, as TFLite's int8 MEAN does, and every file there
    too."""
    import tensorflow as tf

    from export import openvino, savedmodel

    spec = rk.RepVGGSpec("deeper", num_blocks=(2, 3, 4, 1), width_multipliers=(0.5, 0.5))
    model = randomize_batchnorm(rk.RepVGG(spec, input_shape=(64, 64, 3), classes=10), seed=5)
    images = np.random.default_rng(0).normal(size=(48, 64, 64, 3)).astype("float32")
    calibration = images[:16]
    qat = rk.quantize_aware(model, calibration)
    assert rk.quantize.pools_on_grid(qat)
    assert tflite.quantize_aware_pool_advice(qat) is None
    nchw = np.transpose(images, (0, 3, 1, 2))
    qdq = onnx_file(qat, str(tmp_path), nchw=True, int8=True, calibration=calibration)
    qdq_nhwc = onnx_file(qat, str(tmp_path), nchw=False, int8=True, calibration=calibration)
    ir = openvino.convert(qat, str(tmp_path / "openvino"), "int8", calibration)
    int8_graph = savedmodel.int8_function(rk.quantize.snap_biases(qat), calibration)
    got = {
        "tflite": runners.tflite(tflite.convert(qat, "int8"))(images),
        "onnxruntime": runners.onnxruntime(qdq)(nchw),
        "onnxruntime, NHWC file": runners.onnxruntime(qdq_nhwc)(images),
        "openvino": runners.openvino(ir, "int8")(nchw),
        "tensorflow": int8_graph(tf.constant(images)).numpy(),
    }
    expected = {
        runtime: np.asarray(
            rk.quantize.snap_biases(qat, runtime=runtime).predict(images, verbose=0)
        )
        for runtime in rk.quantize.ROUNDINGS
    }
    bound = 1e-5 * np.abs(expected["tflite"]).max()
    equal = lambda a, b: np.abs(a - b).max(axis=-1) <= bound
    for path, logits in got.items():
        assert equal(logits, expected[path.split(",")[0]]).all(), path
    for runtime in ("openvino", "tensorflow"):
        assert not equal(got[runtime], expected["tflite"]).all(), runtime


def test_a_refused_tflite_qat_file_pooling_in_float_names_the_paths_that_follow_its_pool():
    """A QAT model that averages in float over more than one cell: TFLite int8 pools on the last
    activation's grid, and the refusal says so instead of blaming calibration."""
    rng = np.random.default_rng(0)
    for size, cells in ((32, None), (64, "2x2")):
        model = rk.RepVGG(SPEC, input_shape=(size, size, 3), classes=3, deploy=True)
        qat = _pooling_in_float(
            rk.quantize_aware(model, rng.normal(size=(4, size, size, 3)).astype("float32"))
        )
        assert not rk.quantize.pools_on_grid(qat)
        advice = tflite.quantize_aware_pool_advice(qat)
        if cells is None:
            assert advice is None
        else:
            assert f"over the {cells} features" in advice and "train --qat" in advice
    assert tflite.quantize_aware_pool_advice(model) is None  # a float model: calibration advice


def test_savedmodel_int8_refuses_a_qat_model_with_grouped_convolutions(images):
    """TensorFlow's int8 convolution has no groups: one line naming the exporters that take it."""
    from export import savedmodel

    grouped = rk.RepVGGSpec(
        "tiny_g2",
        num_blocks=(2, 1, 1, 1),
        width_multipliers=(0.25, 0.25),
        groups=2,
        grouped_layers=(2,),
    )
    model = rk.RepVGG(grouped, input_shape=(32, 32, 3), classes=3, deploy=True)
    qat = rk.quantize_aware(model, images[:8])
    with pytest.raises(ValueError, match="grouped convolutions.*export.onnx"):
        savedmodel.int8_function(rk.quantize.snap_biases(qat), images[:8])


def test_savedmodel_int8_of_a_qat_model_runs_the_post_training_graph(float_model, images):
    """The same int8 ops as the post-training graph (so the same speed), only other ranges, plus
    the pool's rounding pair."""
    from export import savedmodel, savedmodel_int8

    graphs = {}
    capture = savedmodel_int8.check_runs_here

    def record(graph_def, onednn=None):
        graphs[len(graphs)] = savedmodel_int8.op_counts(graph_def)
        return capture(graph_def, onednn)

    qat = rk.quantize.snap_biases(rk.quantize_aware(float_model, images[:16]))
    try:
        savedmodel_int8.check_runs_here = record
        savedmodel.int8_function(rk.to_deploy(float_model), images[:16])
        savedmodel.int8_function(qat, images[:16])
    finally:
        savedmodel_int8.check_runs_here = capture
    post_training, quantize_aware = graphs[0], graphs[1]
    assert post_training["QuantizedConv2DWithBiasAndReluAndRequantize"] > 0
    for ops in (post_training, quantize_aware):  # the ranges: constants of their own
        ops.pop("Const", None), ops.pop("HostConst", None)
    pool_pair = {"QuantizeV2": 1, "Dequantize": 1}
    assert {op: n - pool_pair.get(op, 0) for op, n in quantize_aware.items()} == post_training
