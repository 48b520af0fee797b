"""Stage 3, per-layer sensitivity: mAP when one prunable unit alone is pruned, layers in parallel.

Each layer is one Ray task (retried if its worker dies); a task loads the dense model, masks
only its layer at each scanned sparsity and scores the val subset. Worker processes are shared
by an equal share of the layers, then exit. The scan covers the
``sensitivity.max_layers`` largest units (by weight count), so its cost stays bounded on big
backbones. The curves feed the ``layer_adaptive`` controller and the report.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from avprune.prune_job import common

log = logging.getLogger(__name__)


def _pruner(model: Any, cfg: Any, importance: str, controller: Any) -> Any:
    import torch

    from pruning import Pruner

    h, w = cfg.budget.input_size
    return Pruner(model, importance=importance, granularity=cfg.pruning.granularity, controller=controller,
                  example_inputs=torch.zeros(1, 3, h, w), update_every=1, round_to=cfg.pruning.round_to,
                  layer_filter=common.layer_filter(model, importance, cfg))


def largest_units(cfg: Any, max_layers: int) -> list[str]:
    """The prunable units (channel groups by root layer, or layers) with the most weights."""
    from pruning.controllers import build_controller

    model = common.build_architecture(cfg)
    pruner = _pruner(model, cfg, cfg.pruning.importances[0], build_controller("fixed", sparsity=0.0))
    modules = dict(model.named_modules())
    size = {u: sum(p.numel() for p in modules[u].parameters()) for u in pruner.units}
    return sorted(pruner.units, key=lambda u: (-size[u], u))[:max_layers]


def scan_layer_task(job: dict[str, Any], layer: str, sparsities: Sequence[float], importance: str,
                    dense_map: float) -> dict[str, Any]:
    """Ray task: the sensitivity curve of one unit (dicts in and out)."""
    import torch

    from avprune.config.prune import PruneJobConfig
    from perception.data import subset
    from pruning.sensitivity import scan_layer

    cfg = PruneJobConfig.model_validate(job)
    common.set_worker_threads(cfg)
    _, val = common.datasets(cfg)
    val = subset(val, cfg.sensitivity.eval_images, seed=cfg.seed)
    model = common.load_dense(cfg)
    h, w = cfg.budget.input_size
    curve = scan_layer(
        model, layer, lambda m: common.evaluate_map(m, val)["map"], list(sparsities),
        importance=importance, granularity=cfg.pruning.granularity, example_inputs=torch.zeros(1, 3, h, w),
        round_to=cfg.pruning.round_to, layer_filter=common.layer_filter(model, importance, cfg),
    )
    return {"layer": layer, "curve": [{"sparsity": s, "map": m, "drop": dense_map - m} for s, m in curve]}


def scan(cfg: Any, layers: Sequence[str], dense_map: float, *, on_result: Any = None) -> dict[str, Any]:
    """Scan ``layers`` as parallel Ray tasks (one CPU each) in the current Ray session."""
    from pruning.distributed import map_tasks

    job = cfg.model_dump(mode="json")
    kwargs = [{"job": job, "layer": layer, "sparsities": list(cfg.sensitivity.sparsities),
               "importance": cfg.pruning.importances[0], "dense_map": dense_map} for layer in layers]
    # A worker process costs ~3 s to start here (Ray, torch, the model), a layer's scan ~1.5 s: each
    # worker takes an equal share of the layers in one process (measured on 2 cores, 4 layers: 17.4 s
    # one process per layer vs 9.1 s shared), then exits (max_calls), so no scan worker idles on a
    # model's worth of memory while the search's trials run.
    out = map_tasks(scan_layer_task, kwargs, num_cpus_per_task=cfg.resources.cpus_per_trial, max_retries=2,
                    max_calls=calls_per_worker(len(kwargs), cfg.resources.cpus_per_trial), on_result=on_result)
    return {r["layer"]: {"curve": r["curve"]} for r in out}


def calls_per_worker(tasks: int, cpus_per_task: float) -> int:
    """Tasks each worker process runs before it exits: an equal share over the Ray slots there are."""
    import math

    import ray

    slots = int(ray.available_resources().get("CPU", 1.0) // max(cpus_per_task, 1e-9))
    workers = max(1, min(slots, tasks))
    return max(1, math.ceil(tasks / workers))


def dense_map_on_subset(cfg: Any) -> float:
    """Dense mAP on the scan's val subset (every curve's reference point)."""
    from perception.data import subset

    _, val = common.datasets(cfg)
    return common.evaluate_map(common.load_dense(cfg), subset(val, cfg.sensitivity.eval_images, seed=cfg.seed))["map"]


def run(ctx: Any) -> dict[str, Any]:
    cfg = ctx.config
    layers = largest_units(cfg, cfg.sensitivity.max_layers)
    dense = dense_map_on_subset(cfg)
    ctx.progress.stage_start("sensitivity", total=len(layers), note=f"{len(layers)} layers as Ray tasks")
    curves = scan(cfg, layers, dense, on_result=lambda i, r: ctx.progress.stage_advance("sensitivity"))
    worst = max(layers, key=lambda u: max(c["drop"] for c in curves[u]["curve"]))
    return {"dense_map": dense, "layers": curves, "note": f"{len(layers)} layers, most sensitive: {worst}"}
