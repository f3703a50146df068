"""The machine a result was measured on: its folder name and the library versions in meta.json."""

import os
import re

from repvgg_keras import cpu_features

LIBRARIES = (
    "tensorflow", "tensorflow-cpu", "keras", "onnxruntime", "openvino", "ai-edge-litert", "tf2onnx",
    "torch", "timm", "kimm", "numpy",
)  # fmt: skip


def library_versions():
    from importlib import metadata

    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def machine_slug():
    """A folder name for this machine's results: CPU vendor and model words plus the core count."""
    name = re.sub(
        r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*$|\d+-core", " ", cpu_features.cpu_name().lower()
    )
    words = re.findall(r"[a-z0-9]+", name)[:4] or ["cpu"]
    return "-".join(words) + f"-{os.cpu_count()}c"
