"""Benchmarks: `python -m bench` (every runtime side by side), `python -m bench.memory`."""
