"""Stage 2, latency table: pruning's per-layer lookup table measured on the budget's runtime.

Per-layer entries depend on the model graph, input size, batch, runtime, device and threads,
not on the weights, so they are cached in ``cache_dir/latency/`` under a fingerprint of all of
them (:func:`cache_key`): the graph is hashed from the dense model as loaded (every module's
type, parameter shapes and conv geometry), never taken from the job's ``model.name``, so a
checkpoint of another architecture or class count can never reuse or poison another's table.
A cached file whose stored fingerprint differs (or that does not read) is re-measured, with a
log line. The constant overhead (pre/post-processing, dispatch) is calibrated per job against
the baseline's measured latency.

This stage also resolves ``pruning.channel_multiple`` once (``auto``: probed on the runtime, the
choice and why recorded) and checks feasibility before any fine-tuning: a latency budget below the
table's prediction at the widest allowed pruning raises
:class:`~avprune.prune_job.errors.BudgetUnreachableError` (exit 2) naming the nearest feasible budget.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from avprune.config.prune import PruneJobConfig
from avprune.prune_job import preflight
from avprune.prune_job.context import StageContext
from avprune.prune_job.errors import BudgetUnreachableError
from avprune.prune_job.gate_fold_stage import start_latency_ms
from avprune.prune_job.records import BaselineRecord, LatencyTableRecord
from perception.io import atomic_write_json

if TYPE_CHECKING:
    from torch import nn

    from pruning.latency_model import LatencyTable

#: ``measure_fn(module, input_shape) -> ms``: how the latency table times one layer.
MeasureFn = Callable[["nn.Module", tuple[int, ...]], float]

log = logging.getLogger(__name__)

#: Channel fractions measured per layer. Three points keep the ORT table to about a minute for
#: SSDlite on 2 cores; the model interpolates between them.
FRACTIONS = (0.25, 0.5, 1.0)


def ort_layer_measure_fn(threads: int, device: str = "cpu", repeats: int = 15, warmup: int = 3) -> MeasureFn:
    """``measure_fn(module, input_shape) -> ms`` that times one layer in ONNX Runtime, in a session
    from the project's one factory (threads explicit, spinning off), as the deployed graph runs."""
    from deploy.runtimes.ort_session import layer_measure_fn

    return layer_measure_fn(threads=threads, device=device, repeats=repeats, warmup=warmup)


def measure_fn_for(config: PruneJobConfig) -> MeasureFn:
    """The per-layer measuring callable for the budget's runtime."""
    b = config.budget
    if b.runtime == "onnxruntime":
        from deploy.runtimes.ort_session import layer_measure_fn

        return layer_measure_fn(threads=b.threads, device=b.device)
    if b.runtime == "pytorch":
        import torch

        from pruning.latency_model import torch_measure_fn

        torch.set_num_threads(b.threads)
        return torch_measure_fn()
    raise ValueError(
        f"budget.runtime {b.runtime!r}: no per-layer latency measurement for it here (TensorRT needs a CUDA "
        "device and the tensorrt package); set budget.runtime to onnxruntime or pytorch"
    )


def grid_multiple(config: PruneJobConfig) -> int:
    """The channel multiple the table's grid is measured on (``auto``: 16, the AVX-512 block; the
    table interpolates between grid points, so the grid need not match the multiple chosen later)."""
    m = config.pruning.channel_multiple
    return m if isinstance(m, int) else 16


def resolve_channel_multiple(config: PruneJobConfig, table: LatencyTable) -> tuple[int, str]:
    """``pruning.channel_multiple`` as an int and why: the config's value, or ``auto`` probed once
    on the budget's runtime with :func:`pruning.alignment.choose_channel_multiple`."""
    from pruning.alignment import choose_channel_multiple, representative_layers

    m = config.pruning.channel_multiple
    if isinstance(m, int):
        return m, f"pruning.channel_multiple: {m} in the job config"
    choice = choose_channel_multiple(measure_fn_for(config), representative_layers(table))
    return choice.multiple, f"auto: {choice.reason}"


def block_costs(table: LatencyTable, blocks: list[str]) -> dict[str, float]:
    """Each block's latency from the table: its layers' calibrated entries at full width (removing
    the block removes them; the add it leaves is free)."""
    full = table.resolve({})
    return {b: table.scale * sum(table.layer_latency(n, *full[n]) for n in table.layers if n.startswith(b + "."))
            for b in blocks}


def graph_fingerprint(model: nn.Module) -> str:
    """Hash of the model graph the table measures: every module's name and type, its own parameter
    shapes (channel counts, pruned widths included) and conv geometry; weights do not count."""
    h = hashlib.sha256()
    for name, m in model.named_modules():
        shapes = tuple((n, tuple(p.shape)) for n, p in m.named_parameters(recurse=False))
        geometry = tuple((a, getattr(m, a)) for a in ("kernel_size", "stride", "padding", "dilation", "groups")
                         if hasattr(m, a))
        h.update(f"{name}|{type(m).__name__}|{shapes}|{geometry}\n".encode())
    return h.hexdigest()[:16]


def cache_key(config: PruneJobConfig, graph: str) -> str:
    """Everything a cached table depends on: runtime, device (with the CPU model), threads, input
    size, batch, the measured channel fractions and the graph fingerprint."""
    from deploy.runtimes.base import cpu_name

    b = config.budget
    return "|".join(map(str, (f"graph={graph}", b.runtime, b.device, cpu_name(), f"threads={b.threads}",
                              f"input={tuple(b.input_size)}", f"batch={b.batch}", f"fractions={FRACTIONS}",
                              f"multiple={grid_multiple(config)}")))


def cache_path(config: PruneJobConfig, key: str) -> Path:
    """The cache file for ``key`` (named by its hash, tagged with runtime and device for humans)."""
    b = config.budget
    return config.cache_dir / "latency" / f"{b.runtime}-{b.device}-{_digest(key)}.json"


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def load_cached(path: Path, key: str, *, runtime: str, device: str) -> LatencyTable | None:
    """The table cached at ``path`` when its stored fingerprint is ``key``'s; None (with a log line
    saying why) when it is missing, unreadable or measured for something else."""
    from pruning.latency_model import LatencyTable

    if not path.is_file():
        return None
    try:
        table = LatencyTable.load(path, runtime=runtime, device=device)
    except (ValueError, KeyError, TypeError, OSError) as e:
        log.warning("latency table cache %s does not read (%s); re-measuring", path, e)
        return None
    stored = table.meta.get("fingerprint")
    if stored != _digest(key):
        log.warning("latency table cache %s was measured for another graph/runtime (fingerprint %s, this job %s); "
                    "re-measuring", path, stored, _digest(key))
        return None
    return table


def load_or_measure(model: nn.Module, example_input: object, config: PruneJobConfig,
                    measure_fn: MeasureFn) -> tuple[LatencyTable, Path, str]:
    """The cached table of this graph, runtime, threads and device, or a freshly measured (and cached)
    one. Returns (table, cache file, "cache" | "measured"); the table's ``meta["cache_key"]`` is the key."""
    from pruning.latency_model import LatencyTable

    b = config.budget
    graph = graph_fingerprint(model)
    key = cache_key(config, graph)
    path = cache_path(config, key)
    table = load_cached(path, key, runtime=b.runtime, device=b.device)
    if table is not None:
        table.meta["cache_key"] = key
        return table, path, "cache"
    t0 = time.perf_counter()
    table = LatencyTable.measure(model, example_input, measure_fn, runtime=b.runtime, device=b.device,
                                 fractions=FRACTIONS, multiple=grid_multiple(config))
    table.meta.update({"fingerprint": _digest(key), "cache_key": key, "graph": graph, "model": config.model.name,
                       "input_size": list(b.input_size), "batch": b.batch, "threads": b.threads,
                       "measure_s": round(time.perf_counter() - t0, 1)})
    atomic_write_json(path, table.to_dict())
    return table, path, "measured"


def macs_table(model: nn.Module, example_input: object, config: PruneJobConfig, dense_ms: float) -> LatencyTable:
    """``pruning.latency_costs: macs``: each layer's multiply-accumulates, scaled so the dense model
    predicts ``dense_ms`` (proportional, no fixed part: the controller's measured latency corrects the
    rest, pre/post-processing included with ``end_to_end``). Computed in well under a second: no cache."""
    from pruning.latency_model import macs_table as build

    table = build(model, example_input, dense_ms=dense_ms, multiple=grid_multiple(config),
                  runtime=f"macs ({config.budget.runtime})")
    table.meta.update({"costs": "macs", "dense_ms": float(dense_ms), "model": config.model.name})
    return table


def run(ctx: StageContext) -> LatencyTableRecord:
    """Load or measure the table, calibrate it to the dense model, save a copy in the output dir."""
    cfg, b = ctx.config, ctx.config.budget
    model = ctx.env.load_start().eval()  # the graph as loaded is the cache key, not model.name
    base = ctx.record(BaselineRecord)
    start_ms = start_latency_ms(ctx)  # the folded model's when the gate_fold stage folded gates
    if cfg.pruning.latency_costs == "macs":
        ctx.progress.stage_start("latency_table", note="MAC cost table (no timing)")
        table, cached, source = macs_table(model, ctx.env.example_input(b.batch), cfg, start_ms), "", "macs"
        overhead = table.overhead_ms
    else:
        ctx.progress.stage_start("latency_table", note=f"latency table on {b.runtime}")
        table, cached, source = load_or_measure(model, ctx.env.example_input(b.batch), cfg, measure_fn_for(cfg))
        overhead = table.calibrate(start_ms)
    multiple, reason = resolve_channel_multiple(cfg, table)
    log.info("channel multiple %d (%s)", multiple, reason)
    in_graph = None
    if cfg.pruning.in_graph():
        # After the proportional start, before the feasibility check: the knapsack and the check both
        # read the in-graph costs (issue #12: the isolated table led the knapsack to 1.05x, this to 1.67x).
        from avprune.prune_job import in_graph as ig

        ctx.progress.stage_start("latency_table", note="in-graph calibration (one probe per channel group)")
        in_graph = ig.calibrate(table, ctx.env, table_cache=cached, table_key=str(table.meta["cache_key"]),
                                channel_multiple=multiple, dense_p50_ms=start_ms)
        overhead = table.overhead_ms
        log.info("in-graph calibration (%s): %d probes, residual RMS %.3f ms, holdout %s pred / %s meas, %.1f s",
                 in_graph.source, in_graph.probes, in_graph.residual_rms_ms, in_graph.holdout_predicted_ms,
                 in_graph.holdout_measured_ms, in_graph.wall_s)
    saving = None
    if cfg.pruning.fits_saving():
        if b.runtime == "tensorrt":  # explicit true is refused at config load
            log.info("saving fit skipped: the whole-graph timings run on onnxruntime or pytorch, not tensorrt")
        else:
            from avprune.prune_job import saving_fit

            ctx.progress.stage_start("latency_table", note="saving fit (dense + uniform cuts timed whole)")
            # a MAC table has no cache file: its fit is kept beside the job's own copy
            home = Path(cached) if cached else ctx.out_dir / "work" / "latency_table.json"
            saving = saving_fit.fit(table, ctx.env, table_cache=home, table_key=str(table.meta.get("cache_key", source)),
                                    channel_multiple=multiple, dense_p50_ms=start_ms)
            overhead = table.overhead_ms
    path = ctx.out_dir / "work" / "latency_table.json"
    atomic_write_json(path, table.to_dict())
    blocks = preflight.model_blocks(ctx.env) if cfg.pruning.prunes_blocks else []
    block_ms = block_costs(table, blocks)
    # Feasibility before any fine-tuning: the widest pruning the job allows must reach the budget.
    p = cfg.pruning
    pruner = preflight.probe_pruner(ctx.env, ctx.env.build_start_architecture(), multiple)
    preflight.check_channel_multiple_fits({g.root: g.size for g in pruner.groups}, multiple, cfg.model.name)
    reach = preflight.widest_reach_ms(table, pruner, p.max_sparsity if p.prunes_channels else 0.0, block_ms)
    if base.latency_budget_ms < reach:
        raise BudgetUnreachableError(
            preflight.budget_unreachable_message(base.latency_budget_ms, reach, base.dense.p50_ms,
                                                 p.max_sparsity, multiple),
            latency_budget_ms=base.latency_budget_ms, nearest_latency_ms=reach)
    return LatencyTableRecord(path=str(path), cache=str(cached), source=source, entries=len(table.entries),
                              overhead_ms=overhead, channel_multiple=multiple, channel_multiple_reason=reason,
                              widest_reach_ms=reach, blocks=tuple(blocks), block_ms=block_ms,
                              **_in_graph_fields(cfg, in_graph), **_saving_fields(cfg, saving))


def _saving_fields(cfg: PruneJobConfig, res: object | None) -> dict[str, object]:
    """The record's ``saving_fit_*`` fields: what the fit did, or why it was off."""
    p = cfg.pruning
    if res is None:
        why = ("pruning.saving_fit: false" if p.saving_fit is False else
               "the in-graph calibration fitted the table" if p.in_graph() else
               "pruning.latency_costs: macs" if p.latency_costs == "macs" else
               f"budget.runtime {cfg.budget.runtime!r}: no whole-graph timing here" if p.prunes_channels else
               f"granularity {p.granularity!r} prunes no channels")
        return {"saving_fit": False, "saving_fit_reason": why}
    return {"saving_fit": True, "saving_fit_reason": "pruning.saving_fit: true" if p.saving_fit else
            "on by default without the in-graph calibration", "saving_fit_source": res.source,
            "saving_fit_cache": res.cache,
            "saving_fit_scale": res.scale_factor, "saving_fit_points": res.points,
            "saving_fit_before": res.before, "saving_fit_residual_rms_ms": res.residual_rms_ms,
            "saving_fit_s": round(res.wall_s, 2)}


def _in_graph_fields(cfg: PruneJobConfig, res: object | None) -> dict[str, object]:
    """The record's ``in_graph_*`` fields: what the calibration did, or why it was off."""
    p = cfg.pruning
    if res is None:
        why = ("pruning.in_graph_calibration: false" if p.in_graph_calibration is False else
               "pruning.latency_costs: macs (no measured costs to fit)" if p.latency_costs == "macs" else
               f"off by default for controller {p.controller!r}" +
               (f" with allocation {p.allocation!r}" if p.controller == "allocation" else ""))
        return {"in_graph": False, "in_graph_reason": why}
    why = ("pruning.in_graph_calibration: true" if p.in_graph_calibration else
           "on by default for controller 'allocation' with allocation 'latency'")
    return {"in_graph": True, "in_graph_reason": why, "in_graph_source": res.source, "in_graph_cache": res.cache,
            "in_graph_probes": res.probes, "in_graph_residual_rms_ms": res.residual_rms_ms,
            "in_graph_holdout_predicted_ms": res.holdout_predicted_ms,
            "in_graph_holdout_measured_ms": res.holdout_measured_ms, "in_graph_s": round(res.wall_s, 2),
            "in_graph_timing": res.timing}
