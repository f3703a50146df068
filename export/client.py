"""Client for a RepVGG model served by TensorFlow Serving, over REST or gRPC.

    python -m export.client --host localhost --model_name repvgg_a0 --image cat.jpg [--protocol grpc]

Sends the encoded image to the `serving_bytes` signature (decode, resize and normalise
happen in the server's graph) and prints the top classes.
"""

import sys
import urllib.request

import numpy as np
from absl import app, flags

from export import predict_requests

FLAGS = flags.FLAGS


def predict_rest(host, port, model_name, encoded_images, timeout=30.0):
    body = predict_requests.rest_body("serving_bytes", encoded_images).encode()
    url = f"http://{host}:{port}/v1/models/{model_name}:predict"
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return predict_requests.parse_rest_response(response.read().decode())


def predict_grpc(host, port, model_name, encoded_images, timeout=30.0):
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(f"{host}:{port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_requests.predict_request(model_name, "serving_bytes", encoded_images)
        return predict_requests.parse_predict_response(stub.Predict(request, timeout=timeout))


def top_k(probabilities, k=5):
    order = np.argsort(-probabilities)[:k]
    return [(int(i), float(probabilities[i])) for i in order]


def main(argv):
    del argv
    encoded = []
    for path in FLAGS.image:
        with open(path, "rb") as f:
            encoded.append(f.read())
    port = FLAGS.port or (8501 if FLAGS.protocol == "rest" else 8500)
    predict = predict_rest if FLAGS.protocol == "rest" else predict_grpc
    try:
        outputs = predict(FLAGS.host, port, FLAGS.model_name, encoded)
    except Exception as error:  # connection refused, HTTP error, gRPC status
        print(f"error: request to {FLAGS.host}:{port} failed: {error}", file=sys.stderr)
        return 1
    for path, probabilities in zip(FLAGS.image, outputs["probabilities"]):
        ranked = ", ".join(f"class {c}: {p:.3f}" for c, p in top_k(probabilities, FLAGS.top_k))
        print(f"{path}: {ranked}")
    return 0


if __name__ == "__main__":
    flags.DEFINE_string("host", "localhost", "TF Serving host.")
    flags.DEFINE_integer("port", None, "Port (default 8501 for REST, 8500 for gRPC).")
    flags.DEFINE_enum("protocol", "rest", ["rest", "grpc"], "REST (JSON, base64 images) or gRPC.")
    flags.DEFINE_string("model_name", "repvgg_a0", "Model name in TF Serving's config.")
    flags.DEFINE_multi_string("image", None, "JPEG/PNG file(s) to classify.")
    flags.DEFINE_integer("top_k", 5, "Classes to print per image.")
    flags.mark_flag_as_required("image")
    app.run(lambda argv: sys.exit(main(argv)))
