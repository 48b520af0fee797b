"""The dense shadow: the dense model fine-tuned alongside the candidates, the reference of a relative floor.

A pruned-then-fine-tuned model is judged against a dense model trained for the same steps (FIELD_NOTES:
a short fine-tune moves the dense model too, so the starting checkpoint is the wrong reference). With
``budget.max_map_drop`` (and ``search.shadow_dense``, on by default then), the search stage first runs one
Ray Tune trial with the candidates' recipe (data, optimizer, rate, warm-up, distillation, the first
candidate's seed, so the same batches) and nothing pruned, scoring mAP every ``measure_every`` steps on
the same val subset; the floor a candidate meets at step ``s`` is the shadow's mAP at ``s`` minus the drop,
and selection compares against its final mAP.

Why before the candidates, not beside them: every candidate then knows its floor at every measurement
before it gets there, with no waiting on another trial (a cluster with fewer slots than trials would
deadlock a candidate that waits for a shadow still queued behind it), ASHA never stops the reference,
and the floors are deterministic (the same on a re-run). It costs one fine-tune of wall time, on one slot.
``--resume`` works at every point: the shadow writes its curve to ``OUT/search/trials/shadow/curve.json``
as it goes and resumes its training from its checkpoint (a restored Tune experiment), and once the curve
says ``done`` the shadow is never run again (nor, after the search stage is recorded, is anything).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from avprune.config.prune import PruneJobConfig
from avprune.prune_job.context import StageContext, TrialSpec
from avprune.prune_job.records import BaselineRecord, Candidate, ShadowPoint, ShadowRecord

log = logging.getLogger(__name__)

SHADOW_ID = "shadow"


def work_dir(out_dir: Path) -> Path:
    """The shadow's trial folder (beside the candidates', so the cluster block counts its attempts)."""
    return out_dir / "search" / "trials" / SHADOW_ID


def shadow_spec(ctx: StageContext, table_path: str) -> TrialSpec:
    """The shadow's trial spec: the first candidate's seed, nothing to prune."""
    base = ctx.record(BaselineRecord)
    cand = Candidate(candidate_id=SHADOW_ID, index=-1, importance="none", controller="none", ramp=0.0,
                     seed=ctx.config.seed)
    return TrialSpec(candidate=cand, job=ctx.config.model_dump(mode="json"), out_dir=str(ctx.out_dir.resolve()),
                     latency_table=table_path, latency_budget_ms=base.latency_budget_ms, map_floor=base.map_floor,
                     dense_map=base.dense.map, max_map_drop=ctx.config.budget.max_map_drop, shadow=True)


def shadow_share(cfg: PruneJobConfig, node_cpus: float | None = None) -> tuple[float, int]:
    """(Ray CPUs, torch threads) of the shadow trial: the slots its candidates will share, up to one node.

    The shadow runs alone before the candidates; on one trial's slot it left the rest of the node
    idle for a third of the search (measured on 2 cores, 2 candidates: 100 steps in 7 minutes on one
    core while the other idled).
    Its recipe stays the candidates' (same batches and seed); only the thread count differs.
    """
    r = cfg.resources
    if node_cpus is None:
        import ray

        if not ray.is_initialized():  # no cluster to size it by: one trial's slot
            return r.cpus_per_trial, r.torch_threads
        node_cpus = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=r.cpus_per_trial)
    cpus = max(r.cpus_per_trial, min(r.cpus_per_trial * cfg.search.candidates, float(node_cpus)))
    threads = max(r.torch_threads, int(r.torch_threads * cpus / r.cpus_per_trial))
    return cpus, threads


def read_curve(work: Path) -> dict:
    """The curve file (``{"points": [...], "done": bool}``); empty when absent or unreadable."""
    path = work / "curve.json"
    if not path.is_file():
        return {"points": [], "done": False}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("shadow curve %s does not read (%s); the shadow runs again", path, e)
        return {"points": [], "done": False}


def record_from(work: Path, cfg: PruneJobConfig, base: BaselineRecord, out_dir: Path) -> ShadowRecord | None:
    """The shadow's record from its finished curve (None unless it is done). Step 0 is the starting
    checkpoint as the baseline scored it (same model, same val subset)."""
    cur = read_curve(work)
    if not cur.get("done"):
        return None
    pts = {0: ShadowPoint(0, base.dense.map, base.dense.map50)}
    for p in cur["points"]:
        pts[int(p["step"])] = ShadowPoint(int(p["step"]), float(p["map"]), float(p.get("map50") or 0.0))
    return ShadowRecord(curve=tuple(pts[s] for s in sorted(pts)), max_map_drop=float(cfg.budget.max_map_drop or 0.0),
                        seed=cfg.seed, steps=cfg.finetune.steps, path=str(work.relative_to(out_dir)))


def run(ctx: StageContext, table_path: str) -> ShadowRecord:
    """The finished shadow: read from its curve when done, else run (or resume) as a Tune trial."""
    from avprune.prune_job.progress import tune_callback
    from avprune.prune_job.ray_exec import run_trials

    cfg, out = ctx.config, ctx.out_dir
    base = ctx.record(BaselineRecord)
    work = work_dir(out)
    rec = record_from(work, cfg, base, out)
    if rec is not None:
        log.info("dense shadow already trained (%s): not run again", work / "curve.json")
        return rec
    ctx.progress.stage_start("search", note="dense shadow (the floor's reference) as a Ray Tune trial")
    cpus, threads = shadow_share(cfg)
    res = {"cpu": cpus, "gpu": cfg.resources.gpus_per_trial}
    results = run_trials(
        trial, [{**shadow_spec(ctx, table_path).to_dict(), "torch_threads": threads}], resources_per_trial=res,
        metric="map", mode="max",
        scheduler=None, max_failures=cfg.search.max_failures, storage_path=out / "search", name="shadow_tune",
        resume=True, callbacks=[tune_callback(ctx.progress, cfg.finetune.steps)],
    )
    rec = record_from(work, cfg, base, out)
    if rec is None:
        err = "; ".join(r.error or "stopped" for r in results) or "no result"
        raise RuntimeError(f"the dense shadow trial did not finish ({err}); the floor has no reference. Resume "
                           "the job to retry it, or set search.shadow_dense: false to judge the floor against "
                           "the starting checkpoint")
    log.info("dense shadow: mAP %.4f after %d steps (floor %.4f)", rec.final_map, rec.steps, rec.final_floor)
    return rec


def trial(params: dict[str, object]) -> None:
    """The shadow, run by Ray Tune in a worker: the candidates' fine-tune with no pruner, mAP every
    ``measure_every`` steps appended to ``curve.json`` (atomically) and reported to Tune."""
    import torch
    from ray import tune

    from avprune.prune_job.cluster import record_attempt, worker_identity
    from avprune.prune_job.env import JobEnv
    from perception.io import atomic_write_json, atomic_write_text
    from perception.train import StepContext, train

    spec = TrialSpec.from_dict(params)
    cfg = PruneJobConfig.model_validate(spec.job)
    env = JobEnv.from_config(cfg)
    work = work_dir(Path(spec.out_dir))
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(work / "pid", str(os.getpid()))
    record_attempt(work)
    env.set_worker_threads()
    threads = int(params.get("torch_threads") or cfg.resources.torch_threads)  # shadow_share's
    torch.set_num_threads(threads)
    torch.manual_seed(spec.candidate.seed)
    model = env.load_dense()
    ft = cfg.finetune
    curve = read_curve(work)  # a restarted attempt keeps the points its predecessor measured
    points = {int(p["step"]): p for p in curve.get("points", [])}

    def measure(step: int) -> None:
        score = env.evaluate_map(model)
        points[step] = {"step": step, "map": score.map, "map50": score.map50}
        done = step >= ft.steps
        atomic_write_json(work / "curve.json", {"points": [points[s] for s in sorted(points)], "done": done,
                                                "torch_threads": torch.get_num_threads()})
        tune.report({"step": step, "map": score.map, "map50": score.map50, "score": score.map, "done": done,
                     **worker_identity()})

    def hook(ctx: StepContext) -> None:
        step = ctx.step + 1
        if step % ft.measure_every == 0 and step < ft.steps:
            measure(step)

    student = model
    if cfg.distill():  # the candidates' recipe: the dense checkpoint teaches (here, a dense student)
        from perception.distill import DistilledDetector

        student = DistilledDetector(model, env.load_dense())
        student.avprune_meta = dict(model.avprune_meta)
    settings = env.finetune_settings(seed=spec.candidate.seed, threads=threads)
    train(student, env.train_set, settings, out_dir=work / "train", hooks=[hook], resume=True, progress=False)
    measure(ft.steps)  # the final point (done) last: the curve is complete only once training is
