"""Malformed requests: the SavedModel's signatures, the TF Serving client and the runtime runners.

A tensor of the wrong rank reaching a oneDNN convolution aborts the process (and, under TF
Serving, the server), so the SavedModel cases run in a child process: an abort is then a
failing test, not the end of the suite.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REPO, cli_env

SIZE = 32
CLASSES = 10
WANTED = f"[N, {SIZE}, {SIZE}, 3]"

pytestmark = pytest.mark.slow  # converts, exports, serves or trains end to end


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny SavedModel (RepVGG-A0, 32x32, 10 classes) and the Keras logits of a good batch."""
    import tensorflow as tf

    import repvgg_keras as rk
    from export import images, savedmodel
    from repvgg_keras import preprocessing

    model = rk.get_model("RepVGG_A0", input_shape=(SIZE, SIZE, 3), classes=CLASSES)
    path = str(tmp_path_factory.mktemp("serving") / "1")
    savedmodel.save_serving_model(model, path)
    pixels = images.load_images("random", 2, SIZE, SIZE, 3)
    normalized = preprocessing.normalize(pixels.astype(np.float32))
    expected = np.asarray(model(normalized, training=False))
    encode = lambda image: tf.io.encode_png(image).numpy()
    encoded = {
        "png": encode(pixels[0]),
        "png1": encode(pixels[1]),
        "grey_png": encode(pixels[0][..., :1]),
        "tall_png": encode(np.zeros((2 * SIZE, SIZE, 3), np.uint8)),
        "jpeg": tf.io.encode_jpeg(pixels[0], quality=95).numpy(),
    }
    np.savez(
        os.path.join(os.path.dirname(path), "good.npz"),
        pixels=pixels,
        normalized=normalized,
        expected=expected,
        **{k: np.array(v, object) for k, v in encoded.items()},
    )
    return path, os.path.join(os.path.dirname(path), "good.npz")


# The child loads the SavedModel as TF2 signatures (route "function": tf.saved_model.load) or
# in a TF1 Session fed by tensor name, as TF Serving does (route "tf1"), and prints one
# JSON line per case.
_CHILD = r"""
import json, sys
import numpy as np
import tensorflow as tf

path, good_file, ROUTE = sys.argv[1:4]
if ROUTE == "tf1":
    tf.compat.v1.disable_eager_execution()
good = np.load(good_file, allow_pickle=True)
pixels, normalized, expected = good["pixels"], good["normalized"], good["expected"]
png, jpeg = good["png"].item(), good["jpeg"].item()
S = pixels.shape[1]
nan = normalized[:1].copy(); nan[0, 3, 4, 1] = np.nan
inf = normalized[:1].copy(); inf[0, 0, 0, 0] = -np.inf
f32 = lambda shape: np.zeros(shape, np.float32)
u8 = lambda shape: np.zeros(shape, np.uint8)
GOOD = {"serving_default": normalized, "serving_uint8": pixels,
        "serving_bytes": np.array([png, good["png1"].item()], object)}
shape_cases = lambda make: {
    "rank0": make(()), "rank1": make((S,)), "rank2": make((S, S)), "rank3": make((S, S, 3)),
    "rank5": make((1, 2, S, S, 3)), "rank5_trailing": make((1, S, S, 3, 1)),
    "channels1": make((1, S, S, 1)), "channels4": make((1, S, S, 4)), "nchw": make((1, 3, S, S)),
    "larger": make((1, 2 * S, 2 * S, 3)), "smaller": make((2, S // 2, S // 2, 3)),
    "empty_wrong_size": make((0, S // 2, S // 2, 3)),
}
CASES = {
    "serving_default": {**shape_cases(f32), "nan": nan, "inf": inf, "empty": f32((0, S, S, 3)),
                        "dtype_int32": np.zeros((1, S, S, 3), np.int32),
                        "dtype_float64": np.zeros((1, S, S, 3), np.float64),
                        "dtype_string": np.array([png], object)},
    "serving_uint8": {**shape_cases(u8), "empty": u8((0, S, S, 3)),
                      "dtype_float32": f32((1, S, S, 3))},
    "serving_bytes": {"rank0": np.array(png, object), "rank2": np.array([[png]], object),
                      "empty": np.array([], object), "garbage": np.array([b"not an image"], object),
                      "empty_string": np.array([b""], object),
                      "truncated_png": np.array([png[: len(png) // 2]], object),
                      "truncated_jpeg": np.array([jpeg[: len(jpeg) // 2]], object),
                      "one_bad_of_two": np.array([png, b"GIF89a garbage"], object),
                      "dtype_uint8": u8((1, S, S, 3)),
                      "larger_png_is_resized": np.array([good["tall_png"].item()], object),
                      "grey_png": np.array([good["grey_png"].item()], object)},
}


def message_line(error):
    lines = [l for l in str(getattr(error, "message", error)).splitlines() if l.strip()]
    skip = ("Graph execution error", "Detected at node", "<stack traces", "\t")
    return next((l for l in lines if not l.startswith(skip)), lines[0] if lines else "")


def attempt(call, value):
    try:
        out = call(value)
        return {"status": "ok", "shapes": {k: list(np.shape(v)) for k, v in out.items()}}
    except Exception as error:  # noqa: BLE001: every error is reported, the test judges it
        return {"status": "error", "class": type(error).__name__,
                "message": message_line(error)[:400]}


def good_still_works(call, signature):
    logits = np.asarray(call(GOOD[signature])["logits"])
    return bool(np.max(np.abs(logits - expected)) <= 1e-3 * max(1.0, np.max(np.abs(expected))))


def run(route, calls):
    for signature, cases in CASES.items():
        for case, value in cases.items():
            if route == "tf1" and case.startswith("dtype_"):
                continue  # Python's Session.run casts feeds to the placeholder's dtype
            result = attempt(calls[signature], value)
            result.update(route=route, signature=signature, case=case,
                          good_after=good_still_works(calls[signature], signature))
            print(json.dumps(result), flush=True)


if ROUTE == "function":
    loaded = tf.saved_model.load(path)
    run("function", {name: (lambda v, f=loaded.signatures[name]: f(images=tf.constant(v)))
                     for name in CASES})
else:
    session = tf.compat.v1.Session()
    meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], path)

    def session_call(name):
        signature = meta.signature_def[name]
        feed = session.graph.get_tensor_by_name(signature.inputs["images"].name)
        fetch = {k: session.graph.get_tensor_by_name(v.name) for k, v in signature.outputs.items()}
        return lambda v: session.run(fetch, {feed: v})

    run("tf1", {name: session_call(name) for name in CASES})
print(json.dumps({"done": True}))
"""

# Cases a signature must accept, and the output batch it must give.
ACCEPTED = {"empty": 0, "larger_png_is_resized": 1, "grey_png": 1}


@pytest.fixture(scope="module")
def child_results(served):
    path, good = served
    results, lines = [], []
    for route in ("function", "tf1"):
        result = subprocess.run(
            [sys.executable, "-c", _CHILD, path, good, route],
            capture_output=True,
            text=True,
            env=cli_env(),
            timeout=600,
        )
        results.append(result)
        lines += [json.loads(l) for l in result.stdout.splitlines() if l.startswith('{"')]
    return results, [l for l in lines if "case" in l]


def test_malformed_requests_leave_the_process_up(child_results):
    results, lines = child_results
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
        assert '{"done": true}' in result.stdout
    assert {l["route"] for l in lines} == {"function", "tf1"}


def test_every_malformed_input_is_an_invalid_argument_naming_the_problem(child_results):
    _, lines = child_results
    wrong = []
    for line in lines:
        if line["case"] in ACCEPTED:
            continue
        message = line.get("message", "")
        if line["status"] != "error" or line["class"] != "InvalidArgumentError":
            wrong.append(line)
        elif line["case"].startswith("dtype_"):
            if "expected to be a" not in message:
                wrong.append(line)
        elif line["signature"] == "serving_bytes" and line["case"].startswith("rank"):
            if "expected shape [N]" not in message or "received shape" not in message:
                wrong.append(line)
        elif line["signature"] == "serving_bytes":
            if not any(word in message for word in ("image", "JPEG", "PNG", "GIF data")):
                wrong.append(line)
        elif line["case"] in ("nan", "inf"):
            if "NaN or Inf" not in message:
                wrong.append(line)
        elif f"expected shape {WANTED}, received shape [" not in message:
            wrong.append(line)
    assert not wrong, "\n".join(json.dumps(w) for w in wrong)
    received = {(l["route"], l["signature"], l["case"]): l.get("message", "") for l in lines}
    rank5 = received["function", "serving_default", "rank5"]
    assert f"received shape [1, 2, {SIZE}, {SIZE}, 3]" in rank5
    assert "received shape [1, 32, 32, 1]" in received["tf1", "serving_uint8", "channels1"]
    assert "received shape []" in received["tf1", "serving_bytes", "rank0"]


def test_empty_batches_and_other_image_sizes_are_answered(child_results):
    _, lines = child_results
    accepted = [l for l in lines if l["case"] in ACCEPTED]
    assert len(accepted) == 2 * 5  # empty for each signature, two resized images, on both routes
    for line in accepted:
        assert line["status"] == "ok", line
        assert line["shapes"] == {
            "logits": [ACCEPTED[line["case"]], CLASSES],
            "probabilities": [ACCEPTED[line["case"]], CLASSES],
        }, line


def test_a_good_request_works_after_each_bad_one(child_results):
    """With the Keras model's logits, on both routes: the Session route is TF Serving's loader,
    which finds the weights only if the SavedModel tracks them as tf.Variables."""
    _, lines = child_results
    assert len(lines) > 60
    assert [l for l in lines if not l["good_after"]] == []


# ---------------------------------------------------------------- export.client


def _client(*args):
    return subprocess.run(
        [sys.executable, "-m", "export.client", *args],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=REPO,
        timeout=120,
    )


def one_error_line(result):
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture
def jpeg(tmp_path):
    import tensorflow as tf

    path = tmp_path / "cat.jpg"
    path.write_bytes(tf.io.encode_jpeg(np.full((8, 8, 3), 120, np.uint8)).numpy())
    return str(path)


def test_client_missing_or_unreadable_image_is_one_error_line(tmp_path):
    line = one_error_line(_client("--image", str(tmp_path / "missing.jpg")))
    assert "missing.jpg: No such file" in line
    (tmp_path / "notes.jpg").write_text("not a picture")
    line = one_error_line(_client("--image", str(tmp_path / "notes.jpg")))
    assert "notes.jpg is not an image" in line


def test_client_unreachable_server_is_one_error_line(jpeg):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = one_error_line(
        _client("--image", jpeg, "--host", "127.0.0.1", "--port", str(port), "--timeout", "3")
    )
    assert f"cannot reach TF Serving's REST API at 127.0.0.1:{port}" in line


@pytest.fixture
def fake_server():
    """A REST endpoint answering like TF Serving: model "repvgg" predicts, others fail."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/v1/models/repvgg:predict":
                status = 200
                row = {"logits": [0.0, 2.0, 1.0], "probabilities": [0.1, 0.7, 0.2]}
                answer = {"predictions": [row] * len(body["instances"])}
            else:
                status = 400
                answer = {
                    "error": "assertion failed: [serving_bytes images: received an empty "
                    "string]\n\t [[{{node Assert}}]]"
                }
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_client_server_error_is_one_error_line_and_answers_print(jpeg, fake_server):
    common = ["--image", jpeg, "--host", "127.0.0.1", "--port", str(fake_server), "--timeout", "10"]
    line = one_error_line(_client(*common, "--model_name", "other"))
    assert "answered HTTP 400: assertion failed: [serving_bytes images" in line
    assert "node" not in line  # the first line of the server's message only
    answered = _client(*common, "--model_name", "repvgg", "--top_k", "2")
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout.strip() == f"{jpeg}: class 1: 0.700, class 2: 0.200"


# ---------------------------------------------------------------- export.runners


def test_runner_rejects_a_wrong_input_shape_naming_both_shapes():
    import repvgg_keras as rk
    from export import runners, tflite

    model = rk.get_model("RepVGG_A0", input_shape=(SIZE, SIZE, 3), classes=CLASSES)
    run = runners.tflite(tflite.convert(model))
    assert run(np.zeros((2, SIZE, SIZE, 3))).shape == (2, CLASSES)
    wanted = f"expects input of shape [N, {SIZE}, {SIZE}, 3]"
    for shape in [
        (SIZE, SIZE, 3),
        (1, SIZE, SIZE, 1),
        (1, 2 * SIZE, 2 * SIZE, 3),
        (1, 3, SIZE, SIZE),
        (0, SIZE, SIZE, 3),
    ]:
        with pytest.raises(ValueError) as raised:
            run(np.zeros(shape))
        assert wanted in str(raised.value) and str(list(shape)) in str(raised.value)
    assert run(np.zeros((1, SIZE, SIZE, 3))).shape == (1, CLASSES)  # still usable
