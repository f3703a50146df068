import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# The `slow` tier: `make test-fast` leaves it out, `make test` (CI) runs everything. Whole modules
# that convert, export, serve or train end to end, and single tests that run a subprocess, torch,
# JAX, every variant or a full 224px model.
SLOW_MODULES = {
    "test_export.py",
    "test_export_segmentation.py",
    "test_train.py",
    "test_jax_backend.py",
    "test_serving_inputs.py",
}
SLOW_TESTS = {
    "test_bench.py": (
        "test_quick_",
        "test_gpu_bench_",
        "test_int8_onnx_",
        "test_torch_multiply_adds",
    ),
    "test_checkpoints.py": (
        "test_parity_with_timm",
        "test_convert_checkpoint_cli",
        "test_imagenet_download",
    ),
    "test_bench_segmentation.py": ("test_small_run_",),
    "test_layering.py": ("test_library_imports",),
    "test_segmentation_metrics.py": ("test_replicas_sum_their_counts",),
    "test_train_segmentation.py": ("test_two_workers_killed_",),
    "test_models.py": ("test_full_size_224", "test_dilated_backbone", "test_d2se_defaults"),
    "test_sample_images.py": ("test_exporter_defaults",),
    "test_sources.py": ("test_cli_bad_input", "test_every_caller_reports"),
    "test_train_inputs.py": (
        "test_finished_run",
        "test_run_of_an_older",
        "test_empty_class_through",
        "test_cli_mistakes",
        "test_unknown_dataset",
    ),
}
# The every-variant parity test stays in the unit tier for the small variants only.
FAST_VARIANTS = ("RepVGG_A0]", "RepVGG_B1g4]")


def pytest_collection_modifyitems(items):
    for item in items:
        module = item.path.name
        name = item.name
        slow = module in SLOW_MODULES or name.startswith(SLOW_TESTS.get(module, ()))
        if name.startswith(("test_every_variant_fuses_exactly", "test_every_backbone_fuses")) and (
            not name.endswith(FAST_VARIANTS)
        ):
            slow = True
        if slow:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def images(rng, shape):
    return rng.normal(0.0, 1.0, shape).astype("float32")
