"""Bad input the exporters and the serving client must refuse in one line: server answers that
are not the signatures' outputs, channel counts the preprocessing or the verification images
cannot serve, unknown tfds datasets, an --output that is a dangling symlink, a full disk."""

import contextlib
import dataclasses
import errno
import http.server
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from tests.helpers import REPO, cli_env, one_error_line, run_cli

SIZE = 32
CLASSES = 10

# ---------------------------------------------------------------- export.client: bad answers

GOOD_ROW = {"logits": [0.0, 2.0, 1.0], "probabilities": [0.1, 0.7, 0.2]}
# --model_name -> what the fake server answers for each image.
ANSWERS = {
    "good": GOOD_ROW,
    "strings": {"probabilities": ["a", "b", "c"]},
    "nulls": {"probabilities": [0.5, None, 0.5]},
    "nan": {"probabilities": [float("nan"), 0.5, 0.5]},
    "negative": {"probabilities": [-0.2, 0.7, 0.5]},
    "logits": {"probabilities": [0.9, 0.9, 0.9]},  # each in [0, 1], but no softmax
    "empty": {"probabilities": []},
    "booleans": {"probabilities": [True, False, False]},
    "seg_good": {"classes": [[0, 1], [1, 1]]},
    "seg_nan": {"classes": [[float("nan"), 2], [2, 2]]},
    "seg_null": {"classes": [[None, 2], [2, 2]]},
    "seg_strings": {"classes": [["a", "b"], ["c", "d"]]},
    "seg_negative": {"classes": [[-1, 2], [2, 2]]},
    "seg_fraction": {"classes": [[0.5, 2], [2, 2]]},
    "seg_empty": {"classes": [[], []]},
}


@pytest.fixture(scope="module")
def fake_server():
    """A REST endpoint on 127.0.0.1 answering like TF Serving with ANSWERS[model name]."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            name = self.path.removeprefix("/v1/models/").removesuffix(":predict")
            data = json.dumps({"predictions": [ANSWERS[name]] * len(body["instances"])}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    server.timeout = 10
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def jpeg(tmp_path_factory):
    path = tmp_path_factory.mktemp("client") / "cat.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0" + bytes(64))  # only its first bytes are checked locally
    return str(path)


@pytest.mark.parametrize(
    "model_name,expected",
    [
        ("strings", "probabilities that are not numbers (found 'a')"),
        ("nulls", "probabilities that are not numbers (found null)"),
        ("booleans", "probabilities that are not numbers (found True)"),
        ("nan", "probabilities holding nan (not a finite number)"),
        ("negative", "probabilities outside [0, 1] (found -0.2)"),
        ("logits", "probabilities whose row sums to 2.7, not 1"),
        ("empty", "empty probabilities (shape [2, 0])"),
        ("seg_nan", "classes holding nan (not a finite number)"),
        ("seg_null", "classes that are not numbers (found null)"),
        ("seg_strings", "classes that are not numbers (found 'a')"),
        ("seg_negative", "classes holding -1, not a class index"),
        ("seg_fraction", "classes holding 0.5, not a class index"),
        ("seg_empty", "empty classes (shape [2, 2, 0])"),
    ],
)
def test_client_refuses_an_answer_that_is_not_the_signatures_output(
    fake_server, jpeg, model_name, expected
):
    from export import client

    ask = client.segment if model_name.startswith("seg_") else client.classify
    with pytest.raises(client.ClientError) as raised:
        ask([jpeg, jpeg], "127.0.0.1", fake_server, "rest", model_name, 10)
    message = str(raised.value)
    assert f"TF Serving at 127.0.0.1:{fake_server} (--model_name {model_name})" in message
    assert expected in message and "\n" not in message


def test_client_good_answers_still_pass(fake_server, jpeg):
    from export import client

    rows = client.classify([jpeg], "127.0.0.1", fake_server, "rest", "good", 10)
    np.testing.assert_allclose(rows, [[0.1, 0.7, 0.2]])
    masks = client.segment([jpeg], "127.0.0.1", fake_server, "rest", "seg_good", 10)
    np.testing.assert_array_equal(masks, [[[0, 1], [1, 1]]])


def _client(*args):
    return subprocess.run(
        [sys.executable, "-m", "export.client", *args],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=REPO,
        timeout=120,
    )


@pytest.mark.parametrize(
    "task,model_name",
    [("classification", "strings"), ("classification", "negative"), ("segmentation", "seg_nan")],
)
def test_client_cli_reports_a_bad_answer_in_one_line(fake_server, jpeg, task, model_name):
    common = ["--image", jpeg, "--host", "127.0.0.1", "--port", str(fake_server)]
    result = _client(*common, "--timeout", "10", "--task", task, "--model_name", model_name)
    line = one_error_line(result)
    assert f"127.0.0.1:{fake_server} (--model_name {model_name})" in line
    assert result.stdout == ""  # nothing drawn from the bad answer ("class 2: 100%")


# ---------------------------------------------------------------- channels and image sources


def test_verification_images_of_other_channels_are_refused_naming_the_source():
    from export import images

    with pytest.raises(ValueError) as raised:
        images.load_images("fashion_mnist", 2, SIZE, SIZE, 2, what="--verify_images fashion_mnist")
    message = str(raised.value)
    assert message.startswith("--verify_images fashion_mnist holds 1-channel images")
    assert "takes 2 channels" in message and "'random'" in message
    with pytest.raises(ValueError, match="'sample' holds 3-channel images .* takes 4 channels"):
        images.load_images("sample", 2, SIZE, SIZE, 4)
    # The conversions that exist still work, and 'random' gives any channel count.
    assert images.load_images("fashion_mnist", 2, SIZE, SIZE, 3).shape == (2, SIZE, SIZE, 3)
    assert images.load_images("sample", 2, SIZE, SIZE, 1).shape == (2, SIZE, SIZE, 1)
    assert images.load_images("random", 2, SIZE, SIZE, 4).shape == (2, SIZE, SIZE, 4)


def test_an_unknown_tfds_dataset_is_one_line_with_close_matches():
    from export import images

    with pytest.raises(ValueError) as raised:
        images.load_images("tfds:nosuch:test", 2, SIZE, SIZE)
    assert str(raised.value) == (
        "image source 'tfds:nosuch:test': no tensorflow-datasets dataset named 'nosuch'."
    )
    with pytest.raises(ValueError) as raised:
        images.load_images("tfds:mnst:test", 2, SIZE, SIZE)
    assert "\n" not in str(raised.value) and "Did you mean mnist" in str(raised.value)


@pytest.mark.slow  # three exporter processes
def test_exporter_cli_channel_and_tfds_errors_say_what_to_pass(tmp_path):
    common = ["--image_size", SIZE, "--classes", CLASSES, "--output", tmp_path / "m.onnx"]
    line = one_error_line(run_cli("export.onnx", *common, "--channels", 4))
    assert "--preprocessing imagenet" in line and "--channels 4" in line
    assert "pass --preprocessing unit" in line
    line = one_error_line(
        run_cli(
            "export.onnx",
            *common,
            *("--channels", 2, "--preprocessing", "unit", "--verify_images", "fashion_mnist"),
        )
    )
    assert line.startswith("error: --verify_images fashion_mnist holds 1-channel images")
    assert "MatMul" not in line
    result = run_cli("export.onnx", *common, "--verify_images", "tfds:nosuch:test")
    line = one_error_line(result)
    assert "no tensorflow-datasets dataset named 'nosuch'" in line
    assert "abstract_reasoning" not in result.stderr  # tfds's list of every dataset
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- an --output that is a dangling link


def test_a_dangling_symlink_output_is_refused_before_work_starts(tmp_path):
    from export import atomic

    link = tmp_path / "model.onnx"
    link.symlink_to(tmp_path / "gone" / "model.onnx")
    wanted = f"{link} is a symlink to {tmp_path}/gone/model.onnx, which does not exist: remove it"
    for overwrite in (False, True):
        with pytest.raises(ValueError) as raised:
            atomic.check_output(str(link), overwrite)
        assert str(raised.value) == wanted + " or pass another --output."
    with pytest.raises(ValueError, match="is a symlink to"):
        with atomic.atomic_output(str(link)):
            pytest.fail("the export ran")
    # A dangling link above the output is refused the same way (makedirs would fail on it).
    (tmp_path / "out").symlink_to(tmp_path / "unmounted")
    with pytest.raises(ValueError, match=f"{tmp_path}/out is a symlink to .*unmounted"):
        atomic.check_output(str(tmp_path / "out" / "a" / "model.onnx"), flag="--export_dir")
    assert os.path.islink(link) and sorted(os.listdir(tmp_path)) == ["model.onnx", "out"]
    atomic.check_output(str(tmp_path / "fine.onnx"))  # a plain missing path still passes


@pytest.mark.slow  # one exporter process
def test_cli_refuses_a_dangling_symlink_output(tmp_path):
    link = tmp_path / "model.onnx"
    link.symlink_to("elsewhere.onnx")
    result = run_cli("export.onnx", "--image_size", SIZE, "--classes", CLASSES, "--output", link)
    line = one_error_line(result)
    assert line == (
        f"error: {link} is a symlink to elsewhere.onnx, which does not exist: remove it or "
        "pass another --output."
    )
    assert os.readlink(link) == "elsewhere.onnx" and os.listdir(tmp_path) == ["model.onnx"]


# ---------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 200 KiB tmpfs (needs root and mount); skipped where it cannot be mounted."""
    directory = tmp_path / "disk"
    directory.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(directory)],
        capture_output=True,
        timeout=30,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], timeout=30)


def _fill(directory):
    """Write into `directory` until the disk is full, as a converter would."""
    with contextlib.suppress(OSError), open(os.path.join(directory, "fill"), "wb") as f:
        for _ in range(1000):
            f.write(bytes(64 * 1024))
            f.flush()


@pytest.mark.parametrize("opaque", [False, True])
def test_a_full_disk_while_staging_names_the_output(small_disk, opaque):
    from export import atomic

    output = str(small_disk / "model_dir")

    def write(staged):
        os.makedirs(staged)
        if not opaque:  # Python's own write: OSError ENOSPC
            with open(os.path.join(staged, "model.bin"), "wb") as f:
                f.write(bytes(1 << 20))
        _fill(staged)
        raise RuntimeError("basic_ios::clear: iostream error")  # what OpenVINO says

    with pytest.raises(OSError) as raised:
        atomic.verified_export(output, write, None, None, None, precision="fp32")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == output
    assert str(raised.value) == f"[Errno 28] no space left on device: '{output}'"
    assert os.listdir(small_disk) == []  # the staging directory is gone, the space free again


def test_other_write_failures_are_not_called_a_full_disk(tmp_path):
    from export import atomic

    def write(staged):
        raise RuntimeError("basic_ios::clear: iostream error")

    with pytest.raises(RuntimeError, match="iostream error"):
        atomic.verified_export(str(tmp_path / "m"), write, None, None, None, precision="fp32")


CUSTOM_FLAGS = dict(num_blocks=(1, 1, 1, 1), width_multipliers=(0.25, 0.25))


@pytest.mark.slow  # converts to OpenVINO in a process
def test_openvino_on_a_full_disk_is_one_line_naming_the_path(tmp_path, small_disk):
    import repvgg_keras as rk

    spec = dataclasses.replace(rk.get_spec("RepVGG_A0"), name="RepVGG_A0_tiny", **CUSTOM_FLAGS)
    weights = str(tmp_path / "tiny.keras")  # 101k parameters: 400 KB, more than the disk holds
    rk.to_deploy(rk.RepVGG(spec, input_shape=(SIZE, SIZE, 3), classes=CLASSES)).save(weights)
    output = small_disk / "tiny_openvino"
    args = ["--weights", weights, "--output", output, "--verify_count", 2, "--precision", "fp32"]
    line = one_error_line(run_cli("export.openvino", *args))
    assert line == (
        f"error: no space left on device while writing {output}; nothing was written: free "
        "some space there or write elsewhere."
    )
    assert os.listdir(small_disk) == []


def test_a_folder_with_a_link_to_itself_counts_each_image_once(tmp_path):
    from export import images
    from tests.helpers import write_png

    for i in range(3):
        write_png(tmp_path / "photos" / f"{i}.png", seed=i)
    os.symlink(".", tmp_path / "photos" / "self")
    os.symlink(tmp_path / "photos" / "0.png", tmp_path / "photos" / "again.png")
    assert len(images.folder_images(str(tmp_path / "photos"))) == 3
