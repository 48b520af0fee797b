"""Stage 5, selection: the highest-mAP candidate whose re-measured latency meets the budget.

Every finished candidate is re-measured here, one after another in the driver, on the same
frames: the latencies trials reported were taken while other trials shared the cores. mAP is
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


def run(ctx: Any) -> dict[str, Any]:
    """Re-measure every finished candidate and pick one; raises InfeasibleBudgetError otherwise."""
    cfg = ctx.config
    base, search = ctx.results["baseline"], ctx.results["search"]
    budget_ms, floor = float(base["latency_budget_ms"]), float(base["map_floor"])
    _, val = common.datasets(cfg)
    frames = common.frames_for_timing(val, cfg)
    finished = [c for c in search["candidates"] if c.get("checkpoint")]
    measured: list[dict[str, Any]] = []
    for cand in finished:
        ctx.progress.stage_start("select", total=len(finished), note=f"re-measuring {cand['candidate_id']}")
        model = common.load_model(ctx.out_dir / cand["checkpoint"], cfg)
        lat = common.measure_latency(model, cfg, frames, ctx.out_dir / "work")
        row = {"candidate_id": cand["candidate_id"], "index": cand["index"], **common.evaluate_map(model, val),
               "p50_ms": lat.p50_ms, "p99_ms": lat.p99_ms, **common.size_of(model, cfg)}
        measured.append(row)
        ctx.progress.stage_advance("select")
        log.info("candidate %s: mAP %.3f, p50 %.2f ms", row["candidate_id"], row["map"], row["p50_ms"])
    points = [Point(m["p50_ms"], m["map"], m["map50"], m["candidate_id"], m["index"]) for m in measured]
    dense = base["dense"]
    others = [Point(dense["p50_ms"], dense["map"], dense["map50"], "dense"), *trial_points(search)]
    chosen = choose(points, budget_ms=budget_ms, floor=floor, others=others)
    row = next(m for m in measured if m["candidate_id"] == chosen.source)
    return {
        "candidate_id": chosen.source,
        "selected": row,
        "measured": measured,
        "pareto": [asdict(p) for p in pareto_front([*points, *others])],
        "note": f"{chosen.source}: mAP {row['map']:.3f}, p50 {row['p50_ms']:.2f} ms (budget {budget_ms:.2f})",
    }
