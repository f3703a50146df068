"""results.png: the benchmark's records as a chart (matplotlib), one panel per (model, batch).

Bars are grouped by precision class (fp32, bf16/fp16, int8) with timm's best reparameterized RepVGG of
each class marked; bench.report computes the numbers and writes the other result files.
"""

from bench.records import is_peer, ok_records

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
    own = ok_records(records, model=model, batch=batch)
    others = [r for name in baselines for r in ok_records(records, model=name, batch=batch)]
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
    models = list(dict.fromkeys(r["model"] for r in ok_records(records)))
    subjects = [m for m in models if m.startswith("RepVGG")]
    return (subjects, [m for m in models if m not in subjects]) if subjects else (models, [])


def _number(value):
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _chart_title(records, meta):
    meta = meta or {}
    size = meta.get("image_size") or next(
        (r.get("image_size") for r in ok_records(records) if r.get("image_size")), None
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
    batches = sorted({r["batch"] for r in ok_records(records)})
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
