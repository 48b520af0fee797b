"""One-shot latency-aware allocation (HALP's knapsack) at a *measured* speed-up, for ``oneshot_recovery``.

Issue #12 lists "which layers are cut" as a recovery lever: at 200 fine-tune steps the knapsack
with measured per-unit damage kept 1.8-3.3 mAP points more than uniform pruning at ~2x
(``benchmarks.allocation``). This module makes that allocation comparable with the uniform
one-shot rows of :mod:`benchmarks.oneshot_recovery`, at the same measured speed and the same
fine-tune:

1. a cost per layer and channel count: ``ort``, the prune job's latency table of this graph,
   runtime and machine (its cache, or measured), re-fitted to whole-graph probes
   (:mod:`avprune.prune_job.in_graph`, also cached); or ``macs``, multiply-accumulates scaled to the
   measured dense latency (measured 2026-12-06: at the ``ort`` table's 1.55x budget the model ran
   1.17x, and no budget it allowed got past 1.42x: the probes' noise credits layers that do not pay);
2. per unit, the detection-loss increase with only that unit pruned to 25/50/75% (the prune job's
   ``metric: loss`` sensitivity scan, :func:`benchmarks.allocation.damage_curves`, cached);
3. :class:`pruning.allocation_controller.AllocationController` (``allocation="latency"``, damage set,
   no ramp) allocates channel groups (multiples of 16) under a predicted budget, and
   :meth:`pruning.Pruner.finalize` removes them;
4. the predicted budget is corrected until the finalized model's *measured* graph speed-up (ORT,
   paired and interleaved with dense, :func:`deploy.timing.time_runtimes` as the side-by-side tables
   time it) is within ``tol`` of the target: the table ranks layers, the measurement sets how far to cut.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("benchmarks.oneshot_knapsack")

MULTIPLE = 16
COSTS = ("ort", "macs")


def calibrated_table(env: Any, work: Path, cost: str = "ort") -> tuple[Any, float]:
    """The cost table of the dense graph and the dense p50 it is scaled to: ``ort``, the job's latency
    table (cached), in-graph calibrated; ``macs``, multiply-accumulates per layer
    (:func:`pruning.latency_model.macs_measure_fn`) scaled to the measured dense latency."""
    from avprune.prune_job import in_graph
    from avprune.prune_job.latency_table import load_or_measure, macs_table, measure_fn_for

    if cost not in COSTS:
        raise ValueError(f"cost {cost!r}: expected one of {', '.join(COSTS)}")
    cfg = env.config
    dense = env.load_dense().eval()
    dense_ms = env.measure_latency(dense, work).p50_ms
    if cost == "macs":
        table = macs_table(dense, env.example_input(cfg.budget.batch), cfg, dense_ms)  # the job's, proportional
        log.info("MAC table: dense %.2f ms, predicted %.2f ms", dense_ms, table.predict({}))
        return table, dense_ms
    table, cache, source = load_or_measure(dense, env.example_input(cfg.budget.batch), cfg, measure_fn_for(cfg))
    table.calibrate(dense_ms)
    res = in_graph.calibrate(table, env, table_cache=cache, table_key=str(table.meta["cache_key"]),
                             channel_multiple=MULTIPLE, dense_p50_ms=dense_ms)
    log.info("latency table (%s), in-graph calibration (%s, %d probes); dense %.2f ms, predicted %.2f ms",
             source, res.source, res.probes, dense_ms, table.predict({}))
    return table, dense_ms


def allocate(env: Any, table: Any, budget_ms: float, damage: dict[str, list[list[float]]], *,
             reconstruct_images: int = 0) -> tuple[Any, dict[str, Any]]:
    """The dense model with the knapsack's channel groups under ``budget_ms`` (predicted) removed;
    ``reconstruct_images`` > 0: the layers reading pruned channels re-solved on that many training
    images before the groups go (:func:`pruning.reconstruct.reconstruct`)."""
    from pruning import Pruner
    from pruning.allocation_controller import AllocationController

    model = env.load_dense().eval()
    ctrl = AllocationController(table, budget_ms, total_steps=1, allocation="latency", ramp_fraction=0.0)
    ctrl.set_damage({u: [(float(s), float(d)) for s, d in c] for u, c in damage.items()})
    imp = "magnitude"
    pruner = Pruner(model, importance=imp, granularity="channel", controller=ctrl,
                    example_inputs=env.example_input(1), layer_filter=env.layer_filter(model, imp),
                    channel_multiple=MULTIPLE, predict_latency=table.predict)
    pruner.update()
    sizes = {g.root: g.size for g in pruner.groups}
    last = ctrl.last
    kept = {u: [int(k), int(sizes[u])] for u, k in (last.kept if last else {}).items() if k < sizes[u]}
    info = {"budget_ms": budget_ms, "predicted_ms": last.predicted_ms if last else None, "cut_units": kept}
    if reconstruct_images > 0:
        info["reconstruct"] = reconstruct_masked(env, model, reconstruct_images)
    return pruner.finalize().eval(), info


def reconstruct_masked(env: Any, model: Any, images: int) -> dict[str, Any]:
    """Re-solve ``model``'s (masked) consumers of pruned channels against the dense model on
    ``images`` training images; a summary of the fits."""
    import time

    from pruning.filters import detector_core_forward
    from pruning.reconstruct import fit_summary, reconstruct

    teacher = env.load_dense().eval()
    t0 = time.perf_counter()
    fits = reconstruct(model, teacher, env.calibration_batches(teacher, images), forward_fn=detector_core_forward)
    out = {"images": images, "seconds": time.perf_counter() - t0, **fit_summary(fits)}
    log.info("reconstruction: %d layers on %d images in %.0f s, mean relative error %.3f -> %.3f", out["layers"],
             images, out["seconds"], out["mean_error_before"], out["mean_error_after"])
    return out


def measured_speedup(env: Any, dense_onnx: Path, model: Any, work: Path, *, blocks: int = 10) -> float:
    """``model``'s ORT graph speed-up over the dense graph, paired and interleaved on 8 val frames
    (:func:`deploy.timing.time_runtimes`, as the benchmarks' side-by-side tables time it)."""
    import torch

    from deploy.runtimes import open_runtime
    from deploy.timing import time_runtimes

    cfg = env.config
    frames = [env.val_set.load_image(i) for i in range(min(8, len(env.val_set)))]
    torch.set_num_threads(cfg.budget.threads)
    with open_runtime(dense_onnx, threads=cfg.budget.threads) as d, \
            open_runtime(env.export_core(model, work / "knapsack_try.onnx"), threads=cfg.budget.threads) as m:
        t = time_runtimes({"dense": d, "model": m}, frames, end_to_end=False, reference="dense",
                          blocks=blocks, block_size=len(frames))
    return float(t.ratios["model"].ratio)


def knapsack_cut(env: Any, speedup: float, damage: dict[str, list[list[float]]], work: Path, *,
                 cost: str = "ort", share: float | None = None, tol: float = 0.02,
                 tries: int = 5, reconstruct_images: int = 0) -> tuple[Any, dict[str, Any]]:
    """A finalized model whose measured graph speed-up over dense is within ``tol`` of ``speedup``
    (or the closest of ``tries``), and what each try predicted and measured. ``share``: no search,
    the budget is that share of the dense prediction (repeats an earlier row's cut exactly)."""
    if not speedup > 1:
        raise ValueError(f"speedup {speedup!r}: give the measured graph speed-up to cut to, > 1 (e.g. 1.55)")
    if share is not None and not 0 < share < 1:
        raise ValueError(f"share {share!r}: give the budget as a share of the dense prediction, in (0, 1)")
    table, dense_ms = calibrated_table(env, work, cost)
    dense = env.export_core(env.load_dense().eval(), work / "dense.onnx")  # exported once, timed beside each try
    budget = table.predict({}) * share if share is not None else table.predict({}) / speedup
    history: list[dict[str, Any]] = []
    best: tuple[float, Any, dict[str, Any]] | None = None
    for _ in range(1 if share is not None else tries):
        model, info = allocate(env, table, budget, damage)  # speed depends on the cut alone: solve once, below
        measured = measured_speedup(env, dense, model, work)
        info["measured_speedup"], info["share"] = measured, budget / table.predict({})
        history.append({k: v for k, v in info.items() if k != "cut_units"})
        log.info("knapsack at predicted %.2f ms: measured %.3fx (target %.2fx)", budget, measured, speedup)
        miss = abs(measured / speedup - 1)
        if best is None or miss < best[0]:
            best = (miss, model, info)
        if miss <= tol:
            break
        # the table ranks the layers; the measurement says how far to cut: scale the budget's saving
        dense_pred, saving = table.predict({}), table.predict({}) - budget
        grow = (1 - 1 / speedup) / (1 - 1 / measured) if measured > 1.01 else 2.0
        budget = max(0.2 * dense_pred, dense_pred - saving * min(2.0, max(0.5, grow)))
    assert best is not None
    _, model, info = best
    if reconstruct_images > 0:  # the chosen cut again (the allocation is deterministic), its layers re-solved
        model, solved = allocate(env, table, info["budget_ms"], damage, reconstruct_images=reconstruct_images)
        assert solved["cut_units"] == info["cut_units"], "the knapsack's allocation changed between two calls"
        info["reconstruct"] = solved["reconstruct"]
    return model, {**info, "cost": cost, "dense_ms": dense_ms, "tries": history}
