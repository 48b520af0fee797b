"""avprune's own methods for ``benchmarks/compare.py``: the ``pruning.Pruner`` in a fine-tune.

- ``avprune_budget_<importance>``: channel granularity, the budget controller (PI control of
  sparsity against the latency target with an mAP floor; cheap predicted latency every step from a
  HALP-style per-layer table, measured latency and mAP every ``measure_every`` steps), for each
  importance criterion (magnitude, taylor, activation, bn_scale).
- ``avprune_cubic``: the same pruner with Zhu & Gupta's cubic ramp (2017) to a fixed final
  sparsity: a threshold that moves, but is not driven by feedback. Its final sparsity is chosen
  once, before fine-tuning, to land on the latency target (table prediction corrected by one
  measurement), so it is compared at the same budget.

- ``avprune_channel_block``: the budget controller (magnitude) with residual blocks gated too
  (issue #14): at the end of the warm-up the blocks least important per millisecond are scheduled
  off for their share of the budget (:class:`avprune.prune_job.block_step.BlockStep`), they fade
  over the ramp, a block whose removal keeps the mAP under the floor ramps back, and the channels
  cover the rest of the budget (predicted latency minus the blocks' saving; measured latency with
  the gated-off blocks removed).

- ``avprune_latency``: the prune job's recipe for issue #12 through the library: the allocation
  controller with the latency-aware allocation (HALP's latency-saliency knapsack, Shen et al.,
  NeurIPS 2022), units compared by the setup's measured damage curves, per-layer counts multiples of
  the comparison's channel multiple, costs from multiply-accumulates with the saving scale the
  Torch-Pruning aligned model measured at setup, the target shrinking over the ramp and corrected by
  measured latency, and distillation from the dense checkpoint while fine-tuning. No mAP floor: the
  comparison judges mAP at equal latency, so the row must reach the target.

The ramps end at ``RAMP_END`` of the step budget so the rest is recovery at the final width, as
every other method gets.
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Any

from torch import nn

from benchmarks.compare_baselines import MAX_RATIO
from benchmarks.compare_methods import (
    MethodContext,
    MethodOutput,
    MethodSpec,
    TrajectoryPoint,
    dense_scaled_ms,
    finetune,
    fold_start_model,
    load_base,
    start_point,
)

log = logging.getLogger(__name__)

IMPORTANCES = ("magnitude", "taylor", "activation", "bn_scale")
RAMP_END = 0.5  # sparsity moves in the first half of the fine-tune; the second half recovers
UPDATE_EVERY = 5  # steps between mask updates (FIELD_NOTES: the mask update is cheap; importance EMAs need a few steps)


def _table(ctx: MethodContext) -> Any:
    from pruning.latency_model import LatencyTable

    if ctx.latency_table is None:
        raise ValueError("avprune methods need the setup's latency table (MethodContext.latency_table)")
    return LatencyTable.load(ctx.latency_table)


def bn_followed_filter(model: nn.Module, example_inputs: Any) -> Any:
    """The detector default filter restricted to layers a BatchNorm follows directly.

    ``bn_scale`` (network slimming's criterion) refuses layers without a BatchNorm after them
    (MobileNetV3's squeeze-excitation convs, the head's plain convs); they stay unpruned, which
    also freezes every channel group they belong to. That cost is part of what the row measures.
    """
    from pruning.filters import detector_core_forward, detector_default_filter
    from pruning.groups import find_following_bn

    base = detector_default_filter(model)
    names = [n for n, m in model.named_modules() if base(n, m)]
    with_bn = set(find_following_bn(model, names, example_inputs, detector_core_forward))
    return lambda name, module: base(name, module) and name in with_bn


def _pruner(model: nn.Module, ctx: MethodContext, importance: str, controller: Any, table: Any) -> Any:
    from pruning import Pruner

    layer_filter = bn_followed_filter(model, ctx.example_inputs) if importance == "bn_scale" else None
    return Pruner(
        model,
        importance=importance,
        granularity="channel",
        controller=controller,
        example_inputs=ctx.example_inputs,
        layer_filter=layer_filter,
        update_every=UPDATE_EVERY,
        round_to=8,
        predict_latency=table.predict,
    )


def _own_parametrized_classes(model: nn.Module) -> None:
    """Give every parametrized module of a deep copy its own class.

    ``torch.nn.utils.parametrize`` puts each parametrized tensor as a property on a per-module
    class (``ParametrizedConv2d``); ``deepcopy`` shares that class between original and copy,
    and ``remove_parametrizations`` deletes the property from the class, so finalizing a copy
    would strip ``weight`` from the original still in training.
    """
    from torch.nn.utils import parametrize

    for m in model.modules():
        if parametrize.is_parametrized(m):
            cls = type(m)
            body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
            m.__class__ = type(cls.__name__, cls.__bases__, body)


def finalized_copy(pruner: Any) -> nn.Module:
    """The pruner's current masked model made physically small, leaving the pruner training on."""
    clone = copy.deepcopy(pruner)
    _own_parametrized_classes(clone.model)
    return clone.finalize().eval()


def _run(ctx: MethodContext, pruner: Any, model: nn.Module, extra: dict[str, Any]) -> MethodOutput:
    traj: list[TrajectoryPoint] = start_point(ctx, lambda: finalized_copy(pruner))
    traj += finetune(model, ctx, steps=ctx.steps, snapshot=lambda: finalized_copy(pruner), hooks=(pruner,))
    history = [
        {"step": r.step, "predicted_ms": r.predicted_latency_ms,
         "sparsity": sum(x.sparsity for x in r.layers.values()) / max(1, len(r.layers))}
        for r in pruner.history
    ]
    small = pruner.finalize().eval()
    return MethodOutput(small, traj, {**extra, "updates": history[-20:]})


def paired_measure(ctx: MethodContext, dense: nn.Module, holder: dict[str, Any]) -> Any:
    """A controller's ``measure() -> (ms, mAP)`` for the pruner in ``holder["pruner"]`` (set once built).

    Timed inside the training process, ORT competes with the training thread pool still winding
    down, which inflated absolute figures by ~1.5x and drove the controller to its ceiling. The
    dense model timed right beside the candidate turns it into a paired ratio, scaled back to the
    quiet setup measurement.
    """

    def measure() -> tuple[float, float]:
        pruner = holder["pruner"]
        return dense_scaled_ms(ctx, finalized_copy(pruner), dense), ctx.map_of(pruner.model)

    return measure


def run_budget(ctx: MethodContext, importance: str) -> MethodOutput:
    """avprune with the budget controller and ``importance``, channel granularity."""
    from pruning.controllers import build_controller

    model = load_base(ctx)
    dense = load_base(ctx).eval()
    table = _table(ctx)
    holder: dict[str, Any] = {}
    measure = paired_measure(ctx, dense, holder)

    ramp = max(1, int(RAMP_END * ctx.steps))
    controller = build_controller(
        "budget",
        latency_budget_ms=ctx.latency_target_ms,
        map_floor=ctx.map_floor,
        predict_latency=table.predict,
        measure=measure,
        measure_every=ctx.measure_every,
        max_sparsity=MAX_RATIO,
        max_rate=min(1.0, MAX_RATIO / ramp),  # per step: any level is reachable within the ramp
    )
    pruner = _pruner(model, ctx, importance, controller, table)
    holder["pruner"] = pruner
    out = _run(ctx, pruner, model, {"importance": importance})
    points = [p.__dict__ for p in controller.points if p.map is not None]
    out.extra.update(infeasible=bool(controller.infeasible), final_sparsity_level=controller.u, measured=points)
    return out


def cubic_final_sparsity(
    pruner: Any, table: Any, target_ms: float, measure_ms: Any, dense_ms: float, *, iters: int = 12
) -> float:
    """Uniform sparsity whose latency is the target: table bisection, then one measured correction.

    The table's layers were timed in eager PyTorch and its constant (pre/post-processing, runtime
    overhead) calibrated on the dense model only, so its slope can be off. One finalized copy at
    the first answer is measured; with the dense measurement that gives two points of an affine
    model ``latency = overhead + scale * layers(u)``, solved for the final answer. (A purely
    multiplicative correction would also rescale the constant, which dominates end to end.)
    """
    from pruning.controllers import build_controller

    def layers(u: float) -> float:
        return table.predict(pruner.config_at(u)) - table.overhead_ms

    def solve(overhead: float, scale: float) -> float:
        lo, hi = 0.0, MAX_RATIO
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if overhead + scale * layers(mid) > target_ms else (lo, mid)
        return hi

    first = solve(table.overhead_ms, 1.0)
    probe = copy.deepcopy(pruner)
    _own_parametrized_classes(probe.model)
    probe.controller = build_controller("fixed", sparsity=first)
    probe.controller.bind(probe.units, probe.config_at)
    probe.update()
    measured = measure_ms(probe.finalize().eval())
    saved = layers(0.0) - layers(first)
    scale = (dense_ms - measured) / saved if saved > 0 else 0.0
    if scale <= 0:  # measurement noise larger than the predicted saving: keep the table's answer
        log.warning("cubic: measured %.2f ms at sparsity %.3f is no faster than dense; keeping it", measured, first)
        return first
    return solve(dense_ms - scale * layers(0.0), scale)


def run_cubic(ctx: MethodContext) -> MethodOutput:
    """avprune with a cubic sparsity ramp (Zhu & Gupta 2017) to a final sparsity chosen for the target."""
    from pruning.controllers import build_controller

    model = load_base(ctx)
    table = _table(ctx)
    ramp = max(1, int(RAMP_END * ctx.steps))
    pruner = _pruner(model, ctx, "magnitude", build_controller("fixed", sparsity=0.0), table)
    final = cubic_final_sparsity(pruner, table, ctx.latency_target_ms, ctx.measure_ms, ctx.dense_ms)
    # The controller needs the pruner's units to bind to, so it is swapped in once they exist.
    pruner.controller = build_controller("cubic", final_sparsity=final, end_step=ramp)
    pruner.controller.bind(pruner.units, pruner.config_at)
    return _run(ctx, pruner, model, {"importance": "magnitude", "final_sparsity": final})


def run_channel_block(ctx: MethodContext) -> MethodOutput:
    """avprune's budget controller (magnitude) over channels and residual blocks together (``channel+block``)."""
    from avprune.prune_job.block_step import BlockStep
    from avprune.prune_job.latency_table import block_costs
    from perception.models import drop_blocks
    from pruning.block_gates import BlockGates
    from pruning.blocks import require_blocks
    from pruning.controllers import build_controller
    from pruning.filters import detector_core_forward

    model = load_base(ctx)
    dense = load_base(ctx).eval()
    table = _table(ctx)
    names = [b.name for b in require_blocks(model, ctx.example_inputs, detector_core_forward)]
    ramp = max(1, int(RAMP_END * ctx.steps))
    warmup = max(1, min(20, ctx.steps // 10))  # the fine-tune's warm-up: Taylor scores exist by then
    block_ms = block_costs(table, names)
    gates = BlockGates(model, names, ramp_steps=max(1, ramp - warmup))
    holder: dict[str, Any] = {}

    def small_now() -> nn.Module:
        small = finalized_copy(holder["pruner"])
        drop_blocks(small, gates.removed())
        return small

    def measure() -> tuple[float, float]:
        # paired with the dense model, as run_budget; the gated-off blocks are gone from the copy
        ms = dense_scaled_ms(ctx, small_now(), dense)
        m = ctx.map_of(holder["pruner"].model)
        holder["step"].observe(m, ctx.map_floor)  # a block costing mAP below the floor ramps back
        return ms, m

    def predict(config: dict[str, int]) -> float:
        return table.predict(config) - holder["step"].removed_ms

    controller = build_controller(
        "budget", latency_budget_ms=ctx.latency_target_ms, map_floor=ctx.map_floor, predict_latency=predict,
        measure=measure, measure_every=ctx.measure_every, max_sparsity=MAX_RATIO,
        max_rate=min(1.0, MAX_RATIO / ramp),
    )
    pruner = _pruner(model, ctx, "magnitude", controller, table)
    pruner.predict_latency = predict
    holder["pruner"] = pruner
    step = BlockStep(gates, block_ms, budget_ms=ctx.latency_target_ms, dense_ms=float(table.predict({})),
                     reach_ms=lambda: float(table.predict(pruner.config_at(MAX_RATIO))), decide_step=warmup,
                     ramp_steps=max(1, ramp - warmup))
    holder["step"] = step
    traj: list[TrajectoryPoint] = start_point(ctx, small_now)
    traj += finetune(model, ctx, steps=ctx.steps, snapshot=small_now, hooks=(step, pruner))
    small = pruner.finalize().eval()
    removed = step.finalize()  # gated-off blocks become identities in the trained model
    drop_blocks(small, removed)
    points = [p.__dict__ for p in controller.points if p.map is not None]
    return MethodOutput(small, traj, {"importance": "magnitude", "removed_blocks": removed,
                                      "blocks_restored": step.restored, "infeasible": bool(controller.infeasible),
                                      "final_sparsity_level": controller.u, "measured": points})


# The latency-aware row's PI may move its target at most this share off the calibrated table. Measured
# inside the training process the latency reads high and noisy (the trajectory probes of one 4.3 ms
# model: 2.8-14 ms); with the controller's default 0.5 the integral wound up to its clip and cut the
# model to 2.3 ms predicted at 0.011 mAP by step 360 of 400 (first run, seed 0). The table is already
# calibrated by a held-out model measured on a quiet setup, so a large correction can only be noise.
MAX_CORRECTION = 0.1
MAX_CUT_PER_UPDATE = 0.08  # the prune job's default: the most predicted latency one mask update may cut


def run_latency(ctx: MethodContext, *, fold: bool = False) -> MethodOutput:
    """The latency-aware allocation controller with damage curves and distillation (module docstring);
    with ``fold`` the squeeze-excitation gates are folded first, as the prune job's ``fold_gates``."""
    from perception.distill import DistilledDetector
    from pruning import Pruner
    from pruning.allocation_controller import AllocationController, saving_scale
    from pruning.latency_model import macs_table

    if ctx.damage is None or ctx.aligned_config is None:
        raise ValueError("avprune_latency needs the setup's damage curves and aligned model (MethodContext)")
    model = load_base(ctx)
    dense = load_base(ctx).eval()  # the teacher and the timing reference stay unfolded (the job's dense side)
    # the prune job's latency_costs: macs, on the comparison's channel multiple
    table = macs_table(dense, ctx.example_inputs, dense_ms=ctx.dense_ms, multiple=ctx.channel_multiple)
    # the Torch-Pruning aligned model the setup measured at the target is the held-out model whose
    # measured saving over its predicted one calibrates the MAC table (pre/post-processing does not shrink)
    scale = saving_scale(float(table.predict({})), float(table.predict(ctx.aligned_config)), ctx.aligned_ms)
    extra: dict[str, Any] = {}
    if fold:
        gates, folded_ms = fold_start_model(ctx, model, dense)
        # the table of the folded start model, anchored to its measured latency (the job's latency
        # table after gate_fold); the saving scale is a ratio of savings and carries over
        table = macs_table(model, ctx.example_inputs, dense_ms=folded_ms, multiple=ctx.channel_multiple)
        extra = {"folded_gates": gates, "folded_ms": folded_ms}
    holder: dict[str, Any] = {}
    measure = paired_measure(ctx, dense, holder)

    warmup = min(20, ctx.steps // 10)  # finetune's warm-up: nothing is cut while the rate rises
    # aim at what the Torch-Pruning aligned model measured at the setup (its rounded counts land under
    # the nominal target: 4.34 ms for 5.00 in one run), so the verdict compares at equal latency
    target = ctx.aligned_ms if ctx.aligned_ms > 0 else ctx.latency_target_ms
    controller = AllocationController(
        table, target, total_steps=ctx.steps, allocation="latency", ramp_fraction=RAMP_END,
        measure=measure, measure_every=ctx.measure_every, map_floor=None, max_unit_sparsity=MAX_RATIO,
        saving_scale=scale, warmup_steps=warmup, max_correction=MAX_CORRECTION,
        # the job's default (pruning.max_cut_per_update): without it the first run's knapsack reshuffled
        # 30+ groups at single updates and the probes read 0.06 mAP at step 200 (seed 0)
        max_cut_per_update=MAX_CUT_PER_UPDATE,
    )
    controller.set_damage({u: [(float(a), float(b)) for a, b in c] for u, c in ctx.damage.items()})
    pruner = Pruner(model, importance="magnitude", granularity="channel", controller=controller,
                    example_inputs=ctx.example_inputs, update_every=max(1, min(UPDATE_EVERY, ctx.steps // 10)),
                    channel_multiple=ctx.channel_multiple, predict_latency=table.predict,
                    # as the prune job (search.freeze_after): the last interval recovers from the last change
                    freeze_after=ctx.steps - max(1, min(ctx.measure_every, ctx.steps // 10)))
    holder["pruner"] = pruner
    student = DistilledDetector(model, dense)
    traj: list[TrajectoryPoint] = start_point(ctx, lambda: finalized_copy(pruner))
    traj += finetune(student, ctx, steps=ctx.steps, snapshot=lambda: finalized_copy(pruner), hooks=(pruner,))
    last = controller.last
    small = pruner.finalize().eval()
    return MethodOutput(small, traj, {
        **extra, "allocation": "latency", "distill": True, "saving_scale": scale, "aimed_ms": target,
        "channel_multiple": ctx.channel_multiple,
        "predicted_ms": None if last is None else float(last.predicted_ms),
        "target_ms": None if last is None else float(last.target_ms),
    })


def _budget_runner(importance: str) -> Any:
    def run(ctx: MethodContext) -> MethodOutput:
        return run_budget(ctx, importance)

    run.__name__ = f"run_budget_{importance}"
    return run


#: The avprune methods, in run order (benchmarks.compare_registry names them).
METHODS = (
    *(MethodSpec(f"avprune_budget_{imp}", _budget_runner(imp), "channel", f"avprune budget, {imp}") for imp in IMPORTANCES),
    MethodSpec("avprune_cubic", run_cubic, "channel", "avprune cubic ramp, magnitude"),
    MethodSpec("avprune_channel_block", run_channel_block, "channel", "avprune channel+block, budget, magnitude"),
    MethodSpec("avprune_latency", run_latency, "channel", "avprune latency-aware allocation, aligned, distilled"),
    MethodSpec("avprune_latency_fold", functools.partial(run_latency, fold=True), "channel",
               "avprune latency-aware allocation, SE gates folded first"),
    # Does INT8 stack with pruning? The avprune_latency model quantized like dense_int8 (FIELD_NOTES: a
    # 50%-pruned model ran slower in U8S8 INT8 than in fp32 on ORT CPU).
    MethodSpec("avprune_latency_int8", run_latency, "channel", "avprune latency-aware allocation, then INT8",
               deploy="int8", reuses="avprune_latency"),
)
