"""Exporters: each format verified against Keras, signatures, request bodies, safety."""

import base64
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import repvgg_keras as rk
from export import (
    atomic,
    fast_predictor,
    images,
    loading,
    predict_requests,
    savedmodel,
    tflite,
    verify,
)
from export import onnx as onnx_export
from repvgg_keras import preprocessing
from repvgg_keras.parity import max_relative_difference, randomize_batchnorm
from repvgg_keras.structure import all_layers
from tests.helpers import REPO, run_cli

pytestmark = pytest.mark.slow  # converts, exports, serves or trains end to end

SIZE = 48


def _trained(name, size=SIZE, seed=0):
    model = rk.get_model(name, input_shape=(size, size, 3), classes=10)
    return randomize_batchnorm(model, seed=seed)


@pytest.fixture(scope="module")
def models():
    return {name: _trained(name) for name in ("RepVGG_A0", "RepVGG_B1g4")}


@pytest.fixture(scope="module")
def pixels():
    """Real images: Fashion-MNIST test images, resized to SIZE and made RGB."""
    return images.load_images("fashion_mnist", 32, SIZE, SIZE, 3)


def _inputs(pixels):
    return preprocessing.normalize(pixels.astype(np.float32), "imagenet", 3)


@pytest.fixture(scope="module")
def exported_savedmodel(tmp_path_factory, models, pixels):
    model = models["RepVGG_A0"]
    path = str(tmp_path_factory.mktemp("serving") / "repvgg_a0" / "1")
    report = savedmodel.export_savedmodel(
        rk.to_deploy(model), path, verify_pixels=pixels, reference=model, model_name="repvgg_a0"
    )
    return path, report


# ---------------------------------------------------------------- SavedModel


def test_savedmodel_signatures_names_shapes_dtypes(exported_savedmodel):
    path, report = exported_savedmodel
    assert report.ok and report.max_rel < 1e-4 and report.top1_agreement == 1.0
    assert os.path.exists(os.path.join(path, "saved_model.pb"))
    loaded = tf.saved_model.load(path)
    # Input shapes are left unknown on purpose: the graph checks them itself (a declared shape lets
    # Grappler drop the checks, and TF Serving does not enforce it; tests/test_serving_inputs.py).
    expected_inputs = {
        "serving_default": tf.float32,
        "serving_uint8": tf.uint8,
        "serving_bytes": tf.string,
    }
    for name, dtype in expected_inputs.items():
        signature = loaded.signatures[name]
        (spec,) = signature.structured_input_signature[1].values()
        assert spec.name == "images" and spec.dtype == dtype and spec.shape.rank is None
        assert set(signature.structured_outputs) == {"logits", "probabilities"}
        assert signature.structured_outputs["logits"].shape.as_list() == [None, 10]
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    shown = subprocess.run(
        [cli, "show", "--dir", path, "--all"], capture_output=True, text=True, check=True
    ).stdout
    for name, dtype in expected_inputs.items():
        block = shown.split(f"signature_def['{name}']")[1].split("signature_def[")[0]
        dt_name = {tf.float32: "DT_FLOAT", tf.uint8: "DT_UINT8", tf.string: "DT_STRING"}[dtype]
        assert f"dtype: {dt_name}\n" in block and "outputs['probabilities']" in block


def test_savedmodel_bytes_and_uint8_match_float(exported_savedmodel, models, pixels):
    loaded = tf.saved_model.load(exported_savedmodel[0])
    expected = np.asarray(models["RepVGG_A0"](_inputs(pixels[:4]), training=False))
    as_float = loaded.signatures["serving_default"](images=tf.constant(_inputs(pixels[:4])))[
        "logits"
    ]
    as_uint8 = loaded.signatures["serving_uint8"](images=tf.constant(pixels[:4]))["logits"]
    encoded = tf.constant([tf.io.encode_png(p).numpy() for p in pixels[:4]])
    as_bytes = loaded.signatures["serving_bytes"](images=encoded)
    for got in (as_float, as_uint8, as_bytes["logits"]):
        assert max_relative_difference(got, expected) < 1e-4
    np.testing.assert_allclose(np.sum(as_bytes["probabilities"], -1), 1.0, rtol=1e-5)


def test_savedmodel_warmup_records_parse(exported_savedmodel):
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(exported_savedmodel[0], "assets.extra", "tf_serving_warmup_requests")
    logs = [
        prediction_log_pb2.PredictionLog.FromString(r.numpy())
        for r in tf.data.TFRecordDataset(path)
    ]
    assert sorted(l.predict_log.request.model_spec.signature_name for l in logs) == sorted(
        savedmodel.SIGNATURES
    )
    loaded = tf.saved_model.load(exported_savedmodel[0])
    for log in logs:  # each warm-up request runs on its signature, as TF Serving replays it
        request = log.predict_log.request
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        out = loaded.signatures[request.model_spec.signature_name](**inputs)
        assert out["logits"].shape == (1, 10)


def test_warmup_records_are_the_bytes_tensorflow_serving_writes(pixels):
    """The warm-up encoder needs no tensorflow-serving-api; its records equal the package's own messages."""
    from tensorflow_serving.apis import prediction_log_pb2

    ours = list(predict_requests.warmup_logs("repvgg_a0", pixels[:2]))
    encoded = [tf.io.encode_png(p).numpy() for p in pixels[:2]]
    bodies = [pixels[:2].astype(np.float32) / 255.0, pixels[:2], encoded]
    for record, signature, body in zip(ours, savedmodel.SIGNATURES, bodies):
        request = predict_requests.predict_request("repvgg_a0", signature, body)
        expected = prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request)
        )
        assert record == expected.SerializeToString(deterministic=True), signature


def _serve_grpc(loaded, request):
    """What TF Serving does with a PredictRequest: run the signature, answer a PredictResponse."""
    from tensorflow_serving.apis import predict_pb2

    inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
    outputs = loaded.signatures[request.model_spec.signature_name](**inputs)
    response = predict_pb2.PredictResponse()
    for key, value in outputs.items():
        response.outputs[key].CopyFrom(tf.make_tensor_proto(value.numpy()))
    return response.SerializeToString()


def _serve_rest(loaded, body):
    """What TF Serving's REST API does with a row-format body (b64 objects decoded)."""
    body = json.loads(body)
    rows = body["instances"]
    if isinstance(rows[0], dict) and "b64" in rows[0]:
        batch = tf.constant([base64.b64decode(r["b64"]) for r in rows])
    else:
        batch = tf.constant(
            rows, dtype=tf.float32 if body["signature_name"] == "serving_default" else tf.uint8
        )
    outputs = {
        k: v.numpy().tolist()
        for k, v in loaded.signatures[body["signature_name"]](images=batch).items()
    }
    return json.dumps({"predictions": [dict(zip(outputs, row)) for row in zip(*outputs.values())]})


def test_client_request_bodies_give_the_right_top1(exported_savedmodel, models, pixels):
    from tensorflow_serving.apis import predict_pb2

    loaded = tf.saved_model.load(exported_savedmodel[0])
    expected = np.asarray(models["RepVGG_A0"](_inputs(pixels[:3]), training=False)).argmax(-1)
    encoded = [tf.io.encode_jpeg(p, quality=100).numpy() for p in pixels[:3]]
    grpc_request = predict_requests.predict_request("repvgg_a0", "serving_bytes", encoded)
    response = predict_pb2.PredictResponse.FromString(_serve_grpc(loaded, grpc_request))
    grpc_out = predict_requests.parse_predict_response(response)
    rest_out = predict_requests.parse_rest_response(
        _serve_rest(loaded, predict_requests.rest_body("serving_bytes", encoded))
    )
    uint8_out = predict_requests.parse_rest_response(
        _serve_rest(loaded, predict_requests.rest_body("serving_uint8", pixels[:3]))
    )
    for out in (grpc_out, rest_out, uint8_out):
        assert out["probabilities"].shape == (3, 10)
        np.testing.assert_array_equal(out["logits"].argmax(-1), expected)


# ---------------------------------------------------------------- TFLite


@pytest.mark.parametrize(
    "name,quantize,max_rel,min_top1",
    [
        ("RepVGG_A0", "none", 1e-4, 1.0),
        ("RepVGG_A0", "float16", 1e-2, 0.95),
        ("RepVGG_A0", "dynamic", 1e-1, 0.8),
        ("RepVGG_A0", "int8", 2.5e-1, 0.5),
        ("RepVGG_A0", "int8_full", 2.5e-1, 0.5),
        ("RepVGG_B1g4", "none", 1e-4, 1.0),
        ("RepVGG_B1g4", "int8", 2.5e-1, 0.5),
    ],
)
def test_tflite_precisions(tmp_path, models, pixels, name, quantize, max_rel, min_top1):
    model = models[name]
    inputs = _inputs(pixels)
    output = str(tmp_path / "model.tflite")
    report = tflite.export_tflite(
        rk.to_deploy(model),
        output,
        quantize=quantize,
        verify_inputs=inputs,
        calibration=_inputs(images.load_images("fashion_mnist", 56, SIZE, SIZE)[32:]),
        reference=model,
        min_agreement=min_top1,  # random weights: near-ties, so int8 keeps less than trained ones
    )
    got = tflite.run(output, inputs)
    expected = np.asarray(model(inputs, training=False))
    assert max_relative_difference(got, expected) <= max_rel
    assert np.mean(got.argmax(-1) == expected.argmax(-1)) >= min_top1
    assert report.max_rel <= max_rel


def test_tflite_int8_keeps_the_head_float_and_int8_full_does_not(models):
    """int8: convolutions int8, pooling + classifier float (better top-1 on trained models);
    int8_full: every op int8, for integer-only accelerators."""
    from ai_edge_litert.interpreter import Interpreter

    deploy = rk.to_deploy(models["RepVGG_A0"])
    calibration = _inputs(images.load_images("fashion_mnist", 16, SIZE, SIZE))
    for quantize, head_dtype in (("int8", np.float32), ("int8_full", np.int8)):
        interpreter = Interpreter(model_content=tflite.convert(deploy, quantize, calibration))
        dtypes = {t["index"]: t["dtype"] for t in interpreter.get_tensor_details()}
        ops = interpreter._get_ops_details()  # no public per-op listing in LiteRT
        weight_dtypes = lambda name, dtypes=dtypes, ops=ops: {
            np.dtype(dtypes[op["inputs"][1]]) for op in ops if op["op_name"] == name
        }
        assert weight_dtypes("CONV_2D") == {np.dtype(np.int8)}, quantize
        assert weight_dtypes("FULLY_CONNECTED") == {np.dtype(head_dtype)}, quantize


def test_tflite_int8_without_calibration_is_an_error(tmp_path, models):
    with pytest.raises(ValueError, match="calibration"):
        tflite.export_tflite(
            models["RepVGG_A0"],
            str(tmp_path / "m.tflite"),
            quantize="int8",
            verify_inputs=np.zeros((1, SIZE, SIZE, 3), np.float32),
        )


# ---------------------------------------------------------------- ONNX


@pytest.mark.parametrize(
    "name,nchw", [("RepVGG_A0", False), ("RepVGG_A0", True), ("RepVGG_B1g4", False)]
)
def test_onnx_matches_keras(tmp_path, models, pixels, name, nchw):
    import onnx

    model = models[name]
    output = str(tmp_path / "model.onnx")
    inputs = _inputs(pixels)
    report = onnx_export.export_onnx(
        rk.to_deploy(model), output, nchw=nchw, verify_inputs=inputs, reference=model
    )
    assert report.max_rel < 1e-4 and report.top1_agreement == 1.0
    proto = onnx.load(output)
    onnx.checker.check_model(proto)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert not dims[0].HasField("dim_value")  # dynamic batch
    assert [d.dim_value for d in dims[1:]] == ([3, SIZE, SIZE] if nchw else [SIZE, SIZE, 3])
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) == 1 + sum(rk.get_spec(name).num_blocks)  # fused: one conv per block
    groups = {a.i for n in convs for a in n.attribute if a.name == "group"}
    assert groups == ({1, 4} if name == "RepVGG_B1g4" else {1})
    feed = np.transpose(inputs[:5], (0, 3, 1, 2)) if nchw else inputs[:5]
    assert (
        max_relative_difference(onnx_export.run(output, feed), model(inputs[:5], training=False))
        < 1e-4
    )


# ---------------------------------------------------------------- full size


def test_full_size_224_all_formats(tmp_path):
    model = _trained("RepVGG_A0", size=224, seed=3)
    plain = rk.to_deploy(model)
    pix = images.load_images("fashion_mnist", 4, 224, 224, 3)
    inputs = _inputs(pix)
    r1 = savedmodel.export_savedmodel(
        plain, str(tmp_path / "sm" / "1"), verify_pixels=pix, reference=model
    )
    r2 = tflite.export_tflite(
        plain, str(tmp_path / "a0.tflite"), verify_inputs=inputs, reference=model
    )
    r3 = onnx_export.export_onnx(
        plain, str(tmp_path / "a0.onnx"), verify_inputs=inputs, reference=model
    )
    assert all(r.max_rel < 1e-4 and r.top1_agreement == 1.0 for r in (r1, r2, r3))


# ---------------------------------------------------------------- safety


def test_existing_artifact_needs_overwrite_and_survives_a_failed_export(tmp_path, models, pixels):
    model = models["RepVGG_A0"]
    output = tmp_path / "a0.onnx"
    output.write_bytes(b"previous good export")
    with pytest.raises(FileExistsError, match="--overwrite"):
        onnx_export.export_onnx(model, str(output), verify_inputs=_inputs(pixels[:2]))
    # Verification fails (the reference is another model): the old file stays, no temp files remain.
    other = _trained("RepVGG_A0", seed=99)
    with pytest.raises(verify.VerificationError, match="nothing was written"):
        onnx_export.export_onnx(
            model, str(output), verify_inputs=_inputs(pixels[:2]), reference=other, overwrite=True
        )
    assert output.read_bytes() == b"previous good export"
    assert sorted(os.listdir(tmp_path)) == ["a0.onnx"]


def test_int8_export_below_99_5_percent_agreement_suggests_quant_friendly(capsys):
    reference = np.eye(10)[np.arange(200) % 10] + 0.01
    flipped = reference.copy()
    flipped[:2] = np.roll(flipped[:2], 1, axis=-1)  # 2 of 200 images change class: 99.0%
    verify.check(verify.compare("a.tflite", "int8", flipped, reference, tolerance=10.0))
    assert "--quant_friendly" in capsys.readouterr().out
    verify.check(verify.compare("a.tflite", "int8", reference, reference))
    verify.check(verify.compare("a.tflite", "fp32", flipped, reference, tolerance=10.0))
    assert "--quant_friendly" not in capsys.readouterr().out


def test_interrupted_export_leaves_the_old_artifact(tmp_path):
    target = tmp_path / "model" / "1"
    target.mkdir(parents=True)
    (target / "saved_model.pb").write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_output(str(target), overwrite=True) as staged:
            os.makedirs(staged)
            with open(os.path.join(staged, "saved_model.pb"), "wb") as f:
                f.write(b"half")
            raise KeyboardInterrupt
    assert (target / "saved_model.pb").read_bytes() == b"old"
    assert os.listdir(tmp_path / "model") == ["1"]
    with atomic.atomic_output(str(target), overwrite=True) as staged:
        os.makedirs(staged)
        with open(os.path.join(staged, "saved_model.pb"), "wb") as f:
            f.write(b"new")
    assert (target / "saved_model.pb").read_bytes() == b"new"


def test_cli_exports_weights_file_and_reports(tmp_path, models):
    weights = tmp_path / "a0.weights.h5"
    models["RepVGG_A0"].save_weights(weights)
    result = run_cli(
        "export.onnx",
        "--model",
        "RepVGG_A0",
        "--weights",
        str(weights),
        "--image_size",
        str(SIZE),
        "--classes",
        "10",
        "--output",
        str(tmp_path / "a0.onnx"),
        "--verify_count",
        "4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max_rel=" in result.stdout and " OK" in result.stdout
    assert (tmp_path / "a0.onnx").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["export.onnx", "--model", "RepVGG_Q7", "--output", "x.onnx"], "Unknown RepVGG model"),
        (["export.tflite", "--output", "x.tflite", "--quantize", "int4"], "--quantize"),
        (
            ["export.savedmodel", "--export_dir", "sm", "--weights", "missing.weights.h5"],
            "does not exist",
        ),
    ],
)
def test_cli_bad_input(tmp_path, args, message):
    result = run_cli(*args)
    assert result.returncode != 0
    assert message in result.stderr


def test_cli_takes_a_timm_checkpoint(tmp_path):
    fixtures = os.path.join(REPO, "tests", "fixtures")
    # The golden fixture is a custom spec, so check the loader path in-process.
    model = loading.load_model("RepVGG_A0", None, SIZE, 10)
    assert model.name == "RepVGG_A0"
    with pytest.raises(ValueError, match="does not match model"):
        loading.load_model(
            "RepVGG_A0", os.path.join(fixtures, "golden_tiny_deploy.safetensors"), SIZE, 10
        )


@pytest.mark.parametrize(
    "options", [dict(quant_friendly=True), dict(use_1x1=False), dict(use_identity=False)]
)
def test_exporters_load_keras_files_of_qarepvgg_and_ablation_models(tmp_path, rng, options):
    """--weights model_train.keras from `train --quant_friendly` or `--ablation` rebuilds the same blocks."""
    from repvgg_keras.parity import randomize_batchnorm

    trained = randomize_batchnorm(
        rk.RepVGG_A0(input_shape=(SIZE, SIZE, 3), classes=10, **options), seed=2
    )
    path = str(tmp_path / "model_train.keras")
    trained.save(path)
    loaded = loading.load_model("RepVGG_A0", path, SIZE, 10)
    x = rng.normal(size=(2, SIZE, SIZE, 3)).astype("float32")
    np.testing.assert_array_equal(
        np.asarray(loaded(x, training=False)), np.asarray(trained(x, training=False))
    )


def test_include_preprocessing_and_no_fuse(tmp_path, models, pixels):
    model = models["RepVGG_A0"]
    with_pre = loading.prepare(model, include_preprocessing=True)
    expected = np.asarray(model(_inputs(pixels[:4]), training=False))
    assert (
        max_relative_difference(with_pre(pixels[:4].astype(np.float32)), expected) < 1e-5
    )  # 0..255 in
    assert not any(isinstance(l, rk.RepVGGBlock) for l in all_layers(with_pre))
    unfused = loading.prepare(model, fuse=False)
    assert any(isinstance(l, rk.RepVGGBlock) for l in all_layers(unfused))
    path = str(tmp_path / "pre" / "1")
    report = savedmodel.export_savedmodel(
        with_pre,
        path,
        verify_pixels=pixels[:4],
        preprocessing_included=True,
        reference=loading.prepare(model, fuse=False, include_preprocessing=True),
    )
    assert report.max_rel < 1e-4
    loaded = tf.saved_model.load(path)
    as_float = loaded.signatures["serving_default"](
        images=tf.constant(pixels[:4].astype(np.float32))
    )["logits"]
    as_uint8 = loaded.signatures["serving_uint8"](images=tf.constant(pixels[:4]))["logits"]
    assert max_relative_difference(as_float, expected) < 1e-4
    assert max_relative_difference(as_uint8, expected) < 1e-4


def test_calibration_images_from_a_folder_and_a_tfds_split(tmp_path, pixels):
    import tensorflow_datasets as tfds

    for i, p in enumerate(pixels[:3]):
        tf.io.write_file(str(tmp_path / f"img{i}.png"), tf.io.encode_png(p))
    from_folder = images.load_images(str(tmp_path), 8, SIZE, SIZE, 3)
    np.testing.assert_array_equal(from_folder, pixels[:3])  # same size: decoded back exactly
    with tfds.testing.mock_data(num_examples=6):
        from_tfds = images.load_images("tfds:cifar10:train", 4, SIZE, 40, 3)
    assert from_tfds.shape == (4, SIZE, 40, 3) and from_tfds.dtype == np.uint8
    with pytest.raises(ValueError, match="Unknown image source"):
        images.load_images("nowhere", 1, SIZE, SIZE)


# ---------------------------------------------------------------- OpenVINO and the inference helper


@pytest.mark.parametrize("name", ["RepVGG_A0", "RepVGG_B1g4"])
def test_openvino_ir_matches_keras_in_fp32(tmp_path, models, pixels, name):
    from export import openvino as openvino_export

    model = models[name]
    output = str(tmp_path / "ir")
    inputs = _inputs(pixels)
    report = openvino_export.export_openvino(
        rk.to_deploy(model), output, precision="fp32", verify_inputs=inputs, reference=model
    )
    assert report.max_rel < 1e-4 and report.top1_agreement == 1.0
    assert sorted(os.listdir(output)) == ["model.bin", "model.xml", "runtime.json"]
    with open(os.path.join(output, "runtime.json")) as f:
        assert json.load(f)["precision"] == "fp32"
    batch = inputs[:3]  # another batch size than the verification: dynamic batch
    assert (
        max_relative_difference(openvino_export.run(output, batch), model(batch, training=False))
        < 1e-4
    )


def test_openvino_reduced_precisions_keep_top1(tmp_path, models, pixels):
    from export import openvino as openvino_export
    from export.openvino_runtime import supports

    model = models["RepVGG_A0"]
    inputs = _inputs(pixels)
    report = openvino_export.export_openvino(
        rk.to_deploy(model),
        str(tmp_path / "int8"),
        quantize="int8",
        verify_inputs=inputs,
        calibration=_inputs(images.load_images("fashion_mnist", 64, SIZE, SIZE, 3)),
        reference=model,
        min_agreement=0.9,
    )
    assert report.precision == "int8" and report.ok and report.top1_agreement >= 0.9
    if supports("bf16"):
        report = openvino_export.export_openvino(
            rk.to_deploy(model),
            str(tmp_path / "bf16"),
            precision="bf16",
            verify_inputs=inputs,
            reference=model,
        )
        assert report.ok and report.top1_agreement >= 0.95


def test_openvino_cli(tmp_path, models):
    path = str(tmp_path / "a0.weights.h5")
    models["RepVGG_A0"].save_weights(path)
    output = str(tmp_path / "a0_ir")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "export.openvino",
            "--model=RepVGG_A0",
            f"--weights={path}",
            f"--image_size={SIZE}",
            "--classes=10",
            f"--output={output}",
            "--precision=fp32",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OK" in done.stdout and os.path.exists(os.path.join(output, "model.xml"))
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "export.openvino",
            "--model=RepVGG_A0",
            f"--weights={path}",
            f"--image_size={SIZE}",
            "--classes=10",
            f"--output={output}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert again.returncode == 1 and "--overwrite" in again.stderr


def test_fast_predictor_picks_a_verified_runtime(models, pixels):
    model = models["RepVGG_A0"]
    inputs = _inputs(pixels)
    predictor = fast_predictor.fast_predictor(model, check_images=inputs)
    assert (
        predictor.runtime == fast_predictor.FASTEST[predictor.precision][0]
    )  # the fastest installed one
    assert predictor.top1_agreement >= 0.995
    expected = np.asarray(model(inputs[:4], training=False))
    tolerance = verify.TOLERANCES[predictor.precision]
    assert max_relative_difference(predictor(inputs[:4]), expected) <= tolerance
    assert predictor.precision in predictor.describe()

    exact = fast_predictor.fast_predictor(
        model, precision="fp32", runtime="keras", check_images=inputs
    )
    assert exact.max_rel_diff < 1e-4 and exact.layout == "NHWC"


def test_fast_predictor_int8_in_tflite(models, pixels):
    model = models["RepVGG_A0"]
    calibration = _inputs(images.load_images("fashion_mnist", 48, SIZE, SIZE)[16:])
    predictor = fast_predictor.fast_predictor(
        model,
        precision="int8",
        runtime="tflite",
        check_images=_inputs(pixels),
        calibration_images=calibration,
        min_agreement=0.9,
    )
    assert (predictor.runtime, predictor.precision, predictor.layout) == ("tflite", "int8", "NHWC")
    assert predictor.max_rel_diff <= verify.TOLERANCES["int8"]
    with pytest.raises(ValueError, match="cannot run precision 'bf16'"):
        fast_predictor.fast_predictor(
            model, precision="bf16", runtime="tflite", check_images=_inputs(pixels)
        )


def test_fast_predictor_refuses_what_it_cannot_check(models):
    with pytest.raises(ValueError, match="calibration_images"):
        fast_predictor.fast_predictor(models["RepVGG_A0"], precision="int8")
    with pytest.raises(ValueError, match="runtime must be"):
        fast_predictor.fast_predictor(models["RepVGG_A0"], runtime="tensorrt")


def test_onnx_conversion_runs_in_a_child_process_and_falls_back(tmp_path, models):
    """export.onnx.onnx_file converts in a child (tf2onnx's memory goes back to the OS when it exits);
    a model the child cannot reload (an unregistered custom layer) is converted in this process."""
    from export import runners

    plain = rk.to_deploy(models["RepVGG_A0"])
    path = str(tmp_path / "child.onnx")
    assert onnx_export._convert_in_child(plain, path, nchw=True)
    x = np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 3)).astype("float32")
    assert verify.compare(
        "child", "fp32", runners.onnxruntime(path)(x.transpose(0, 3, 1, 2)), plain(x)
    ).ok

    class Scale(tf.keras.layers.Layer):  # not registered: the child cannot load it
        def call(self, inputs):
            return inputs * 2.0

    inputs = tf.keras.Input((SIZE, SIZE, 3))
    custom = tf.keras.Model(inputs, plain(Scale()(inputs)))
    assert not onnx_export._convert_in_child(custom, str(tmp_path / "custom.onnx"), nchw=True)
    written = onnx_export.onnx_file(custom, str(tmp_path), nchw=True)
    assert verify.compare(
        "here", "fp32", runners.onnxruntime(written)(x.transpose(0, 3, 1, 2)), custom(x)
    ).ok
    assert sorted(os.listdir(tmp_path)) == ["child.onnx", "model_nchw.onnx"]  # no leftovers
