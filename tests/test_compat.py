"""The private (and TF1-only) TensorFlow and Keras API each package relies on lives in its compat
module (repvgg_keras/compat.py, export/compat.py, train/compat.py), written for tensorflow 2.21 and
keras 3.15. After an upgrade, a failure here names the private API that went away and the compat
function to update; no other file uses such API (checked below)."""

import glob
import importlib
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import REPO

WRITTEN_FOR = "tensorflow 2.21, keras 3.15"


def _attribute(path):
    """The object at "module:attribute.attribute", its module imported."""
    module, _, attributes = path.partition(":")
    value = importlib.import_module(module)
    for name in filter(None, attributes.split(".")):
        value = getattr(value, name)
    return value


def _conv_relu():
    """A functional model Input -> Conv2D -> ReLU, and its two layers."""
    inputs = keras.Input((4, 4, 2))
    conv, relu = keras.layers.Conv2D(2, 1, name="conv"), keras.layers.ReLU(name="relu")
    return keras.Model(inputs, relu(conv(inputs))), conv, relu


def _backup():
    return keras.callbacks.BackupAndRestore("unused_backup_dir")


def _model_attribute(name):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    return getattr(model, name)


# For each compat module, {its function (or Class.member): (the private API, how to touch it)}.
PRIVATE_API = {
    "repvgg_keras": {
        "is_graph_model": (
            "Functional._run_through_graph",
            lambda: _conv_relu()[0]._run_through_graph,
        ),
        "consumers": (
            "Operation._outbound_nodes, Node.operation",
            lambda: _conv_relu()[1]._outbound_nodes[0].operation,
        ),
    },
    "export": {
        "freeze": (
            "tensorflow.python.framework.convert_to_constants.convert_variables_to_constants_v2",
            lambda: _attribute(
                "tensorflow.python.framework.convert_to_constants:convert_variables_to_constants_v2"
            ),
        ),
        "silenced_deprecation": (
            "tensorflow.python.util.deprecation.silence",
            lambda: _attribute("tensorflow.python.util.deprecation:silence"),
        ),
        "copy_graph_def": ("tf.compat.v1.GraphDef", lambda: tf.compat.v1.GraphDef),
        "import_graph_def": (
            "tf.compat.v1.import_graph_def",
            lambda: tf.compat.v1.import_graph_def,
        ),
        "wrap_function": ("tf.compat.v1.wrap_function", lambda: tf.compat.v1.wrap_function),
        "registered_kernels": (
            "tensorflow.python.framework.kernels.get_registered_kernels_for_op",
            lambda: _attribute("tensorflow.python.framework.kernels:get_registered_kernels_for_op"),
        ),
        "onednn_enabled": (
            "tensorflow.python.util._pywrap_util_port.IsMklEnabled",
            lambda: _attribute("tensorflow.python.util._pywrap_util_port:IsMklEnabled"),
        ),
        "keras_tf_conv_replaced": (
            "keras.src.backend.tensorflow.nn.conv",
            lambda: _attribute("keras.src.backend.tensorflow.nn:conv"),
        ),
        "parents": (
            "Operation._inbound_nodes, Node.parent_nodes, Node.operation",
            lambda: _conv_relu()[2]._inbound_nodes[0].parent_nodes[0].operation,
        ),
    },
    "train": {
        "BackupAndRestore._save_model": (
            "keras.callbacks.BackupAndRestore._save_model",
            lambda: keras.callbacks.BackupAndRestore._save_model,
        ),
        "BackupAndRestore.weights_path": (
            "BackupAndRestore._weights_path",
            lambda: _backup()._weights_path,
        ),
        "BackupAndRestore.metadata_path": (
            "BackupAndRestore._training_metadata_path",
            lambda: _backup()._training_metadata_path,
        ),
        "BackupAndRestore.current_epoch": (
            "BackupAndRestore._current_epoch",
            lambda: _backup()._current_epoch,
        ),
        "initial_epoch": ("Model._initial_epoch", lambda: _model_attribute("_initial_epoch")),
        "set_initial_epoch": ("Model._initial_epoch", lambda: _model_attribute("_initial_epoch")),
        "symbolic_build": ("Model._symbolic_build", lambda: _model_attribute("_symbolic_build")),
    },
}


@pytest.mark.parametrize("package", sorted(PRIVATE_API))
def test_every_private_name_a_compat_module_uses_exists(package):
    compat = importlib.import_module(f"{package}.compat")
    gone = []
    for name, (private, touch) in PRIVATE_API[package].items():
        owner, _, member = name.partition(".")
        assert hasattr(getattr(compat, owner), member or "__call__"), f"{package}.compat.{name}?"
        try:
            touch()
        except (ImportError, AttributeError, IndexError) as error:
            gone.append(
                f"  {private} ({type(error).__name__}: {error}): update {package}.compat.{name}"
            )
    assert not gone, (
        f"{package}/compat.py was written for {WRITTEN_FOR}; with tensorflow {tf.__version__} "
        f"and keras {keras.__version__} this private API is gone:\n" + "\n".join(gone)
    )


@pytest.mark.parametrize("package", sorted(PRIVATE_API))
def test_every_name_of_a_compat_module_is_checked_here(package):
    compat = importlib.import_module(f"{package}.compat")
    defined = {
        name
        for name, value in vars(compat).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == compat.__name__
    }
    checked = {name.partition(".")[0] for name in PRIVATE_API[package]}
    assert defined == checked, (
        f"{package}/compat.py defines {sorted(defined)}; PRIVATE_API in tests/test_compat.py "
        f"checks {sorted(checked)}: name the private API each new function touches there"
    )


# Private API by module path or by name; each name below is wrapped by a compat function.
PRIVATE_USE = re.compile(
    r"keras\.src\b|tensorflow\.python\b|tf\.compat\.v1\b|_pywrap|\b(_run_through_graph|"
    r"_outbound_nodes|_inbound_nodes|_initial_epoch|_symbolic_build|_save_model|_weights_path|"
    r"_training_metadata_path|_current_epoch)\b"
)


def test_no_private_api_outside_the_compat_modules():
    found = []
    for package in ("repvgg_keras", "export", "train", "bench"):
        for path in sorted(glob.glob(os.path.join(REPO, package, "**", "*.py"), recursive=True)):
            if os.path.basename(path) == "compat.py":
                continue
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if PRIVATE_USE.search(line):
                        found.append(f"  {os.path.relpath(path, REPO)}:{number}: {line.strip()}")
    assert not found, (
        "private TensorFlow/Keras API outside the compat modules (move it into the package's "
        "compat.py, one function with a line on why and the version):\n" + "\n".join(found)
    )


# What each compat function does for its callers, on this TensorFlow and Keras.


def test_is_graph_model_tells_functional_from_sequential_and_subclassed():
    from repvgg_keras import compat

    class Subclassed(keras.Model):
        def call(self, x):
            return x

    sequential = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    assert compat.is_graph_model(_conv_relu()[0])
    assert not compat.is_graph_model(sequential)
    assert not compat.is_graph_model(Subclassed())


def test_export_graph_helpers_freeze_copy_and_rerun_a_function():
    from export import compat

    weight = tf.Variable([[2.0]])
    function = tf.function(lambda x: tf.matmul(x, weight))
    frozen = compat.freeze(function.get_concrete_function(tf.TensorSpec((None, 1), tf.float32)))
    graph_def = compat.copy_graph_def(frozen.graph.as_graph_def())
    assert not {node.op for node in graph_def.node} & {"VarHandleOp", "ReadVariableOp"}
    with compat.silenced_deprecation():
        wrapped = compat.wrap_function(lambda: compat.import_graph_def(graph_def))
    rerun = wrapped.prune(
        feeds=wrapped.graph.get_tensor_by_name(frozen.inputs[0].name),
        fetches=wrapped.graph.get_tensor_by_name(frozen.outputs[0].name),
    )
    assert float(rerun(tf.constant([[3.0]]))[0, 0]) == 6.0
    assert any(kernel.device_type == "CPU" for kernel in compat.registered_kernels("Conv2D"))
    assert isinstance(compat.onednn_enabled(), bool)


def test_keras_convolutions_go_through_the_replacement_while_inside():
    from export import compat

    calls = []

    def conv(original, *args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    x, kernel = np.ones((1, 3, 3, 2), np.float32), np.ones((1, 1, 2, 4), np.float32)
    with compat.keras_tf_conv_replaced(conv):
        inside = keras.ops.conv(x, kernel)
    keras.ops.conv(x, kernel)
    assert len(calls) == 1
    np.testing.assert_allclose(keras.ops.convert_to_numpy(inside), np.full((1, 3, 3, 4), 2.0))


def test_consumers_and_parents_follow_the_graph():
    from export import compat
    from repvgg_keras import compat as library_compat

    _, conv, relu = _conv_relu()
    assert library_compat.consumers(conv) == [relu]
    assert compat.parents(relu) == [conv]


def test_backup_hooks_save_through_save_backup_and_count_epochs():
    from train import compat

    class Recording(compat.BackupAndRestore):
        saves = 0

        def save_backup(self):
            self.saves += 1

    every_batch = Recording("unused_backup_dir", save_freq=1)
    every_batch.on_train_batch_end(0)
    assert every_batch.saves == 1
    every_epoch = Recording("unused_backup_dir", save_freq="epoch")
    every_epoch.on_epoch_end(2)
    assert (every_epoch.saves, every_epoch.current_epoch) == (1, 3)
    every_epoch.current_epoch = 5
    assert every_epoch.current_epoch == 5
    assert os.path.basename(every_epoch.weights_path) == "latest.weights.h5"
    assert os.path.basename(every_epoch.metadata_path) == "training_metadata.json"


def test_initial_epoch_and_symbolic_build():
    from train import compat

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    assert compat.initial_epoch(model) == 0
    compat.set_initial_epoch(model, 3)
    assert compat.initial_epoch(model) == 3
    data = tf.data.Dataset.from_tensors((tf.zeros((1, 2)), tf.zeros((1, 1))))
    compat.symbolic_build(model, data.element_spec)
    assert model.optimizer.built
