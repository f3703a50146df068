"""Client for a RepVGG model served by TensorFlow Serving, over REST or gRPC.

    python -m export.client --host localhost --model_name repvgg_a0 --image cat.jpg [--protocol grpc]

Sends the encoded image to the `serving_bytes` signature (decode, resize and normalise
happen in the server's graph) and prints the top classes. Every failure (a file that is
missing or not an image, a server that is down or answers an error) is one `error:` line
and exit status 1.
"""

import http.client
import json
import sys
import urllib.error
import urllib.request

import numpy as np
from absl import app, flags

from export import predict_requests

FLAGS = flags.FLAGS
FORMATS = "JPEG, PNG, GIF, BMP or WebP"


class ClientError(Exception):
    """A failure the user can act on; main prints it as one `error:` line."""


def _is_image(data):
    """Whether `data` starts like a format the server's decode_image reads."""
    return data.startswith(
        (
            b"\xff\xd8\xff",
            b"\x89PNG\r\n\x1a\n",
            b"GIF87a",
            b"GIF89a",
            b"BM",
            b"\xff\x0a",
            b"\x00\x00\x00\x0cJXL \r\n\x87\n",
        )
    ) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def read_images(paths):
    """The files' bytes, checked locally: a wrong path should not cost a round trip."""
    encoded = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as error:
            raise ClientError(f"cannot read {path}: {error.strerror or error}.") from None
        if not _is_image(data):
            what = "is empty" if not data else "is not an image"
            raise ClientError(f"{path} {what}: expected a {FORMATS} file.")
        encoded.append(data)
    return encoded


def _first_line(text, limit=300):
    return (str(text).strip().splitlines() or [""])[0][:limit]


def predict_rest(host, port, model_name, encoded_images, timeout=30.0):
    body = predict_requests.rest_body("serving_bytes", encoded_images).encode()
    url = f"http://{host}:{port}/v1/models/{model_name}:predict"
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode()
    except urllib.error.HTTPError as error:  # before URLError, its base class
        raise ClientError(
            f"TF Serving at {host}:{port} answered HTTP {error.code}: {_rest_error(error)}"
        ) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ClientError(
            f"cannot reach TF Serving's REST API at {host}:{port} ({reason}): is the "
            "server running there? (--host, --port)"
        ) from None
    try:
        return predict_requests.parse_rest_response(text)
    except (ValueError, KeyError, IndexError, TypeError):
        raise ClientError(f"unexpected answer from {url}: {_first_line(text, 200)}") from None


def _rest_error(error):
    """TF Serving's {"error": "..."} body, first line; else the HTTP reason."""
    try:
        return _first_line(json.loads(error.read().decode())["error"])
    except Exception:  # not TF Serving's JSON; the status line says enough
        return str(error.reason)


def predict_grpc(host, port, model_name, encoded_images, timeout=30.0):
    try:
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc
    except ImportError as error:
        raise ClientError(
            f"--protocol grpc needs the grpcio and tensorflow-serving-api packages "
            f"({error}); or use --protocol rest."
        ) from None

    with grpc.insecure_channel(f"{host}:{port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_requests.predict_request(model_name, "serving_bytes", encoded_images)
        try:
            response = stub.Predict(request, timeout=timeout)
        except grpc.RpcError as error:
            code = error.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise ClientError(
                    f"cannot reach TF Serving's gRPC API at {host}:{port} "
                    f"({code.name}): is the server running there? (--host, --port)"
                ) from None
            raise ClientError(
                f"TF Serving at {host}:{port} answered {code.name}: {_first_line(error.details())}"
            ) from None
        return predict_requests.parse_predict_response(response)


def top_k(probabilities, k=5):
    order = np.argsort(-probabilities)[:k]
    return [(int(i), float(probabilities[i])) for i in order]


def classify(paths, host, port, protocol, model_name, timeout):
    """Probabilities [len(paths), classes] from the server; ClientError on any failure."""
    encoded = read_images(paths)
    predict = predict_rest if protocol == "rest" else predict_grpc
    try:
        outputs = predict(host, port, model_name, encoded, timeout=timeout)
    except ClientError:
        raise
    except Exception as error:  # anything else still gets one line, not a traceback
        raise ClientError(
            f"request to {host}:{port} failed: {type(error).__name__}: {_first_line(error)}"
        ) from None
    probabilities = np.asarray(outputs.get("probabilities", []))
    if probabilities.ndim != 2 or len(probabilities) != len(paths):
        raise ClientError(
            f"TF Serving at {host}:{port} answered without one row of probabilities "
            f"per image (got shape {list(probabilities.shape)}): is --model_name "
            f"{model_name} a RepVGG export with a serving_bytes signature?"
        )
    return probabilities


def main(argv):
    del argv
    port = FLAGS.port or (8501 if FLAGS.protocol == "rest" else 8500)
    try:
        rows = classify(
            FLAGS.image, FLAGS.host, port, FLAGS.protocol, FLAGS.model_name, FLAGS.timeout
        )
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path, probabilities in zip(FLAGS.image, rows):
        ranked = ", ".join(f"class {c}: {p:.3f}" for c, p in top_k(probabilities, FLAGS.top_k))
        print(f"{path}: {ranked}")
    return 0


if __name__ == "__main__":
    flags.DEFINE_string("host", "localhost", "TF Serving host.")
    flags.DEFINE_integer("port", None, "Port (default 8501 for REST, 8500 for gRPC).")
    flags.DEFINE_enum("protocol", "rest", ["rest", "grpc"], "REST (JSON, base64 images) or gRPC.")
    flags.DEFINE_string("model_name", "repvgg_a0", "Model name in TF Serving's config.")
    flags.DEFINE_multi_string("image", None, "JPEG/PNG file(s) to classify.")
    flags.DEFINE_integer("top_k", 5, "Classes to print per image.", lower_bound=1)
    flags.DEFINE_float("timeout", 30.0, "Seconds to wait for the server.", lower_bound=0.001)
    flags.mark_flag_as_required("image")
    app.run(lambda argv: sys.exit(main(argv)))
