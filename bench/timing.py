"""Interleaved timing: every case runs once per round, rounds repeat, medians are reported.

Interleaving spreads a noisy neighbour's load over all cases instead of one; each
timed chunk runs enough calls to last `chunk_seconds`, after warm-up calls.
"""

import dataclasses
import statistics
import time
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass
class Case:
    key: tuple
    predict: Callable
    batch: np.ndarray
    calls: int = 1
    throughputs: list[float] = dataclasses.field(default_factory=list)  # images/s per round

    def warm_up(self, chunk_seconds, warmup_calls=2):
        for _ in range(warmup_calls):
            self.predict(self.batch)
        begin = time.perf_counter()
        self.predict(self.batch)
        elapsed = time.perf_counter() - begin
        self.calls = max(1, int(round(chunk_seconds / max(elapsed, 1e-6))))

    def run_chunk(self):
        begin = time.perf_counter()
        for _ in range(self.calls):
            self.predict(self.batch)
        elapsed = time.perf_counter() - begin
        self.throughputs.append(len(self.batch) * self.calls / elapsed)

    def summary(self):
        values = self.throughputs
        median = statistics.median(values)
        return {
            "images_per_s": median,
            "images_per_s_min": min(values),
            "images_per_s_max": max(values),
            "latency_ms": 1000.0 * len(self.batch) / median,
            "rounds": len(values),
            "calls_per_round": self.calls,
        }


def use_threads(threads):
    """Give every runtime in this process `threads` threads.

    TensorFlow: `threads` for each op's own work (intra-op) and up to `threads` ops at once
    (inter-op), which is TensorFlow's and TF Serving's default on a machine with that many
    cores; ops that do not depend on each other (the per-group convolutions of a split grouped
    block, a PSPNet's pyramid branches) then run side by side, each still on the shared intra-op
    pool. PyTorch: `threads` intra-op threads (it runs one op at a time)."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass


def measure(cases, rounds, chunk_seconds, progress=print):
    for case in cases:
        case.warm_up(chunk_seconds)
    for round_index in range(rounds):
        order = cases[round_index % len(cases) :] + cases[: round_index % len(cases)]  # rotate
        for case in order:
            case.run_chunk()
        progress(f"  round {round_index + 1}/{rounds} done")
    return cases
