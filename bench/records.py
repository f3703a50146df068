"""Selecting benchmark records: what the tables (bench.report) and charts (bench.charts) share."""


def ok_records(records, **where):
    """The finished records (status ok) whose fields equal `where`."""
    return [
        r
        for r in records
        if r.get("status") == "ok" and all(r.get(k) == v for k, v in where.items())
    ]


PEER_RUNTIMES = ("timm", "kimm")  # other implementations of RepVGG (PyTorch, Keras), not ours


def is_peer(runtime):
    return runtime.startswith(PEER_RUNTIMES)
