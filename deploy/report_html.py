"""The validation report as one self-contained HTML page (no scripts, no external files).

Charts are matplotlib PNGs and sample frames JPEGs, all embedded as base64 ``data:`` URIs, so the
page can be attached to a CI run or mailed. Everything is drawn from the report dict alone (plus
the sample frames, which JSON does not carry), so a page can be re-rendered from ``report.json``.

Sections: verdict banner; summary table (per stream and overall, per model); latency timeline per
stream with the budget line, late and dropped frames marked; latency histogram + CDF; per-stage
breakdown; sample frames with detections (models side by side); streams, models and environment.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from deploy.report_video import draw_detections
from deploy.validation import SampleFrame

MODEL_COLOURS = ("#1f77b4", "#ff7f0e")  # candidate, reference
STAGE_ORDER = ("queue", "decode", "preprocess", "inference", "postprocess")
STAGE_COLOURS = ("#bbbbbb", "#8c564b", "#2ca02c", "#1f77b4", "#9467bd")

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin:0 0 8px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.verdict{padding:12px 16px;border-radius:6px;font-size:18px;font-weight:600;margin:12px 0}
.pass{background:#e3f6e5;color:#14601f;border:1px solid #7bc98a} .fail{background:#fde6e6;color:#8a1212;border:1px solid #e08a8a}
table{border-collapse:collapse;font-size:13px;margin:8px 0} th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f4f4f4} td.l,th.l{text-align:left} tr.overall td{font-weight:600;background:#fafafa}
.tag-pass{color:#14601f;font-weight:700} .tag-fail{color:#a11;font-weight:700}
img.chart{max-width:100%;border:1px solid #eee;margin:6px 0} .samples{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0} figcaption{font-size:12px;color:#555} .pair{display:flex;gap:6px}
.muted{color:#666;font-size:13px} code{background:#f4f4f4;padding:1px 4px;border-radius:3px}
"""


def render(report: dict[str, Any], samples: Sequence[SampleFrame] = ()) -> str:
    """The full page for a report dict from :func:`deploy.validation.build_report`."""
    cfg, models = report["config"], report["models"]
    v = report["verdict"]
    title = f"avprune validate: {'PASS' if v['passed'] else 'FAIL'} ({models[0]['label']})"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Real-time validation of {_e(models[0]['label'])}</h1>",
        f'<p class="muted">budget <b>{cfg["budget_ms"]:g} ms</b> · mode <b>{_e(cfg["mode"])}</b> · '
        f'policy <b>{_e(cfg["drop_policy"])}</b> · warm-up {_warmup_text(cfg)} · fail on '
        f'<code>{_e(", ".join(cfg["fail_on"]))}</code> · {_e(report["created_utc"])}</p>',
        _verdict_block(report),
        "<h2>Summary</h2>", _summary_table(report),
        '<p class="muted">Latency = completion − arrival (queueing included in realtime mode). '
        "A frame is late when its latency exceeds the budget; dropped frames were never processed. "
        "Miss rate = (late + dropped) / offered. Percentiles are nearest-rank; warm-up frames are excluded.</p>",
        "<h2>Latency timeline</h2>",
    ]
    for si, stream in enumerate(report["streams"]):
        parts.append(f"<h3>{_e(stream['spec'])}</h3>")
        parts.append(_img(_timeline_png(report, si), f"latency timeline of stream {si}", "timeline"))
    parts += ["<h2>Latency distribution</h2>", _img(_distribution_png(report), "histogram and CDF", "distribution"),
              "<h2>Per-stage breakdown</h2>", _img(_stages_png(report), "per-stage breakdown", "stages"),
              _stages_table(report)]
    if samples:
        parts += ["<h2>Sample frames</h2>", _samples_block(report, samples)]
    parts += ["<h2>Streams</h2>", _streams_table(report), "<h2>Models and environment</h2>", _env_block(report),
              "</body></html>"]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- blocks


def _e(x: Any) -> str:
    return html.escape(str(x))


def _warmup_text(cfg: dict) -> str:
    if cfg.get("warmup_s"):
        return f"{cfg['warmup_s']:g} s"
    return f"{cfg.get('warmup_frames', 0)} frames"


def _verdict_block(report: dict) -> str:
    v = report["verdict"]
    label = report["models"][0]["label"]
    head = f"PASS: {label} meets the budget" if v["passed"] else f"FAIL: {label} violates the budget"
    reasons = "".join(f"<li>{_e(r)}</li>" for r in v["reasons"])
    ref = ""
    if len(report["overall"]) > 1:
        rv = report["overall"][1]["verdict"]
        ref = (f'<p class="muted">Reference {_e(report["models"][1]["label"])} (not gating): '
               f'{"PASS" if rv["passed"] else "FAIL"}</p>')
    return f'<div class="verdict {"pass" if v["passed"] else "fail"}">{_e(head)}</div>' + (
        f"<ul>{reasons}</ul>" if reasons else "") + ref


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _summary_table(report: dict) -> str:
    cols = ("offered", "processed", "dropped", "late", "miss %", "p50", "p90", "p99", "p99.9", "max", "mean",
            "jitter", "FPS", "verdict")
    rows = ["<table><tr><th class='l'>model</th><th class='l'>stream</th>"
            + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"]

    def row(model: dict, where: str, stats: dict, v: dict, cls: str = "") -> str:
        tag = '<span class="tag-pass">PASS</span>' if v["passed"] else '<span class="tag-fail">FAIL</span>'
        cells = [stats["offered"], stats["processed"], stats["dropped"], stats["late"],
                 _fmt(100 * stats["miss_ratio"], 1), _fmt(stats["p50_ms"]), _fmt(stats["p90_ms"]),
                 _fmt(stats["p99_ms"]), _fmt(stats["p99_9_ms"]), _fmt(stats["max_ms"]), _fmt(stats["mean_ms"]),
                 _fmt(stats["jitter_ms"]), _fmt(stats["sustained_fps"], 1)]
        return (f"<tr class='{cls}'><td class='l'>{_e(model['label'])}</td><td class='l'>{_e(where)}</td>"
                + "".join(f"<td>{c}</td>" for c in cells) + f"<td>{tag}</td></tr>")

    for overall in report["overall"]:
        model = report["models"][overall["model"]]
        for res in report["results"]:
            if res["model"] == overall["model"]:
                rows.append(row(model, _short(report["streams"][res["stream"]]["spec"]), res["stats"], res["verdict"]))
        rows.append(row(model, "all streams", overall["stats"], overall["verdict"], "overall"))
    rows.append("</table><p class='muted'>Latencies in ms; FPS = processed frames per second sustained.</p>")
    return "\n".join(rows)


def _short(spec: str, width: int = 60) -> str:
    return spec if len(spec) <= width else "…" + spec[-(width - 1):]


def _stages_table(report: dict) -> str:
    head = "".join(f"<th>{s}</th>" for s in (*STAGE_ORDER, "end_to_end"))
    rows = [f"<table><tr><th class='l'>model</th><th>stat</th>{head}</tr>"]
    for overall in report["overall"]:
        stages = overall["stages"]
        for stat in ("mean_ms", "p50_ms", "p99_ms"):
            cells = "".join(f"<td>{_fmt(stages.get(s, {}).get(stat))}</td>" for s in (*STAGE_ORDER, "end_to_end"))
            rows.append(f"<tr><td class='l'>{_e(report['models'][overall['model']]['label'])}</td>"
                        f"<td>{stat[:-3]}</td>{cells}</tr>")
    return "\n".join(rows) + "</table>"


def _streams_table(report: dict) -> str:
    rows = ["<table><tr><th class='l'>#</th><th class='l'>stream</th><th class='l'>kind</th><th>frames read</th>"
            "<th>decode failures</th><th class='l'>notes</th></tr>"]
    for si, s in enumerate(report["streams"]):
        fails = s["decode_failures"]
        detail = ", ".join(f"#{f['frame_id']}" for f in fails[:20]) + (" …" if len(fails) > 20 else "")
        notes = "; ".join(s.get("notes", []))
        if s.get("clamped_timestamps"):
            notes += f"{'; ' if notes else ''}{s['clamped_timestamps']} timestamps stepped backwards (clamped)"
        rows.append(f"<tr><td class='l'>{si}</td><td class='l'>{_e(s['spec'])}</td><td class='l'>{_e(s['kind'])}</td>"
                    f"<td>{s['frames_read']}</td><td>{len(fails)}{_e(' (' + detail + ')') if fails else ''}</td>"
                    f"<td class='l'>{_e(notes)}</td></tr>")
    return "\n".join(rows) + "</table>"


def _env_block(report: dict) -> str:
    rows = ["<table><tr><th class='l'>model</th><th class='l'>role</th><th class='l'>backend</th>"
            "<th class='l'>device</th><th class='l'>precision</th><th class='l'>version</th><th class='l'>sha256</th></tr>"]
    for m in report["models"]:
        rt = m["runtime"]
        rows.append(f"<tr><td class='l'>{_e(m['path'])}</td><td class='l'>{_e(m['role'])}</td>"
                    f"<td class='l'>{_e(rt['backend'])}</td><td class='l'>{_e(rt['device'])}</td>"
                    f"<td class='l'>{_e(rt['precision'])}</td><td class='l'>{_e(rt['version'])}</td>"
                    f"<td class='l'><code>{_e((m['sha256'] or '–')[:16])}</code></td></tr>")
    rows.append("</table>")
    env = report["environment"]
    libs = ", ".join(f"{k} {v}" for k, v in env["libraries"].items())
    rows.append(f"<p class='muted'>CPU: {_e(env['cpu'])} ({env['logical_cpus']} logical) · {_e(env['platform'])} · "
                f"Python {_e(env['python'])}<br>{_e(libs)}</p>")
    return "\n".join(rows)


def _samples_block(report: dict, samples: Sequence[SampleFrame]) -> str:
    import cv2

    labels = [m["label"] for m in report["models"]]
    out = ['<div class="samples">']
    for sample in samples:
        tiles = []
        for mi, dets in enumerate(sample.detections):
            drawn = draw_detections(sample.image, dets)
            ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
            uri = "data:image/jpeg;base64," + base64.b64encode(jpg.tobytes()).decode("ascii")
            latency = _frame_latency(report, mi, sample.stream, sample.frame_id)
            width = min(max(drawn.shape[1], 320), 640)  # small frames are scaled up to be legible
            tiles.append(f'<figure><img src="{uri}" alt="frame {sample.frame_id}" width="{width}">'
                         f"<figcaption>{_e(labels[mi])}: {len(dets.above(0.3))} boxes ≥ 0.3 · {_e(latency)}"
                         "</figcaption></figure>")
        out.append(f'<div><div class="muted">stream {sample.stream} frame {sample.frame_id}</div>'
                   f'<div class="pair">{"".join(tiles)}</div></div>')
    out.append("</div>")
    return "\n".join(out)


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


def _img(png: bytes, alt: str, ident: str) -> str:
    return (f'<img class="chart" id="{ident}" alt="{_e(alt)}" '
            f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">')


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, axes


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


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
    fig, ax = _figure(12, 3.6)
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
    return _png(fig)


def _distribution_png(report: dict) -> bytes:
    budget = report["config"]["budget_ms"]
    fig, (hist, cdf) = _figure(12, 3.4, ncols=2)
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
    return _png(fig)


def _stages_png(report: dict) -> bytes:
    rows = [(f"{report['models'][r['model']]['label']} · stream {r['stream']}", r["stages"]) for r in report["results"]]
    fig, ax = _figure(12, 0.9 + 0.45 * len(rows))
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
    return _png(fig)
