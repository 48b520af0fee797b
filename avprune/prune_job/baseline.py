"""Stage 1, baseline: the dense model's mAP and measured latency, and the budget in absolute terms.

The budget's relative forms (``speedup``, ``max_map_drop``) become absolute numbers here, from
this measurement, and every later stage reads them from this record: a resumed job keeps the
same targets even though a re-measured latency would differ by noise.
"""

from __future__ import annotations

import logging
from typing import Any

from avprune.prune_job import common

log = logging.getLogger(__name__)


def run(ctx: Any) -> dict[str, Any]:
    """Measure the dense model; returns ``dense`` (summary row), ``latency_budget_ms``, ``map_floor``."""
    cfg = ctx.config
    ctx.progress.stage_start("baseline", note="data")
    common.prepare_data(cfg)
    _, val = common.datasets(cfg)
    model = common.load_dense(cfg)
    ctx.progress.stage_start("baseline", note="dense mAP")
    metrics = common.evaluate_map(model, val)
    ctx.progress.stage_start("baseline", note=f"latency on {cfg.budget.runtime}")
    lat = common.measure_latency(model, cfg, common.frames_for_timing(val, cfg), ctx.out_dir / "work")
    size = common.size_of(model, cfg)
    budget_ms = cfg.budget.latency_target(lat.p50_ms)
    floor = cfg.budget.floor(metrics["map"])
    dense = {**metrics, "p50_ms": lat.p50_ms, "p99_ms": lat.p99_ms, **size}
    log.info("dense: mAP %.3f, p50 %.2f ms; budget %.2f ms at mAP >= %.3f", metrics["map"], lat.p50_ms, budget_ms, floor)
    return {
        "dense": dense,
        "latency": lat.to_dict(),
        "latency_budget_ms": budget_ms,
        "map_floor": floor,
        "val_images": len(val),
        "note": f"mAP {metrics['map']:.3f}, p50 {lat.p50_ms:.2f} ms -> budget {budget_ms:.2f} ms, floor {floor:.3f}",
    }
