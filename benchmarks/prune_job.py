"""Benchmark: the prune job by granularity (channel vs channel+block), against a dense model trained as long.

    python -m benchmarks.prune_job            # the real run (a quiet 2-core machine, ~30 minutes)
    python -m benchmarks.prune_job --quick    # a smoke run of the plumbing (a few minutes; printed, not written to RESULTS.md)
    python -m benchmarks.prune_job --checkpoint DENSE.pt --data COCO_DIR   # another checkpoint / data folder

One run, side by side (issues #12 and #14):

1. The dense SSDlite320 checkpoint of ``benchmarks.train_default`` (``_work/train_default/model.pt``,
   or ``_work/train_default_quick`` with ``--quick``; trained here when missing) and its data.
2. *dense-long*: the dense checkpoint fine-tuned for as many steps as a candidate with the same
   recipe, without pruning (the "dense model trained alongside"; an under-trained dense model
   flatters pruning). Every mAP drop below is against it. Each job judges its own floor against a
   dense shadow with the same recipe (``budget.max_map_drop`` = ``MAX_DROP_POINTS``, ``search.shadow_dense``):
   the floor at a measurement is the shadow's mAP at that step minus the drop, so fine-tuning's restart
   dip is not read as pruning damage.
3. One prune job per granularity (``channel``, ``channel+block``), each the example job
   (``avprune/config/examples/prune_default.yaml``: allocation controller, groups of 16,
   distillation) at a graph budget of ``BUDGET_SPEEDUP`` x, ``--candidates`` candidates of
   ``--steps`` fine-tune steps each. Peak RSS of the driver and all Ray processes is sampled.
4. Every finished candidate (and a selected snapshot), dense, dense-long and two Torch-Pruning
   one-shot "ceiling" models: mAP on the same val images, ONNX Runtime graph and frame latency
   timed paired and interleaved (``deploy.timing.time_runtimes``), speed-ups as paired ratios.
5. Pareto fronts (graph speed-up vs mAP drop) per granularity over the final models and the
   candidates' measured points during the search; channel+block vs channel at equal drop
   (:mod:`benchmarks.prune_job_front`); a PNG beside the JSON.
6. The sensitivity stage with 1 vs 2 Ray workers (same layers, same scan).

Targets: #12 >= 1.5x graph at <= 1.0 point (required; 2.0x reported); #14 channel+block >= 2.5x at
<= 1.0 point and its front >= 15% more speed-up than channel's at equal drop; sensitivity with 2
workers >= 1.7x faster than with 1. Results: ``benchmarks/results/prune_job.json`` and RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from benchmarks._results import ASSETS, check_tag, machine_line, publish
from benchmarks.prune_job_front import best_within, compare_fronts, pareto_front, plot_fronts
from perception.io import atomic_write_json

log = logging.getLogger("benchmarks.prune_job")

WORK = Path(__file__).with_name("_work")
EXAMPLE = Path(__file__).resolve().parents[1] / "avprune" / "config" / "examples" / "prune_default.yaml"
GRANULARITIES = ("channel", "channel+block")
BUDGET_SPEEDUP, MAX_DROP_POINTS = 2.5, 1.0  # every job's budget: #14's target
REQUIRED_12, REPORTED_12, TARGET_14, FRONT_GAIN = 1.5, 2.0, 2.5, 1.15
TARGET_SENS_SPEEDUP = 1.7
STEPS, MEASURE_EVERY, RAMP = 400, 50, 0.5  # 400 steps: #12's minimum; the budget is reached by half of them
CEILING_RATIOS = (0.5, 0.75)


# ----------------------------------------------------------------------------- inputs


def _data(quick: bool, seed: int, given: Path | None) -> Path:
    """The synthetic COCO folder the train benchmark used (synthesised when missing)."""
    if given is not None:
        return given
    from benchmarks._data import synthetic_coco

    return synthetic_coco(WORK / ("synth_quick" if quick else "synth"), images=120 if quick else 600, seed=seed)


def _dense_checkpoint(quick: bool, coco: Path, seed: int, given: Path | None) -> Path:
    """The train benchmark's checkpoint, or a fresh one trained with the default recipe."""
    if given is not None:
        if not given.is_file():
            raise FileNotFoundError(f"--checkpoint {given}: no such file")
        return given
    path = WORK / ("train_default_quick" if quick else "train_default") / "model.pt"
    if path.is_file():
        return path
    from perception.data import load_split
    from perception.models import build_detector
    from perception.train import default_train_settings, train

    log.info("no dense checkpoint at %s: training one", path)
    settings = default_train_settings(1.0 if quick else 8.0, seed=seed, num_threads=2)
    train(build_detector("ssdlite320_mobilenet_v3_large"), load_split(coco, "train"), settings,
          out_dir=path.parent, progress=True)
    return path


def _job(args: argparse.Namespace, ckpt: Path, coco: Path, granularity: str, out: Path, cache: Path) -> Any:
    """The example job pointed at the benchmark's checkpoint and data, budget at the targets."""
    from avprune.config.prune import load_prune_config

    overrides: dict[str, Any] = {
        "model.checkpoint": str(ckpt),
        "data": {"source": "coco", "root": str(coco), "val_images": args.val_images or (24 if args.quick else 96)},
        "budget.speedup": args.speedup, "budget.latency_ms": None, "budget.end_to_end": False,
        # deployed at 0.01: decoding + NMS 2.0 -> 0.7 ms per frame for 0.03 mAP points on this (converged) model
        "budget.score_thresh": 0.01,
        "pruning.granularity": granularity, "pruning.ramps": list(args.ramp), "search.candidates": args.candidates,
        "finetune.steps": args.steps, "finetune.measure_every": MEASURE_EVERY,
        **({"finetune.lr": args.lr} if args.lr is not None else {}),
        "output_dir": str(out), "cache_dir": str(cache), "seed": args.seed,
    }
    # The floor moves with a dense shadow trained alongside (same recipe, seed and steps). Judged
    # against dense-long's final mAP at every step instead, the restart dip of fine-tuning (0.47-0.50
    # at steps 50-100 against a 0.561 floor, measured) held the target and nothing was pruned.
    overrides.update({"budget.max_map_drop": MAX_DROP_POINTS / 100, "budget.map_floor": None,
                      "search.shadow_dense": True})
    if args.allocation:
        overrides["pruning.allocation"] = args.allocation
    if args.latency_costs:
        overrides["pruning.latency_costs"] = args.latency_costs
    if args.reconstruct:
        overrides["pruning.reconstruct_images"] = args.reconstruct
    if args.fold_gates is not None:
        overrides["pruning.fold_gates"] = args.fold_gates
    if args.importances:
        overrides["pruning.importances"] = args.importances
    if args.floor_allowance is not None:
        overrides["pruning.floor_allowance"] = args.floor_allowance
    if args.one_shot_recovery is not None:
        overrides["pruning.one_shot_recovery"] = args.one_shot_recovery
    if args.latency_margin is not None:
        overrides["budget.latency_margin"] = args.latency_margin
    if args.allocation == "latency":  # the knapsack reads every unit's damage curve (resolved defaults)
        overrides.update({"sensitivity.max_layers": None, "sensitivity.sparsities": None})
    if args.quick:
        overrides.update({"finetune.measure_every": 6, "finetune.batch_size": 4, "sensitivity.max_layers": 2,
                          "sensitivity.sparsities": [0.5], "sensitivity.eval_images": 8, "budget.measure_iters": 10})
    return load_prune_config(EXAMPLE, overrides)


# ----------------------------------------------------------------------------- measurements


def _dense_long(cfg: Any, out: Path) -> Path:
    """The dense checkpoint fine-tuned for as many steps as a candidate, without pruning (reused
    when the recipe is the same)."""
    from avprune.prune_job.env import JobEnv
    from perception.train import TrainSettings, train

    ft = cfg.finetune
    recipe = {"checkpoint": str(cfg.model.checkpoint), "steps": ft.steps, "batch_size": ft.batch_size,
              "optimizer": ft.optimizer, "lr": ft.lr, "warmup": ft.warmup(), "seed": cfg.seed}
    marker = out / "recipe.json"
    if (out / "model.pt").is_file() and marker.is_file() and json.loads(marker.read_text()) == recipe:
        return out / "model.pt"
    env = JobEnv.from_config(cfg)
    settings = TrainSettings(steps=ft.steps, batch_size=ft.batch_size, optimizer=ft.optimizer, lr=ft.lr,
                             warmup_steps=ft.warmup(), checkpoint_every=max(ft.steps, 1), seed=cfg.seed,
                             num_threads=2)
    res = train(env.load_dense(), env.train_set, settings, out_dir=out, progress=False)
    atomic_write_json(marker, recipe)
    return Path(res.model_path)


def _side_by_side(cfg: Any, models: dict[str, Path], work: Path, blocks: int) -> dict[str, dict[str, Any]]:
    """mAP on the job's val images; ONNX Runtime graph and frame latency, paired and interleaved."""
    from dataclasses import asdict

    import torch

    from avprune.prune_job.env import JobEnv
    from deploy.runtimes import open_runtime
    from deploy.timing import time_runtimes

    env = JobEnv.from_config(cfg)
    val = env.val_set
    frames = [val.load_image(i) for i in range(min(8, len(val)))]
    out: dict[str, dict[str, Any]] = {}
    runtimes = {}
    for name, ckpt in models.items():
        model = env.load_model(ckpt)
        out[name] = {**asdict(env.evaluate_map(model)), **asdict(env.size_of(model)), "checkpoint": str(ckpt)}
        slug = "".join(c if c.isalnum() else "_" for c in name)
        runtimes[name] = open_runtime(env.export_core(model, work / "onnx" / f"{slug}.onnx"), threads=cfg.budget.threads)
    torch.set_num_threads(cfg.budget.threads)
    try:
        timing = {kind: time_runtimes(runtimes, frames, end_to_end=kind == "frame", reference="dense",
                                      blocks=blocks, block_size=len(frames))
                  for kind in ("graph", "frame")}
    finally:
        for rt in runtimes.values():
            rt.__exit__(None, None, None)
    for name, rec in out.items():
        for kind, t in timing.items():
            rec[f"{kind}_p50_ms"] = t.summaries[name].p50_ms
            rec[f"{kind}_p99_ms"] = t.summaries[name].p99_ms
            r = t.ratios.get(name)
            rec[f"{kind}_speedup"] = 1.0 if r is None else r.ratio
            rec[f"{kind}_speedup_ci"] = None if r is None else [r.low, r.high]
    return out


def _ceiling_models(ckpt: Path, cfg: Any, work: Path) -> dict[str, Path]:
    """``ratio`` of every prunable channel group removed at once (Torch-Pruning, no fine-tuning)."""
    import torch

    from avprune.prune_job.env import JobEnv
    from benchmarks.compare_baselines import tp_channel_prune
    from perception.models import save_checkpoint

    out = {}
    for ratio in CEILING_RATIOS:
        path = work / f"ceiling_{int(ratio * 100)}.pt"
        if not path.is_file():
            model = JobEnv.from_config(cfg).load_model(ckpt).eval()
            tp_channel_prune(model, ratio, torch.zeros(1, 3, *cfg.budget.input_size), global_pruning=False)
            save_checkpoint(path, model)
        out[f"one-shot {int(ratio * 100)}% (ceiling)"] = path
    return out


def _stage(job_dir: Path, stage: str) -> dict[str, Any]:
    rec = job_dir / "stages" / f"{stage}.json"
    return json.loads(rec.read_text())["result"] if rec.is_file() else {}


def _stage_walls(job_dir: Path) -> dict[str, float]:
    """Seconds per finished stage, from the job's stage records (also when the job raised at the end)."""
    out = {}
    for rec in sorted((job_dir / "stages").glob("*.json"), key=lambda p: p.stat().st_mtime):
        d = json.loads(rec.read_text())
        if isinstance(d.get("wall_s"), (int, float)):
            out[str(d.get("stage", rec.stem))] = float(d["wall_s"])
    return out


def _run_job(cfg: Any, job_dir: Path, quick: bool) -> dict[str, Any]:
    """One prune job; an infeasible or unreachable budget is recorded, not raised (the candidates
    are still worth measuring)."""
    from avprune.prune_job import BudgetUnreachableError, InfeasibleBudgetError, run_prune_job
    from avprune.prune_job.memory import PeakRSS

    t0 = time.perf_counter()
    result, infeasible, unreachable = None, None, None
    with PeakRSS() as mem:  # this process and its local Ray instance, also when the budget fails
        for _ in range(2):
            try:
                result = run_prune_job(cfg, out_dir=job_dir, resume=True, progress=not quick)
            except InfeasibleBudgetError as e:
                infeasible = str(e)
            except BudgetUnreachableError as e:
                if unreachable is not None or e.nearest_latency_ms is None:
                    raise
                # the table says this granularity cannot reach the budget: run it at the nearest
                # feasible budget instead (stated in RESULTS.md), so its front still has points
                unreachable = str(e)
                budget = cfg.budget.model_copy(update={"latency_ms": 1.02 * e.nearest_latency_ms, "speedup": None})
                job_dir = job_dir.with_name(job_dir.name + "-nearest")
                cfg = cfg.model_copy(update={"budget": budget, "output_dir": job_dir.resolve()})
                log.warning("%s: %s; running at latency_ms %.2f", cfg.pruning.granularity, e, budget.latency_ms)
                continue
            break
    return {"granularity": cfg.pruning.granularity, "job_dir": str(job_dir), "job_wall_s": time.perf_counter() - t0,
            "stage_wall_s": result.stage_wall_s if result else _stage_walls(job_dir),
            "candidate_id": result.candidate_id if result else None,
            "selected_checkpoint": str(result.checkpoint) if result else None,
            "infeasible": infeasible, "unreachable": unreachable, "peak_rss_gib": mem.peak_bytes / 2**30,
            "dense_graph_ms": (_stage(job_dir, "baseline").get("dense") or {}).get("p50_ms"),
            "map_floor": _stage(job_dir, "baseline").get("map_floor"),
            "latency_budget_ms": _stage(job_dir, "baseline").get("latency_budget_ms"),
            # pruning.fold_gates: what folding the gates alone gave before any pruning (empty when off)
            "gate_fold": {k: _stage(job_dir, "gate_fold").get(k) for k in ("images", "map", "p50_ms", "seconds")}
            | {"gates": len(_stage(job_dir, "gate_fold").get("gates") or [])},
            # how the latency table was fitted to the graph (the controllers aim by it)
            "latency_table": {k: _stage(job_dir, "latency_table").get(k) for k in (
                "note", "overhead_ms", "in_graph", "in_graph_holdout_predicted_ms", "in_graph_holdout_measured_ms",
                "saving_fit", "saving_fit_scale", "saving_fit_points", "saving_fit_before")}}


def _reuse_shadow(src_job: Path, dst_job: Path, cfg: Any) -> None:
    """The first job's finished dense shadow curve, given to a later job that has none.

    The shadow is the dense recipe (data, optimizer, rate, seed, steps, measurement subset) with
    nothing pruned: the granularity does not enter it, so a second job would retrain the same model
    (about 8 minutes here) for the same curve."""
    from avprune.prune_job.shadow import read_curve, work_dir
    from avprune.prune_job.state import StageStore

    src, dst = work_dir(src_job), work_dir(dst_job)
    curve = read_curve(src)
    if not curve.get("done") or (dst / "curve.json").exists():
        return
    # claimed as the job would claim it (job.json first): a folder with results and no job.json is refused
    StageStore(dst_job).open(fingerprint=cfg.fingerprint(), config=cfg.model_dump(mode="json"), resume=True)
    dst.mkdir(parents=True, exist_ok=True)
    atomic_write_json(dst / "curve.json", curve)
    log.info("%s: dense shadow curve reused from %s (same recipe and seed)", dst_job.name, src_job.name)


#: What the dense shadow's training depends on: a shadow trained under these is the same model.
SHADOW_RECIPE = ("model", "data", "finetune", "seed", "budget.max_map_drop", "budget.input_size", "pruning.fold_gates")


def _shadow_from(src_job: Path, dst_job: Path, cfg: Any) -> None:
    """``--shadow-from``: an earlier run's finished dense shadow (curve and model) for this job, after
    checking that it was trained under the same recipe (:data:`SHADOW_RECIPE`). Saves the shadow's
    training (18 minutes at 800 steps here) when only the pruning side of a job changes."""
    import shutil

    from avprune.prune_job.shadow import read_curve, work_dir

    if not (src_job / "job.json").is_file():
        raise ValueError(f"--shadow-from {src_job}: not a prune job folder (no job.json); pass the job-<granularity>-... "
                         "folder of an earlier run under benchmarks/_work/<tag>/")
    stored = json.loads((src_job / "job.json").read_text())["config"]
    mine = cfg.model_dump(mode="json")

    def pick(d: dict[str, Any], dotted: str) -> Any:
        for part in dotted.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    differ = [k for k in SHADOW_RECIPE if pick(stored, k) != pick(mine, k)]
    if differ:
        raise ValueError(f"--shadow-from {src_job}: its shadow was trained under another recipe ({', '.join(differ)} "
                         "differ); run without --shadow-from")
    src = work_dir(src_job)
    if not read_curve(src).get("done") or not (src / "train" / "model.pt").is_file():
        raise ValueError(f"--shadow-from {src_job}: no finished dense shadow there (curve.json done and train/model.pt)")
    _reuse_shadow(src_job, dst_job, cfg)
    dst = work_dir(dst_job) / "train"
    if not (dst / "model.pt").is_file():
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / "train" / "model.pt", dst / "model.pt")


def _shadow_model(job_dir: Path, dest: Path) -> Path | None:
    """The job's finished dense shadow (``search.shadow_dense``) as a plain checkpoint at ``dest``, or None.

    With distillation on, the shadow trains inside ``DistilledDetector`` (the candidates' recipe), so
    its checkpoint names every weight ``student.*``; ``dest`` holds them under the detector's own names."""
    import torch

    from avprune.prune_job.shadow import read_curve, work_dir
    from perception.io import atomic_path

    work = work_dir(job_dir)
    path = work / "train" / "model.pt"
    if not (read_curve(work).get("done") and path.is_file()):
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    if any(k.startswith("student.") for k in state):
        state = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        torch.save({**ckpt, "state_dict": state}, tmp)
    return dest


def _job_models(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The job's finished candidates (and a selected snapshot): name -> what the record says."""
    job_dir, gran = Path(job["job_dir"]), job["granularity"]
    out = {}
    for c in _stage(job_dir, "search").get("candidates", []):
        if not c.get("checkpoint"):
            continue
        prec = job_dir / (c.get("pruning_record") or "")
        pr = json.loads(prec.read_text()) if prec.is_file() else {}
        out[f"{gran} {c['candidate_id']}"] = {
            "granularity": gran, "candidate_id": c["candidate_id"], "importance": c.get("importance"),
            "ramp": c.get("ramp"), "controller": c.get("controller"), "path": str(job_dir / c["checkpoint"]),
            "job_infeasible": c.get("infeasible"), "channel_multiple": pr.get("channel_multiple"),
            "allocation": pr.get("allocation"), "removed_blocks": pr.get("removed_blocks", []),
            "blocks_restored": pr.get("blocks_restored", []), "selected": c["candidate_id"] == job["candidate_id"],
        }
    sel = job.get("candidate_id")
    if sel and "@" in sel and job.get("selected_checkpoint"):  # a snapshot: a model of its own
        base = next((v for v in out.values() if v["candidate_id"] == sel.split("@")[0]), {})
        out[f"{gran} {sel} (selected snapshot)"] = {**base, "candidate_id": sel, "path": job["selected_checkpoint"],
                                                    "selected": True, "removed_blocks": None}
    return out


def _search_points(job: dict[str, Any], dense_long_map: float, steps: int) -> list[dict[str, Any]]:
    """The candidates' measured points during the search (before the last step) as Pareto points:
    speed-up against the baseline stage's dense graph latency, measured by the same code."""
    dense_ms = job.get("dense_graph_ms")
    if not dense_ms:
        return []
    pts = []
    for c in _stage(Path(job["job_dir"]), "search").get("candidates", []):
        for h in c.get("history") or []:
            if h.get("map") is None or not h.get("latency_ms") or h.get("step") is None or h["step"] >= steps:
                continue
            pts.append({"name": f"{job['granularity']} {c['candidate_id']}@{h['step']}", "kind": "search",
                        "step": h["step"], "graph_speedup": dense_ms / h["latency_ms"], "map": h["map"],
                        "map_drop_points": 100 * (dense_long_map - h["map"]), "sparsity": h.get("sparsity")})
    return pts


def _sensitivity_scaling(cfg: Any, layer_counts: tuple[int, ...]) -> list[dict[str, float]]:
    """Wall time of the same sensitivity scan with 1 and 2 Ray workers (a fresh instance each), per
    number of scanned layers: each worker pays a fixed start-up, so scaling grows with the scan."""
    from avprune.prune_job import sensitivity
    from avprune.prune_job.ray_exec import ray_session

    dense = sensitivity.dense_value(cfg)
    rows = []
    for count in layer_counts:
        layers = sensitivity.largest_units(cfg, count)
        times = {}
        for workers in (1, 2):
            with ray_session(None, num_cpus=workers, runtime_env={"env_vars": {"AVPRUNE_TORCH_THREADS": "1",
                                                                              "OMP_NUM_THREADS": "1"}}):
                t0 = time.perf_counter()
                sensitivity.scan(cfg, layers, dense)
                times[workers] = time.perf_counter() - t0
        rows.append({"layers": len(layers), "one_worker_s": times[1], "two_workers_s": times[2],
                     "speedup": times[1] / times[2]})
    return rows


# ----------------------------------------------------------------------------- main


def _ramps(value: str) -> tuple[float, ...]:
    """``--ramp 0,0.5`` -> (0.0, 0.5); the job config checks the range (``pruning.ramps``)."""
    try:
        return tuple(float(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ramp takes comma-separated shares in [0, 1]; got {value!r}") from None


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny fine-tune, 2 sensitivity layers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint", type=Path, help="dense checkpoint (default: the train benchmark's)")
    ap.add_argument("--data", type=Path, help="COCO folder of that checkpoint (default: the train benchmark's)")
    ap.add_argument("--speedup", type=float, default=BUDGET_SPEEDUP,
                    help=f"every job's graph budget as a speed-up over dense (default {BUDGET_SPEEDUP}, #14's target; "
                    "#12's required point is 1.5)")
    ap.add_argument("--steps", type=int, help=f"fine-tune steps per candidate and dense-long (default {STEPS}; quick 12)")
    ap.add_argument("--candidates", type=int, default=2, help="candidates per granularity (default 2)")
    ap.add_argument("--tag", help="results name: benchmarks/results/TAG.json, its RESULTS.md section and "
                                  "benchmarks/_work/TAG (default prune_job; quick: prune_job_quick)")
    ap.add_argument("--lr", type=float, help="fine-tune peak rate of the candidates, the shadow and dense-long "
                                             "(default: the example job's, the dense recipe's 1e-3)")
    ap.add_argument("--granularities", default=",".join(GRANULARITIES), help="comma-separated (default: both)")
    ap.add_argument("--val-images", type=int, help="val images every in-job mAP (and so the floor) is judged on "
                                                   "(default 96; quick 24): ~1 point of noise at 96")
    ap.add_argument("--dense-long", choices=("shadow", "train"), default="shadow",
                    help="the dense model trained as long that every drop is against: the first job's dense "
                         "shadow (default: one model for the floor and the report) or a separate training")
    ap.add_argument("--allocation", choices=("uniform", "latency"), help="default: the example job's")
    ap.add_argument("--latency-costs", choices=("measured", "macs"),
                    help="the latency table's per-layer costs (default: the example job's, measured)")
    ap.add_argument("--ramp", type=_ramps, default=(RAMP,), metavar="R[,R...]",
                    help=f"share of the fine-tune (after the warm-up) by which the latency target reaches the budget; "
                         f"the rest recovers; 0 = one-shot (pruning.ramps: candidates cycle importances x ramps; "
                         f"default {RAMP})")
    ap.add_argument("--importances", type=lambda v: [x.strip() for x in v.split(",") if x.strip()], default=None,
                    metavar="I[,I...]", help="pruning.importances (default: the example job's, magnitude,bn_scale)")
    ap.add_argument("--floor-allowance", type=float, default=None, metavar="MAP",
                    help="pruning.floor_allowance (default: the example job's)")
    ap.add_argument("--one-shot-recovery", type=float, default=None, metavar="SHARE",
                    help="pruning.one_shot_recovery: share of the fine-tune a one-shot candidate's floor is not judged "
                         "(default: the example job's)")
    ap.add_argument("--reconstruct", type=int, default=0, metavar="IMAGES",
                    help="pruning.reconstruct_images: each candidate's cut re-solved against the dense model on this "
                         "many training images once it reaches the budget (default 0: off)")
    ap.add_argument("--latency-margin", type=float, default=None, metavar="SHARE",
                    help="budget.latency_margin: the trials aim this share under the budget, select judges at it "
                    "(default: the example job's)")
    ap.add_argument("--fold-gates", type=int, default=None, metavar="IMAGES",
                    help="pruning.fold_gates: the squeeze-excitation gates folded into the next conv as their mean scale "
                         "over this many training images before pruning (default: the example job's, 64; 0: off)")
    ap.add_argument("--shadow-from", type=Path, default=None, metavar="JOB_DIR",
                    help="reuse the finished dense shadow (curve and model) of an earlier job folder trained under "
                    "the same recipe (model, data, fine-tune, seed, drop, input size, gate fold); checked, refused "
                    "otherwise")
    ap.add_argument("--report-only", action="store_true", help="rewrite the RESULTS.md section from the last run")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    tag = check_tag(args.tag or ("prune_job_quick" if args.quick else "prune_job"))
    if args.report_only:
        return _write(json.loads((ASSETS / f"{tag}.json").read_text()), tag)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.steps = args.steps or (12 if args.quick else STEPS)
    grans = [g.strip() for g in args.granularities.split(",") if g.strip()]
    bad = sorted(set(grans) - {"channel", "block", "channel+block"})
    if bad or not grans:
        raise SystemExit(f"--granularities: unknown {bad or grans}; use channel, block, channel+block")
    t_start = time.perf_counter()
    work = WORK / tag
    coco = _data(args.quick, args.seed, args.data)
    ckpt = _dense_checkpoint(args.quick, coco, args.seed, args.checkpoint)
    cache = WORK / "cache"

    # Every drop in the tables is against dense-long's mAP. By default it is the first job's dense
    # shadow (the same recipe, trained inside the job for its floor): the floor a job aims at and the
    # drop the benchmark reports then come from one model. Two trainings of that recipe differ:
    # 0.5685 vs 0.5619 on the same 192 val images (2026-12-05).
    recipe = _job(args, ckpt, coco, grans[0], work / "job", cache)
    t0 = time.perf_counter()
    dense_long = _dense_long(recipe, work / "dense_long") if args.dense_long == "train" else None
    dense_long_s = time.perf_counter() - t0

    jobs, cfgs = {}, {}
    for gran in grans:
        cfg = _job(args, ckpt, coco, gran, work / "job", cache)
        slug = gran.replace("+", "_")
        job_dir = work / f"job-{slug}-{cfg.fingerprint()[:10]}"  # named by its config: an edit starts afresh
        cfg = cfg.model_copy(update={"output_dir": job_dir.resolve()})
        cfgs[gran] = cfg
        if jobs:
            _reuse_shadow(Path(next(iter(jobs.values()))["job_dir"]), job_dir, cfg)
        elif args.shadow_from is not None:
            _shadow_from(args.shadow_from, job_dir, cfg)
        jobs[gran] = _run_job(cfg, job_dir, args.quick)
    first = cfgs[grans[0]]
    if dense_long is None:
        dense_long = _shadow_model(Path(jobs[grans[0]]["job_dir"]), work / "dense_long_shadow.pt")
        if dense_long is None:
            log.warning("the first job has no finished dense shadow: training dense-long instead")
            t0 = time.perf_counter()
            dense_long = _dense_long(recipe, work / "dense_long")
            dense_long_s = time.perf_counter() - t0
    from avprune.prune_job.env import JobEnv

    env = JobEnv.from_config(recipe)
    dl_map = env.evaluate_map(env.load_model(dense_long)).map
    floor = max(0.0, dl_map - MAX_DROP_POINTS / 100)
    log.info("dense-long (%s) mAP %.4f: the benchmark's floor is %.4f", dense_long, dl_map, floor)
    sens = _sensitivity_scaling(first, (2,) if args.quick else (first.sensitivity_max_layers() or 8, 16))

    cands: dict[str, dict[str, Any]] = {}
    for job in jobs.values():
        cands.update(_job_models(job))
    models = {"dense": ckpt, "dense_long": dense_long, **{k: Path(v["path"]) for k, v in cands.items()},
              **_ceiling_models(ckpt, first, work)}
    table = _side_by_side(first, models, work, blocks=3 if args.quick else 20)

    dl = table["dense_long"]["map"]
    candidates, points = [], {g: [] for g in grans}
    for name, info in cands.items():
        row = table[name]
        drop = 100 * (dl - row["map"])
        rec = {"name": name, **{k: v for k, v in info.items() if k != "path"}, "checkpoint": info["path"],
               "graph_speedup": row["graph_speedup"], "graph_speedup_ci": row["graph_speedup_ci"],
               "frame_speedup": row["frame_speedup"], "frame_speedup_ci": row["frame_speedup_ci"],
               "map": row["map"], "map50": row["map50"], "map_drop_points": drop,
               "params_m": row["params"] / 1e6, "gmacs": row["gmacs"],
               "feasible": row["graph_speedup"] >= args.speedup and drop <= MAX_DROP_POINTS}
        candidates.append(rec)
        points[info["granularity"]].append({**rec, "kind": "final"})
    for gran, job in jobs.items():
        points[gran] += _search_points(job, dl, args.steps)
    fronts = {g: pareto_front(p) for g, p in points.items()}
    record = {
        "quick": args.quick, "seed": args.seed, "steps": args.steps, "candidates_per_granularity": args.candidates,
        "budget_speedup": args.speedup, "max_drop_points": MAX_DROP_POINTS, "ramps": list(args.ramp),
        "measure_every": first.finetune.measure_every, "checkpoint": str(ckpt), "data": str(coco),
        "dense_long_map_job_val": dl_map, "map_floor": floor, "dense_long_s": dense_long_s,
        "dense_long_source": args.dense_long, "dense_long_checkpoint": str(dense_long),
        "jobs": jobs, "candidates": candidates, "points": points, "pareto": fronts,
        "side_by_side": table, "sensitivity": sens, "machine": machine_line(),
        "config": {g: c.model_dump(mode="json") for g, c in cfgs.items()},
    }
    record.update(_verdicts(record))
    record["wall_s"] = time.perf_counter() - t_start
    ASSETS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(ASSETS / f"{tag}.json", record)
    return _write(record, tag)


def _verdicts(record: dict[str, Any]) -> dict[str, Any]:
    """The comparison of fronts and the targets of #12 and #14, from the fronts and the final models."""
    fronts, points = record["pareto"], record["points"]
    out: dict[str, Any] = {"comparison": None, "targets": {}}
    if "channel" in fronts and "channel+block" in fronts:
        out["comparison"] = compare_fronts(fronts["channel"], fronts["channel+block"], FRONT_GAIN)
    t = out["targets"]
    for key, gran, speed in (("issue12_required", "channel", REQUIRED_12), ("issue12_target", "channel", REPORTED_12),
                             ("issue14_target", "channel+block", TARGET_14)):
        if gran not in points:
            continue
        best = best_within(points[gran], MAX_DROP_POINTS)
        final = best_within([p for p in points[gran] if p["kind"] == "final"], MAX_DROP_POINTS)
        t[key] = {"granularity": gran, "speedup": speed, "max_drop": MAX_DROP_POINTS,
                  "met": bool(best and best["graph_speedup"] >= speed), "best": best,
                  "met_by_final_model": bool(final and final["graph_speedup"] >= speed), "best_final": final}
    return out


def _write(record: dict[str, Any], tag: str) -> int:
    png = ASSETS / f"{tag}_pareto.png"
    if record["points"]:
        plot_fronts(png, record["points"], record["pareto"], MAX_DROP_POINTS, (REQUIRED_12, REPORTED_12, TARGET_14),
                    f"prune_job: {record['steps']} fine-tune steps, budget {record['budget_speedup']}x graph")
    from benchmarks.prune_job_report import markdown

    publish(tag, markdown(record, png.name, tag), quick=record["quick"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
