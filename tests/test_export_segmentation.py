"""Exporters and the serving client with --task segmentation: a PSPNet from a .keras file."""

import base64
import http.server
import json
import os
import threading

import numpy as np
import pytest
import tensorflow as tf

import repvgg_keras as rk
from export import images, loading, runners, tflite, verify
from repvgg_keras import preprocessing
from repvgg_keras.parity import max_relative_difference, randomize_batchnorm
from repvgg_keras.structure import all_layers
from tests.helpers import one_error_line, run_cli

pytestmark = pytest.mark.slow  # converts, exports, serves or trains end to end

SIZE = 64
CLASSES = 5
TOLERANCE = verify.TOLERANCES["fp32"]


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    """A PSPNet (narrow head with the low-level skip and the image refinement, trained-like
    BatchNorm and residual) saved as train does: training form."""
    model = rk.PSPNet(
        "RepVGG_A0",
        classes=CLASSES,
        input_shape=(SIZE, SIZE, 3),
        head_channels=64,
        low_level_skip=True,
        image_refine=True,
    )
    model = randomize_batchnorm(model, seed=1)
    residual = model.get_layer("image_refine_residual")
    noise = np.random.default_rng(2)
    residual.set_weights([noise.normal(scale=0.05, size=w.shape) for w in residual.get_weights()])
    path = str(tmp_path_factory.mktemp("seg") / "model_train.keras")
    model.save(path)
    return model, path


@pytest.fixture(scope="module")
def pixels():
    """Two of the shipped sample photos: the images the exporters verify on."""
    return images.load_images("sample", 2, SIZE, SIZE, 3)


def _inputs(pixels):
    return preprocessing.normalize(pixels.astype(np.float32), "imagenet", 3)


def _export_args(path):
    return ["--task", "segmentation", "--model", "RepVGG_A0", "--weights", path]


def _check_outputs(logits, classes, model, pixels):
    """Runtime logits within fp32 tolerance of Keras's; classes the argmax of those logits."""
    expected = np.asarray(model(_inputs(pixels), training=False))
    assert logits.shape == expected.shape == (len(pixels), SIZE, SIZE, CLASSES)
    assert max_relative_difference(logits, expected) < TOLERANCE
    assert classes.shape == (len(pixels), SIZE, SIZE)
    assert np.issubdtype(classes.dtype, np.integer)
    np.testing.assert_array_equal(classes, logits.argmax(-1))
    assert np.mean(classes == expected.argmax(-1)) > 0.999


def _verified_line(stdout):
    (line,) = [l for l in stdout.splitlines() if l.startswith("verified: ")]
    return line


@pytest.fixture(scope="module")
def exported_savedmodel(tmp_path_factory, seg):
    export_dir = str(tmp_path_factory.mktemp("serving") / "seg")
    result = run_cli(
        "export.savedmodel",
        *_export_args(seg[1]),
        "--image_size",
        str(SIZE),
        "--classes",
        str(CLASSES),
        "--export_dir",
        export_dir,
        "--precision",
        "fp32",
        "--verify_count",
        "2",
    )
    return os.path.join(export_dir, "1"), result


def test_savedmodel_cli_segmentation_signatures(exported_savedmodel, seg, pixels):
    path, result = exported_savedmodel
    assert result.returncode == 0, result.stderr[-3000:]
    line = _verified_line(result.stdout)
    assert f"per-pixel top-1 agreement 100.00% on 2 images x {SIZE * SIZE} pixels" in line
    assert os.path.exists(os.path.join(path, "saved_model.pb"))
    loaded = tf.saved_model.load(path)
    encoded = tf.constant([tf.io.encode_png(p).numpy() for p in pixels])
    feeds = {
        "serving_default": tf.constant(_inputs(pixels)),
        "serving_uint8": tf.constant(pixels),
        "serving_bytes": encoded,
    }
    for name, feed in feeds.items():
        out = loaded.signatures[name](images=feed)
        assert set(out) == {"logits", "classes"}
        assert out["logits"].dtype == tf.float32 and out["classes"].dtype == tf.int32
        _check_outputs(out["logits"].numpy(), out["classes"].numpy(), seg[0], pixels)
    empty = loaded.signatures["serving_uint8"](images=tf.zeros((0, SIZE, SIZE, 3), tf.uint8))
    assert empty["classes"].shape == (0, SIZE, SIZE)
    warmup = os.path.join(path, "assets.extra", "tf_serving_warmup_requests")
    assert sum(1 for _ in tf.data.TFRecordDataset(warmup)) == 3


def test_tflite_cli_segmentation(tmp_path, seg, pixels):
    output = str(tmp_path / "seg.tflite")
    result = run_cli(
        "export.tflite", *_export_args(seg[1]), "--output", output, "--verify_count", "2"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "per-pixel top-1 agreement" in _verified_line(result.stdout)
    assert os.path.exists(output)
    logits, classes = runners.tflite(output, output=("logits", "classes"))(_inputs(pixels[:1]))
    _check_outputs(logits, classes, seg[0], pixels[:1])


def test_onnx_cli_segmentation(tmp_path, seg, pixels):
    output = str(tmp_path / "seg.onnx")
    result = run_cli(
        "export.onnx", *_export_args(seg[1]), "--classes", str(CLASSES), "--output", output,
        "--verify_count", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "per-pixel top-1 agreement" in _verified_line(result.stdout)
    assert os.path.exists(output)
    nchw = np.transpose(_inputs(pixels[:1]), (0, 3, 1, 2))  # NCHW in, channels-last out
    logits, classes = runners.onnxruntime(output, output=("logits", "classes"))(nchw)
    _check_outputs(logits, classes, seg[0], pixels[:1])


def test_classifier_with_task_segmentation_is_one_error_line(tmp_path):
    path = str(tmp_path / "classifier.keras")
    rk.RepVGG_A0(input_shape=(SIZE, SIZE, 3), classes=CLASSES).save(path)
    output = tmp_path / "x.onnx"
    line = one_error_line(
        run_cli("export.onnx", *_export_args(path), "--output", str(output), timeout=300)
    )
    assert "is not a segmentation model" in line and "Drop --task segmentation" in line
    assert not output.exists()


def test_model_source_checks(seg):
    """Flags that do not fit the file, and options segmentation lacks, are refused early."""
    model, path = seg
    src = rk.read_source(path)  # read once; every loader takes the Source as it takes the path
    with pytest.raises(ValueError, match="pass --task segmentation"):
        loading.load_model("RepVGG_A0", src, SIZE, CLASSES)
    with pytest.raises(ValueError, match=f"its logits have {CLASSES} classes"):
        loading.load_segmentation_model("RepVGG_A0", src, SIZE, CLASSES + 1)
    with pytest.raises(ValueError, match=f"pass --image_size {SIZE}"):
        loading.load_segmentation_model("RepVGG_A0", src, SIZE * 2)
    with pytest.raises(ValueError, match="pass --model RepVGG_A0"):
        loading.load_segmentation_model("RepVGG_B0", src)
    with pytest.raises(ValueError, match="--quantize int8 is not supported for --task"):
        tflite.convert(model, "int8", calibration=np.zeros((1, SIZE, SIZE, 3), np.float32))
    loaded = loading.load_segmentation_model("RepVGG_A0", src)  # sizes from the file
    assert loaded.output_shape == (None, SIZE, SIZE, CLASSES)


@pytest.fixture
def serving(exported_savedmodel):
    """A REST endpoint answering like TF Serving, from the exported SavedModel."""
    loaded = tf.saved_model.load(exported_savedmodel[0])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert body["signature_name"] == "serving_bytes"
            encoded = [base64.b64decode(instance["b64"]) for instance in body["instances"]]
            out = loaded.signatures["serving_bytes"](images=tf.constant(encoded))
            rows = [dict(zip(out, row)) for row in zip(*(v.numpy().tolist() for v in out.values()))]
            data = json.dumps({"predictions": rows}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield loaded, server.server_address[1]
    server.shutdown()
    server.server_close()


def test_client_prints_class_areas_and_writes_the_mask(tmp_path, serving, pixels):
    from export import client
    from repvgg_keras import masks

    loaded, port = serving
    image = tmp_path / "photo.png"
    image.write_bytes(tf.io.encode_png(pixels[0]).numpy())
    mask_png = tmp_path / "photo_mask.png"
    common_args = ["--task", "segmentation", "--image", str(image), "--port", str(port)]
    result = run_cli(
        "export.client", *common_args, "--host", "127.0.0.1", "--model_name", "seg",
        "--mask_png", str(mask_png), "--class_names", "a,b,c,d,e", timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # What the server computes for that request:
    served = loaded.signatures["serving_bytes"](images=tf.constant([image.read_bytes()]))
    mask = served["classes"].numpy()[0]
    expected = client.area_summary(mask, "a,b,c,d,e".split(","), 5)
    assert result.stdout.splitlines()[0] == f"{image}: {expected}"
    assert expected.startswith(f"{SIZE}x{SIZE} mask, ")
    written = tf.io.decode_png(mask_png.read_bytes()).numpy()
    np.testing.assert_array_equal(written, masks.colorize(mask))


def test_client_segmentation_bad_input_is_one_error_line(tmp_path):
    missing = str(tmp_path / "missing.jpg")
    line = one_error_line(run_cli("export.client", "--task", "segmentation", "--image", missing))
    assert "missing.jpg: No such file" in line
    jpeg = tmp_path / "a.jpg"
    jpeg.write_bytes(tf.io.encode_jpeg(np.full((8, 8, 3), 9, np.uint8)).numpy())
    two = ["--image", str(jpeg), "--image", str(jpeg).replace("a.jpg", "b.jpg")]
    (tmp_path / "b.jpg").write_bytes(jpeg.read_bytes())
    args = ["export.client", "--task", "segmentation", *two, "--mask_png", "mask.png"]
    assert "put {stem} in it" in one_error_line(run_cli(*args))
    line = one_error_line(run_cli("export.client", "--image", str(jpeg), "--mask_png", "m.png"))
    assert "pass --task segmentation" in line


def test_png_writer_round_trips():
    from export import client

    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(tf.io.decode_png(client.png_bytes(rgb)).numpy(), rgb)


def test_a_model_saved_under_a_mixed_policy_exports_in_float32(tmp_path):
    import keras

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        trained = rk.PSPNet(
            "RepVGG_A0", classes=3, input_shape=(32, 32, 3), head_channels=8, image_refine=True
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")
    path = str(tmp_path / "mixed.keras")
    rk.to_deploy(trained).save(path)
    model = loading.load_segmentation_model("RepVGG_A0", path)
    policies = {l.dtype_policy.name for l in all_layers(model) if hasattr(l, "dtype_policy")}
    assert policies == {"float32"}
    x = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype("float32")
    reference = np.asarray(keras.models.load_model(path)(x), np.float32)
    assert max_relative_difference(np.asarray(model(x)), reference) < 3e-2  # bf16 vs fp32
