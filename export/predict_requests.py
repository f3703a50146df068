"""TF Serving request bodies (gRPC PredictRequest and REST JSON), built one way for all uses.

The client, the warm-up records and the tests use these functions, so what the tests run
through the SavedModel is exactly what the client sends.
"""

import base64
import json

import numpy as np


def predict_request(model_name, signature_name, images, version=None):
    """A tensorflow_serving PredictRequest for `images` (uint8/float32 array or list of bytes)."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = int(version)
    if signature_name == "serving_bytes":
        tensor = tf.make_tensor_proto(list(images), dtype=tf.string)
    else:
        tensor = tf.make_tensor_proto(np.asarray(images))
    request.inputs["images"].CopyFrom(tensor)
    return request


def warmup_logs(model_name, pixels):
    """PredictionLog records (one per signature) for assets.extra/tf_serving_warmup_requests."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    pixels = np.asarray(pixels, np.uint8)
    encoded = [tf.io.encode_png(p).numpy() for p in pixels]
    bodies = {
        "serving_default": pixels.astype(np.float32) / 255.0,
        "serving_uint8": pixels,
        "serving_bytes": encoded,
    }
    for signature, body in bodies.items():
        request = predict_request(model_name, signature, body)
        yield prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request)
        )


def rest_body(signature_name, images):
    """JSON body for POST /v1/models/<name>:predict (row format; bytes as {"b64": ...})."""
    if signature_name == "serving_bytes":
        instances = [{"b64": base64.b64encode(b).decode("ascii")} for b in images]
    else:
        instances = np.asarray(images).tolist()
    return json.dumps({"signature_name": signature_name, "instances": instances})


def parse_rest_response(text):
    """{'predictions': [{'logits': [...], 'probabilities': [...]}, ...]} -> dict of arrays."""
    predictions = json.loads(text)["predictions"]
    if isinstance(predictions[0], dict):
        return {k: np.asarray([p[k] for p in predictions]) for k in predictions[0]}
    return {"logits": np.asarray(predictions)}


def parse_predict_response(response):
    import tensorflow as tf

    return {key: tf.make_ndarray(proto) for key, proto in response.outputs.items()}
