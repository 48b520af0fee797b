"""Runs the prune job's stages in order, recording each, skipping finished ones on `--resume`.

    baseline -> latency_table -> sensitivity -> search -> select -> finalize

Each stage is a function ``StageContext -> record`` (a frozen dataclass of
:mod:`avprune.prune_job.records`); its ``to_dict()`` is written to ``OUT/stages/NAME.json`` only
when it returns, so a killed driver resumes at the first stage without a record, and the
records of finished stages are read back with the record type's ``from_dict``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from avprune.config.prune import PruneJobConfig
from avprune.prune_job.context import StageContext
from avprune.prune_job.env import JobEnv
from avprune.prune_job.errors import InfeasibleBudgetError
from avprune.prune_job.progress import JobProgress
from avprune.prune_job.records import (
    BaselineRecord,
    FinalizeRecord,
    JSONDict,
    ModelSummary,
    SelectRecord,
        StageRecord,
)
from avprune.prune_job.state import StageStore

if TYPE_CHECKING:
    from rich.table import Table

log = logging.getLogger(__name__)


class RecordType(Protocol):
    """A stage record class: reads its own JSON back."""

    def from_dict(self, d: JSONDict) -> StageRecord: ...


@dataclass(frozen=True)
class Stage:
    """One stage: its name (the record's file name), what it runs, and its record type."""

    name: str
    run: Callable[[StageContext], StageRecord]
    record: RecordType


def default_stages() -> list[Stage]:
    """The job's seven stages, imported lazily (they pull in torch, Ray and the runtimes)."""
    from avprune.prune_job import (
        baseline,
        finalize,
        gate_fold_stage,
        latency_table,
        records,
        search,
        select,
        sensitivity,
    )

    return [
        Stage("baseline", baseline.run, records.BaselineRecord),
        Stage("gate_fold", gate_fold_stage.run, records.GateFoldRecord),  # records "off" unless pruning.fold_gates
        Stage("latency_table", latency_table.run, records.LatencyTableRecord),
        Stage("sensitivity", sensitivity.run, records.SensitivityRecord),
        Stage("search", search.run, records.SearchRecord),
        Stage("select", select.run, records.SelectRecord),
        Stage("finalize", finalize.run, records.FinalizeRecord),
    ]


def run_stages(
    stages: Sequence[Stage],
    *,
    config: PruneJobConfig,
    out_dir: Path,
    store: StageStore,
    progress: JobProgress,
    env: JobEnv | None = None,
) -> dict[str, StageRecord]:
    """Run every stage without a record; load the records of the others. Returns all records."""
    env = env or JobEnv.from_config(config)
    results: dict[str, StageRecord] = {}
    for stage in stages:
        if store.done(stage.name):
            results[stage.name] = stage.record.from_dict(store.load(stage.name))
            progress.stage_done(stage.name, results[stage.name].note, skipped=True)
            continue
        progress.stage_start(stage.name)
        t0 = time.perf_counter()
        ctx = StageContext(config=config, env=env, out_dir=out_dir, progress=progress, results=dict(results))
        result = stage.run(ctx)
        wall = time.perf_counter() - t0
        store.save(stage.name, result.to_dict(), wall_s=wall)
        results[stage.name] = result
        progress.stage_done(stage.name, f"{result.note} ({wall:.1f} s)")
    return results


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
    stages: Sequence[Stage] | None = None,
    preflight: bool = True,
) -> PruneJobResult:
    """Run (or resume) a prune job on a local Ray instance or the cluster at ``address``.

    Raises :class:`~avprune.prune_job.errors.InfeasibleBudgetError` when no candidate meets both
    the latency budget and the mAP floor; ValueError (exit 2) before any fine-tuning for a
    ``channel_multiple`` or ``granularity`` the model cannot take (before Ray or OUT) and a budget
    below the latency table's reach (:class:`~avprune.prune_job.errors.BudgetUnreachableError`).
    ``stages`` replaces the default stages (tests). ``preflight=False`` skips the input checks
    (:mod:`avprune.prune_job.preflight`) when the caller has just run them. A job that fails leaves
    nothing new behind when no stage finished, and ``OUT/failed.json`` (the error, the finished
    stages) otherwise; ``--resume`` continues it.
    """
    from avprune.prune_job.cluster import node_snapshot
    from avprune.prune_job.memory import PeakRSS
    from avprune.prune_job.preflight import check_model
    from avprune.prune_job.ray_exec import ray_session

    if preflight:
        from avprune.prune_job.preflight import check_job_inputs

        check_job_inputs(config)  # before Ray starts and before OUT is written
    # absolute, as the config's paths are: Ray Tune runs each trial in a folder of its own, where a
    # relative --out would name another place (measured: the trials failed on work/latency_table.json)
    out = Path(out_dir).expanduser().resolve() if out_dir is not None else config.output_dir
    # what config load cannot see (the architecture): refused before Ray starts or OUT is created
    check_model(config)
    store = StageStore(out)
    before = store.entries()
    store.open(fingerprint=config.fingerprint(), config=config.model_dump(mode="json"), resume=resume)
    stage_list = list(stages) if stages is not None else default_stages()
    # A finished job resumed reads its records back: no stage runs, so Ray is not started for it
    needs_ray = not all(store.done(s.name) for s in stage_list)
    if not needs_ray:
        log.info("every stage of %s is recorded: reading the records (Ray not started)", out)
    try:
        with PeakRSS() as mem, contextlib.ExitStack() as stack:
            if needs_ray:
                info = stack.enter_context(ray_session(address, runtime_env=_worker_env(config)))
                log.info("Ray: %d node(s), %.0f CPUs, %.0f GPUs", info.nodes, info.num_cpus, info.num_gpus)
                nodes_start = node_snapshot()
            prog = stack.enter_context(JobProgress(progress))
            results = run_stages(stage_list, config=config, out_dir=out, store=store, progress=prog,
                                 env=JobEnv.from_config(config))
            if needs_ray:
                nodes_end = node_snapshot()
    except BaseException as e:
        try:
            store.fail(e, keep=before)
        except Exception as cleanup:  # noqa: BLE001 - the job's own error is the one to report
            log.warning("could not clean up %s after the failure: %s", out, cleanup)
        raise
    store.clear_failed()
    if needs_ray:  # otherwise report.json keeps the cluster block of the run that made it
        _record_cluster(out, results, nodes_start, nodes_end)
    sel = results.get("select")
    if isinstance(sel, SelectRecord) and sel.infeasible is not None:
        # the best trade-off is written (best_tradeoff.*, report.*); now say so
        raise InfeasibleBudgetError(**sel.infeasible.error_fields())
    result = summarize(out, results, {s.name: store.wall_s(s.name) for s in stage_list})
    return dataclasses.replace(result, peak_rss_mb=mem.peak_bytes / 2**20)


def _record_cluster(out: Path, results: Mapping[str, StageRecord], start: list, end: list) -> None:
    """The ``cluster`` block of report.json: nodes at start and end, lost nodes, retried trials."""
    from avprune.prune_job.cluster import cluster_block, trial_attempts, write_cluster_block

    fin = results.get("finalize")
    report = out / (fin.report_json if isinstance(fin, FinalizeRecord) else "report.json")
    if not report.is_file():
        return
    block = cluster_block(start, end, trial_attempts(out))
    write_cluster_block(report, block)
    if block["lost_nodes"] or block["retried"]:
        log.warning("Ray: %d node(s) lost during the job; retried trials: %s", len(block["lost_nodes"]),
                    ", ".join(f"{cid} ({r['attempts']} attempts)" for cid, r in block["retried"].items()) or "none")


def _worker_env(config: PruneJobConfig) -> dict[str, dict[str, str]]:
    """Thread caps for every Ray worker: 2 trials x N torch threads must not oversubscribe the cores."""
    n = str(config.resources.torch_threads)
    return {"env_vars": {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "AVPRUNE_TORCH_THREADS": n}}


def summarize(out_dir: Path, results: Mapping[str, StageRecord], wall: dict[str, float]) -> PruneJobResult:
    """Build the result from the ``baseline``, ``select`` and ``finalize`` records."""
    base, sel, fin = results["baseline"], results["select"], results["finalize"]
    if not (isinstance(base, BaselineRecord) and isinstance(sel, SelectRecord) and isinstance(fin, FinalizeRecord)):
        raise TypeError(f"summarize needs the baseline, select and finalize records; got "
                        f"{type(base).__name__}, {type(sel).__name__}, {type(fin).__name__}")
    dense, pruned = base.dense, fin.pruned
    return PruneJobResult(
        out_dir=out_dir,
        candidate_id=sel.candidate_id,
        dense=dense,
        pruned=pruned,
        latency_budget_ms=base.latency_budget_ms,
        map_floor=base.map_floor if sel.map_floor is None else sel.map_floor,  # the dense shadow's, when one ran
        speedup=dense.p50_ms / pruned.p50_ms if pruned.p50_ms > 0 else float("nan"),
        checkpoint=out_dir / fin.checkpoint,
        onnx=out_dir / fin.onnx,
        report_json=out_dir / fin.report_json,
        report_html=out_dir / fin.report_html,
        stage_wall_s=wall,
    )


def summary_table(result: PruneJobResult) -> Table:
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
