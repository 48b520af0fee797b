"""Stage 4, candidate search: candidates fine-tuned in parallel as Ray Tune trials.

Candidates vary the importance criterion and the ramp speed (and the seed, past the grid);
each is a Tune trial that fine-tunes the dense model with a :class:`pruning.Pruner` driven by
the job's controller (the budget controller by default: cheap predicted latency from the
latency table every step, measured latency and mAP every ``measure_every`` steps). Each
measurement is one Tune report, so ASHA can stop a hopeless trial at a rung.

A trial works in ``OUT/search/trials/<id>/``: it writes its pid (for operators, and for the
worker-kill test), fine-tunes with ``perception.train`` checkpointing there every
``measure_every`` steps, and ends with ``pruned.pt`` (the finalized, physically smaller model)
and ``pruning.json`` (per-layer records). A restarted trial (worker died, or the driver was
killed and the job resumed) continues from its last training checkpoint.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from avprune.prune_job import common

log = logging.getLogger(__name__)


def candidates(config: Any) -> list[dict[str, Any]]:
    """The candidate grid: importances x ramps, cycled (with new seeds) up to ``search.candidates``."""
    p = config.pruning
    grid = [(imp, ramp) for ramp in p.ramps for imp in p.importances]
    out = []
    for i, (imp, ramp) in enumerate(itertools.islice(itertools.cycle(grid), config.search.candidates)):
        out.append({"candidate_id": f"c{i}", "index": i, "importance": imp, "controller": p.controller,
                    "ramp": float(ramp), "seed": config.seed + i})
    return out


# ----------------------------------------------------------------------------- inside a trial


def _controller(cfg: Any, cand: dict[str, Any], base: dict[str, Any], table: Any, measure: Any) -> Any:
    """The candidate's controller; the ramp sets how fast sparsity may move."""
    from pruning.controllers import build_controller

    p, steps = cfg.pruning, cfg.finetune.steps
    # nothing is pruned during the learning-rate warm-up; the ramp covers the steps after it
    begin = cfg.finetune.warmup()
    ramp_steps = max(1, int(round(cand["ramp"] * (steps - begin))))
    if cand["controller"] == "budget":
        return build_controller(
            "budget", latency_budget_ms=base["latency_budget_ms"], map_floor=base["map_floor"],
            predict_latency=table.predict, measure=measure, measure_every=cfg.finetune.measure_every,
            max_sparsity=p.max_sparsity, max_rate=min(1.0, p.max_sparsity / ramp_steps), warmup_steps=begin,
        )
    if cand["controller"] == "cubic":
        return build_controller("cubic", final_sparsity=p.max_sparsity, begin_step=begin, end_step=begin + ramp_steps)
    if cand["controller"] == "fixed":
        return build_controller("fixed", sparsity=p.max_sparsity)
    profile = {layer: [(c["sparsity"], c["drop"]) for c in rec["curve"]] for layer, rec in base["sensitivity"].items()}
    return build_controller("layer_adaptive", profile=profile, max_drop=max(0.0, base["dense_map"] - base["map_floor"]),
                            begin_step=begin, end_step=begin + ramp_steps, max_sparsity=p.max_sparsity)


@contextlib.contextmanager
def _measure_lock(path: Path) -> Iterator[None]:
    """One latency measurement at a time across trials (on one node): trials that measured
    concurrently would each time the other's load. Training elsewhere still competes, which is
    why selection re-measures every finished candidate alone."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def finalized_copy(pruner: Any, fresh_model: Any) -> Any:
    """A physically pruned copy of the pruner's current masked model (the pruner keeps training).

    ``fresh_model`` is a new instance of the same architecture. Not ``copy.deepcopy``: a deep
    copy shares torch's dynamically created parametrized classes with the original, and
    removing the copy's parametrizations deletes the original's ``weight`` properties.
    """
    from pruning import Pruner
    from pruning.controllers import build_controller

    clone = Pruner(
        fresh_model, importance=pruner.importance, granularity=pruner.granularity,
        controller=build_controller("fixed", sparsity=0.0), example_inputs=pruner.example_inputs,
        layer_filter=pruner.layer_filter, update_every=pruner.update_every, round_to=pruner.round_to,
        nm=pruner.nm, forward_fn=pruner.forward_fn,
    )
    fresh_model.load_state_dict(pruner.model.state_dict())
    clone.load_state_dict(pruner.state_dict())
    return clone.finalize()


class _Reporter:
    """Train hook: every ``measure_every`` steps, one Tune report (measured latency, mAP, sparsity)."""

    def __init__(self, pruner: Any, measure: Any, last: dict[str, Any], every: int, budget_ms: float) -> None:
        self.pruner, self.measure, self.last, self.every, self.budget_ms = pruner, measure, last, every, budget_ms

    def __call__(self, ctx: Any) -> None:
        step = ctx.step + 1
        if step % self.every:
            return
        if self.last.get("step") != step:  # otherwise the budget controller measured this very step
            self.measure()
        pred = self.pruner.predict_latency(self.pruner.channel_config()) if self.pruner.predict_latency else None
        _report(step, self.last, self.budget_ms, latency_pred_ms=pred, sparsity=self.pruner.masked_fraction())


def _report(step: int, last: dict[str, Any], budget_ms: float, **extra: Any) -> None:
    """One Tune report. ASHA ranks on ``score``: mAP minus the relative latency overshoot, so a
    model over budget is worth less than its mAP says and models within budget rank on mAP."""
    from ray import tune

    lat, metrics = last["latency"], last["metrics"]
    score = metrics["map"] - max(0.0, lat.p50_ms / budget_ms - 1.0)
    tune.report({"step": step, "map": metrics["map"], "map50": metrics["map50"], "latency_ms": lat.p50_ms,
                 "latency_p99_ms": lat.p99_ms, "score": score, **extra})


def trial(params: dict[str, Any]) -> None:
    """One candidate, run by Ray Tune in a worker process (dicts in, Tune reports out)."""
    import torch

    from avprune.config.prune import PruneJobConfig
    from perception.io import atomic_write_json, atomic_write_text
    from perception.models import save_checkpoint
    from perception.train import TrainSettings, train
    from pruning import Pruner
    from pruning.latency_model import LatencyTable

    cfg = PruneJobConfig.model_validate(params["job"])
    cand, base = params["candidate"], params["base"]
    work = Path(params["out_dir"]) / "search" / "trials" / cand["candidate_id"]
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(work / "pid", str(os.getpid()))
    common.set_worker_threads(cfg)
    torch.manual_seed(cand["seed"])

    train_ds, val = common.datasets(cfg)
    frames = common.frames_for_timing(val, cfg)
    table = LatencyTable.load(params["latency_table"])
    model = common.load_dense(cfg)
    last: dict[str, Any] = {}
    holder: dict[str, Any] = {}

    budget_ms, floor = base["latency_budget_ms"], base["map_floor"]
    snap_meta = work / "snapshot.json"
    holder["best"] = json.loads(snap_meta.read_text())["map"] if snap_meta.is_file() else -1.0

    def measure() -> tuple[float, float]:
        pruner = holder["pruner"]
        small = finalized_copy(pruner, common.build_architecture(cfg))
        with _measure_lock(work.parent / "measure.lock"):
            lat = common.measure_latency(small, cfg, frames, work)
        metrics = common.evaluate_map(pruner.model, val)
        last.update(step=pruner.step_count, latency=lat, metrics=metrics)
        if lat.p50_ms <= budget_ms and metrics["map"] >= max(floor, holder["best"]):
            # Keep the best point that met both targets (NetAdapt keeps its best too): the controller
            # may give capacity back later and end over budget on a noisy measurement.
            save_checkpoint(work / "snapshot.pt", small, extra={"candidate": cand, "step": pruner.step_count})
            atomic_write_json(snap_meta, {"step": pruner.step_count, "map": metrics["map"], "latency_ms": lat.p50_ms})
            holder["best"] = metrics["map"]
        return lat.p50_ms, metrics["map"]

    controller = _controller(cfg, cand, base, table, measure)
    h, w = cfg.budget.input_size
    pruner = Pruner(model, importance=cand["importance"], granularity=cfg.pruning.granularity, controller=controller,
                    example_inputs=torch.zeros(1, 3, h, w), update_every=cfg.pruning.update_every,
                    round_to=cfg.pruning.round_to, predict_latency=table.predict,
                    layer_filter=common.layer_filter(model, cand["importance"], cfg))
    holder["pruner"] = pruner
    ft = cfg.finetune
    settings = TrainSettings(steps=ft.steps, batch_size=ft.batch_size, optimizer=ft.optimizer, lr=ft.lr,
                             warmup_steps=ft.warmup(), checkpoint_every=ft.measure_every, seed=cand["seed"],
                             num_threads=cfg.resources.torch_threads)
    reporter = _Reporter(pruner, measure, last, ft.measure_every, budget_ms)
    train(model, train_ds, settings, out_dir=work / "train", hooks=[pruner, reporter], resume=True, progress=False)

    # The finished candidate: per-layer records, the physically smaller model, its own numbers.
    final_rec = pruner.history[-1].to_dict()["layers"] if pruner.history else {}
    layers = {name: {"sparsity": sp, **{k: final_rec.get(name, {}).get(k) for k in ("threshold", "target")}}
              for name, sp in pruner.layer_sparsity().items()}
    infeasible = bool(getattr(controller, "infeasible", False))
    small = pruner.finalize()
    save_checkpoint(work / "pruned.pt", small, extra={"candidate": cand})
    atomic_write_json(work / "pruning.json", {"layers": layers, "history": [r.to_dict() for r in pruner.history[-50:]]})
    with _measure_lock(work.parent / "measure.lock"):
        lat = common.measure_latency(small, cfg, frames, work)
    last.update(step=ft.steps, latency=lat, metrics=common.evaluate_map(small, val))
    _report(ft.steps, last, budget_ms, done=True, infeasible=infeasible)


# ----------------------------------------------------------------------------- the stage


def run(ctx: Any) -> dict[str, Any]:
    """Run every candidate as a Tune trial; record each one's reports and final checkpoint."""
    from avprune.prune_job.progress import tune_callback
    from pruning.distributed import run_trials

    cfg, out = ctx.config, ctx.out_dir
    base_rec = ctx.results["baseline"]
    sens = ctx.results.get("sensitivity", {})
    base = {"latency_budget_ms": base_rec["latency_budget_ms"], "map_floor": base_rec["map_floor"],
            "dense_map": base_rec["dense"]["map"], "sensitivity": sens.get("layers", {})}
    cands = candidates(cfg)
    params = [{"candidate": c, "candidate_id": c["candidate_id"], "job": cfg.model_dump(mode="json"),
               "base": base, "out_dir": str(out.resolve()), "latency_table": ctx.results["latency_table"]["path"]}
              for c in cands]
    ft = cfg.finetune
    reports = ft.steps // ft.measure_every + 1
    ctx.progress.stage_start("search", total=len(cands), note=f"{len(cands)} candidates as Ray Tune trials")
    res = {"cpu": cfg.resources.cpus_per_trial, "gpu": cfg.resources.gpus_per_trial}
    results = run_trials(
        trial, params, resources_per_trial=res, metric="score", mode="max",
        scheduler="asha" if cfg.search.early_stopping else None,
        max_t=reports, grace_period=min(cfg.search.grace_period, reports), max_failures=cfg.search.max_failures,
        storage_path=out / "search", name="tune", resume=True,
        callbacks=[tune_callback(ctx.progress, ft.steps)],
    )
    records = []
    for r in sorted(results, key=lambda r: r.config["candidate"]["index"]):
        cand = r.config["candidate"]
        work = out / "search" / "trials" / cand["candidate_id"]
        done = bool(r.last.get("done")) and (work / "pruned.pt").is_file()
        status = "done" if done else ("failed" if r.error else "stopped early")
        snap = work / "snapshot.json"
        snapshot = json.loads(snap.read_text()) if snap.is_file() and (work / "snapshot.pt").is_file() else None
        records.append({
            **cand, "status": status, "error": r.error, "steps": r.last.get("step"),
            "snapshot": str((work / "snapshot.pt").relative_to(out)) if snapshot else None,
            "snapshot_step": snapshot["step"] if snapshot else None,
            "infeasible": r.last.get("infeasible"),
            "history": [{k: h.get(k) for k in ("step", "map", "map50", "latency_ms", "latency_pred_ms", "sparsity", "score")}
                        for h in r.history],
            "checkpoint": str((work / "pruned.pt").relative_to(out)) if done else None,
            "pruning_record": str((work / "pruning.json").relative_to(out)) if done else None,
        })
        ctx.progress.stage_advance("search")
    n_done = sum(r["status"] == "done" for r in records)
    if n_done == 0 and not any(r["snapshot"] for r in records):
        errors = "; ".join(f"{r['candidate_id']}: {r['error'] or r['status']}" for r in records)
        raise RuntimeError(f"no candidate finished its fine-tuning ({errors})")
    return {"candidates": records, "note": f"{n_done}/{len(records)} candidates finished"}


def pid_files(out_dir: Path) -> dict[str, int]:
    """Trial worker pids by candidate id (as written by running trials)."""
    pids = {}
    for p in sorted((out_dir / "search" / "trials").glob("*/pid")):
        try:
            pids[p.parent.name] = int(p.read_text())
        except (OSError, ValueError):
            continue
    return pids


__all__ = ["candidates", "finalized_copy", "pid_files", "run", "trial"]
