"""The latency-table stage's saving fit: the table's overall scale fitted to whole-graph timings.

Why: a measured table is the sum of layers timed alone, and the job anchored it to the dense model
by a constant overhead. On ONNX Runtime CPU that overhead came out at -9.5 ms for a 7.0 ms graph
(the isolated layers sum to 16.5 ms), so every predicted saving was ~2.4x what the graph delivers:
the controller of a 2x budget aimed at 1.84 ms predicted, got a model measuring 4.8 ms, and its PI
correction sat at its clip (benchmarks/RESULTS.md prune_job_oneshot2, 1.63x for a 2x budget).

:func:`pruning.graph_calibration.fit_saving` times the start model dense and thinned uniformly to
:data:`SPARSITIES` (4 whole-graph timings, interleaved as the in-graph probes are) and fits the
table's slope through the dense point. It is the default whenever the in-graph calibration (one
probe per channel group, which also fits each layer's share) is off: every allocation and
controller reads the same fitted table. Cached beside the table, keyed like the in-graph fit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from avprune.prune_job import in_graph
from perception.io import atomic_write_json

if TYPE_CHECKING:
    from avprune.prune_job.env import JobEnv
    from pruning.latency_model import LatencyTable

log = logging.getLogger(__name__)

#: Uniform sparsities of the thinned copies (capped at ``pruning.max_sparsity``): the range a budget
#: of 1.3-3x reaches, so the fitted slope holds where the controllers aim.
SPARSITIES = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class SavingFitResult:
    """What the fit did (the latency-table record's ``saving_fit_*`` fields); ms in the table's unit."""

    source: str  # "cache" or "measured"
    cache: str
    scale_factor: float  # fitted slope over the slope before the fit, in probe units (~1/2.4: it over-predicted savings)
    points: tuple[tuple[float, float, float], ...]  # (uniform sparsity, predicted ms after the fit, measured ms)
    before: tuple[float, ...]  # each point's prediction before the fit
    residual_rms_ms: float
    wall_s: float


def sparsities(max_sparsity: float) -> tuple[float, ...]:
    """:data:`SPARSITIES` the job allows, or ``max_sparsity`` alone when it is below them all."""
    return tuple(s for s in SPARSITIES if s <= max_sparsity) or (float(max_sparsity),)


def settings(channel_multiple: int, max_sparsity: float) -> dict[str, Any]:
    """Everything the fit depends on beyond the table's own cache key."""
    return {"sparsities": list(sparsities(max_sparsity)), "rounds": in_graph.ROUNDS,
            "channel_multiple": int(channel_multiple), "version": 1}


def cache_file(table_cache: Path, table_key: str, table: LatencyTable, cfg: dict[str, Any]) -> tuple[Path, str]:
    """(file, key) of the fit cached beside the table file ``table_cache`` keyed ``table_key``."""
    key = "|".join((table_key, json.dumps(cfg, sort_keys=True), f"entries={in_graph.entries_digest(table)}"))
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return table_cache.with_name(f"{table_cache.stem}.saving_fit-{digest}.json"), key


def fit(table: LatencyTable, env: JobEnv, *, table_cache: Path, table_key: str, channel_multiple: int,
        dense_p50_ms: float, measure_many: in_graph.MeasureMany | None = None) -> SavingFitResult:
    """Fit ``table``'s scale (in place) to whole-graph timings, or apply the cached fit; then anchor
    it to ``dense_p50_ms`` (the measured latency of the model pruning starts from) as the in-graph
    fit is anchored. ``measure_many`` replaces the runtime timing (tests)."""
    from pruning.graph_calibration import fit_saving

    cfg = env.config
    spars = sparsities(cfg.pruning.max_sparsity)
    path, key = cache_file(table_cache, table_key, table, settings(channel_multiple, cfg.pruning.max_sparsity))
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    t0 = time.perf_counter()
    cached = in_graph.read_cache(path, digest, "saving-fit")
    if cached is not None:
        table.scale, table.overhead_ms = float(cached["scale"]), float(cached["overhead_ms"])
        source, doc = "cache", cached["fit"]
    else:
        model = env.load_start().eval()  # the folded model when pruning.fold_gates is on: the one pruned
        from pruning.importance import offline_importance  # torch: imported when needed
        imp = offline_importance(cfg.pruning.importances)
        res = fit_saving(table, model, env.example_input(cfg.budget.batch),
                         measure_many or in_graph.measure_many_for(cfg, {}), sparsities=spars,
                         channel_multiple=channel_multiple,
                         pruner_kwargs={"importance": imp, "layer_filter": env.layer_filter(model, imp)})
        doc = {"dense_ms": res.dense_ms, "points": [list(p) for p in res.points], "before": list(res.before),
               "scale_factor": res.scale_factor, "residual_rms_ms": res.residual_rms_ms}
        atomic_write_json(path, {"fingerprint": digest, "cache_key": key,
                                 "settings": settings(channel_multiple, cfg.pruning.max_sparsity),
                                 "scale": table.scale, "overhead_ms": table.overhead_ms, "fit": doc})
        source = "measured"
    probe_dense = float(doc["dense_ms"])
    k = in_graph.anchor(table, probe_dense, dense_p50_ms, cfg.budget.end_to_end)

    def in_unit(ms: float) -> float:  # a timing as the anchored table reads it
        return ms + dense_p50_ms - probe_dense if cfg.budget.end_to_end else ms * k

    points = tuple((float(s), in_unit(float(f)), in_unit(float(m))) for s, f, m in doc["points"])
    table.meta["saving_fit"] = {"dense_p50_ms": dense_p50_ms, "probe_dense_ms": probe_dense,
                                "end_to_end": cfg.budget.end_to_end, "points": [list(p) for p in points]}
    # The slope correction in the probes' own unit (x0.376 on the benchmark checkpoint): the job's
    # table.scale / prior_scale also carries the drift between the baseline's timing and the probes'
    # (k), which made the same fit read x0.43 in one job and x0.61 in another.
    factor = float(doc["scale_factor"])
    log.info("saving fit (%s): table slope x%.3f; %s", source, factor,
             ", ".join(f"{s:.2f}: {p:.2f} pred / {m:.2f} meas ms" for s, p, m in points))
    return SavingFitResult(source=source, cache=str(path), scale_factor=factor, points=points,
                           before=tuple(float(b) for b in doc["before"]),  # already in the table's unit
                           residual_rms_ms=float(doc["residual_rms_ms"]) * (1.0 if cfg.budget.end_to_end else k),
                           wall_s=time.perf_counter() - t0)
