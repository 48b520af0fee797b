"""Stage 1, baseline: the dense model's mAP and measured latency, and the budget in absolute terms.

The budget's relative forms (``speedup``, ``max_map_drop``) become absolute numbers here, from
this measurement, and every later stage reads them from this record: a resumed job keeps the
same targets even though a re-measured latency would differ by noise. The dense latency is the
median of >= 5 timed blocks' p50s (``JobEnv.measure_latency_blocks``); the record keeps every
block's p50, so ``report.json`` shows how much one measurement of it moves.
"""

from __future__ import annotations

import logging

from avprune.prune_job.context import StageContext
from avprune.prune_job.records import BaselineRecord, ModelSummary
from deploy.timing import LatencySummary, percentile

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> BaselineRecord:
    """Measure the dense model; the record holds its summary row, ``latency_budget_ms`` and ``map_floor``."""
    cfg, env = ctx.config, ctx.env
    ctx.progress.stage_start("baseline", note="data")
    env.prepare_data()
    model = env.load_dense()
    ctx.progress.stage_start("baseline", note="dense mAP")
    score = env.evaluate_map(model)
    ctx.progress.stage_start("baseline", note=f"latency on {cfg.budget.runtime}")
    timing = env.measure_latency_blocks(model, ctx.out_dir / "work")
    blocks = timing.block_p50_ms["dense"]
    whole = timing.summaries["dense"]
    # the budget's p50 is the median of the blocks' p50s: one slow block (another job on the
    # machine) cannot move it; the tail and mean come from every sample
    lat = LatencySummary(p50_ms=float(percentile(blocks, 50)), p90_ms=whole.p90_ms, p99_ms=whole.p99_ms,
                         mean_ms=whole.mean_ms, n=whole.n)
    size = env.size_of(model)
    rec = BaselineRecord(
        dense=ModelSummary(map=score.map, map50=score.map50, p50_ms=lat.p50_ms, p99_ms=lat.p99_ms,
                           params=size.params, gmacs=size.gmacs),
        latency=lat,
        latency_budget_ms=cfg.budget.latency_target(lat.p50_ms),
        map_floor=cfg.budget.floor(score.map),
        val_images=len(env.val_set),
        latency_blocks_ms=tuple(blocks),
    )
    log.info("dense: mAP %.3f, p50 %.2f ms (median of %d blocks, %.2f-%.2f); budget %.2f ms at mAP >= %.3f",
             score.map, lat.p50_ms, len(blocks), min(blocks), max(blocks), rec.latency_budget_ms, rec.map_floor)
    return rec
