"""Stage 3, per-layer sensitivity: the damage when one prunable unit alone is pruned, layers in parallel.

Each layer is one Ray task (retried if its worker dies); a task masks only its layer at each
scanned sparsity and measures ``sensitivity.metric``: the detection loss on fixed training images
(default: a forward pass per point) or mAP on the val subset. Worker processes are shared by an
equal share of the layers, then exit; the record names the worker process that scanned each
layer. The scan covers every unit, or the ``sensitivity.max_layers`` largest (by weight count) to
bound its cost on big backbones. The curves are the latency knapsack's damage (``allocation:
latency``), the ``layer_adaptive`` controller's profile, and a report figure.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from avprune.config.prune import PruneJobConfig
from avprune.prune_job.context import StageContext
from avprune.prune_job.env import JobEnv
from avprune.prune_job.records import CurvePoint, JSONDict, LayerSensitivity, SensitivityRecord

if TYPE_CHECKING:
    from torch import nn

    from pruning import Controller, Pruner

log = logging.getLogger(__name__)


def _pruner(env: JobEnv, model: nn.Module, importance: str, controller: Controller, channel_multiple: int) -> Pruner:
    from pruning import Pruner

    p = env.config.pruning
    return Pruner(model, importance=importance, granularity=p.pruner_granularity(), controller=controller,
                  example_inputs=env.example_input(), update_every=1, channel_multiple=channel_multiple,
                  layer_filter=env.layer_filter(model, importance))


def job_channel_multiple(ctx: StageContext) -> int:
    """The multiple the latency-table stage resolved (older records: the config's, else 8)."""
    from avprune.prune_job.records import LatencyTableRecord

    rec = ctx.find(LatencyTableRecord)
    if rec is not None and rec.channel_multiple:
        return int(rec.channel_multiple)
    m = ctx.config.pruning.channel_multiple
    return m if isinstance(m, int) else 8


def largest_units(cfg: PruneJobConfig, max_layers: int | None, channel_multiple: int = 16) -> list[str]:
    """The prunable units (channel groups by root layer, or layers) with the most weights (None: all)."""
    from pruning.controllers import build_controller

    env = JobEnv.from_config(cfg)
    model = env.build_start_architecture()
    from pruning.importance import offline_importance  # torch: imported when needed
    pruner = _pruner(env, model, offline_importance(cfg.pruning.importances), build_controller("fixed", sparsity=0.0), channel_multiple)
    modules = dict(model.named_modules())
    size = {u: sum(p.numel() for p in modules[u].parameters()) for u in pruner.units}
    return sorted(pruner.units, key=lambda u: (-size[u], u))[:max_layers]


@dataclass(frozen=True)
class ScanTask:
    """One Ray task of the scan: a unit's curve at the given sparsities (picklable)."""

    job: JSONDict  # the validated job config as JSON
    layer: str
    sparsities: tuple[float, ...]
    importance: str
    dense_value: float
    channel_multiple: int = 8  # the job's resolved multiple (latency-table record)


def metric_fn(env: JobEnv) -> Callable[[nn.Module], float]:
    """The scan's metric, higher is better: mAP on val images, or minus the loss on training images."""
    spec = env.config.sensitivity
    if env.config.sensitivity_metric() == "loss":
        from perception.loss_probe import loss_metric

        return loss_metric(env.train_set, images=spec.eval_images, batch_size=min(8, spec.eval_images),
                           seed=env.config.seed)
    val = env.val_subset(spec.eval_images)
    return lambda m: env.evaluate_map(m, val).map


def scan_metric(env: JobEnv) -> Callable[[nn.Module], float]:
    """:func:`metric_fn`, after re-estimating the scored model's BatchNorm statistics when
    ``sensitivity.bn_recalibration_images`` is set (EagleEye, Li et al., ECCV 2020: a pruned network
    ranked through stale statistics ranks poorly). The scan works on its own copy, so the statistics
    it changes are that copy's."""
    metric, n = metric_fn(env), env.config.sensitivity.bn_recalibration_images
    if not n:
        return metric

    def recalibrated(model: nn.Module) -> float:
        env.recalibrate_bn(model, images=n)
        return metric(model)

    return recalibrated


def scan_layer_task(task: ScanTask) -> tuple[str, LayerSensitivity]:
    """Ray task: the sensitivity curve of one unit, and the pid of the process that scanned it."""
    from pruning.sensitivity import scan_layer

    env = JobEnv.from_config(PruneJobConfig.model_validate(task.job))  # once per worker process
    env.set_worker_threads()
    model = env.load_start()  # the model the trials prune (gates folded with pruning.fold_gates)
    p = env.config.pruning
    curve = scan_layer(
        model, task.layer, scan_metric(env), list(task.sparsities),
        importance=task.importance, granularity=p.pruner_granularity(), example_inputs=env.example_input(),
        channel_multiple=task.channel_multiple, layer_filter=env.layer_filter(model, task.importance),
    )
    points = tuple(CurvePoint(sparsity=s, value=v, drop=task.dense_value - v) for s, v in curve)
    return task.layer, LayerSensitivity(curve=points, worker_pid=os.getpid())


def scan(cfg: PruneJobConfig, layers: Sequence[str], dense_value: float, *, channel_multiple: int = 16,
         on_result: Callable[[int, object], None] | None = None) -> dict[str, LayerSensitivity]:
    """Scan ``layers`` as parallel Ray tasks (one CPU each) in the current Ray session."""
    from avprune.prune_job.ray_exec import map_tasks
    from pruning.importance import offline_importance  # torch: imported when needed

    job = cfg.model_dump(mode="json")
    importance, sparsities = offline_importance(cfg.pruning.importances), tuple(cfg.sensitivity_sparsities())
    tasks = [{"task": ScanTask(job=job, layer=layer, sparsities=sparsities, importance=importance,
                               dense_value=dense_value, channel_multiple=channel_multiple)} for layer in layers]
    # A worker process costs ~3 s to start here (Ray, torch, the model), a layer's scan ~1.5 s: each
    # worker takes an equal share of the layers in one process (measured on 2 cores, 4 layers: 17.4 s
    # one process per layer vs 9.1 s shared), then exits (max_calls), so no scan worker idles on a
    # model's worth of memory while the search's trials run.
    out = map_tasks(scan_layer_task, tasks, num_cpus_per_task=cfg.resources.cpus_per_trial, max_retries=2,
                    max_calls=calls_per_worker(len(tasks), cfg.resources.cpus_per_trial), on_result=on_result)
    return dict(out)


def calls_per_worker(tasks: int, cpus_per_task: float) -> int:
    """Tasks each worker process runs before it exits: an equal share over the Ray slots there are."""
    import ray

    slots = int(ray.available_resources().get("CPU", 1.0) // max(cpus_per_task, 1e-9))
    workers = max(1, min(slots, tasks))
    return max(1, math.ceil(tasks / workers))


def dense_value(cfg: PruneJobConfig) -> float:
    """The unpruned start model's metric on the scan's images (every curve's reference point), scored
    as the scan scores its points (re-estimated statistics included)."""
    env = JobEnv.from_config(cfg)
    return scan_metric(env)(env.load_start())


def run(ctx: StageContext) -> SensitivityRecord:
    cfg = ctx.config
    multiple = job_channel_multiple(ctx)
    layers = largest_units(cfg, cfg.sensitivity_max_layers(), multiple)
    dense = dense_value(cfg)
    ctx.progress.stage_start("sensitivity", total=len(layers),
                             note=f"{len(layers)} layers as Ray tasks ({cfg.sensitivity_metric()})")
    curves = scan(cfg, layers, dense, channel_multiple=multiple, on_result=lambda i, r: ctx.progress.stage_advance("sensitivity"))
    return SensitivityRecord(dense_value=dense, layers={u: curves[u] for u in layers}, metric=cfg.sensitivity_metric())
