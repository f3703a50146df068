"""repvgg-keras: RepVGG for Keras 3, trained with branches, served without them."""

from setuptools import find_packages, setup

# tensorflow-serving-api (for the gRPC client and warm-up records) pins the full
# `tensorflow` wheel; `make install` adds it with --no-deps next to tensorflow-cpu.
EXPORT = [
    "tf2onnx>=1.17",
    "onnx>=1.16",
    "onnxruntime>=1.20",
    "ai-edge-litert>=2.0",
    "grpcio",
    "openvino>=2024.0",
]
TRAIN = ["tensorflow-datasets>=4.9.10", "importlib_resources", "tensorboard", "matplotlib"]

setup(
    name="repvgg-keras",
    version="0.1.0",
    description="RepVGG for Keras 3: three-branch training, exact fusion to a plain 3x3 conv stack",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["repvgg_keras*", "export*", "train*"]),
    package_data={"export": ["sample_images/*.jpg", "sample_images/LICENSE.md", "serving/*"]},
    install_requires=["keras>=3.15", "numpy", "absl-py", "safetensors"],
    extras_require={
        # TensorFlow is the main backend; pick the CPU wheel or the full (GPU-capable) one.
        "cpu": ["tensorflow-cpu>=2.21,<2.22"],
        "gpu": ["tensorflow>=2.21,<2.22"],
        "export": EXPORT,
        # Reading the authors' .pth checkpoints (timm's .safetensors need no torch).
        "torch": ["torch"],
        "train": TRAIN,
        "test": [
            "tensorflow-cpu>=2.21,<2.22",
            "pytest>=8",
            "pytest-xdist",
            "jax[cpu]",
            "ruff==0.17.6",
            "mypy>=1.11",  # tests/test_builders.py: a type checker sees the builders
        ]
        + EXPORT
        + TRAIN,
    },
)
