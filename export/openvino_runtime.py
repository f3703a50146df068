"""OpenVINO on the CPU: compile our ONNX file with the precision and threads asked for.

OpenVINO reads ONNX directly (no conversion step); bf16 runs natively on CPUs with
AVX512-BF16 or AMX, int8 from a QDQ-quantized ONNX file (export/onnx_int8.py).
"""

from export.precisions import PRECISIONS

# The precisions OpenVINO computes in, with their inference precision hints (export/precisions.py).
PRECISION_HINTS = {name: p.openvino_hint for name, p in PRECISIONS.items() if p.openvino_hint}


def capabilities():
    import openvino as ov

    return set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def supports(precision):
    """Whether this CPU runs `precision` natively (OpenVINO's own capability list)."""
    return PRECISIONS[precision].openvino_capability in capabilities()


def compile_model(path, precision="fp32", threads=None, latency=True):
    """A compiled CPU model; `threads` None lets OpenVINO use every core."""
    import openvino as ov

    if precision not in PRECISION_HINTS:
        raise ValueError(
            f"Unknown precision {precision!r}: choose one of {', '.join(PRECISION_HINTS)}."
        )
    config = {
        "INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision],
        "PERFORMANCE_HINT": "LATENCY" if latency else "THROUGHPUT",
    }
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return ov.Core().compile_model(ov.Core().read_model(path), "CPU", config)
