"""results.png: panels grouped by precision class with timm's best reparameterized RepVGG marked (no pixel tests)."""

import json

from bench import charts, report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _record(runtime, precision, speed, model="RepVGG_A0", batch=1, **extra):
    return dict(
        model=model,
        runtime=runtime,
        precision=precision,
        batch=batch,
        images_per_s=speed,
        status="ok",
        **extra,
    )


RECORDS = [
    _record("keras-deploy", "fp32", 25.0),
    _record("onnxruntime-nchw", "fp32", 50.0),
    _record("timm-train", "fp32", 60.0),  # faster, but not reparameterized: never the peer
    _record("timm-reparam", "fp32", 20.0),
    _record("timm-reparam-cl", "fp32", 40.0),
    _record("openvino", "int8", 400.0, top1_agreement=0.99),
    _record("tflite", "fp16", 45.0),
    _record("openvino", "bf16", 120.0),
    _record("timm-reparam-cl", "bf16", 80.0),
    _record("timm-cl", "fp32", 16.0, model="ResNet-18"),
    _record("keras-deploy", "fp32", 99.0, batch=32),  # another panel
    {
        "model": "RepVGG_A0",
        "runtime": "openvino",
        "precision": "fp16",
        "batch": 1,
        "status": "skipped",
        "reason": "no fp16",
    },
]


def test_bars_are_grouped_by_precision_class_with_the_peer_marked():
    bars, peers = charts.chart_bars(RECORDS, "RepVGG_A0", 1, baselines=["ResNet-18"])
    assert [b["label"] for b in bars] == [
        "timm-train",
        "onnxruntime-nchw",
        "timm-reparam-cl",
        "keras-deploy",
        "timm-reparam",
        "ResNet-18 timm-cl",
        "openvino bf16",
        "timm-reparam-cl bf16",
        "tflite fp16",
        "openvino",
    ]
    assert [b["group"] for b in bars] == ["fp32"] * 6 + ["bf16/fp16"] * 3 + ["int8"]
    assert {g: r["runtime"] + " " + r["precision"] for g, r in peers.items()} == {
        "fp32": "timm-reparam-cl fp32",
        "bf16/fp16": "timm-reparam-cl bf16",
    }
    by_label = {b["label"]: b for b in bars}
    assert [label for label, b in by_label.items() if b["peer"]] == [
        "timm-reparam-cl",
        "timm-reparam-cl bf16",
    ]
    assert by_label["onnxruntime-nchw"]["ratio"] == 50 / 40
    assert by_label["openvino bf16"]["ratio"] == 120 / 80
    assert by_label["openvino"]["ratio"] is None  # no timm int8 to hold it against
    assert (
        by_label["timm-reparam"]["ratio"] is None and by_label["ResNet-18 timm-cl"]["ratio"] is None
    )
    assert {b["kind"] for b in bars if b["label"].startswith("timm")} == {"timm"}
    assert by_label["ResNet-18 timm-cl"]["kind"] == "baseline"
    assert by_label["ResNet-18 timm-cl"]["colour"] == charts.BASELINE_COLOUR
    colours = {b["group"]: b["colour"] for b in bars if b["kind"] == "ours"}
    assert len(set(colours.values())) == 3 and charts.BASELINE_COLOUR not in colours.values()


def test_chart_and_cli_write_a_png(tmp_path, capsys):
    meta = {
        "machine": "test machine",
        "threads": 2,
        "image_size": 32,
        "date": "2026-01-01",
        "weights": "random",
    }
    path = tmp_path / "chart.png"
    charts.chart(RECORDS, str(path), meta)
    assert path.read_bytes()[:8] == PNG_SIGNATURE

    (tmp_path / "results.json").write_text(json.dumps(RECORDS))
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert report.main([str(tmp_path), "--png-only"]) == 0
    assert (tmp_path / "results.png").read_bytes()[:8] == PNG_SIGNATURE
    assert not (tmp_path / "results.md").exists()

    assert report.main([str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "results.json" in err and "Traceback" not in err
