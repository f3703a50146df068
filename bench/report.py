"""The benchmark's numbers: the table, the headline ratios, results.json (records), meta.json (machine,
command, peak) and results.md. results.png is drawn by bench.charts from the same records.

    python -m bench.report DIR [--png-only]    # redraw a results directory's results.md and results.png
"""

import json
import os
import sys

from bench import charts
from bench.records import is_peer, ok_records

COLUMNS = (
    "model",
    "runtime",
    "precision",
    "batch",
    "images_per_s",
    "min",
    "max",
    "latency_ms",
    "gflops",
    "peak_pct",
    "top1_agreement",
    "max_rel_diff",
    "peak_rss_mb",
)


def _fmt(value, digits=1):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def rows(records):
    for r in records:
        if r.get("status") != "ok":
            yield [
                r["model"],
                r["runtime"],
                r["precision"],
                _fmt(r.get("batch")),
                "skipped: " + r.get("reason", ""),
            ]
            continue
        yield [
            r["model"],
            r["runtime"],
            r["precision"],
            str(r["batch"]),
            _fmt(r["images_per_s"]),
            _fmt(r["images_per_s_min"]),
            _fmt(r["images_per_s_max"]),
            _fmt(r["latency_ms"], 2),
            _fmt(r.get("gflops")),
            _fmt(None if r.get("peak_fraction") is None else 100 * r["peak_fraction"]),
            _fmt(r.get("top1_agreement"), 4),
            _fmt(r.get("max_rel_diff"), 6)
            if r.get("max_rel_diff") is None
            else f"{r['max_rel_diff']:.1e}",
            _fmt(r.get("peak_rss_mb")),
        ]


def text_table(records):
    table = [list(COLUMNS)] + list(rows(records))
    widths = [max(len(row[i]) for row in table if i < len(row)) for i in range(len(COLUMNS))]
    lines = []
    for row in table:
        if len(row) < len(COLUMNS):  # a skipped runtime: one long cell
            lines.append(
                "  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4]
            )
        else:
            lines.append(
                "  ".join(
                    cell.rjust(w) if i >= 3 else cell.ljust(w)
                    for i, (cell, w) in enumerate(zip(row, widths))
                )
            )
    return "\n".join(lines)


def speed(records, **where):
    """images/s of the first finished record whose fields equal `where`, else None."""
    found = ok_records(records, **where)
    return found[0]["images_per_s"] if found else None


def ratios(records, min_agreement=0.995):
    """The headline comparisons, per model and batch: list of (model, batch, what, value, detail)."""
    out = []
    models = sorted({r["model"] for r in ok_records(records) if r["model"].startswith("RepVGG")})
    batches = sorted({r["batch"] for r in ok_records(records)})
    for model in models:
        for batch in batches:
            train, deploy = (
                speed(records, model=model, batch=batch, runtime=name, precision="fp32")
                for name in ("keras-train", "keras-deploy")
            )
            if train and deploy:
                out.append(
                    (
                        model,
                        batch,
                        "Keras deploy / training form speed",
                        deploy / train,
                        "tf.function both",
                    )
                )
            kimm = speed(
                records, model=model, batch=batch, runtime="kimm-reparam", precision="fp32"
            )
            if deploy and kimm:
                out.append(
                    (
                        model,
                        batch,
                        "Keras deploy form / kimm reparameterized",
                        deploy / kimm,
                        "same weights, tf.function both",
                    )
                )
            memory = {
                r["runtime"]: r.get("peak_rss_mb")
                for r in ok_records(records, model=model, batch=batch)
            }
            if memory.get("keras-train") and memory.get("keras-deploy"):
                out.append(
                    (
                        model,
                        batch,
                        "peak RSS deploy / training form",
                        memory["keras-deploy"] / memory["keras-train"],
                        "separate processes",
                    )
                )
            peers = [
                r
                for r in ok_records(records, model=model, batch=batch, precision="fp32")
                if r["runtime"].startswith("timm-reparam")
            ]
            if not peers:
                continue
            peer = max(peers, key=lambda r: r["images_per_s"])
            ours = [
                r
                for r in ok_records(records, model=model, batch=batch)
                if not is_peer(r["runtime"])
            ]
            best_fp32 = max(
                (r for r in ours if r["precision"] == "fp32"),
                key=lambda r: r["images_per_s"],
                default=None,
            )
            reduced = [
                r
                for r in ours
                if r["precision"] != "fp32" and (r.get("top1_agreement") or 0) >= min_agreement
            ]
            best_reduced = max(reduced, key=lambda r: r["images_per_s"], default=None)
            for label, best in (
                ("best fp32", best_fp32),
                (f"best reduced precision (agreement >= {min_agreement})", best_reduced),
            ):
                if best:
                    out.append(
                        (
                            model,
                            batch,
                            f"{label} / {peer['runtime']} fp32",
                            best["images_per_s"] / peer["images_per_s"],
                            f"{best['runtime']} {best['precision']}",
                        )
                    )
    for batch in batches:
        a0 = max(
            (
                speed(records, model="RepVGG_A0", batch=batch, runtime=name, precision="fp32") or 0
                for name in ("timm-reparam", "timm-reparam-cl")
            ),
            default=0,
        )
        resnet = max(
            (
                r["images_per_s"]
                for r in ok_records(records, model="ResNet-18", batch=batch, precision="fp32")
            ),
            default=None,
        )
        if a0 and resnet:
            out.append(
                (
                    "RepVGG_A0",
                    batch,
                    "RepVGG-A0 / ResNet-18 (timm, fp32, best layout each)",
                    a0 / resnet,
                    "PyTorch",
                )
            )
        ours = max(
            (
                r["images_per_s"]
                for r in ok_records(records, model="RepVGG_A0", batch=batch, precision="fp32")
                if not is_peer(r["runtime"])
            ),
            default=None,
        )
        if ours and resnet:
            out.append(
                ("RepVGG_A0", batch, "RepVGG-A0 ours best fp32 / ResNet-18 timm", ours / resnet, "")
            )
    return out


def markdown(records, meta):
    lines = [
        f"# Benchmark: {meta['date']}",
        "",
        f"Machine: {meta['machine']}; {meta['threads']} threads for every runtime; image size "
        f"{meta['image_size']}; weights: {meta['weights']}.",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"CPU peak (best square matmul of size {meta['peak_size']} over the libraries at hand): "
        + ", ".join(
            f"{k} {_fmt(meta['peak_gflops'][k])} GFLOP/s ({meta['peak_gflops'][k + '_library']})"
            for k in ("fp32", "bf16", "int8")
            if k in meta["peak_gflops"]
        )
        + ". `gflops`: 2 x the model's multiply-adds x images/s; `peak_pct`: that as a percentage of "
        "the peak of its precision (fp32 for fp16-weight runs, which XNNPACK computes in fp32 here).",
        "",
        "Images/s: median over interleaved rounds (min, max). `top1_agreement` and `max_rel_diff`: "
        f"against the Keras training form in fp32 on {meta['image_count']} real images ({meta['images']}).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows(records):
        lines.append("| " + " | ".join(row + [""] * (len(COLUMNS) - len(row))) + " |")
    found = ratios(records)
    if found:
        lines += [
            "",
            "## Ratios (same run)",
            "",
            "| model | batch | ratio | value | detail |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {m} | {b} | {what} | {value:.2f}x | {detail} |"
            for m, b, what, value, detail in found
        ]
    structure = meta.get("structure")
    if structure:
        lines += [
            "",
            "## Structure",
            "",
            "| model | form | layers | graph nodes | parameters |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {s['model']} | {s['form']} | {s['layers']} | {s['graph_nodes']} | {s['parameters']:,} |"
            for s in structure
        ]
    return "\n".join(lines) + "\n"


def write(out_dir, records, meta):
    """results.json, meta.json, results.md and results.png in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(records, f, indent=1)
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(records, meta))
    charts.chart(records, os.path.join(out_dir, "results.png"), meta)


def regenerate(out_dir, png_only=False):
    """Redraw results.png (and results.md unless png_only) from the results.json and meta.json already in out_dir."""
    loaded = []
    for name in ("results.json", "meta.json"):
        path = os.path.join(out_dir, name)
        try:
            with open(path) as f:
                loaded.append(json.load(f))
        except (OSError, ValueError) as error:
            raise ValueError(
                f"cannot read {path} ({error}); pass a directory written by `python -m bench`"
            ) from None
    records, meta = loaded
    if not png_only:
        with open(os.path.join(out_dir, "results.md"), "w") as f:
            f.write(markdown(records, meta))
    charts.chart(records, os.path.join(out_dir, "results.png"), meta)


def main(argv):
    """python -m bench.report DIR [--png-only]: redraw a results directory after the chart or table changes."""
    usage = "usage: python -m bench.report DIR [--png-only]"
    dirs = [a for a in argv if a != "--png-only"]
    if len(dirs) != 1 or dirs[0].startswith("-"):
        print(f"error: expected one results directory. {usage}", file=sys.stderr)
        return 1
    try:
        regenerate(dirs[0], png_only="--png-only" in argv)
    except (ValueError, KeyError) as error:
        print(
            f"error: {error if isinstance(error, ValueError) else f'missing field {error} in the results'}",
            file=sys.stderr,
        )
        return 1
    print(
        f"wrote {os.path.join(dirs[0], 'results.png')}"
        + ("" if "--png-only" in argv else " and results.md")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
