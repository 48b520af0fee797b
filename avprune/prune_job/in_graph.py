"""The latency-table stage's in-graph calibration: the per-layer table re-fitted to the whole graph.

Why: a layer timed alone in ONNX Runtime pays NCHWc reorders of its own maps, so the isolated
table over-predicts layers with large maps and HALP's knapsack (``pruning.allocation: latency``)
cuts layers the graph does not reward (benchmarks/allocation.py measured 1.05x where uniform gave
1.67x at the same predicted budget; with this calibration 1.67x). :func:`pruning.graph_calibration.calibrate_in_graph`
times the whole core dense and with one channel group thinned at a time, and fits each layer's
factor; this module supplies the job's timing (the budget's runtime, threads and input size, all
probes in interleaved rounds), caches the fitted factors beside the table, and anchors the
prediction to the baseline's dense measurement.

Cache: ``cache_dir/latency/<runtime>-<device>-<digest>.in_graph.json``, keyed on the table's own
cache key plus the calibration settings (:func:`settings`) and a digest of the table's entries (a
re-measured table is re-calibrated). The factors do not depend on the weights (which channels a
probe removes does not change its latency), only on the graph the key already hashes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from avprune.config.prune import PruneJobConfig
from perception.io import atomic_write_json

if TYPE_CHECKING:
    from torch import nn

    from avprune.prune_job.env import JobEnv
    from pruning.latency_model import LatencyTable

log = logging.getLogger(__name__)

#: Probe sparsity per group: deep enough that each probe's saving stands above timing noise
#: (benchmarks/allocation.py uses the same 0.75).
PROBE_SPARSITY = 0.75
#: Interleaved timing rounds over all probes (each round runs every probe once; the median is kept).
ROUNDS = 15
#: Out-of-sample check measured with the probes, left out of the fit: every group at this sparsity.
HOLDOUT = 0.5
RIDGE = 0.05
MAX_FACTOR = 3.0

MeasureMany = Callable[[Sequence["nn.Module"]], Sequence[float]]


@dataclass(frozen=True)
class InGraphResult:
    """What the calibration did (the latency-table record's ``in_graph_*`` fields)."""

    source: str  # "cache" or "measured"
    cache: str
    probes: int
    dense_ms: float  # the dense core as the probes timed it
    residual_rms_ms: float
    holdout_predicted_ms: float | None  # every group at HOLDOUT, predicted after anchoring ...
    holdout_measured_ms: float | None  # ... and measured (anchored the same way)
    wall_s: float
    timing: dict[str, float]  # seconds spent building probes / exporting / timing (measured runs only)


def settings(channel_multiple: int) -> dict[str, Any]:
    """Everything the calibrated factors depend on beyond the table's own cache key."""
    return {"probe_sparsity": PROBE_SPARSITY, "rounds": ROUNDS, "ridge": RIDGE, "max_factor": MAX_FACTOR,
            "holdout": HOLDOUT, "channel_multiple": int(channel_multiple), "prior": "proportional", "version": 1}


def entries_digest(table: LatencyTable) -> str:
    return hashlib.sha256(json.dumps(table.entries, sort_keys=True).encode()).hexdigest()[:16]


def read_cache(path: Path, digest: str, what: str) -> dict[str, Any] | None:
    """A fit cached at ``path`` when it reads and was made for ``digest``; None (with a log line) otherwise."""
    if not path.is_file():
        return None
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("%s cache %s does not read (%s); re-measuring", what, path, e)
        return None
    if cached.get("fingerprint") != digest:
        log.warning("%s cache %s was fitted for another table or settings; re-measuring", what, path)
        return None
    return cached


def cache_file(table_cache: Path, table_key: str, table: LatencyTable, channel_multiple: int) -> tuple[Path, str]:
    """(file, key) of the calibration cached beside the table file ``table_cache`` keyed ``table_key``."""
    key = "|".join((table_key, json.dumps(settings(channel_multiple), sort_keys=True), f"entries={entries_digest(table)}"))
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return table_cache.with_name(f"{table_cache.stem}.in_graph-{digest}.json"), key


def measure_many_for(config: PruneJobConfig, timing: dict[str, float]) -> MeasureMany:
    """``measure_many(models) -> p50 ms each``: every model's core on the budget's runtime, threads and
    input size, all timed in the same interleaved rounds (:func:`deploy.timing.time_paired`), so drift
    hits every probe alike. Adds the seconds spent exporting and timing to ``timing``."""
    import torch

    from deploy.timing import time_paired
    from pruning.filters import DetectorCore

    b = config.budget
    shape = (b.batch, 3, *b.input_size)

    def measure_many(models: Sequence[nn.Module]) -> list[float]:
        t0 = time.perf_counter()
        x = torch.randn(shape)
        if b.runtime == "onnxruntime":
            from deploy.runtimes.ort_session import module_session

            sessions = [module_session(DetectorCore(m).eval(), shape, threads=b.threads, device=b.device)[0]
                        for m in models]
            feed = {"x": x.numpy()}
            calls = {str(i): (lambda _x, s=s: s.run(None, feed)) for i, s in enumerate(sessions)}
        elif b.runtime == "pytorch":
            cores = [DetectorCore(m).eval() for m in models]

            def call(core: nn.Module) -> Callable[[Any], Any]:
                def run(_x: Any) -> Any:
                    with torch.no_grad():
                        return core(x)
                return run

            calls = {str(i): call(c) for i, c in enumerate(cores)}
        else:
            raise ValueError(f"budget.runtime {b.runtime!r}: no in-graph calibration for it here; set "
                             "pruning.in_graph_calibration: false")
        timing["export_s"] = timing.get("export_s", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        threads = torch.get_num_threads()
        torch.set_num_threads(b.threads)
        try:
            paired = time_paired(calls, [None], blocks=ROUNDS, block_size=1, warmup=2, resamples=50)
        finally:
            torch.set_num_threads(threads)
        timing["timing_s"] = timing.get("timing_s", 0.0) + time.perf_counter() - t0
        return [paired.summaries[str(i)].p50_ms for i in range(len(models))]

    return measure_many


def anchor(table: LatencyTable, probe_dense_ms: float, dense_p50_ms: float, end_to_end: bool) -> float:
    """Make the fitted table predict the baseline's dense latency, the unit the budget is in.

    The probes time the core alone in their own session minutes after the baseline: the graph part is
    re-expressed at the baseline's measurement by their ratio (drift scales every layer alike); with
    ``end_to_end`` the difference is pre/post-processing, a constant, added to the overhead.
    Returns the factor (1.0 for end to end) that maps a probe-timed ms to the table's unit.
    """
    if end_to_end:
        table.overhead_ms += dense_p50_ms - probe_dense_ms
        return 1.0
    k = dense_p50_ms / probe_dense_ms
    table.scale *= k
    table.overhead_ms *= k
    return k


def _apply(table: LatencyTable, d: dict[str, Any]) -> None:
    table.layer_scale = {k: float(v) for k, v in d["layer_scale"].items()}
    table.scale, table.overhead_ms = float(d["scale"]), float(d["overhead_ms"])
    table.meta["in_graph"] = d["meta"]


def calibrate(table: LatencyTable, env: JobEnv, *, table_cache: Path, table_key: str, channel_multiple: int,
              dense_p50_ms: float, measure_many: MeasureMany | None = None) -> InGraphResult:
    """Fit ``table`` (in place) to whole-graph probes, or apply the cached fit; then anchor it to
    ``dense_p50_ms`` (the measured latency of the model pruning starts from: the baseline's dense
    latency, or the gate_fold stage's). ``measure_many`` replaces the runtime timing (tests)."""
    from pruning.graph_calibration import calibrate_in_graph

    cfg = env.config
    path, key = cache_file(table_cache, table_key, table, channel_multiple)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    t0 = time.perf_counter()
    timing: dict[str, float] = {}
    cached = read_cache(path, digest, "in-graph calibration")
    if cached is not None:
        _apply(table, cached)
        source, fit = "cache", cached["fit"]
    else:
        model = env.load_start().eval()  # the folded model when pruning.fold_gates is on: the one pruned
        from pruning.importance import offline_importance  # torch: imported when needed
        imp = offline_importance(cfg.pruning.importances)
        measure = measure_many or measure_many_for(cfg, timing)
        t1 = time.perf_counter()
        cal = calibrate_in_graph(
            table, model, env.example_input(cfg.budget.batch), measure, channel_multiple=channel_multiple,
            probe_sparsity=PROBE_SPARSITY, ridge=RIDGE, max_factor=MAX_FACTOR, holdout=(HOLDOUT,),
            pruner_kwargs={"importance": imp, "layer_filter": env.layer_filter(model, imp)}, prior="proportional")
        timing["total_s"] = time.perf_counter() - t1
        timing["probes_s"] = max(0.0, timing["total_s"] - timing.get("export_s", 0.0) - timing.get("timing_s", 0.0))
        hold = cal.holdout[0] if cal.holdout else (None, None)
        fit = {"dense_ms": cal.dense_ms, "probes": len(cal.probes), "residual_rms_ms": cal.residual_rms_ms,
               "holdout_predicted_ms": hold[0], "holdout_measured_ms": hold[1],
               "timing": {k: round(v, 2) for k, v in timing.items()}}
        atomic_write_json(path, {"fingerprint": digest, "cache_key": key, "settings": settings(channel_multiple),
                                 "layer_scale": table.layer_scale, "scale": table.scale,
                                 "overhead_ms": table.overhead_ms, "meta": table.meta.get("in_graph", {}), "fit": fit})
        source = "measured"
    probe_dense = float(fit["dense_ms"])
    k = anchor(table, probe_dense, dense_p50_ms, cfg.budget.end_to_end)

    def in_unit(ms: float | None) -> float | None:  # the holdout, both sides mapped as the table was
        if ms is None:
            return None
        return ms + dense_p50_ms - probe_dense if cfg.budget.end_to_end else ms * k

    table.meta["in_graph_anchor"] = {"dense_p50_ms": dense_p50_ms, "probe_dense_ms": probe_dense,
                                     "end_to_end": cfg.budget.end_to_end}
    return InGraphResult(source=source, cache=str(path), probes=int(fit["probes"]), dense_ms=probe_dense,
                         residual_rms_ms=float(fit["residual_rms_ms"]), holdout_predicted_ms=in_unit(fit.get("holdout_predicted_ms")),
                         holdout_measured_ms=in_unit(fit.get("holdout_measured_ms")), wall_s=time.perf_counter() - t0,
                         timing=dict(fit.get("timing", {})) if source == "measured" else {})
