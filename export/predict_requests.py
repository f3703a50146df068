"""TF Serving request bodies (gRPC PredictRequest and REST JSON), built one way for all uses.

The client, the warm-up records and the tests use these functions, so what the tests run
through the SavedModel is exactly what the client sends.
"""

import base64
import json

import numpy as np


def predict_request(model_name, signature_name, images, version=None, output_filter=()):
    """A tensorflow_serving PredictRequest for `images` (uint8/float32 array or list of bytes).

    `output_filter`: the outputs to return (default all), e.g. ["classes"] so that a
    segmentation server does not send the per-pixel logits back.
    """
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = int(version)
    request.output_filter.extend(output_filter)
    request.inputs["images"].CopyFrom(_tensor_proto(signature_name, images))
    return request


def warmup_logs(model_name, pixels):
    """Serialized PredictionLog records (one per signature) for assets.extra/tf_serving_warmup_requests.

    Encoded here from TensorFlow's own TensorProto, so that exporting needs no tensorflow-serving-api
    (whose wheel pins the full TensorFlow); the tests check the bytes against that package's messages.
    """
    import tensorflow as tf

    pixels = np.asarray(pixels, np.uint8)
    encoded = [tf.io.encode_png(p).numpy() for p in pixels]
    bodies = {
        "serving_default": pixels.astype(np.float32) / 255.0,
        "serving_uint8": pixels,
        "serving_bytes": encoded,
    }
    for signature, body in bodies.items():
        yield _prediction_log(
            model_name, signature, _tensor_proto(signature, body).SerializeToString()
        )


def _tensor_proto(signature_name, images):
    import tensorflow as tf

    if signature_name == "serving_bytes":
        return tf.make_tensor_proto(list(images), dtype=tf.string)
    return tf.make_tensor_proto(np.asarray(images))


def _field(number, payload):
    """One length-delimited protobuf field: key, varint length, bytes."""
    if isinstance(payload, str):
        payload = payload.encode()
    header, length = bytearray([number << 3 | 2]), len(payload)
    while True:
        byte, length = length & 0x7F, length >> 7
        header.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(header) + payload


def _prediction_log(model_name, signature_name, tensor_bytes):
    """PredictionLog{predict_log: PredictLog{request: PredictRequest{model_spec, inputs["images"]}}}."""
    # ModelSpec.name, .signature_name
    model_spec = _field(1, model_name) + _field(3, signature_name)
    inputs_entry = _field(1, "images") + _field(2, tensor_bytes)  # map<string, TensorProto> entry
    request = _field(1, model_spec) + _field(2, inputs_entry)
    return _field(6, _field(1, request))  # PredictionLog.predict_log = 6; PredictLog.request = 1


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
