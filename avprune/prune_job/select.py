"""Stage 5, selection: the highest-mAP candidate whose re-measured latency meets the budget.

Every finished candidate is re-measured here, one after another in the driver, on the same
frames, each right after the dense model (its latency is the ratio to that dense timing, expressed
at the baseline's dense latency): the latencies trials reported were taken while other trials
shared the cores, and absolute timings minutes apart drift. mAP is
re-evaluated on the same val subset. Ties break deterministically: mAP, then AP50 (both rounded
to 4 decimals, below evaluation noise), then candidate index — never on latency, which is noisy.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from avprune.prune_job import common
from avprune.prune_job.errors import InfeasibleBudgetError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Point:
    """One (latency, mAP) trade-off: a re-measured candidate, a trial report or the dense model."""

    latency_ms: float
    map: float
    map50: float = 0.0
    source: str = ""  # candidate id, "trial c0 step 40", "dense"
    index: int = -1  # candidate index for final candidates, -1 otherwise


def choose(candidates: Sequence[Point], *, budget_ms: float, floor: float, others: Sequence[Point] = ()) -> Point:
    """The selected candidate, or InfeasibleBudgetError built from every point seen.

    ``others`` (trial reports, the dense model) do not get selected but tell the user what was
    reachable: the best trade-off and the nearest feasible budget.
    """
    feasible = [c for c in candidates if c.latency_ms <= budget_ms and c.map >= floor]
    if feasible:
        return min(feasible, key=lambda c: (-round(c.map, 4), -round(c.map50, 4), c.index))
    points = [*candidates, *others]
    if not points:
        raise ValueError("no candidate finished: nothing to select (see the search stage's errors)")
    best = min(points, key=lambda p: max(0.0, p.latency_ms - budget_ms) / budget_ms + max(0.0, floor - p.map))
    meets_floor = [p.latency_ms for p in points if p.map >= floor]
    meets_budget = [p.map for p in points if p.latency_ms <= budget_ms]
    raise InfeasibleBudgetError(
        latency_budget_ms=budget_ms,
        map_floor=floor,
        best_latency_ms=best.latency_ms,
        best_map=best.map,
        nearest_latency_ms=min(meets_floor) if meets_floor else None,
        nearest_map_floor=max(meets_budget) if meets_budget else None,
    )


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """Points no other point beats on both latency (lower) and mAP (higher), by latency."""
    front: list[Point] = []
    for p in sorted(points, key=lambda p: (p.latency_ms, -p.map)):
        if not front or p.map > front[-1].map:
            front.append(p)
    return front


def trial_points(search: dict[str, Any]) -> list[Point]:
    """Every measured (latency, mAP) a trial reported during its fine-tuning."""
    pts = []
    for cand in search["candidates"]:
        for h in cand.get("history", []):
            if h.get("latency_ms") is not None and h.get("map") is not None:
                pts.append(Point(float(h["latency_ms"]), float(h["map"]), float(h.get("map50") or 0.0),
                                 f"{cand['candidate_id']} step {h.get('step')}"))
    return pts


def deliverables(search: dict[str, Any]) -> list[dict[str, Any]]:
    """Every model the search produced: each finished candidate's final model, and each trial's
    best snapshot that met both targets when measured (``c0@60``), in a fixed order."""
    out = []
    for c in search["candidates"]:
        if c.get("checkpoint"):
            out.append({"candidate_id": c["candidate_id"], "index": 2 * c["index"], "checkpoint": c["checkpoint"]})
        if c.get("snapshot"):
            out.append({"candidate_id": f"{c['candidate_id']}@{c['snapshot_step']}", "index": 2 * c["index"] + 1,
                        "checkpoint": c["snapshot"]})
    return out


def run(ctx: Any) -> dict[str, Any]:
    """Re-measure every deliverable model alone and pick one; raises InfeasibleBudgetError otherwise."""
    cfg = ctx.config
    base, search = ctx.results["baseline"], ctx.results["search"]
    budget_ms, floor = float(base["latency_budget_ms"]), float(base["map_floor"])
    _, val = common.datasets(cfg)
    frames = common.frames_for_timing(val, cfg)
    models = deliverables(search)
    dense_model = common.load_model(cfg.model.checkpoint, cfg)
    base_p50 = float(base["dense"]["p50_ms"])
    measured: list[dict[str, Any]] = []
    for item in models:
        ctx.progress.stage_start("select", total=len(models), note=f"re-measuring {item['candidate_id']}")
        model = common.load_model(ctx.out_dir / item["checkpoint"], cfg)
        # Side by side: the dense model is timed right before each candidate and the candidate's
        # latency is taken as a ratio to it, expressed at the baseline's dense latency. Absolute
        # timings minutes apart on a shared machine drift by tens of percent; paired ratios do not.
        dense_now = common.measure_latency(dense_model, cfg, frames, ctx.out_dir / "work")
        lat = common.measure_latency(model, cfg, frames, ctx.out_dir / "work")
        scale = base_p50 / dense_now.p50_ms
        row = {**item, **common.evaluate_map(model, val), "p50_ms": lat.p50_ms * scale, "p99_ms": lat.p99_ms * scale,
               "raw_p50_ms": lat.p50_ms, "dense_p50_ms_beside": dense_now.p50_ms, **common.size_of(model, cfg)}
        measured.append(row)
        ctx.progress.stage_advance("select")
        log.info("candidate %s: mAP %.3f, p50 %.2f ms", row["candidate_id"], row["map"], row["p50_ms"])
    points = [Point(m["p50_ms"], m["map"], m["map50"], m["candidate_id"], m["index"]) for m in measured]
    dense = base["dense"]
    dense_point = Point(dense["p50_ms"], dense["map"], dense["map50"], "dense")
    # Only models one could ship inform the infeasible message (trial reports are in the report).
    infeasible: dict[str, Any] | None = None
    try:
        chosen = choose(points, budget_ms=budget_ms, floor=floor,
                        others=[dense_point])
    except InfeasibleBudgetError as e:
        if not points:
            raise
        # Nothing is lost: the best trade-off among the candidates is still finalized (as
        # best_tradeoff.*, never as pruned.*) and the job then ends with the infeasible message.
        infeasible = {**e.to_dict(), "message": str(e)}
        chosen = min(points, key=lambda p: max(0.0, p.latency_ms - budget_ms) / budget_ms + max(0.0, floor - p.map))
    row = next(m for m in measured if m["candidate_id"] == chosen.source)
    everything = [*points, dense_point, *trial_points(search)]
    return {
        "candidate_id": chosen.source,
        "checkpoint": row["checkpoint"],
        "selected": row,
        "measured": measured,
        "pareto": [asdict(p) for p in pareto_front(everything)],
        "feasible": infeasible is None,
        "infeasible": infeasible,
        "note": f"{chosen.source}: mAP {row['map']:.3f}, p50 {row['p50_ms']:.2f} ms (budget {budget_ms:.2f})",
    }
