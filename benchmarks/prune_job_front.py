"""Pareto fronts of ``benchmarks.prune_job``: graph speed-up vs mAP drop, per granularity.

A point is one model: a candidate's final model (measured side by side with dense and dense-long)
or a candidate's measured point during the search (the trial's own measurement at that step: a real
model, since the mask is physical once finalized). A point dominates another when it is at least
as fast at no larger drop. The front of a granularity is its non-dominated points, sorted by drop.

Comparing two fronts "at equal drop": a front is read as a function speed-up(drop), linear between
its points and flat after its last one (a larger allowed drop can always take the fastest point);
it is undefined below its smallest drop. Where both fronts are defined over their common range of
drops, the ratio of the two is evaluated at every front point's drop in that range and at its ends.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Point = Mapping[str, Any]  # needs "graph_speedup" and "map_drop_points"


def pareto_front(points: Sequence[Point]) -> list[dict[str, Any]]:
    """The non-dominated points (higher speed-up, lower drop), sorted by drop ascending."""
    pts = sorted((dict(p) for p in points), key=lambda p: (p["map_drop_points"], -p["graph_speedup"]))
    front: list[dict[str, Any]] = []
    for p in pts:
        if not front or p["graph_speedup"] > front[-1]["graph_speedup"]:
            front.append(p)
    return front


def speedup_at(front: Sequence[Point], drop: float) -> float | None:
    """The front's speed-up at ``drop``: linear between points, flat after the last; None below the first."""
    if not front or drop < front[0]["map_drop_points"]:
        return None
    for a, b in zip(front, front[1:], strict=False):
        da, db = a["map_drop_points"], b["map_drop_points"]
        if da <= drop <= db:
            if db == da:
                return max(a["graph_speedup"], b["graph_speedup"])
            t = (drop - da) / (db - da)
            return a["graph_speedup"] + t * (b["graph_speedup"] - a["graph_speedup"])
    return front[-1]["graph_speedup"]


def compare_fronts(base: Sequence[Point], other: Sequence[Point], gain: float) -> dict[str, Any]:
    """``other``'s speed-up over ``base``'s at equal drop where both are defined: met when the
    ratio is >= ``gain`` at every evaluated drop."""
    if not base or not other:
        return {"met": False, "reason": "a front has no point", "drops": [], "ratios": []}
    lo = max(base[0]["map_drop_points"], other[0]["map_drop_points"])
    hi = min(base[-1]["map_drop_points"], other[-1]["map_drop_points"])
    if lo > hi:
        return {"met": False, "reason": f"the fronts share no range of mAP drop (from {lo:.2f} vs up to {hi:.2f})",
                "drops": [], "ratios": []}
    drops = sorted({lo, hi, *(p["map_drop_points"] for p in (*base, *other) if lo <= p["map_drop_points"] <= hi)})
    ratios = []
    for d in drops:
        b, o = speedup_at(base, d), speedup_at(other, d)
        ratios.append(o / b if b and o is not None else None)
    valid = [r for r in ratios if r is not None]
    worst = min(valid) if valid else None
    return {"met": worst is not None and worst >= gain, "gain": gain, "range": [lo, hi], "drops": drops,
            "ratios": ratios, "min_ratio": worst, "max_ratio": max(valid) if valid else None,
            "reason": "" if valid else "no evaluable drop"}


def best_within(points: Sequence[Point], max_drop: float) -> dict[str, Any] | None:
    """The fastest point at a drop of at most ``max_drop`` points."""
    ok = [p for p in points if p["map_drop_points"] <= max_drop]
    return dict(max(ok, key=lambda p: p["graph_speedup"])) if ok else None


def target_line(label: str, best: Point | None, speedup: float, max_drop: float) -> tuple[bool, str]:
    """Met/not met for ">= speedup at <= max_drop", naming the best point within the drop."""
    if best is None:
        return False, f"{label} (>= {speedup}x graph at <= {max_drop} point): **NOT met** (no point within the drop)"
    met = best["graph_speedup"] >= speedup
    return met, (f"{label} (>= {speedup}x graph at <= {max_drop} point): **{'met' if met else 'NOT met'}**; "
                 f"best within the drop {best['graph_speedup']:.2f}x at {best['map_drop_points']:.2f} points "
                 f"({best['name']})")


def plot_fronts(path: Path, points: Mapping[str, Sequence[Point]], fronts: Mapping[str, Sequence[Point]],
                max_drop: float, speed_lines: Sequence[float], title: str) -> Path:
    """Scatter of every point (final models filled, search points hollow), each front as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from perception.io import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = dict(zip(points, ("tab:blue", "tab:red", "tab:green", "tab:purple"), strict=False))
    for gran, pts in points.items():
        c = colours[gran]
        fin = [p for p in pts if p.get("kind") == "final"]
        srch = [p for p in pts if p.get("kind") != "final"]
        ax.scatter([p["map_drop_points"] for p in srch], [p["graph_speedup"] for p in srch], s=18,
                   facecolors="none", edgecolors=c, label=f"{gran}: search points")
        ax.scatter([p["map_drop_points"] for p in fin], [p["graph_speedup"] for p in fin], s=40, color=c,
                   label=f"{gran}: final models")
        fr = fronts.get(gran) or []
        if fr:
            xs = [p["map_drop_points"] for p in fr]
            ys = [p["graph_speedup"] for p in fr]
            ax.step(xs + [max(xs[-1], max_drop) + 0.5], ys + [ys[-1]], where="post", color=c, lw=0.8, ls=":")
            ax.plot(xs, ys, color=c, lw=1.4, label=f"{gran}: front")
    ax.axvline(max_drop, color="k", lw=0.8, ls="--")
    for s in speed_lines:
        ax.axhline(s, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("mAP drop vs dense trained as long (points)")
    ax.set_ylabel("graph speed-up vs dense (ORT CPU)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


__all__ = ["best_within", "compare_fronts", "pareto_front", "plot_fronts", "speedup_at", "target_line"]
