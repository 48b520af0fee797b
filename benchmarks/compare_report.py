"""Table, plot and verdict of ``benchmarks/compare.py``, computed from the stored numbers.

Nothing in the paragraph is written in advance: every sentence that judges is chosen by
comparing the measured means against each other and against the seed spread, so a difference
smaller than the spread is called noise.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.compare_registry import get_method

EQUAL_LATENCY = 0.05  # "at equal measured latency": within 5% (issue #7)
TARGET_POINTS = 1.0  # avprune's best must beat Torch-Pruning one-shot by >= 1.0 mAP point
REFERENCE = "tp_magnitude"
# Issue #12's fair baselines: Torch-Pruning with the same channel multiple and the same steps. When a
# run has them, the verdict judges against the better of them; tp_magnitude (global, round_to=8) otherwise.
FAIR_REFERENCES = ("tp_aligned", "tp_iterative", "tp_aligned_distill")
LATENCY_AWARE = "avprune_latency"
LATENCY_AWARE_ROWS = (LATENCY_AWARE, f"{LATENCY_AWARE}_fold")
INT8 = "dense_int8"  # issue #12: what a user would try instead of pruning


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation over seeds (0 with one seed)."""

    mean: float
    sd: float
    n: int

    @staticmethod
    def of(values: Sequence[float]) -> Stat:
        vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
        if not vals:
            return Stat(math.nan, math.nan, 0)
        return Stat(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals))

    def fmt(self, digits: int = 1) -> str:
        if self.n == 0:
            return "n/a"
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f}" if self.n > 1 else f"{self.mean:.{digits}f}"


@dataclass(frozen=True)
class Row:
    """One method's aggregate over its seeds (mAP figures in points, i.e. x100)."""

    method: str
    label: str
    map: Stat
    map50: Stat
    map_small: Stat
    p50: Stat
    p99: Stat
    params_m: Stat
    nonzero_m: Stat
    gmacs: Stat
    wall_s: Stat
    # paired speed-up over the dense model from the final pass (older records: None)
    speedup: Stat | None = None
    speedup_ci: tuple[float, float] | None = None  # its bootstrap 95% interval, with one seed


def aggregate(cells: Sequence[dict[str, Any]]) -> list[Row]:
    """Rows in first-seen method order from the per-(method, seed) records with their final pass."""
    methods = list(dict.fromkeys(c["method"] for c in cells))
    rows = []
    for m in methods:
        cs = [c for c in cells if c["method"] == m]
        f = [c["final"] for c in cs]

        def pts(key: str, fs: list[dict[str, Any]] = f) -> Stat:
            return Stat.of([100 * x[key] if x[key] is not None else math.nan for x in fs])

        rows.append(
            Row(
                method=m,
                label=get_method(m).label,
                map=pts("map"),
                map50=pts("map50"),
                map_small=pts("map_small"),
                p50=Stat.of([x["p50_ms"] for x in f]),
                p99=Stat.of([x["p99_ms"] for x in f]),
                params_m=Stat.of([x["params"] / 1e6 for x in f]),
                nonzero_m=Stat.of([x["nonzero_params"] / 1e6 for x in f]),
                gmacs=Stat.of([x["gmacs"] for x in f]),
                wall_s=Stat.of([c["wall_s"] for c in cs]),
                speedup=Stat.of([x["speedup"] for x in f]) if all("speedup" in x for x in f) else None,
                speedup_ci=tuple(f[0]["speedup_ci"]) if len(f) == 1 and f[0].get("speedup_ci") else None,
            )
        )
    return rows


def table(rows: Sequence[Row]) -> str:
    """The markdown table; speed-up is the paired ratio over the dense model from the same pass
    (mean over seeds; its 95% interval with one seed), or dense p50 over the method's p50 in older records."""
    dense = next((r for r in rows if r.method == "dense"), None)
    head = (
        "| method | mAP | AP50 | AP small | p50 ms | p99 ms | params M (non-zero) | GMACs | speed-up | method wall s |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        if r.speedup is not None and r.speedup.n:
            speed = f"{r.speedup.mean:.2f}×" + (f" [{r.speedup_ci[0]:.2f}, {r.speedup_ci[1]:.2f}]" if r.speedup_ci else "")
        else:
            speed = f"{dense.p50.mean / r.p50.mean:.2f}×" if dense and r.p50.mean > 0 else "n/a"
        lines.append(
            f"| {r.label} (`{r.method}`) | {r.map.fmt()} | {r.map50.fmt()} | {r.map_small.fmt()} | {r.p50.fmt(2)} | "
            f"{r.p99.fmt(2)} | {r.params_m.mean:.2f} ({r.nonzero_m.mean:.2f}) | {r.gmacs.mean:.3f} | {speed} | "
            f"{r.wall_s.fmt(0)} |"
        )
    return head + "\n".join(lines) + "\n"


def verdict(rows: Sequence[Row]) -> list[str]:
    """Sentences judging the issue's target and the side questions, each computed from the rows."""
    by = {r.method: r for r in rows}
    out: list[str] = []
    fair = [by[m] for m in FAIR_REFERENCES if m in by]
    ref = max(fair, key=lambda r: r.map.mean) if fair else by.get(REFERENCE)
    # the latency-aware rows are what issue #12 judges (with and without the job's gate fold, the best
    # at equal latency); older runs judge avprune's best row
    aware = [by[m] for m in LATENCY_AWARE_ROWS if m in by]
    avp = aware or [r for r in rows if r.method.startswith("avprune_") and get_method(r.method).deploy == "fp32"]
    if ref is None or not avp:
        return ["The target (avprune vs Torch-Pruning) is not judged: this run did not include both."]
    close = [r for r in avp if abs(r.p50.mean - ref.p50.mean) <= EQUAL_LATENCY * ref.p50.mean]
    if not close:
        near = min(avp, key=lambda r: abs(r.p50.mean - ref.p50.mean))
        out.append(
            f"No avprune configuration landed within {EQUAL_LATENCY:.0%} of Torch-Pruning's latency "
            f"(`{ref.method}`, {ref.p50.mean:.2f} ms); the nearest, `{near.method}`, measures {near.p50.mean:.2f} ms at "
            f"{near.map.mean:.1f} mAP vs {ref.map.mean:.1f}, so the target cannot be judged at equal latency."
        )
    else:
        best = max(close, key=lambda r: r.map.mean)
        diff = best.map.mean - ref.map.mean
        spread = math.hypot(best.map.sd, ref.map.sd)
        where = (
            f"At equal measured latency ({best.p50.mean:.2f} vs {ref.p50.mean:.2f} ms), avprune's best "
            f"configuration `{best.method}` reaches {best.map.fmt()} mAP against Torch-Pruning's "
            f"(`{ref.method}`) {ref.map.fmt()}: a difference of {diff:+.1f} points with a seed spread of ±{spread:.1f}."
        )
        if diff >= TARGET_POINTS and diff > spread:
            judge = f"The issue's target (≥ {TARGET_POINTS:.1f} point) is met, and the gap exceeds the spread."
        elif diff >= TARGET_POINTS:
            judge = (
                f"The means clear the {TARGET_POINTS:.1f}-point target, but the gap is within the seed spread: "
                "call it noise until more seeds separate them."
            )
        elif abs(diff) <= spread:
            judge = f"The target (≥ {TARGET_POINTS:.1f} point) is not met; the two are indistinguishable at this spread."
        elif diff > 0:
            judge = f"avprune is ahead, but by less than the {TARGET_POINTS:.1f}-point target: not met."
        else:
            judge = "Torch-Pruning is ahead: the target is not met."
        out.append(f"{where} {judge}")
        if best.wall_s.mean > ref.wall_s.mean:
            out.append(
                f"`{best.method}` costs more time: {best.wall_s.mean:.0f} s of method wall time against "
                f"{ref.wall_s.mean:.0f} s for one-shot pruning plus the same fine-tune."
            )
    for ours, theirs, what in ((f"{LATENCY_AWARE}_fold", "tp_aligned_distill_fold", "the gate fold"),
                               (LATENCY_AWARE, "tp_aligned_distill", "distillation")):
        if ours in by and theirs in by:  # the allocation's own share: the same levers on both sides
            a, b = by[ours], by[theirs]
            d, sp = a.map.mean - b.map.mean, math.hypot(a.map.sd, b.map.sd)
            out.append(f"With {what} on both sides, `{ours}` is {d:+.1f} points against `{theirs}` "
                       f"({a.p50.mean:.2f} vs {b.p50.mean:.2f} ms, spread ±{sp:.1f}"
                       f"{': noise' if abs(d) <= sp else ''}): what the latency-aware allocation itself adds.")
    dense = by.get("dense")
    if dense:
        pruned = [r for r in rows if get_method(r.method).kind == "channel"]
        if pruned:
            top = max(pruned, key=lambda r: r.map.mean)
            rel = "above" if top.map.mean > dense.map.mean + math.hypot(top.map.sd, dense.map.sd) else (
                "below" if top.map.mean < dense.map.mean - math.hypot(top.map.sd, dense.map.sd) else "level with")
            out.append(
                f"The best channel-pruned model (`{top.method}`, {top.map.mean:.1f} mAP at {top.p50.mean:.2f} ms) is "
                f"{rel} the dense model trained for the same steps ({dense.map.mean:.1f} mAP at {dense.p50.mean:.2f} ms), "
                f"{dense.p50.mean / top.p50.mean:.2f}× faster."
            )
    if INT8 in by and dense:
        out.append(_int8_sentence(by[INT8], dense, avp))
    stacked = by.get(f"{LATENCY_AWARE}_int8")
    if stacked and LATENCY_AWARE in by:
        fp32 = by[LATENCY_AWARE]
        out.append(
            f"INT8 on top of pruning (`{stacked.method}`): {stacked.p50.mean:.2f} ms against {fp32.p50.mean:.2f} in fp32 "
            f"({fp32.p50.mean / stacked.p50.mean:.2f}×) at {stacked.map.mean - fp32.map.mean:+.1f} mAP points."
        )
    un = by.get("unstructured_l1")
    if un and dense:
        sparsity = 1 - un.nonzero_m.mean / max(un.params_m.mean, 1e-9)
        out.append(
            f"Unstructured L1 zeroes {sparsity:.0%} of the weights yet runs at {dense.p50.mean / un.p50.mean:.2f}× "
            "the dense speed: dense CPU kernels skip no zeros, which is why structure matters."
        )
    slim = by.get("slimming")
    if slim and ref:
        d = slim.map.mean - ref.map.mean
        noise = abs(d) <= math.hypot(slim.map.sd, ref.map.sd)
        out.append(
            f"Network slimming vs Torch-Pruning one-shot: {d:+.1f} mAP points at {slim.p50.mean:.2f} vs "
            f"{ref.p50.mean:.2f} ms{' (within the spread: noise)' if noise else ''}."
        )
    return out


def _int8_sentence(int8: Row, dense: Row, avp: Sequence[Row]) -> str:
    """Dense INT8, what a user would try instead of pruning, judged at equal latency when it gets there."""
    speed = int8.speedup.mean if int8.speedup is not None and int8.speedup.n else dense.p50.mean / int8.p50.mean
    d_dense = int8.map.mean - dense.map.mean
    head = (f"Dense INT8 (`{INT8}`, the same dense model quantized) runs {speed:.2f}× the dense speed at "
            f"{int8.map.fmt()} mAP ({d_dense:+.1f} points against dense).")
    if not avp:
        return head
    best = max(avp, key=lambda r: r.map.mean)
    diff = best.map.mean - int8.map.mean
    spread = math.hypot(best.map.sd, int8.map.sd)
    if abs(best.p50.mean - int8.p50.mean) <= EQUAL_LATENCY * int8.p50.mean:
        who = "noise" if abs(diff) <= spread else ("avprune ahead" if diff > 0 else "INT8 ahead")
        return (f"{head} At equal measured latency ({best.p50.mean:.2f} vs {int8.p50.mean:.2f} ms), `{best.method}` "
                f"is {diff:+.1f} points against it ({who}, spread ±{spread:.1f}).")
    if int8.p50.mean > best.p50.mean:
        return (f"{head} It does not reach `{best.method}`'s latency ({best.p50.mean:.2f} ms against "
                f"{int8.p50.mean:.2f}), so the two are not compared at equal latency: at this budget quantization "
                "alone is not an alternative to pruning.")
    return (f"{head} It is faster than `{best.method}` ({int8.p50.mean:.2f} against {best.p50.mean:.2f} ms) "
            f"at {-diff:+.1f} points of mAP against it.")


def plot(
    cells: Sequence[dict[str, Any]], rows: Sequence[Row], setup: dict[str, Any], path: Path, *, graph: bool = False
) -> Path:
    """PNG of the mAP-latency plane: each method's mean trajectory and its final point with spreads
    (``graph``: latency is the core graph's, not the whole frame's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from perception.io import atomic_path

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    colours = plt.get_cmap("tab10")
    for k, r in enumerate(rows):
        c = colours(k % 10)
        steps: dict[int, list[tuple[float, float]]] = {}
        for cell in (x for x in cells if x["method"] == r.method):
            for p in cell["trajectory"]:
                steps.setdefault(p["step"], []).append((p["latency_ms"], 100 * p["map"]))
        xs = [statistics.fmean(v[0] for v in steps[s]) for s in sorted(steps)]
        ys = [statistics.fmean(v[1] for v in steps[s]) for s in sorted(steps)]
        ax.plot(xs, ys, "-o", color=c, ms=3, lw=1, alpha=0.6)
        ax.errorbar(r.p50.mean, r.map.mean, xerr=r.p50.sd, yerr=r.map.sd, fmt="*", ms=12, color=c, label=r.label)
    ax.axvline(setup["latency_target_ms"], ls="--", color="grey", lw=1, label="latency target")
    ax.set_xlabel(("core graph latency" if graph else "end-to-end latency per frame")
                  + ", ONNX Runtime CPU 2 threads (ms)")
    ax.set_ylabel("mAP@[.5:.95] (points)")
    ax.set_title("Pruning methods in the mAP-latency plane (lines: probes during fine-tune; stars: final)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def markdown(data: dict[str, Any], png_rel: str) -> str:
    """The RESULTS.md section: settings, run time, table, plot and the computed paragraph."""
    from benchmarks._results import machine_line

    cfg, setup, cells = data["config"], data["setup"], data["cells"]
    rows = aggregate(cells)
    seeds = len(cfg["seeds"])
    clamped = (
        f" The requested {cfg['speedup']:g}× was out of reach for one-shot pruning at the largest ratio "
        f"(pre/post-processing does not shrink with channels), so the target is what that ratio measured."
        if setup.get("target_clamped") else ""
    )
    start = (f"`{Path(cfg['checkpoint']).name}`, given with --checkpoint" if cfg.get("checkpoint")
             else f"{cfg['pretrain_steps']} steps from scratch")
    return "\n".join(
        [
            "## Dynamic thresholds vs other pruning techniques (`python -m benchmarks.compare`)",
            "",
            f"`{cfg['detector']}` at {cfg['image_size']}×{cfg['image_size']} on "
            + (f"the COCO folder `{cfg['data']}`" if cfg.get("data") else f"the synthetic drive set ({cfg['images']} images)")
            + "; every method starts from the same dense checkpoint "
            f"({start}) and fine-tunes {cfg['steps']} steps at batch {cfg['batch_size']}; "
            f"latency target {setup['latency_target_ms']:.2f} ms = dense {setup['dense_ms']:.2f} ms / "
            f"{cfg['speedup']:g}.{clamped} {seeds} seed(s) per method, mean ± sample s.d. Final rows: full validation split "
            "through the deployed ONNX Runtime model; latency measured for all models in one interleaved pass "
            + ("(CPU, 2 threads, the core graph alone: what pruning changes; `--latency graph`). "
               if cfg.get("latency") == "graph" else "(CPU, 2 threads, end to end per frame). ")
            + "Method wall time excludes the benchmark's own probes. "
            "avprune's feedback (measured mAP) comes from training images, never validation ones. GMACs count "
            "dense kernels: unstructured zeros still cost MACs.",
            "",
            f"Machine: {machine_line()}. Run time of the command: {data['total_s'] / 60:.1f} min of stage time "
            f"(setup {setup['setup_s'] / 60:.1f}, final pass {data['final_s'] / 60:.1f}; data generation aside), "
            f"{data['run_s'] / 60:.1f} min in the invocation that wrote this.",
            "",
            table(rows),
            f"![mAP-latency plane]({png_rel})",
            "",
            *[" ".join(verdict(rows))],
            "",
        ]
    )


def write(data: dict[str, Any], *, quick: bool, work: Path | None = None) -> Path:
    """Write the section (full runs) or a side file in the work dir (``--quick`` smoke runs)."""
    from benchmarks._results import ASSETS, write_section
    from perception.io import atomic_write_text

    if quick:
        if work is None:
            raise ValueError("a quick run writes its report into the work dir; pass work")
        plot(data["cells"], aggregate(data["cells"]), data["setup"], work / "compare.png",
             graph=data["config"].get("latency") == "graph")
        md = "**SMOKE RUN (--quick): tiny model, data and steps; the numbers mean nothing.**\n\n"
        md += markdown(data, "compare.png")
        atomic_write_text(work / "compare.md", md)
        return work / "compare.md"
    rows = aggregate(data["cells"])
    plot(data["cells"], rows, data["setup"], ASSETS / "compare.png", graph=data["config"].get("latency") == "graph")
    write_json(data, rows, ASSETS / "compare.json")
    return write_section("compare", markdown(data, "results/compare.png"))


def write_json(data: dict[str, Any], rows: Sequence[Row], path: Path) -> Path:
    """``compare.json``: the settings, every row's means and spreads, and the verdict's sentences."""
    import dataclasses

    from benchmarks._results import machine_line
    from perception.io import atomic_write_json

    setup = {k: v for k, v in data["setup"].items() if k not in ("damage", "aligned_config")}
    atomic_write_json(path, {
        "config": data["config"], "setup": setup, "machine": machine_line(),
        "rows": [dataclasses.asdict(r) for r in rows], "verdict": verdict(rows),
        "cells": [{k: c[k] for k in ("method", "seed", "params", "wall_s", "final", "extra") if k in c}
                  for c in data["cells"]],
    })
    return path
