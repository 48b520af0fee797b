"""The validation report as one self-contained HTML page (no scripts, no external files).

Built with :mod:`deploy.html_kit` (charts are matplotlib PNGs and sample frames JPEGs, embedded as
``data:`` URIs). Everything is drawn from the report dict alone (plus the sample frames, which
JSON does not carry), so a page can be re-rendered from ``report.json``.

Sections: verdict banner; paired speed-up (two models); summary table (per stream and overall,
per model); latency timeline per stream with the budget line, late and dropped frames marked;
latency histogram + CDF; per-stage breakdown; sample frames with detections (models side by side);
streams, models and environment.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deploy import html_kit as hk
from deploy.html_kit import Raw, esc, fmt
from deploy.report_video import draw_detections
from deploy.validation import Outcome, SampleFrame

MODEL_COLOURS = ("#1f77b4", "#ff7f0e")  # candidate, reference
STAGE_ORDER = ("queue", "decode", "preprocess", "inference", "postprocess")
STAGE_COLOURS = ("#bbbbbb", "#8c564b", "#2ca02c", "#1f77b4", "#9467bd")


def write_report(outcome: Outcome, out_dir: str | Path) -> tuple[Path, Path]:
    """``report.json`` and ``report.html`` in ``out_dir``, each written atomically."""
    from perception.io import atomic_write_json, atomic_write_text

    out_dir = Path(out_dir)
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    atomic_write_json(json_path, outcome.report)
    atomic_write_text(html_path, render(outcome.report, outcome.samples))
    return json_path, html_path


def render(report: dict[str, Any], samples: Sequence[SampleFrame] = ()) -> str:
    """The full page for a report dict from :func:`deploy.validation.build_report`."""
    cfg, models = report["config"], report["models"]
    v = report["verdict"]
    title = f"avprune validate: {'PASS' if v['passed'] else 'FAIL'} ({models[0]['label']})"
    parts: list[str] = [
        Raw(f'<p class="muted">budget <b>{cfg["budget_ms"]:g} ms</b> · mode <b>{esc(cfg["mode"])}</b> · '
            f'policy <b>{esc(cfg["drop_policy"])}</b> · warm-up {_warmup_text(cfg)} · fail on '
            f'<code>{esc(", ".join(cfg["fail_on"]))}</code> · {esc(report["created_utc"])}</p>'),
        _verdict_block(report),
    ]
    if report.get("paired"):
        parts.append(hk.section("Paired speed-up", _paired_block(report)))
    parts += [
        hk.section("Summary", _summary_table(report), hk.paragraph(
            "Latency = completion − arrival (queueing included in realtime mode). A frame is late when its "
            "latency exceeds the budget; dropped frames were never processed. Miss rate = (late + dropped) / "
            "offered. Percentiles: numpy's linear method (Hyndman & Fan type 7); warm-up frames are excluded.")),
        hk.section("Latency timeline", *[
            Raw(f"<h3>{esc(stream['spec'])}</h3>") + hk.png(_timeline_png(report, si), f"latency timeline of stream {si}",
                                                           ident="timeline" if si == 0 else f"timeline-{si}")
            for si, stream in enumerate(report["streams"])]),
        hk.section("Latency distribution", hk.png(_distribution_png(report), "histogram and CDF", ident="distribution")),
        hk.section("Per-stage breakdown", hk.png(_stages_png(report), "per-stage breakdown", ident="stages"),
                   _stages_table(report)),
    ]
    if samples:
        parts.append(hk.section("Sample frames", _samples_block(report, samples)))
    parts += [hk.section("Streams", _streams_table(report)), hk.section("Models and environment", _env_block(report))]
    return hk.page(title, parts, heading=f"Real-time validation of {models[0]['label']}")


# ----------------------------------------------------------------------------- blocks


def _warmup_text(cfg: dict) -> str:
    if cfg.get("warmup_s"):
        return f"{cfg['warmup_s']:g} s"
    return f"{cfg.get('warmup_frames', 0)} frames"


def _verdict_block(report: dict) -> str:
    v = report["verdict"]
    label = report["models"][0]["label"]
    head = f"PASS: {label} meets the budget" if v["passed"] else f"FAIL: {label} violates the budget"
    out = hk.banner(head, passed=v["passed"], reasons=v["reasons"])
    if len(report["overall"]) > 1:
        rv = report["overall"][1]["verdict"]
        out += hk.paragraph(f"Reference {report['models'][1]['label']} (not gating): {'PASS' if rv['passed'] else 'FAIL'}")
    return Raw(out)


def _paired_block(report: dict) -> str:
    p = report["paired"]
    cand, ref = p["candidate"], p["reference"]
    head = (f"{cand} is {p['speedup']:.2f}x as fast as {ref} per frame (p50, paired), "
            f"{100 * p['confidence']:.0f}% interval {p['speedup_low']:.2f}–{p['speedup_high']:.2f}x")
    rows = []
    for name in (cand, ref):
        s, st = p["summaries"][name], p["stages"].get(name, {})
        rows.append([name, s["p50_ms"], s["p90_ms"], s["p99_ms"], s["mean_ms"],
                     *(st.get(k, {}).get("p50_ms") for k in ("preprocess", "graph", "postprocess"))])
    parts = [hk.banner(head, passed=None),
             hk.table(["model", "p50 ms", "p90 ms", "p99 ms", "mean ms", "preprocess p50", "graph p50",
                       "decode+NMS p50"], rows)]
    parts += [hk.note(n) for n in p.get("notes", [])]
    parts.append(hk.paragraph(
        f"Both models ran on the same {p['frames']} decoded frames, {p.get('rounds', p['blocks'])} rounds, "
        "alternating frame by frame (order rotated every frame; back to back, no pacing; stream decoding "
        "excluded), so drift on a shared machine hits both alike. Speed-up = reference p50 / candidate p50; the "
        "interval is a seeded bootstrap over the alternating pairs. The realtime replay above is unpaired (one "
        "model after the other)."))
    return Raw("\n".join(parts))


def _summary_table(report: dict) -> str:
    header = ("model", "stream", "offered", "processed", "dropped", "late", "miss %", "p50", "p90", "p99", "p99.9",
              "max", "mean", "jitter", "FPS", "verdict")
    rows, classes = [], []

    def row(model: dict, where: str, stats: dict, v: dict, cls: str | None = None) -> None:
        rows.append([model["label"], where, stats["offered"], stats["processed"], stats["dropped"], stats["late"],
                     fmt(100 * stats["miss_ratio"], 1), stats["p50_ms"], stats["p90_ms"], stats["p99_ms"],
                     stats["p99_9_ms"], stats["max_ms"], stats["mean_ms"], stats["jitter_ms"],
                     fmt(stats["sustained_fps"], 1), hk.tag(v["passed"])])
        classes.append(cls)

    for overall in report["overall"]:
        model = report["models"][overall["model"]]
        for res in report["results"]:
            if res["model"] == overall["model"]:
                row(model, _short(report["streams"][res["stream"]]["spec"]), res["stats"], res["verdict"])
        row(model, "all streams", overall["stats"], overall["verdict"], "overall")
    return Raw(hk.table(header, rows, left=2, row_classes=classes)
               + hk.paragraph("Latencies in ms; FPS = processed frames per second sustained."))


def _short(spec: str, width: int = 60) -> str:
    return spec if len(spec) <= width else "…" + spec[-(width - 1):]


def _stages_table(report: dict) -> str:
    cols = (*STAGE_ORDER, "end_to_end")
    rows = []
    for overall in report["overall"]:
        stages = overall["stages"]
        for stat in ("mean_ms", "p50_ms", "p99_ms"):
            rows.append([report["models"][overall["model"]]["label"], stat[:-3],
                         *(stages.get(s, {}).get(stat) for s in cols)])
    return hk.table(["model", "stat", *cols], rows)


def _streams_table(report: dict) -> str:
    rows = []
    for si, s in enumerate(report["streams"]):
        fails = s["decode_failures"]
        detail = ", ".join(f"#{f['frame_id']}" for f in fails[:20]) + (" …" if len(fails) > 20 else "")
        notes = "; ".join(s.get("notes", []))
        if s.get("clamped_timestamps"):
            notes += f"{'; ' if notes else ''}{s['clamped_timestamps']} timestamps stepped backwards (clamped)"
        rows.append([si, s["spec"], s["kind"], s["frames_read"], f"{len(fails)}" + (f" ({detail})" if fails else ""),
                     notes])
    return hk.table(["#", "stream", "kind", "frames read", "decode failures", "notes"], rows, left=3)


def _env_block(report: dict) -> str:
    rows = []
    for m in report["models"]:
        rt = m["runtime"]
        rows.append([m["path"], m["role"], rt["backend"], rt["device"], rt["precision"], rt["version"],
                     Raw(f"<code>{esc((m['sha256'] or '–')[:16])}</code>")])
    env = report["environment"]
    libs = ", ".join(f"{k} {v}" for k, v in env["libraries"].items())
    return Raw(hk.table(["model", "role", "backend", "device", "precision", "version", "sha256"], rows, left=7)
               + Raw(f"<p class='muted'>CPU: {esc(env['cpu'])} ({env['logical_cpus']} logical) · "
                     f"{esc(env['platform'])} · Python {esc(env['python'])}<br>{esc(libs)}</p>"))


def _samples_block(report: dict, samples: Sequence[SampleFrame]) -> str:
    labels = [m["label"] for m in report["models"]]
    out = ['<div class="samples">']
    for sample in samples:
        tiles = []
        for mi, dets in enumerate(sample.detections):
            drawn = draw_detections(sample.image, dets)
            latency = _frame_latency(report, mi, sample.stream, sample.frame_id)
            width = min(max(drawn.shape[1], 320), 640)  # small frames are scaled up to be legible
            tiles.append(f"<figure>{hk.jpeg(drawn, f'frame {sample.frame_id}', width=width)}"
                         f"<figcaption>{esc(labels[mi])}: {len(dets.above(0.3))} boxes ≥ 0.3 · {esc(latency)}"
                         "</figcaption></figure>")
        out.append(f'<div><div class="muted">stream {sample.stream} frame {sample.frame_id}</div>'
                   f'<div class="pair">{"".join(tiles)}</div></div>')
    out.append("</div>")
    return Raw("\n".join(out))


def _frame_latency(report: dict, model: int, stream: int, frame_id: int) -> str:
    for res in report["results"]:
        if res["model"] == model and res["stream"] == stream:
            cols = res["frames"]
            for i, fid in enumerate(cols["frame_id"]):
                if fid == frame_id:
                    lat = cols["latency_ms"][i]
                    return cols["status"][i] if lat is None else f"{lat:.1f} ms"
    return "not played"


# ----------------------------------------------------------------------------- charts


def _measured(res: dict) -> dict[str, np.ndarray]:
    cols = res["frames"]
    keep = ~np.array(cols["warmup"], dtype=bool)
    return {
        "t": np.array(cols["arrival_ms"], dtype=float)[keep] / 1e3,
        "lat": np.array([np.nan if v is None else v for v in cols["latency_ms"]], dtype=float)[keep],
        "status": np.array(cols["status"])[keep],
    }


def _timeline_png(report: dict, stream: int) -> bytes:
    budget = report["config"]["budget_ms"]
    fig, ax = hk.figure(12, 3.6)
    for res in (r for r in report["results"] if r["stream"] == stream):
        m = _measured(res)
        colour, label = MODEL_COLOURS[res["model"] % 2], report["models"][res["model"]]["label"]
        ok = m["status"] == "processed"
        ax.plot(m["t"][ok], m["lat"][ok], lw=0.9, marker=".", ms=3, color=colour, label=label)
        late = ok & (m["lat"] > budget)
        ax.scatter(m["t"][late], m["lat"][late], s=18, marker="x", color="#d62728", zorder=3)
        dropped = m["status"] == "dropped"
        if dropped.any():  # ticks along the bottom edge, whatever the latency scale
            ax.plot(m["t"][dropped], np.full(dropped.sum(), 0.03 + 0.05 * (res["model"] % 2)), "|", ms=9,
                    mew=1.5, color=colour, transform=ax.get_xaxis_transform(),
                    label=f"{label}: dropped ({int(dropped.sum())})")
    ax.axhline(budget, color="#d62728", ls="--", lw=1.2, label=f"budget {budget:g} ms")
    ax.set_xlabel("stream time (s)")
    ax.set_ylabel("latency (ms)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    return hk.figure_png(fig)


def _distribution_png(report: dict) -> bytes:
    budget = report["config"]["budget_ms"]
    fig, (hist, cdf) = hk.figure(12, 3.4, ncols=2)
    for overall in report["overall"]:
        mi = overall["model"]
        lat = np.concatenate([_measured(r)["lat"] for r in report["results"] if r["model"] == mi])
        lat = np.sort(lat[~np.isnan(lat)])
        if not len(lat):
            continue
        colour, label = MODEL_COLOURS[mi % 2], report["models"][mi]["label"]
        hist.hist(lat, bins=min(60, max(10, len(lat) // 4)), color=colour, alpha=0.55, label=label)
        cdf.step(lat, np.arange(1, len(lat) + 1) / len(lat), where="post", color=colour, label=label)
    for ax in (hist, cdf):
        ax.axvline(budget, color="#d62728", ls="--", lw=1.2, label=f"budget {budget:g} ms")
        ax.set_xlabel("latency (ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    hist.set_ylabel("frames")
    cdf.set_ylabel("fraction of frames ≤ latency")
    cdf.set_ylim(0, 1.01)
    return hk.figure_png(fig)


def _stages_png(report: dict) -> bytes:
    rows = [(f"{report['models'][r['model']]['label']} · stream {r['stream']}", r["stages"]) for r in report["results"]]
    fig, ax = hk.figure(12, 0.9 + 0.45 * len(rows))
    y = np.arange(len(rows))
    left = np.zeros(len(rows))
    for stage, colour in zip(STAGE_ORDER, STAGE_COLOURS, strict=True):
        widths = np.array([st.get(stage, {}).get("mean_ms", 0.0) for _, st in rows])
        ax.barh(y, widths, left=left, color=colour, label=stage)
        left += widths
    ax.axvline(report["config"]["budget_ms"], color="#d62728", ls="--", lw=1.2, label="budget")
    ax.set_yticks(y, [name for name, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("mean time per processed frame (ms)")
    fig.legend(fontsize=8, ncols=6, loc="outside upper center")
    ax.grid(axis="x", alpha=0.3)
    return hk.figure_png(fig)
