"""Results out: results.json (records), meta.json (machine, command, peak), results.md (table and
ratios), results.png (chart)."""

import json
import os
import sys

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


def _ok(records, **where):
    return [
        r
        for r in records
        if r.get("status") == "ok" and all(r.get(k) == v for k, v in where.items())
    ]


PEER_RUNTIMES = ("timm", "kimm")  # other implementations of RepVGG (PyTorch, Keras), not ours


def is_peer(runtime):
    return runtime.startswith(PEER_RUNTIMES)


def _speed(records, model, batch, runtime, precision="fp32"):
    found = _ok(records, model=model, batch=batch, runtime=runtime, precision=precision)
    return found[0]["images_per_s"] if found else None


def ratios(records, min_agreement=0.995):
    """The headline comparisons, per model and batch: list of (model, batch, what, value, detail)."""
    out = []
    models = sorted({r["model"] for r in _ok(records) if r["model"].startswith("RepVGG")})
    batches = sorted({r["batch"] for r in _ok(records)})
    for model in models:
        for batch in batches:
            train, deploy = (
                _speed(records, model, batch, name) for name in ("keras-train", "keras-deploy")
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
            kimm = _speed(records, model, batch, "kimm-reparam")
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
                r["runtime"]: r.get("peak_rss_mb") for r in _ok(records, model=model, batch=batch)
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
                for r in _ok(records, model=model, batch=batch, precision="fp32")
                if r["runtime"].startswith("timm-reparam")
            ]
            if not peers:
                continue
            peer = max(peers, key=lambda r: r["images_per_s"])
            ours = [r for r in _ok(records, model=model, batch=batch) if not is_peer(r["runtime"])]
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
                _speed(records, "RepVGG_A0", batch, name) or 0
                for name in ("timm-reparam", "timm-reparam-cl")
            ),
            default=0,
        )
        resnet = max(
            (
                r["images_per_s"]
                for r in _ok(records, model="ResNet-18", batch=batch, precision="fp32")
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
                for r in _ok(records, model="RepVGG_A0", batch=batch, precision="fp32")
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


# Chart: one panel per (model, batch); bars grouped by precision class, the peer's best marked.
PRECISION_CLASSES = (("fp32", ("fp32",)), ("bf16/fp16", ("bf16", "fp16")), ("int8", ("int8",)))
PRECISION_COLOURS = {"fp32": "#1f77b4", "bf16/fp16": "#e67e22", "int8": "#2ca02c"}
OTHER_COLOUR = "#8c564b"  # a precision outside the three classes
BASELINE_COLOUR = "#b3b3b3"
PEER_PREFIX = (
    "timm-reparam"  # timm's reparameterized RepVGG: the peer every runtime of ours is held against
)


def precision_class(precision):
    """fp32, bf16/fp16 or int8 (the class a reader compares within); any other precision is its own class."""
    for name, members in PRECISION_CLASSES:
        if precision in members:
            return name
    return precision


def _class_order(name):
    names = [n for n, _ in PRECISION_CLASSES]
    return (names.index(name), "") if name in names else (len(names), name)


def chart_bars(records, model, batch, baselines=()):
    """The bars of one panel, top to bottom, and the peer's best per precision class.

    Bars of `model` at `batch` (our runtimes and timm's RepVGG forms), plus the records of the `baselines`
    models at that batch, grouped by precision class (fp32, bf16/fp16, int8) and fastest first within a class.
    Returns (bars, peers): bars are dicts with label, value, group, kind ("ours", "timm", "baseline"), colour,
    ratio (ours / the peer's best of the same class, else None), peer (True on the bar that sets the mark) and
    record; peers maps a class to the fastest timm-reparam* record of the model in that class.
    """
    own = _ok(records, model=model, batch=batch)
    others = [r for name in baselines for r in _ok(records, model=name, batch=batch)]
    peers = {}
    for r in own:
        group = precision_class(r["precision"])
        if r["runtime"].startswith(PEER_PREFIX) and (
            group not in peers or r["images_per_s"] > peers[group]["images_per_s"]
        ):
            peers[group] = r
    bars = []
    for r in own + others:
        group = precision_class(r["precision"])
        kind = "baseline" if r["model"] != model else "timm" if is_peer(r["runtime"]) else "ours"
        label = r["runtime"] if kind != "baseline" else f"{r['model']} {r['runtime']}"
        if r["precision"] != group:
            label += f" {r['precision']}"
        peer = peers.get(group)
        bars.append(
            {
                "label": label,
                "value": r["images_per_s"],
                "group": group,
                "kind": kind,
                "record": r,
                "colour": BASELINE_COLOUR
                if kind == "baseline"
                else PRECISION_COLOURS.get(group, OTHER_COLOUR),
                "ratio": r["images_per_s"] / peer["images_per_s"]
                if kind == "ours" and peer
                else None,
                "peer": r is peer,
            }
        )
    bars.sort(key=lambda b: (_class_order(b["group"]), -b["value"]))
    return bars, peers


def _chart_models(records):
    """(subjects, baselines): RepVGG models get panels; the other models are baselines drawn in each panel."""
    models = list(dict.fromkeys(r["model"] for r in _ok(records)))
    subjects = [m for m in models if m.startswith("RepVGG")]
    return (subjects, [m for m in models if m not in subjects]) if subjects else (models, [])


def _number(value):
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _chart_title(records, meta):
    meta = meta or {}
    size = meta.get("image_size") or next(
        (r.get("image_size") for r in _ok(records) if r.get("image_size")), None
    )
    parts = [
        meta.get("machine"),
        f"{meta['threads']} threads" if meta.get("threads") else None,
        f"{size}x{size} images" if size else None,
    ]
    title = "Inference throughput (images/s, higher is better): " + ", ".join(p for p in parts if p)
    detail = "; ".join(
        p
        for p in (meta.get("date"), f"weights: {meta['weights']}" if meta.get("weights") else None)
        if p
    )
    return title, detail


def _panel_extent(bars):
    """Height of a panel in bar slots: one per bar, one header per precision class, a small gap between classes."""
    groups = len({b["group"] for b in bars})
    return len(bars) + groups + 0.4 * max(groups - 1, 0)


def _draw_panel(axis, bars, peers, min_agreement, extent):
    """Horizontal bars top to bottom, a header row per precision class, the peer's best as a dashed line."""
    positions, ticks, tick_labels, tick_colours, spans = [], [], [], [], {}
    y = 0.0
    for index, bar in enumerate(bars):
        if index == 0 or bar["group"] != bars[index - 1]["group"]:
            y += 0.4 if index else 0.0
            ticks.append(y)
            tick_labels.append(bar["group"])
            tick_colours.append(PRECISION_COLOURS.get(bar["group"], OTHER_COLOUR))
            spans[bar["group"]] = [y, y]
            y += 1.0
        positions.append(y)
        ticks.append(y)
        tick_labels.append(bar["label"])
        tick_colours.append("#555555" if bar["kind"] == "baseline" else "black")
        spans[bar["group"]][1] = y
        y += 1.0
    top = max(b["value"] for b in bars)
    label_box = {"facecolor": "white", "edgecolor": "none", "pad": 0.6, "alpha": 0.85}
    for position, bar in zip(positions, bars):
        timm = bar["kind"] == "timm"
        axis.barh(
            position,
            bar["value"],
            height=0.72,
            color="white" if timm else bar["colour"],
            edgecolor=bar["colour"],
            hatch="////" if timm else None,
            linewidth=1.0,
        )
        text = _number(bar["value"])
        if bar["ratio"] is not None:
            text += f"  ({bar['ratio']:.2f}x)"
        agreement = bar["record"].get("top1_agreement")
        if bar["kind"] == "ours" and agreement is not None and agreement < min_agreement:
            text += f"  top-1 agreement {agreement:.3f}"
        axis.text(
            bar["value"] + top * 0.008,
            position,
            text,
            va="center",
            fontsize=7.5,
            zorder=4,
            bbox=label_box,
            color="#555555" if bar["kind"] == "baseline" else "black",
            fontweight="bold" if bar["peer"] else "normal",
        )
    for group, (header, last) in spans.items():
        peer = peers.get(group)
        if peer is None:
            if any(b["kind"] == "ours" for b in bars if b["group"] == group):
                axis.text(
                    top * 0.008,
                    header,
                    f"no timm {group} to compare with",
                    va="center",
                    fontsize=7.5,
                    color="#333333",
                    style="italic",
                )
            continue
        axis.plot(
            [peer["images_per_s"]] * 2,
            [header + 0.1, last + 0.5],
            linestyle="--",
            linewidth=1.2,
            color="#333333",
            zorder=3,
        )
        axis.text(
            peer["images_per_s"] + top * 0.008,
            header,
            f"timm best {_number(peer['images_per_s'])}",
            va="center",
            fontsize=7.5,
            color="#333333",
            style="italic",
        )
    axis.set_yticks(ticks, tick_labels, fontsize=7.5)
    for label, colour in zip(axis.get_yticklabels(), tick_colours):
        label.set_color(colour)
        if colour not in ("black", "#555555"):
            label.set_fontweight("bold")
    axis.tick_params(axis="y", length=0)
    axis.set_ylim(
        max(y, extent) - 0.4, -0.6
    )  # the row's tallest panel sets the slots: equal bar heights
    axis.set_xlim(0, top * 1.3)
    axis.grid(axis="x", color="#e6e6e6", linewidth=0.8)
    axis.set_axisbelow(True)
    for side in ("top", "right"):
        axis.spines[side].set_visible(False)
    axis.tick_params(axis="x", labelsize=7.5)
    axis.set_xlabel("images/s (median over rounds)", fontsize=8)


def chart(records, path, meta=None, min_agreement=0.995):
    """results.png: a row of panels per RepVGG model, a panel per batch size, read at a glance.

    Each panel holds every runtime of the model plus the baselines (grey), grouped by precision class, with
    timm's best reparameterized RepVGG of each class as a dashed line and ours / that line beside each bar.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    subjects, baselines = _chart_models(records)
    batches = sorted({r["batch"] for r in _ok(records)})
    panels = {(m, b): chart_bars(records, m, b, baselines) for m in subjects for b in batches}
    if not panels:
        subjects, batches, panels = ["(no results)"], [None], {("(no results)", None): ([], {})}
    extents = [max(_panel_extent(panels[m, b][0]) for b in batches) for m in subjects]
    slots = [extent + 3 for extent in extents]  # + title and axis
    figure, axes = plt.subplots(
        len(subjects),
        len(batches),
        squeeze=False,
        figsize=(6.8 * len(batches) + 0.6, 0.2 * sum(slots) + 1.6),
        gridspec_kw={"height_ratios": slots},
    )
    for row, model in enumerate(subjects):
        for column, batch in enumerate(batches):
            axis = axes[row, column]
            bars, peers = panels[model, batch]
            if not bars:
                axis.set_axis_off()
                axis.text(
                    0.5, 0.5, "no results", ha="center", va="center", transform=axis.transAxes
                )
                continue
            _draw_panel(axis, bars, peers, min_agreement, extents[row])
            axis.set_title(f"{model}, batch {batch}", fontsize=10, fontweight="bold", loc="left")
    title, detail = _chart_title(records, meta)
    figure.suptitle(title + ("\n" + detail if detail else ""), fontsize=11)
    handles = [
        Patch(color=PRECISION_COLOURS[name], label=f"{name}, ours") for name, _ in PRECISION_CLASSES
    ]
    handles += [
        Patch(
            facecolor="white",
            edgecolor="#555555",
            hatch="////",
            label="peers: timm RepVGG (PyTorch), kimm RepVGG (Keras)",
        ),
        Line2D(
            [],
            [],
            color="#333333",
            linestyle="--",
            label="timm's best reparameterized RepVGG, same precision; (1.05x) = ours / that line",
        ),
    ]
    if baselines:
        handles.insert(
            -1, Patch(color=BASELINE_COLOUR, label="baselines: timm " + ", ".join(baselines))
        )
    figure.legend(
        handles=handles,
        loc="lower center",
        ncol=3,
        fontsize=8,
        frameon=False,
        bbox_to_anchor=(0.5, 0.25 / figure.get_figheight()),
    )
    legend_inches = 0.95
    skipped = [r for r in records if r.get("status") != "ok"]
    if skipped:
        note = "; ".join(
            f"{r['model']} {r['runtime']} {r['precision']}"
            + (f" ({r['reason'][:60]})" if r.get("reason") else "")
            for r in skipped
        )
        figure.text(
            0.5,
            0.06 / figure.get_figheight(),
            "not run: " + (note if len(note) < 400 else note[:400] + " ..."),
            ha="center",
            va="bottom",
            fontsize=7,
            color="#555555",
            wrap=True,
        )
    figure.tight_layout(rect=(0, legend_inches / figure.get_figheight(), 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(out_dir, records, meta):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(records, f, indent=1)
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(records, meta))
    chart(records, os.path.join(out_dir, "results.png"), meta)


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
    chart(records, os.path.join(out_dir, "results.png"), meta)


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
