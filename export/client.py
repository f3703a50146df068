"""Client for a RepVGG model served by TensorFlow Serving, over REST or gRPC.

    python -m export.client --host localhost --model_name repvgg_a0 --image cat.jpg [--protocol grpc]

Sends the encoded image to the `serving_bytes` signature (decode, resize and normalise
happen in the server's graph) and prints the top classes. Every failure (a file that is
missing or not an image, a server that is down or answers an error, an answer that is not
the signature's output: not numbers, NaN, empty, probabilities that are no softmax) is one
`error:` line and exit status 1.

    python -m export.client --task segmentation --model_name seg --image street.jpg \
        [--mask_png street_mask.png] [--class_names road,car,person]

With --task segmentation (a model exported with `export.savedmodel --task segmentation`)
it prints, per image, the share of the mask each class covers, largest first, and with
--mask_png writes the mask in colour (PASCAL VOC's palette, at the model's input size).
"""

import http.client
import json
import numbers
import os
import struct
import sys
import urllib.error
import urllib.request
import zlib

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


def predict_grpc(host, port, model_name, encoded_images, timeout=30.0, output_filter=()):
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
        request = predict_requests.predict_request(
            model_name, "serving_bytes", encoded_images, output_filter=output_filter
        )
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


def _predict(paths, host, port, protocol, model_name, timeout, output_filter=()):
    """The server's outputs for the images at `paths`, by name; ClientError on any failure."""
    encoded = read_images(paths)
    try:
        if protocol == "rest":  # TF Serving's REST API returns every output
            return predict_rest(host, port, model_name, encoded, timeout=timeout)
        return predict_grpc(host, port, model_name, encoded, timeout, output_filter)
    except ClientError:
        raise
    except Exception as error:  # anything else still gets one line, not a traceback
        raise ClientError(
            f"request to {host}:{port} failed: {type(error).__name__}: {_first_line(error)}"
        ) from None


# The output each task reads and its axes: probabilities [N, classes], classes [N, H, W].
TASK_OUTPUTS = {"probabilities": 2, "classes": 3}
# How far a row of probabilities may sum from 1: the signatures' softmax is float32.
SUM_TOLERANCE = 1e-3


def _per_image(outputs, name, count, problem, wrong_task):
    """`outputs[name]` (one of TASK_OUTPUTS) if it holds one entry per image (`count`); else a
    ClientError: `problem(the shape received)`, then `wrong_task` where the server answered the
    other task's output instead."""
    got = np.asarray(outputs.get(name, []))
    if got.ndim == TASK_OUTPUTS[name] and len(got) == count:
        return got
    (other,) = set(TASK_OUTPUTS) - {name}
    answered_other = np.ndim(outputs.get(other, [])) == TASK_OUTPUTS[other]
    raise ClientError(problem(list(got.shape)) + (wrong_task if answered_other else ""))


def _shown(value):
    """A value as the answer held it: null for None, text quoted, at most 40 characters."""
    return "null" if value is None else repr(value.item() if hasattr(value, "item") else value)[:40]


def _check_answer(got, name, where):
    """`got` (output `name`, shape already checked) if it is what the serving signatures return,
    else ClientError saying what is wrong: values that are not numbers or not finite, no
    entries, `probabilities` that are not a softmax (each in [0, 1], a row summing to 1: the
    `serving_bytes` signature returns softmax(logits)), `classes` that are not class indexes."""
    if got.dtype.kind not in "iuf":
        numeric = lambda v: isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
        bad = [v for v in got.flat if not numeric(v)]
        if bad:
            raise ClientError(
                f"{where} answered {name} that are not numbers (found {_shown(bad[0])})."
            )
        got = got.astype(np.float64)  # numbers of mixed types
    if got.size == 0:
        raise ClientError(f"{where} answered empty {name} (shape {list(got.shape)}).")
    if not np.isfinite(got).all():
        bad = got[~np.isfinite(got)].flat[0]
        raise ClientError(f"{where} answered {name} holding {bad} (not a finite number).")
    if name == "probabilities":
        if got.min() < 0 or got.max() > 1:
            bad = got.min() if got.min() < 0 else got.max()
            raise ClientError(
                f"{where} answered probabilities outside [0, 1] (found {bad:g}): is it a "
                "RepVGG export, whose serving_bytes signature returns softmax probabilities?"
            )
        sums = got.sum(axis=-1)
        if np.abs(sums - 1).max() > SUM_TOLERANCE:
            bad = sums[np.argmax(np.abs(sums - 1))]
            raise ClientError(
                f"{where} answered probabilities whose row sums to {bad:g}, not 1: is it a "
                "RepVGG export, whose serving_bytes signature returns softmax probabilities?"
            )
    elif got.min() < 0 or (got.dtype.kind == "f" and (got != np.round(got)).any()):
        bad = got.min() if got.min() < 0 else got[got != np.round(got)].flat[0]
        raise ClientError(f"{where} answered classes holding {bad:g}, not a class index.")
    return got


def classify(paths, host, port, protocol, model_name, timeout):
    """Probabilities [len(paths), classes] from the server; ClientError on any failure."""
    outputs = _predict(paths, host, port, protocol, model_name, timeout)
    probabilities = _per_image(
        outputs,
        "probabilities",
        len(paths),
        lambda shape: (
            f"TF Serving at {host}:{port} answered without one row of probabilities per image "
            f"(got shape {shape}): is --model_name {model_name} a RepVGG export with a "
            "serving_bytes signature?"
        ),
        " It answered per-pixel classes: pass --task segmentation.",
    )
    where = f"TF Serving at {host}:{port} (--model_name {model_name})"
    return _check_answer(probabilities, "probabilities", where).astype(np.float64)


def segment(paths, host, port, protocol, model_name, timeout):
    """Class masks, int [len(paths), H, W], from a segmentation export's `classes` output."""
    outputs = _predict(paths, host, port, protocol, model_name, timeout, ["classes"])
    classes = _per_image(
        outputs,
        "classes",
        len(paths),
        lambda shape: (
            f"TF Serving at {host}:{port} answered without a mask of classes per image "
            f"(got shape {shape}): is --model_name {model_name} a segmentation export "
            "(export.savedmodel --task segmentation)?"
        ),
        " It answered class probabilities: drop --task segmentation.",
    )
    where = f"TF Serving at {host}:{port} (--model_name {model_name})"
    return _check_answer(classes, "classes", where).astype(np.int64)


def area_summary(mask, class_names=None, top_k=5):
    """One line: the mask's size and the share of it each class covers, largest first
    (`top_k` classes, the rest summed)."""
    from repvgg_keras import masks  # here: the package imports Keras, which classifying skips

    areas = masks.class_areas(mask, class_names)
    label = lambda index, name: f"class {index}" if class_names is None else f"{name} ({index})"
    parts = [f"{label(i, name)}: {share:.1%}" for i, name, _, share in areas[:top_k]]
    rest = sum(share for *_, share in areas[top_k:])
    if rest:
        parts.append(f"{len(areas) - top_k} other classes: {rest:.1%}")
    height, width = np.shape(mask)
    return f"{height}x{width} mask, " + ", ".join(parts)


def png_bytes(rgb):
    """A PNG file of uint8 RGB pixels [H, W, 3] (numpy and zlib only: no imaging library)."""
    rgb = np.ascontiguousarray(rgb, np.uint8)
    height, width, _ = rgb.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, -1)], axis=1)

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


def mask_paths(pattern, image_paths):
    """--mask_png for each image: `pattern` itself for one image; for several, `pattern` must
    hold {stem}, which becomes each image's file name without extension. Checked before any
    request is sent: the directory must exist and be writable."""
    if len(image_paths) > 1 and "{stem}" not in pattern:
        raise ClientError(
            f"--mask_png {pattern} names one file but {len(image_paths)} images were given: put "
            "{stem} in it (e.g. masks/{stem}.png), which becomes each image's name."
        )
    stems = [os.path.splitext(os.path.basename(path))[0] for path in image_paths]
    paths = [pattern.replace("{stem}", stem) for stem in stems]
    if len(set(paths)) != len(paths):
        raise ClientError(f"--mask_png {pattern} gives two images the same mask file.")
    for path in paths:
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK | os.X_OK):
            raise ClientError(
                f"cannot write --mask_png {path}: {directory} is not a writable directory."
            )
        if os.path.isdir(path):
            raise ClientError(f"cannot write --mask_png {path}: it is a directory.")
    return paths


def write_mask_png(path, mask):
    """`mask` in PASCAL VOC's colours (`repvgg_keras.masks.colorize`) as a PNG file at `path`."""
    from repvgg_keras import masks  # here, as in area_summary: the package imports Keras

    try:
        with open(path, "wb") as f:
            f.write(png_bytes(masks.colorize(mask)))
    except OSError as error:
        raise ClientError(f"cannot write {path}: {error.strerror or error}.") from None


def _run_segmentation(port):
    class_names = FLAGS.class_names.split(",") if FLAGS.class_names else None
    outputs = mask_paths(FLAGS.mask_png, FLAGS.image) if FLAGS.mask_png else None
    rows = segment(FLAGS.image, FLAGS.host, port, FLAGS.protocol, FLAGS.model_name, FLAGS.timeout)
    for index, (path, mask) in enumerate(zip(FLAGS.image, rows)):
        print(f"{path}: {area_summary(mask, class_names, FLAGS.top_k)}")
        if outputs:
            write_mask_png(outputs[index], mask)
            print(f"  mask written to {outputs[index]}")


def main(argv):
    del argv
    port = FLAGS.port or (8501 if FLAGS.protocol == "rest" else 8500)
    if FLAGS.task == "segmentation":
        try:
            _run_segmentation(port)
        except ClientError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        return 0
    try:
        if FLAGS.mask_png or FLAGS.class_names:
            flag = "--mask_png" if FLAGS.mask_png else "--class_names"
            raise ClientError(f"{flag} is for segmentation models: pass --task segmentation.")
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
    flags.DEFINE_enum(
        "task",
        "classification",
        ["classification", "segmentation"],
        "classification: print the top classes. segmentation: print each class's share of "
        "the mask (a model exported with --task segmentation).",
    )
    flags.DEFINE_string("host", "localhost", "TF Serving host.")
    flags.DEFINE_integer("port", None, "Port (default 8501 for REST, 8500 for gRPC).")
    flags.DEFINE_enum("protocol", "rest", ["rest", "grpc"], "REST (JSON, base64 images) or gRPC.")
    flags.DEFINE_string("model_name", "repvgg_a0", "Model name in TF Serving's config.")
    flags.DEFINE_multi_string("image", None, "JPEG/PNG file(s) to classify.")
    flags.DEFINE_integer("top_k", 5, "Classes to print per image.", lower_bound=1)
    flags.DEFINE_string(
        "mask_png",
        None,
        "Segmentation: write the colour mask to this PNG file (with several --image, a "
        "pattern holding {stem}, e.g. masks/{stem}.png).",
    )
    flags.DEFINE_string(
        "class_names", None, "Segmentation: class names, comma-separated, in class order."
    )
    flags.DEFINE_float("timeout", 30.0, "Seconds to wait for the server.", lower_bound=0.001)
    flags.mark_flag_as_required("image")
    app.run(lambda argv: sys.exit(main(argv)))
