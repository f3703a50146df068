"""This CPU's practical peak: the best GFLOP/s of a large matmul in fp32 and bf16, over the
libraries at hand (PyTorch's oneDNN/MKL, NumPy's BLAS, TensorFlow), same thread count.

One library is not enough: MKL, for one, takes slower code paths on AMD CPUs.
"""

import time


def _best_rate(matmul, size, seconds):
    matmul()  # warm-up
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        begin = time.perf_counter()
        matmul()
        best = max(best, 2 * size**3 / (time.perf_counter() - begin) / 1e9)
    return best


def _torch(dtype, size, threads):
    import torch

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    if dtype == "int8":
        return None
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a, b = (torch.randn(size, size, generator=generator).to(torch_dtype) for _ in range(2))
    return lambda: torch.matmul(a, b)


def _numpy(dtype, size, threads):
    import numpy as np

    if dtype != "fp32":
        return None
    rng = np.random.default_rng(0)
    a, b = (rng.normal(size=(size, size)).astype(np.float32) for _ in range(2))
    return lambda: a @ b


def _tensorflow(dtype, size, threads):
    import tensorflow as tf

    if dtype == "int8":
        return None
    tf_dtype = {"fp32": tf.float32, "bf16": tf.bfloat16}[dtype]
    a, b = (tf.cast(tf.random.stateless_normal((size, size), (0, i)), tf_dtype) for i in range(2))
    matmul = tf.function(lambda: tf.linalg.matmul(a, b))
    return lambda: matmul().numpy()


def _onnxruntime(dtype, size, threads):
    """int8: onnxruntime's MatMulInteger (uint8 x int8 -> int32, VNNI where the CPU has it),
    the kernel its quantized convolutions use."""
    if dtype != "int8":
        return None
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["c"])],
        "matmul_integer",
        [
            helper.make_tensor_value_info("a", TensorProto.UINT8, [size, size]),
            helper.make_tensor_value_info("b", TensorProto.INT8, [size, size]),
        ],
        [helper.make_tensor_value_info("c", TensorProto.INT32, [size, size])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(0)
    feed = {
        "a": rng.integers(0, 255, (size, size), dtype=np.uint8),
        "b": rng.integers(-127, 127, (size, size), dtype=np.int8),
    }
    return lambda: session.run(["c"], feed)


LIBRARIES = {
    "torch": _torch,
    "numpy": _numpy,
    "tensorflow": _tensorflow,
    "onnxruntime": _onnxruntime,
}


def measure(threads, quick=False):
    """{"fp32": GFLOP/s, "bf16": ..., "int8": GOP/s, "fp32_library": ..., "fp32_all": {...}, ...}."""
    size, seconds = (512, 0.2) if quick else (2048, 2.0)
    result = {}
    for dtype in ("fp32", "bf16", "int8"):
        rates = {}
        for name, make in LIBRARIES.items():
            try:
                matmul = make(dtype, size, threads)
            except ImportError:
                continue
            if matmul is not None:
                rates[name] = _best_rate(matmul, size, seconds)
        if rates:
            best = max(rates, key=rates.get)
            result[dtype], result[f"{dtype}_library"] = rates[best], best
            result[f"{dtype}_all"] = rates
    return result
