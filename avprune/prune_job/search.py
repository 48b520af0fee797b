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

With a relative floor (``budget.max_map_drop``, ``search.shadow_dense``) a dense shadow trial runs
first (:mod:`avprune.prune_job.shadow`); each candidate's spec carries its mAP curve, and the floor a
measurement is judged against is the shadow's mAP at that step minus the drop.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from avprune.config.prune import FinetuneSpec, PruneJobConfig
from avprune.prune_job.context import StageContext, TrialSpec
from avprune.prune_job.env import JobEnv, MapScore
from avprune.prune_job.node_gate import NodeGate
from avprune.prune_job.records import (
    BaselineRecord,
    Candidate,
    CandidateRecord,
    LatencyTableRecord,
    SearchRecord,
    SensitivityRecord,
    ShadowRecord,
    TrialReport,
)

if TYPE_CHECKING:
    from torch import nn

    from avprune.prune_job.block_step import BlockStep
    from avprune.prune_job.reconstruct_step import ReconstructStep
    from deploy.timing import LatencySummary
    from perception.train import StepContext
    from pruning import Controller, Pruner
    from pruning.latency_model import LatencyTable

log = logging.getLogger(__name__)

#: ``predict(channel_config) -> ms``: the latency table's prediction for a channel configuration.
PredictFn = Callable[[dict[str, int]], float]
#: ``measure() -> (p50 ms, mAP)``: the budget controller's measured feedback.
MeasureFn = Callable[[], tuple[float, float]]


def candidates(config: PruneJobConfig) -> list[Candidate]:
    """The candidate grid: importances x ramps, cycled (with new seeds) up to ``search.candidates``."""
    p = config.pruning
    grid = [(imp, ramp) for ramp in p.ramps for imp in p.importances]
    return [Candidate(candidate_id=f"c{i}", index=i, importance=imp, controller=p.controller, ramp=float(ramp),
                      seed=config.seed + i)
            for i, (imp, ramp) in enumerate(itertools.islice(itertools.cycle(grid), config.search.candidates))]


# ----------------------------------------------------------------------------- inside a trial


def _controller(cfg: PruneJobConfig, spec: TrialSpec, table: LatencyTable, predict_latency: PredictFn,
                measure: MeasureFn, budget_ms: float | None = None) -> Controller:
    """The candidate's controller; the ramp sets how fast sparsity may move. ``budget_ms`` replaces
    the job's budget (blocks removed elsewhere leave the channels a looser one)."""
    from pruning.controllers import build_controller

    p, steps, cand = cfg.pruning, cfg.finetune.steps, spec.candidate
    budget = spec.latency_budget_ms if budget_ms is None else budget_ms
    # nothing is pruned during the learning-rate warm-up; the ramp covers the steps after it
    begin, ramp = cfg.finetune.warmup(), ramp_steps(cfg, cand)
    if p.granularity == "block":  # depth only: channels stay whole
        return build_controller("fixed", sparsity=0.0)
    if cand.controller == "allocation":
        from pruning.allocation_controller import AllocationController, saving_scale

        # the held-out pruned model's measured saving over its predicted one: the table's known
        # bias on pruned shapes, given to the controller up front instead of learnt by the PI late
        scale = 1.0 if spec.holdout_ms is None else saving_scale(float(table.predict({})), *spec.holdout_ms)
        # the target holds at the dense prediction through the warm-up (a fresh optimizer's dip is
        # not pruning damage; issue #12) and the ramp covers the steps after it
        ctrl = AllocationController(
            table, budget, total_steps=steps, allocation=p.allocation,
            ramp_fraction=0.0 if cand.ramp == 0 else min(1.0, ramp / steps), measure=measure,
            measure_every=cfg.finetune.measure_every, map_floor=spec.map_floor, max_unit_sparsity=p.max_sparsity,
            saving_scale=scale, warmup_steps=begin, floor_allowance=p.floor_allowance, step_back=p.step_back,
            max_cut_per_update=p.max_cut_per_update, recovery_steps=recovery_steps(cfg, cand),
            regrow_until=p.regrow_until,
        )
        log.info("%s: saving scale %.3f (held-out model %s ms predicted/measured)", cand.candidate_id, scale,
                 spec.holdout_ms)
        if spec.sensitivity and p.allocation == "latency":
            # the knapsack compares units by their measured damage curves (importance ranks within a unit)
            ctrl.set_damage(spec.sensitivity)
        return ctrl
    if cand.controller == "budget":
        return build_controller(
            "budget", latency_budget_ms=budget, map_floor=spec.map_floor,
            predict_latency=predict_latency, measure=measure, measure_every=cfg.finetune.measure_every,
            max_sparsity=p.max_sparsity, max_rate=min(1.0, p.max_sparsity / ramp), warmup_steps=begin,
        )
    if cand.controller == "cubic":
        return build_controller("cubic", final_sparsity=p.max_sparsity, begin_step=begin, end_step=begin + ramp)
    if cand.controller == "fixed":
        return build_controller("fixed", sparsity=p.max_sparsity)
    return build_controller("layer_adaptive", profile=spec.sensitivity,
                            max_drop=max(0.0, spec.dense_map - spec.map_floor),
                            begin_step=begin, end_step=begin + ramp, max_sparsity=p.max_sparsity)


def ramp_steps(cfg: PruneJobConfig, cand: Candidate) -> int:
    """Steps the candidate's ramp takes after the learning-rate warm-up (1 for a one-shot cut)."""
    ft = cfg.finetune
    return max(1, int(round(cand.ramp * (ft.steps - ft.warmup()))))


def ramp_end_step(cfg: PruneJobConfig, cand: Candidate) -> int:
    """The training step the candidate's ramp ends: the warm-up plus :func:`ramp_steps`."""
    return cfg.finetune.warmup() + ramp_steps(cfg, cand)


def in_recovery(cfg: PruneJobConfig, cand: Candidate, controller: Controller, step: int) -> bool:
    """Whether ``step`` falls in a one-shot candidate's recovery window, where no floor is judged:
    the controller's own window when it keeps one (the allocation controller's moves with the steps
    held under the floor), else the configured one right after the ramp."""
    window = getattr(controller, "in_recovery", None)
    if callable(window):
        return bool(window(step))
    start = ramp_end_step(cfg, cand)
    return start <= step < start + recovery_steps(cfg, cand)


def recovery_steps(cfg: PruneJobConfig, cand: Candidate) -> int:
    """Steps after a one-shot candidate's cut during which its floor is not judged (0 for a ramp)."""
    if cand.ramp > 0:
        return 0
    return int(round(cfg.pruning.one_shot_recovery * (cfg.finetune.steps - cfg.finetune.warmup())))


def finalized_copy(pruner: Pruner, fresh_model: nn.Module) -> nn.Module:
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
        layer_filter=pruner.layer_filter, update_every=pruner.update_every, channel_multiple=pruner.channel_multiple,
        nm=pruner.nm, forward_fn=pruner.forward_fn,
    )
    fresh_model.load_state_dict(pruner.model.state_dict())
    clone.load_state_dict(pruner.state_dict())
    return clone.finalize()


@dataclass
class _Measured:
    """The trial's latest measurement."""

    step: int
    latency: LatencySummary
    score: MapScore
    map_floor: float | None = None  # the floor this measurement was judged against


class _Trial:
    """One candidate's fine-tune in a worker: measurement, snapshots of the best point, Tune reports."""

    def __init__(self, spec: TrialSpec, env: JobEnv, work: Path) -> None:
        self.spec, self.env, self.work = spec, env, work
        self.pruner: Pruner | None = None
        self.blocks: BlockStep | None = None
        self.reconstruct: ReconstructStep | None = None
        self.last: _Measured | None = None
        self._measured_net: tuple[str, tuple[tuple[str, float], ...]] | None = None  # masks + gates last measured
        self._dense_target: nn.Module | Path | None = None
        self.load_factor: float | None = None  # baseline dense p50 / dense p50 in the last paired timing
        # Latency is timed with every other trial on the node paused (a trainer on the other core
        # squeezes the pruned/dense ratio toward 1: avprune.prune_job.node_gate)
        self.gate = NodeGate(work.parent)
        snapshot, floor_snapshot = kept_point(work, "snapshot"), kept_point(work, "floor_snapshot")
        self.best = snapshot["map"] if snapshot else -1.0
        # the fastest point that kept the floor while no point met both targets (restored on restart)
        self.floor_best_ms = floor_snapshot["latency_ms"] if floor_snapshot else math.inf

    def _latency(self, model: nn.Module) -> LatencySummary:
        dense_ms = self.spec.dense_latency_ms
        with self.gate.exclusive():
            if dense_ms is None:
                return self.env.measure_latency(model, self.work)
            if self._dense_target is None:  # exported once per trial process
                self._dense_target = self.env.runtime_target(self.env.load_dense(), self.work / "latency_dense.onnx")
            lat, factor = self.env.measure_latency_paired(model, self._dense_target, self.work, dense_ms=dense_ms)
        self.load_factor = factor
        if factor < 0.9:
            log.info("latency measured under load (dense %.2fx its baseline): scaled to %.2f ms", 1 / factor, lat.p50_ms)
        return lat

    def _recalibrate_if_cut(self) -> None:
        """Re-estimate the BatchNorm statistics (adaptive BN, ``finetune.bn_recalibration_images``) when
        the network changed since the last measurement: channels cut or regrown, a block gate moved.

        Why: a cut's BNs follow it only at their momentum (0.03 in SSDlite), so a model measured soon
        after a cut reads far worse than it is. The demo's checkpoint cut uniformly by 10/20/30% reads
        0.173/0.055/0.001 mAP as cut and 0.484/0.447/0.288 re-estimated on 64 training images (dense
        0.558), and the floor would judge the first. A network unchanged since the last measurement
        keeps what training estimated: re-estimated on 64-128 images, the demo's final models (masks
        frozen for the last interval) read 0.0-1.2 points lower, not higher (benchmarks/RESULTS.md)."""
        pruner = self.pruner
        assert pruner is not None  # measure() and finish() checked
        gates = tuple(sorted(self.blocks.gates.gates.items())) if self.blocks is not None else ()
        net = (pruner.mask_digest(), gates)
        if self._measured_net is None:  # first measurement of this process: changed if anything is cut
            changed = pruner.masked_fraction() > 0 or any(v < 1 for _, v in gates)
        else:
            changed = net != self._measured_net
        self._measured_net = net
        if changed:
            self.env.recalibrate_bn(pruner.model)

    # Train-hook state (saved in the training checkpoint): a trial restarted from it decides whether
    # its network changed since the last measurement as the uninterrupted trial would.
    def state_dict(self) -> dict[str, object]:
        return {"measured_net": self._measured_net}

    def load_state_dict(self, state: dict[str, object]) -> None:
        net = state.get("measured_net")
        self._measured_net = None if net is None else (str(net[0]), tuple((str(n), float(v)) for n, v in net[1]))

    def __call__(self, ctx: StepContext) -> None:
        self.hook(ctx)

    def measure(self) -> tuple[float, float]:
        """Measured latency of the current pruned model and its mAP; keeps the snapshots (:meth:`keep_snapshots`)."""
        pruner = self.pruner
        if pruner is None:
            raise ValueError("measure() called before the trial's pruner was set")
        self._recalibrate_if_cut()  # before the finalized copy: the snapshot carries what was measured
        small = finalized_copy(pruner, self.env.build_start_architecture())
        if self.blocks is not None:
            self.blocks.apply_to(small)
        lat = self._latency(small)
        score = self.env.evaluate_map(pruner.model)
        floor = self.spec.floor_at(pruner.step_count)
        if self.spec.floor_curve and hasattr(pruner.controller, "map_floor"):
            # the dense shadow's mAP at this step minus the drop: the controller compares mAP with it
            # right after this call returns
            pruner.controller.map_floor = floor
        self.last = _Measured(step=pruner.step_count, latency=lat, score=score, map_floor=floor)
        # a block whose removal keeps mAP under the floor ramps back (#14), but not inside a one-shot
        # candidate's recovery window, where the channels' floor is not judged either
        if self.blocks is not None and not in_recovery(self.env.config, self.spec.candidate, pruner.controller,
                                                        pruner.step_count):
            self.blocks.observe(score.map, floor)
        self.keep_snapshots(small, pruner.step_count, lat.p50_ms, score.map, floor)
        return lat.p50_ms, score.map

    def keep_snapshots(self, small: nn.Module, step: int, latency_ms: float, map_value: float, floor: float) -> None:
        """Keep the measured model when it is the best point yet that met both targets (``snapshot.pt``),
        or, while none has, the fastest yet that kept the mAP floor (``floor_snapshot.pt``).

        Why both (NetAdapt keeps its best too): the controller may give capacity back later and end over
        budget on a noisy measurement; and where the budget is out of reach it keeps cutting near the
        floor, where one noisy read above it lets a last cut through that the masks' freeze leaves no
        room to take back. The demo's job read 0.549 at step 80 (floor 0.548) and shipped 0.530 after its
        cut at step 100; selection now sees the model that kept the floor too."""
        from perception.io import atomic_write_json
        from perception.models import save_checkpoint

        def keep(name: str) -> None:  # the model first: its point file says the model is complete
            save_checkpoint(self.work / f"{name}.pt", small,
                            extra={"candidate": self.spec.candidate.to_dict(), "step": step})
            atomic_write_json(self.work / f"{name}.json", {"step": step, "map": map_value, "latency_ms": latency_ms})

        if latency_ms <= self.spec.latency_budget_ms and map_value >= max(floor, self.best):
            keep("snapshot")
            self.best = map_value
        elif self.best < 0 and map_value >= floor and latency_ms < self.floor_best_ms:
            keep("floor_snapshot")
            self.floor_best_ms = latency_ms

    def hook(self, ctx: StepContext) -> None:
        """Train hook: every ``measure_every`` steps a measurement, and one Tune report (measured latency,
        mAP, sparsity) except at the last step, which :meth:`finish` reports once the model is saved."""
        step = ctx.step + 1
        pruner = self.pruner
        ft = self.env.config.finetune
        if step % ft.measure_every or pruner is None:
            return
        if self.last is None or self.last.step != step:  # otherwise the budget controller measured this very step
            self.measure()
        if step >= ft.steps:
            # The last step is finish()'s report, made once pruned.pt is written: a report of it here
            # let ASHA stop a candidate that had trained every step before its model was saved (the
            # demo's job: c0 'stopped early' at step 120 of 120, no pruned.pt).
            return
        pred = pruner.predict_latency(pruner.channel_config()) if pruner.predict_latency else None
        self.report(step, latency_pred_ms=pred, sparsity=pruner.masked_fraction())

    def finish(self, pruner: Pruner, steps: int, infeasible: bool) -> None:
        """The finished candidate: per-layer records, the physically smaller model, its own numbers."""
        from perception.io import atomic_write_json
        from perception.models import save_checkpoint

        final_rec = pruner.history[-1].layers if pruner.history else {}
        layers = {name: {"sparsity": sp, "threshold": getattr(final_rec.get(name), "threshold", None),
                         "target": getattr(final_rec.get(name), "target", None)}
                  for name, sp in pruner.layer_sparsity().items()}
        channels = pruner.channel_config()
        dense_channels = {n: int(getattr(m, "out_channels", getattr(m, "out_features", 0)))
                          for n, m in pruner.modules.items() if n in channels}
        if self.last is None or self.last.step != steps:
            self._recalibrate_if_cut()  # as measure() would: the shipped model is the one measured below
        small = pruner.finalize()
        # Blocks after channels: the channel finalize traces Torch-Pruning's graph with every layer in
        # place (a group's root inside a removed block would be gone); names are unchanged by it.
        removed = self.blocks.finalize() if self.blocks is not None else []
        save_checkpoint(self.work / "pruned.pt", small,
                        extra={"candidate": self.spec.candidate.to_dict(), "removed_blocks": removed})
        ctrl = pruner.controller
        atomic_write_json(self.work / "pruning.json", {
            "layers": layers, "history": [r.to_dict() for r in pruner.history[-50:]],
            "channels": {n: {"dense": dense_channels[n], "kept": k} for n, k in channels.items()},
            "channel_multiple": pruner.channel_multiple,
            "allocation": getattr(ctrl, "allocation_kind", None),
            # the allocation controller's measured points: target, prediction, latency, mAP, correction, floor
            "controller_points": [asdict(pt) for pt in getattr(ctrl, "points", [])
                                  if pt.latency_ms is not None],
            "removed_blocks": removed,
            "reconstruction": self.reconstruct.summary if self.reconstruct is not None else None,
            **({"block_events": []} if self.blocks is None else self.blocks.report()),
        })
        if self.last is None or self.last.step != steps:
            # Measured at the last step already (measure_every divides the steps): that was this very
            # model (the pruner's state after the last step, finalized alike), so it is not timed again.
            self.last = _Measured(step=steps, latency=self._latency(small), score=self.env.evaluate_map(small),
                                  map_floor=self.spec.floor_at(steps))
        self.report(steps, done=True, infeasible=infeasible)

    def report(self, step: int, **extra: float | bool | None) -> None:
        """One Tune report. ASHA ranks on ``score``: mAP minus the relative latency overshoot, so a
        model over budget is worth less than its mAP says and models within budget rank on mAP."""
        from ray import tune

        if self.last is None:
            raise ValueError(f"Tune report at step {step} before any measurement")
        lat, m = self.last.latency, self.last.score
        score = m.map - max(0.0, lat.p50_ms / self.spec.latency_budget_ms - 1.0)
        from avprune.prune_job.cluster import worker_identity

        tune.report({"step": step, "map": m.map, "map50": m.map50, "latency_ms": lat.p50_ms,
                     "latency_p99_ms": lat.p99_ms, "score": score, "map_floor": self.last.map_floor,
                     **({} if self.load_factor is None else {"load_factor": self.load_factor}),
                     **extra, **worker_identity()})


def trial(params: dict[str, object]) -> None:
    """One candidate, run by Ray Tune in a worker process (a :class:`TrialSpec` as a dict in, Tune reports out)."""
    import torch

    from perception.io import atomic_write_text
    from perception.train import train
    from pruning import Pruner
    from pruning.latency_model import LatencyTable

    spec = TrialSpec.from_dict(params)
    cfg = PruneJobConfig.model_validate(spec.job)
    env = JobEnv.from_config(cfg)
    work = Path(spec.out_dir) / "search" / "trials" / spec.candidate_id
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(work / "pid", str(os.getpid()))
    from avprune.prune_job.cluster import record_attempt

    record_attempt(work)  # node id + pid of this attempt: report.json's cluster block
    env.set_worker_threads()
    torch.manual_seed(spec.candidate.seed)

    table = LatencyTable.load(spec.latency_table)
    dense = env.load_dense()  # the teacher, and the reference every speed-up is measured against
    model = env.load_start()  # what is pruned: dense, or dense with its gates folded (pruning.fold_gates)
    state = _Trial(spec, env, work)
    ft, p = cfg.finetune, cfg.pruning
    importance = spec.candidate.importance
    hooks: list[object] = []
    blocks = None
    if p.prunes_blocks:
        blocks = _block_step(cfg, spec, table, model, env)
        state.blocks = blocks
    budget_ms = None if blocks is None else _ChannelBudget(spec.latency_budget_ms, blocks)
    predict = table.predict if blocks is None else (lambda c: table.predict(c) - blocks.removed_ms)
    measure: MeasureFn = state.measure
    if blocks is not None and spec.candidate.controller == "allocation":
        # the allocation controller's PI compares measured latency with its channel-only target:
        # add back what the removed blocks saved
        gates = blocks

        def measure() -> tuple[float, float]:
            lat, m = state.measure()
            return lat + sum(gates.block_ms.get(n, 0.0) for n in gates.gates.removed()), m

    controller = _controller(cfg, spec, table, predict, measure)
    if budget_ms is not None and hasattr(controller, "budget"):
        controller.budget = budget_ms.value()  # refreshed by the block hook's decision below
        budget_ms.controller = controller
    pruner = Pruner(model, importance=importance, granularity=p.pruner_granularity(), controller=controller,
                    example_inputs=env.example_input(), update_every=p.update_every,
                    channel_multiple=spec.channel_multiple, predict_latency=predict,
                    layer_filter=env.layer_filter(model, importance), freeze_after=freeze_after(cfg),
                    stable_masks=p.stable_masks)
    state.pruner = pruner
    if blocks is not None:
        blocks.reach_ms = lambda: _widest_channels_ms(cfg, table, pruner)
        hooks.append(blocks)
        if budget_ms is not None:
            hooks.append(budget_ms)
    hooks.append(pruner)
    if p.reconstruct_images and p.prunes_channels:
        state.reconstruct = _reconstruct_step(cfg, spec, env, model, dense, controller)
        hooks.append(state.reconstruct)  # after the pruner (this step's masks), before the measurement
    hooks += [state, state.gate]  # the gate last: a measurement elsewhere waits for this step's hooks
    student = model
    if cfg.distill():
        from perception.distill import DistilledDetector

        # the dense checkpoint teaches the pruned student (issue #12 lever 5); hooks see the student
        student = DistilledDetector(model, dense)
        student.avprune_meta = dict(model.avprune_meta)  # train's checkpoints name the detector
    settings = env.finetune_settings(seed=spec.candidate.seed, threads=cfg.resources.torch_threads)
    state.gate.start_training()
    try:
        train(student, env.train_set, settings, out_dir=work / "train", hooks=hooks, resume=True, progress=False)
    finally:
        state.gate.stop_training()
    if state.gate.waited_s > 1.0:
        log.info("paused %.1f s in all while other trials timed latency", state.gate.waited_s)
    state.finish(pruner, ft.steps, infeasible=bool(getattr(controller, "infeasible", False)))


def _reconstruct_step(cfg: PruneJobConfig, spec: TrialSpec, env: JobEnv, model: nn.Module, dense: nn.Module,
                      controller: Controller) -> ReconstructStep:
    """The hook that re-solves the pruned model's consumer layers once its cut has reached the budget:
    the first mask update after the ramp where the allocation met its target (or the last update)."""
    from avprune.prune_job.reconstruct_step import ReconstructStep
    from pruning.filters import detector_core_forward

    ramp_end = ramp_end_step(cfg, spec.candidate)

    def caught_up() -> bool:  # the allocation controller may lag its target (max_cut_per_update)
        last = getattr(controller, "last", None)
        return last is None or float(last.predicted_ms) <= float(last.target_ms) * 1.01

    teacher = copy.deepcopy(dense).eval()  # the distillation teacher is left as it is
    return ReconstructStep(model, teacher, lambda: env.calibration_batches(teacher, cfg.pruning.reconstruct_images),
                           from_step=ramp_end, last_step=freeze_after(cfg), update_every=cfg.pruning.update_every,
                           ready=caught_up, forward_fn=detector_core_forward)


def freeze_after(cfg: PruneJobConfig) -> int:
    """The last step that may change masks: one measurement interval before the end (at least
    ``update_every`` steps), so the candidate recovers from its last change and its last in-trial
    measurement is of the model it ships."""
    ft = cfg.finetune
    return max(0, ft.steps - max(ft.measure_every, cfg.pruning.update_every))


def _widest_channels_ms(cfg: PruneJobConfig, table: LatencyTable, pruner: Pruner) -> float:
    """Predicted latency with channels pruned as far as the job allows (dense for ``block``)."""
    sp = cfg.pruning.max_sparsity if cfg.pruning.prunes_channels else 0.0
    return float(table.predict(pruner.config_at(sp)))


def _block_step(cfg: PruneJobConfig, spec: TrialSpec, table: LatencyTable, model: nn.Module, env: JobEnv) -> BlockStep:
    """Gates on the removable blocks the latency-table stage found, decided at the end of warm-up."""
    from avprune.prune_job.block_step import BlockStep
    from pruning.block_gates import BlockGates

    names = sorted(spec.block_ms)
    if not names:
        raise ValueError(f"pruning.granularity {cfg.pruning.granularity!r}: the latency-table record lists no "
                         f"removable block for {cfg.model.name!r}")
    begin, ramp = cfg.finetune.warmup(), ramp_steps(cfg, spec.candidate)
    gates = BlockGates(model, names, ramp_steps=ramp)
    return BlockStep(gates, spec.block_ms, budget_ms=spec.latency_budget_ms, reach_ms=lambda: float(table.predict({})),
                     decide_step=begin, ramp_steps=ramp, freeze_after=freeze_after(cfg))


class _ChannelBudget:
    """Train hook: once blocks are chosen, the channel controller's budget is the job's plus their saving."""

    def __init__(self, budget_ms: float, blocks: BlockStep) -> None:
        self.budget_ms, self.blocks = budget_ms, blocks
        self.controller: Controller | None = None

    def value(self) -> float:
        return self.budget_ms + self.blocks.removed_ms

    def __call__(self, ctx: StepContext) -> None:
        if self.controller is not None and hasattr(self.controller, "budget"):
            self.controller.budget = self.value()


# ----------------------------------------------------------------------------- the stage


def trial_specs(ctx: StageContext, shadow: ShadowRecord | None = None) -> list[TrialSpec]:
    """One :class:`TrialSpec` per candidate, from the baseline (budget), table and sensitivity records,
    and the dense shadow's curve (the moving floor) when there is one."""
    base = ctx.record(BaselineRecord)
    sens = ctx.find(SensitivityRecord)
    job = ctx.config.model_dump(mode="json")
    table = ctx.record(LatencyTableRecord)
    multiple = table.channel_multiple or (ctx.config.pruning.channel_multiple
                                          if isinstance(ctx.config.pruning.channel_multiple, int) else 8)
    # the trials aim under the budget by budget.latency_margin: select re-times what they deliver
    aim_ms = ctx.config.budget.search_target(base.latency_budget_ms)
    return [TrialSpec(candidate=c, job=job, out_dir=str(ctx.out_dir.resolve()),
                      latency_table=table.path, latency_budget_ms=aim_ms,
                      map_floor=base.map_floor, dense_map=base.dense.map,
                      sensitivity=sens.profile() if sens is not None else {},
                      channel_multiple=int(multiple), block_ms=dict(table.block_ms),
                      floor_curve=[] if shadow is None else [(p.step, p.map) for p in shadow.curve],
                      max_map_drop=None if shadow is None else shadow.max_map_drop,
                      dense_latency_ms=base.latency.p50_ms, holdout_ms=_holdout(table))
            for c in candidates(ctx.config)]


def _holdout(table: LatencyTableRecord) -> tuple[float, float] | None:
    """The in-graph calibration's held-out model, (predicted, measured) ms, when it was measured."""
    pred, meas = table.in_graph_holdout_predicted_ms, table.in_graph_holdout_measured_ms
    return None if pred is None or meas is None else (float(pred), float(meas))


def kept_point(work: Path, name: str) -> dict[str, float] | None:
    """The measured point of a trial's kept model ``work/NAME.pt`` (:meth:`_Trial.keep_snapshots`), None
    when it has none."""
    meta = work / f"{name}.json"
    return json.loads(meta.read_text()) if meta.is_file() and (work / f"{name}.pt").is_file() else None


def report_count(ft: FinetuneSpec) -> int:
    """Tune reports of a candidate that trains every step (ASHA's ``max_t``): one per
    ``measure_every`` steps before the last (:meth:`_Trial.hook`), then finish()'s."""
    return -(-ft.steps // ft.measure_every)


def asha_grace(cfg: PruneJobConfig, candidates: Sequence[Candidate]) -> int:
    """Reports before ASHA may stop a trial: ``search.grace_period``, and never before every ramp has
    ended plus one recovering measurement.

    ASHA ranks on mAP minus the latency overshoot; mid-ramp every candidate is over the budget by
    design, so an earlier rung stops whichever happens to be pruned more slowly (measured: c0 stopped
    at step 100 of 400, mAP 0.494 at 12.2 ms, behind c1's 0.465 at 11.8 ms, for a 6.9 ms budget).
    """
    ft = cfg.finetune
    reports = report_count(ft)
    ramp_end = max((ramp_end_step(cfg, c) + recovery_steps(cfg, c) for c in candidates), default=0)
    return min(max(cfg.search.grace_period, -(-ramp_end // ft.measure_every) + 1), reports)


def run(ctx: StageContext) -> SearchRecord:
    """Run every candidate as a Tune trial; record each one's reports and final checkpoint."""
    from avprune.prune_job.progress import tune_callback
    from avprune.prune_job.ray_exec import run_trials

    cfg, out = ctx.config, ctx.out_dir
    shadow = None
    if cfg.shadow_dense():
        from avprune.prune_job import shadow as shadow_stage

        # First, as its own Tune trial: the candidates then read their floor from its finished curve
        # (see avprune.prune_job.shadow for why before, not beside them).
        shadow = shadow_stage.run(ctx, ctx.record(LatencyTableRecord).path)
    specs = trial_specs(ctx, shadow)
    ft = cfg.finetune
    reports = report_count(ft)
    ctx.progress.stage_start("search", total=len(specs), note=f"{len(specs)} candidates as Ray Tune trials")
    res = {"cpu": cfg.resources.cpus_per_trial, "gpu": cfg.resources.gpus_per_trial}
    results = run_trials(
        trial, [s.to_dict() for s in specs], resources_per_trial=res, metric="score", mode="max",
        scheduler="asha" if cfg.search.early_stopping else None,
        max_t=reports, grace_period=asha_grace(cfg, [s.candidate for s in specs]), max_failures=cfg.search.max_failures,
        storage_path=out / "search", name="tune", resume=True,
        callbacks=[tune_callback(ctx.progress, ft.steps)],
    )
    records = []
    for r in sorted(results, key=lambda r: TrialSpec.from_dict(r.config).candidate.index):
        cand = TrialSpec.from_dict(r.config).candidate
        work = out / "search" / "trials" / cand.candidate_id
        done = bool(r.last.get("done")) and (work / "pruned.pt").is_file()
        snapshot, floor_snapshot = kept_point(work, "snapshot"), kept_point(work, "floor_snapshot")
        inf = r.last.get("infeasible")
        records.append(CandidateRecord(
            candidate=cand, status="done" if done else ("failed" if r.error else "stopped early"), error=r.error,
            steps=r.last.get("step"),
            snapshot=str((work / "snapshot.pt").relative_to(out)) if snapshot else None,
            snapshot_step=snapshot["step"] if snapshot else None,
            floor_snapshot=str((work / "floor_snapshot.pt").relative_to(out)) if floor_snapshot else None,
            floor_snapshot_step=floor_snapshot["step"] if floor_snapshot else None,
            infeasible=None if inf is None else bool(inf),
            history=tuple(TrialReport.from_dict(h) for h in r.history),
            checkpoint=str((work / "pruned.pt").relative_to(out)) if done else None,
            pruning_record=str((work / "pruning.json").relative_to(out)) if done else None,
        ))
        ctx.progress.stage_advance("search")
    if not any(r.status == "done" or r.snapshot or r.floor_snapshot for r in records):
        errors = "; ".join(f"{r.candidate_id}: {r.error or r.status}" for r in records)
        raise RuntimeError(f"no candidate finished its fine-tuning ({errors})")
    return SearchRecord(candidates=tuple(records), shadow=shadow)


def pid_files(out_dir: Path) -> dict[str, int]:
    """Trial worker pids by candidate id (as written by running trials)."""
    pids = {}
    for p in sorted((out_dir / "search" / "trials").glob("*/pid")):
        try:
            pids[p.parent.name] = int(p.read_text())
        except (OSError, ValueError):
            continue
    return pids


__all__ = ["candidates", "finalized_copy", "pid_files", "report_count", "run", "trial", "trial_specs"]
