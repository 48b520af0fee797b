"""report.json and a self-contained report.html (PNGs embedded as base64, no external files).

Figures: mAP vs latency per candidate over fine-tuning with the budget, the floor and the
Pareto front; mAP and latency against steps; the selected candidate's sparsity and threshold
per layer; sensitivity curves. The latency table is rendered as an HTML table.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from avprune.prune_job.records import JSONDict
from perception.io import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    "th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee;margin:0.5em 0}"
    ".ok{color:#0a0}.bad{color:#a00}code{background:#f5f5f5;padding:1px 4px}"
)


def write_report_json(path: Path, doc: JSONDict) -> None:
    atomic_write_json(path, dict(doc))


def _png(fig: Figure) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _tradeoff_figure(doc: JSONDict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for cand in doc["candidates"]:
        pts = [(h["latency_ms"], h["map"]) for h in cand.get("history", []) if h.get("latency_ms") is not None]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, "-o", ms=3, alpha=0.7, label=f"{cand['candidate_id']} ({cand['importance']}) during fine-tune")
    for m in doc.get("measured", []):
        ax.plot(m["p50_ms"], m["map"], "*", ms=12, label=f"{m['candidate_id']} re-measured")
    dense = doc["dense"]
    ax.plot(dense["p50_ms"], dense["map"], "ks", ms=8, label="dense")
    front = doc.get("pareto", [])
    if front:
        ax.step([p["latency_ms"] for p in front], [p["map"] for p in front], "k--", where="post", lw=1, label="Pareto front")
    ax.axvline(doc["latency_budget_ms"], color="tab:red", lw=1, label="latency budget")
    ax.axhline(doc["map_floor"], color="tab:green", lw=1, label="mAP floor")
    ax.set_xlabel(f"latency p50 per batch, ms ({doc['runtime']})")
    ax.set_ylabel("mAP@[.5:.95]")
    ax.set_title("mAP vs latency per candidate")
    ax.legend(fontsize=7, loc="best")
    return _png(fig)


def _over_time_figure(doc: JSONDict) -> str:
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for cand in doc["candidates"]:
        hist = [h for h in cand.get("history", []) if h.get("step") is not None]
        if not hist:
            continue
        steps = [h["step"] for h in hist]
        a1.plot(steps, [h.get("map") for h in hist], "-o", ms=3, label=cand["candidate_id"])
        a2.plot(steps, [h.get("latency_ms") for h in hist], "-o", ms=3, label=f"{cand['candidate_id']} measured")
        if any(h.get("latency_pred_ms") is not None for h in hist):
            a2.plot(steps, [h.get("latency_pred_ms") for h in hist], ":", label=f"{cand['candidate_id']} predicted")
    a1.axhline(doc["map_floor"], color="tab:green", lw=1)
    a2.axhline(doc["latency_budget_ms"], color="tab:red", lw=1)
    a1.set(xlabel="fine-tune step", ylabel="mAP", title="mAP over fine-tuning")
    a2.set(xlabel="fine-tune step", ylabel="ms", title="latency over fine-tuning")
    a1.legend(fontsize=7)
    a2.legend(fontsize=7)
    return _png(fig)


def _layers_figure(layers: Mapping[str, JSONDict]) -> str:
    import matplotlib.pyplot as plt

    names = list(layers)
    fig, ax = plt.subplots(figsize=(10, max(2.5, 0.22 * len(names))))
    ax.barh(range(len(names)), [layers[n].get("sparsity", 0.0) for n in names], color="tab:blue")
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.invert_yaxis()
    ax.set(xlabel="sparsity (fraction removed)", xlim=(0, 1), title="selected candidate: sparsity per layer")
    return _png(fig)


def _channels_figure(channels: Mapping[str, JSONDict], shares: Mapping[str, float] | None = None) -> str | None:
    """Bar per layer: dense channels (grey) and kept channels (coloured by the layer's share of the
    dense model's predicted latency when the table gives it)."""
    import matplotlib.pyplot as plt

    names = [n for n, v in channels.items() if v.get("dense")]
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(10, max(2.5, 0.2 * len(names))))
    ys = range(len(names))
    ax.barh(ys, [channels[n]["dense"] for n in names], color="#ddd", label="dense")
    share = [float((shares or {}).get(n, 0.0)) for n in names]
    top = max(share, default=0.0) or 1.0
    colors = plt.get_cmap("viridis")([s / top for s in share]) if shares else "tab:blue"
    ax.barh(ys, [channels[n]["kept"] for n in names], color=colors, label="kept")
    ax.set_yticks(list(ys), names, fontsize=5)
    ax.invert_yaxis()
    title = "dense vs kept output channels per layer"
    if shares:
        title += " (kept bars coloured by the layer's latency share, dark = small)"
    ax.set(xlabel="output channels", title=title)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def _thresholds_figure(history: Sequence[JSONDict]) -> str | None:
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float]]] = {}
    for rec in history:
        for name, layer in (rec.get("layers") or {}).items():
            if isinstance(layer, Mapping) and layer.get("threshold") is not None:
                series.setdefault(name, []).append((rec.get("step", 0), layer["threshold"]))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(10, 3.6))
    for pts in list(series.values())[:40]:
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, lw=0.8)
    ax.set(xlabel="fine-tune step", ylabel="normalised importance threshold", title="threshold per layer over fine-tuning")
    return _png(fig)


def swaps_note(history: Sequence[JSONDict]) -> str:
    """One line on the selected candidate's mask churn: channels swapped at unchanged counts (a
    pruned channel outranking a kept one and taking its place), in all and after the last change of
    any layer's kept count. Empty for records written before swaps were counted."""
    per_update: list[tuple[int, int, tuple[int, ...]]] = []
    for rec in history:
        layers = [v for v in (rec.get("layers") or {}).values() if isinstance(v, Mapping)]
        if not layers or any(v.get("swapped") is None for v in layers):
            continue
        per_update.append((int(rec.get("step", 0)), sum(int(v["swapped"]) for v in layers),
                           tuple(int(v.get("channels") or 0) for v in layers)))
    if not per_update:
        return ""
    total = sum(n for _, n, _ in per_update)
    last_change = max((i for i in range(1, len(per_update)) if per_update[i][2] != per_update[i - 1][2]), default=0)
    after = sum(n for _, n, _ in per_update[last_change + 1:])
    since = per_update[last_change][0]
    return (f"<p>Mask updates swapped {total} channels in all ({after} after step {since}, the last change of a "
            f"kept count): a pruned channel that outranked a kept one took its place. "
            f"<code>pruning.stable_masks</code> keeps the kept channels while their count holds.</p>")


def _sensitivity_figure(sens: JSONDict) -> str | None:
    import matplotlib.pyplot as plt

    layers = sens.get("layers") or {}
    if not layers:
        return None
    loss = sens.get("metric") == "loss"  # values are minus the loss: plot the loss itself
    sign = -1.0 if loss else 1.0
    dense = sens["dense_value"] if "dense_value" in sens else sens["dense_map"]
    fig, ax = plt.subplots(figsize=(7.5, 3.6 if len(layers) <= 12 else 4.8))
    for name, rec in layers.items():
        curve = rec.get("curve", [])
        ys = [sign * dense, *[sign * c.get("value", c.get("map", 0.0)) for c in curve]]
        ax.plot([0.0, *[c["sparsity"] for c in curve]], ys, "-o", ms=3, label=name)
    ax.set(xlabel="sparsity of the layer alone", ylabel="detection loss (fixed images)" if loss else "mAP",
           title="per-layer sensitivity")
    ax.legend(fontsize=5 if len(layers) > 12 else 6, ncol=2 if len(layers) > 12 else 1)
    return _png(fig)


def _table(rows: Sequence[JSONDict], cols: Sequence[str]) -> str:
    def cell(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report_html(path: Path, doc: JSONDict, latency_table: JSONDict | None) -> None:
    """Render the job's report.json content as one self-contained HTML file."""
    dense, pruned = doc["dense"], doc["pruned"]
    summary = _table(
        [{"model": "dense", **dense, "speed-up": 1.0}, {"model": f"pruned ({doc['candidate_id']})", **pruned,
                                                        "speed-up": doc["speedup"]}],
        ["model", "map", "map50", "p50_ms", "p99_ms", "params", "gmacs", "speed-up"],
    )
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>avprune prune report</title><style>{_CSS}</style></head><body>",
        "<h1>avprune prune job</h1>",
        f"<p>Budget: p50 &le; <b>{doc['latency_budget_ms']:.2f} ms</b> per batch on <code>{html.escape(doc['runtime'])}</code> "
        f"({html.escape(doc['device'])}, {doc['threads']} threads), mAP &ge; <b>{doc['map_floor']:.3f}</b>. "
        + _aim_note(doc) +
        f"Selected <b>{html.escape(doc['candidate_id'])}</b>: {doc['speedup']:.2f}&times; faster.</p>",
        _infeasible_banner(doc),
        summary,
        frame_section(doc),
        "<h2>Candidates</h2>",
        _table(doc.get("measured", []), ["candidate_id", "map", "map50", "p50_ms", "p99_ms", "params", "gmacs"]),
        _table([{k: c.get(k) for k in ("candidate_id", "importance", "controller", "ramp", "status", "steps")}
                for c in doc["candidates"]], ["candidate_id", "importance", "controller", "ramp", "status", "steps"]),
        _tradeoff_figure(doc),
        _over_time_figure(doc),
        _floor_section(doc),
        "<h2>Pareto front</h2>",
        _table(doc.get("pareto", []), ["source", "latency_ms", "map", "map50"]),
    ]
    parts.append(_pruning_setup(doc))
    channels = doc.get("channels") or {}
    shares = {n: v["latency_share"] for n, v in channels.items() if v.get("latency_share") is not None}
    fig_ch = _channels_figure(channels, shares) if channels else None
    if fig_ch:
        parts += ["<h2>Channels per layer (selected model)</h2>", fig_ch]
    from avprune.prune_job.report_blocks import blocks_html

    parts.append(blocks_html(doc))  # which blocks went, when, their latency share and mAP cost (#14)
    from avprune.prune_job.gate_fold_stage import gate_fold_html

    parts.append(gate_fold_html(doc))  # pruning.fold_gates: which gates, what the fold cost and gave
    layers = doc.get("layers") or {}
    if layers:
        parts += ["<h2>Per layer (selected candidate)</h2>", _layers_figure(layers)]
        thr = _thresholds_figure(doc.get("pruner_history", []))
        if thr:
            parts.append(thr)
        parts.append(swaps_note(doc.get("pruner_history", [])))
        parts.append(_table([{"layer": n, **v} for n, v in layers.items()], ["layer", *sorted({k for v in layers.values() for k in v})]))
    sens = doc.get("sensitivity") or {}
    fig = _sensitivity_figure(sens)
    if fig:
        parts += ["<h2>Sensitivity</h2>", fig]
    if latency_table:
        entries = latency_table.get("entries") or latency_table.get("table") or []
        if isinstance(entries, Mapping):
            entries = [{"key": k, **(v if isinstance(v, Mapping) else {"ms": v})} for k, v in entries.items()]
        if entries:
            cols = sorted({k for e in entries for k in e})
            parts += [f"<h2>Latency table ({len(entries)} entries)</h2>", _table(entries[:200], cols)]
    parts.append(f"<h2>Job</h2><pre>{html.escape(json.dumps(doc.get('config', {}), indent=1))}</pre></body></html>")
    atomic_write_text(path, "\n".join(parts))


def _pruning_setup(doc: JSONDict) -> str:
    """The channel multiple and why, and how the budget was allocated over layers."""
    cm, al = doc.get("channel_multiple") or {}, doc.get("allocation") or {}
    if not cm and not al:
        return ""
    return (f"<h2>Pruning set-up</h2><p>Channel multiple: <b>{html.escape(str(cm.get('value')))}</b> "
            f"(configured <code>{html.escape(str(cm.get('configured')))}</code>): {html.escape(str(cm.get('reason', '')))}."
            f"<br>Allocation: <b>{html.escape(str(al.get('mode')))}</b>, controller "
            f"<code>{html.escape(str(al.get('controller')))}</code>, granularity "
            f"<code>{html.escape(str(al.get('granularity')))}</code>.{_reconstruction(doc)}</p>")


def _reconstruction(doc: JSONDict) -> str:
    """One sentence on ``pruning.reconstruct_images``: when the cut was re-solved and how close it got."""
    rc = doc.get("reconstruction")
    if not rc:
        return ""
    return (f"<br>Reconstruction: at step {int(rc['step'])} the {int(rc['layers'])} 1x1 convs reading pruned channels "
            f"were re-solved against the dense model ({rc['seconds']:.0f} s): mean relative output error "
            f"{rc['mean_error_before']:.3f} -> {rc['mean_error_after']:.3f}.")


def _floor_section(doc: JSONDict) -> str:
    """Which reference judged the mAP floor, and both curves: the dense shadow's mAP with the floor it
    set at each step, and each candidate's mAP with the floor its measurements met."""
    fl = doc.get("floor") or {}
    if not fl:
        return ""
    text = (f"<h2>mAP floor</h2><p>Judged against {html.escape(str(fl.get('description', '')))}.")
    if fl.get("reference") == "checkpoint":
        text += (" <code>search.shadow_dense</code> is off: a fine-tune moves the dense model too, so this floor "
                 "does not say what pruning cost against a dense model trained as long.")
    text += "</p>"
    shadow = fl.get("shadow")
    cands = {k: v for k, v in (fl.get("candidates") or {}).items() if v}
    if not shadow and not cands:
        return text
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    if shadow:
        steps = [p["step"] for p in shadow["curve"]]
        ax.plot(steps, [p["map"] for p in shadow["curve"]], "k-s", ms=4, label="dense shadow mAP")
        ax.plot([p["step"] for p in shadow["floor"]], [p["map_floor"] for p in shadow["floor"]], "k:",
                label=f"floor = shadow - {fl.get('max_map_drop')}")
    else:
        ax.axhline(fl["map_floor"], color="tab:green", lw=1, label=f"floor ({fl.get('reference')})")
    for cid, hist in cands.items():
        pts = [(h["step"], h["map"]) for h in hist if h.get("map") is not None]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, "-o", ms=3, alpha=0.8, label=f"{cid} mAP")
    ax.set(xlabel="fine-tune step", ylabel="mAP@[.5:.95]", title="candidates vs the floor's reference")
    ax.legend(fontsize=7, loc="best")
    rows = [{"model": "dense shadow" if shadow else "starting checkpoint",
             "final mAP": fl.get("reference_map"), "floor": fl.get("map_floor")}] if fl.get("reference_map") is not None else []
    return text + _png(fig) + (_table(rows, ["model", "final mAP", "floor"]) if rows else "")


def _aim_note(doc: JSONDict) -> str:
    """The trials' own latency target, when ``budget.latency_margin`` put it under the budget."""
    aim = doc.get("search_target_ms")
    if aim is None or aim >= doc["latency_budget_ms"]:
        return ""
    return (f"The trials aimed at {aim:.2f} ms ({1 - aim / doc['latency_budget_ms']:.0%} under the budget, "
            "<code>budget.latency_margin</code>); every model was judged at the budget. ")


def _infeasible_banner(doc: JSONDict) -> str:
    """A budget that was not met must be the first thing a reader sees, not a footnote."""
    if doc.get("feasible", True):
        return ""
    message = (doc.get("infeasible") or {}).get("message", "the budget was not met")
    return ("<p style='background:#fdecea;border:1px solid #d93025;padding:8px'><b>Budget NOT met.</b> "
            f"{html.escape(message)}. The model below is the best trade-off reached (best_tradeoff.*).</p>")


def frame_section(doc: JSONDict) -> str:
    """Graph and frame p50/p99 of dense and pruned from one paired run, and the per-stage split."""
    ft = doc.get("frame_timing")
    if not ft:
        return ""
    rows = [{"model": m, **{f"{stage} {q}": ft[m][stage][f"{q}_ms"] for stage in ("frame", "graph", "preprocess",
                                                                                  "decode_nms") for q in ("p50", "p99")}}
            for m in ("dense", "pruned")]
    fs = ft["frame_speedup"]
    spread = (doc.get("baseline_latency") or {}).get("spread") or {}
    note = (f" Baseline (the budget's dense p50): median of {spread['blocks']} blocks, {spread['min_ms']:.2f}-"
            f"{spread['max_ms']:.2f} ms." if spread else "")
    return (f"<h2>Whole frames, paired (ms)</h2><p>Frame speed-up <b>{fs['ratio']:.2f}&times;</b> "
            f"[{fs['low']:.2f}, {fs['high']:.2f}], graph speed-up {ft['graph_speedup']:.2f}&times; "
            f"({html.escape(ft['how'])}).{note}</p>"
            + _table(rows, list(rows[0])))
