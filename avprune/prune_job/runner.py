"""Runs the prune job's stages in order, recording each, skipping finished ones on `--resume`.

    baseline -> latency_table -> sensitivity -> search -> select -> finalize

Each stage is a function ``StageContext -> dict`` (JSON-able); its dict is written to
``OUT/stages/NAME.json`` only when it returns, so a killed driver resumes at the first stage
without a record.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avprune.config.prune import PruneJobConfig
from avprune.prune_job.errors import InfeasibleBudgetError
from avprune.prune_job.progress import JobProgress
from avprune.prune_job.state import StageStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageContext:
    """What a stage sees: the config, where to write, and the results of the stages before it."""

    config: PruneJobConfig
    out_dir: Path
    results: Mapping[str, dict[str, Any]]
    progress: JobProgress


StageFn = Callable[[StageContext], dict[str, Any]]


def default_stages() -> list[tuple[str, StageFn]]:
    """The job's six stages, imported lazily (they pull in torch, Ray and the runtimes)."""
    from avprune.prune_job import baseline, finalize, latency_table, search, select, sensitivity

    return [
        ("baseline", baseline.run),
        ("latency_table", latency_table.run),
        ("sensitivity", sensitivity.run),
        ("search", search.run),
        ("select", select.run),
        ("finalize", finalize.run),
    ]


def run_stages(
    stages: Sequence[tuple[str, StageFn]],
    *,
    config: PruneJobConfig,
    out_dir: Path,
    store: StageStore,
    progress: JobProgress,
) -> dict[str, dict[str, Any]]:
    """Run every stage without a record; load the records of the others. Returns all results."""
    results: dict[str, dict[str, Any]] = {}
    for name, fn in stages:
        if store.done(name):
            results[name] = store.load(name)
            progress.stage_done(name, _note(results[name]), skipped=True)
            continue
        progress.stage_start(name)
        t0 = time.perf_counter()
        result = fn(StageContext(config=config, out_dir=out_dir, results=dict(results), progress=progress))
        wall = time.perf_counter() - t0
        store.save(name, result, wall_s=wall)
        results[name] = result
        progress.stage_done(name, f"{_note(result)} ({wall:.1f} s)")
    return results


def _note(result: Mapping[str, Any]) -> str:
    """A stage may put a short human summary under ``"note"``."""
    return str(result.get("note", ""))


@dataclass(frozen=True)
class ModelSummary:
    """One row of the final table."""

    map: float
    map50: float
    p50_ms: float
    p99_ms: float
    params: int
    gmacs: float


@dataclass(frozen=True)
class PruneJobResult:
    """What `avprune prune` and `make demo` show: dense vs pruned, and where the artifacts are."""

    out_dir: Path
    candidate_id: str
    dense: ModelSummary
    pruned: ModelSummary
    latency_budget_ms: float
    map_floor: float
    speedup: float
    checkpoint: Path
    onnx: Path
    report_json: Path
    report_html: Path
    stage_wall_s: dict[str, float]
    peak_rss_mb: float = float("nan")  # driver + local Ray processes together, this run


def run_prune_job(
    config: PruneJobConfig,
    *,
    out_dir: str | Path | None = None,
    address: str | None = None,
    resume: bool = False,
    progress: bool = True,
    stages: Sequence[tuple[str, StageFn]] | None = None,
) -> PruneJobResult:
    """Run (or resume) a prune job on a local Ray instance or the cluster at ``address``.

    Raises :class:`~avprune.prune_job.errors.InfeasibleBudgetError` when no candidate meets both
    the latency budget and the mAP floor. ``stages`` replaces the default stages (tests).
    """
    from avprune.prune_job.memory import PeakRSS
    from pruning.distributed import ray_session

    out = Path(out_dir) if out_dir is not None else config.output_dir
    store = StageStore(out)
    store.open(fingerprint=config.fingerprint(), config=config.model_dump(mode="json"), resume=resume)
    stage_list = list(stages) if stages is not None else default_stages()
    with PeakRSS() as mem:
        with ray_session(address, runtime_env=_worker_env(config)) as info, JobProgress(progress) as prog:
            log.info("Ray: %d node(s), %.0f CPUs, %.0f GPUs", info.nodes, info.num_cpus, info.num_gpus)
            results = run_stages(stage_list, config=config, out_dir=out, store=store, progress=prog)
    infeasible = results.get("select", {}).get("infeasible")
    if infeasible:  # the best trade-off is written (best_tradeoff.*, report.*); now say so
        raise InfeasibleBudgetError(**{k: v for k, v in infeasible.items() if k != "message"})
    result = summarize(out, results, {name: store.wall_s(name) for name, _ in stage_list})
    return dataclasses.replace(result, peak_rss_mb=mem.peak_bytes / 2**20)


def _worker_env(config: PruneJobConfig) -> dict[str, Any]:
    """Thread caps for every Ray worker: 2 trials x N torch threads must not oversubscribe the cores."""
    n = str(config.resources.torch_threads)
    return {"env_vars": {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "AVPRUNE_TORCH_THREADS": n}}


def summarize(out_dir: Path, results: Mapping[str, Mapping[str, Any]], wall: dict[str, float]) -> PruneJobResult:
    """Build the result from the ``baseline``, ``select`` and ``finalize`` records."""
    base, sel, fin = results["baseline"], results["select"], results["finalize"]
    dense = ModelSummary(**{k: base["dense"][k] for k in ModelSummary.__dataclass_fields__})
    pruned = ModelSummary(**{k: fin["pruned"][k] for k in ModelSummary.__dataclass_fields__})
    return PruneJobResult(
        out_dir=out_dir,
        candidate_id=str(sel["candidate_id"]),
        dense=dense,
        pruned=pruned,
        latency_budget_ms=float(base["latency_budget_ms"]),
        map_floor=float(base["map_floor"]),
        speedup=dense.p50_ms / pruned.p50_ms if pruned.p50_ms > 0 else float("nan"),
        checkpoint=out_dir / fin["checkpoint"],
        onnx=out_dir / fin["onnx"],
        report_json=out_dir / fin["report_json"],
        report_html=out_dir / fin["report_html"],
        stage_wall_s=wall,
    )


def summary_table(result: PruneJobResult) -> Any:
    """The final dense-vs-pruned table as a rich Table (the CLI and the demo print it)."""
    from rich.table import Table

    t = Table(title=f"prune job: candidate {result.candidate_id} (budget {result.latency_budget_ms:.2f} ms, "
              f"mAP floor {result.map_floor:.3f})")
    for col in ("model", "mAP", "AP50", "p50 ms", "p99 ms", "params (M)", "GMACs", "speed-up"):
        t.add_column(col, justify="right")
    for name, m, sp in (("dense", result.dense, 1.0), ("pruned", result.pruned, result.speedup)):
        t.add_row(name, f"{m.map:.3f}", f"{m.map50:.3f}", f"{m.p50_ms:.2f}", f"{m.p99_ms:.2f}",
                  f"{m.params / 1e6:.2f}", f"{m.gmacs:.3f}", f"{sp:.2f}x")
    return t
