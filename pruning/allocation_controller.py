"""Allocation controller: a moving latency target, allocated across layers at every mask update.

The HALP recipe (Shen et al., "Structural Pruning via Latency-Saliency Knapsack", NeurIPS 2022) as
a :class:`~pruning._controller.Controller` the :class:`~pruning.pruner.Pruner` consults:

- **Moving target.** The predicted-latency target shrinks from the dense prediction to the budget
  over ``ramp_fraction`` of the fine-tune steps (exponential, HALP's schedule, or cubic), then holds,
  so the network spends the rest of the fine-tune recovering.
- **Allocation.** At every mask update the pruner hands over each channel group's importance and
  :func:`pruning.allocation.allocate_latency` (or ``allocate_uniform``, the one-global-ratio
  baseline) decides how many aligned channels each keeps; each layer's threshold is the importance
  of its weakest kept group.
- **Latency feedback.** Every ``measure_every`` steps ``measure()`` returns measured (latency ms,
  mAP). A discrete PI in velocity form, ``Δc = kp·(e_t − e_{t−1}) + ki·e_t``, shrinks (or widens)
  the predicted target by ``(1 − c)``. Its error ``e`` is the table's on the model just measured:
  measured latency against that allocation's prediction divided by ``(1 − c)``, so it settles where
  the corrected table is right, and a target held under the mAP floor is not read as table error.
- **Saving scale (a prior for the PI).** ``saving_scale`` is the share of the table's predicted
  saving that the runtime delivers, measured once on a held-out pruned model
  (:func:`saving_scale`): the target handed to the allocator is ``dense - (dense - t) / scale``,
  exact at the dense end, where a constant factor would cut at step one. Why: an in-graph
  calibrated table predicted a uniform-50% model at 1.69 ms that measured 4.48 (dense 7.72: 54% of
  the predicted saving delivered; prune_job benchmark), and the PI, learning that from 50-step
  measurements during the ramp, had closed little of it when the mAP floor took over. Tables that
  are not calibrated in-graph get their slope fitted to whole-graph uniform cuts before any trial
  (:func:`pruning.graph_calibration.fit_saving`): anchored by a constant instead, a table predicted
  1.84 ms for a 4.8 ms model and the PI, clipped at ``max_correction``, never closed the gap.
- **mAP feedback per layer.** Under ``map_floor`` the target holds (a fresh cut dips, fine-tuning
  recovers it) and the layers cut since the previous measurement get their importance scaled up in
  proportion to their cut, so their groups are the first to regrow; ``set_sensitivity`` does the
  same up front from a sensitivity scan. The schedule's clock stops while the target holds, so the
  ramp resumes where it paused: had it run on, the release would cut a whole hold's worth of
  schedule in one update (measured: 0% -> 19% of weights in 5 steps, and mAP 0.51 -> 0.42).
- **Floor with a recovery allowance.** ``floor_allowance`` (mAP) lowers the floor while the ramp
  runs and shrinks to nothing at the last step: a model cut during the ramp has not had the steps
  to recover, and judged at the full floor it held the target at ~1.2x (prune_job benchmark,
  converged checkpoint: the floor bound at 0.3 of the channels; a one-shot 1.65x model sat 4.0
  points under dense after 300 steps and 1.9 after 900).
- **Recovery window.** ``recovery_steps`` after the ramp ends, the floor is not judged at all
  (latency feedback still runs): a one-shot cut starts 10-17 points under dense and takes a few
  hundred steps to come back (RESULTS.md oneshot_recovery_foldse); judged at once, it would
  regrow most of its cut at the first measurement.
- **Step back, then bisect.** With ``step_back > 0`` a measurement under the (allowed) floor
  raises the target ``step_back`` of the way back to the last target that met it, so the weakest
  pruned groups regrow (masks keep their weights); the next target after a recovery is the
  midpoint between the last good and the last bad one, until they are within 1% of the dense
  prediction. ``step_back = 0`` is the plain hold. Why: holding alone kept a model cut 3.4 points
  under its floor there for the rest of the fine-tune, and it shipped 2.8 points under.
- **Recovering on course is held.** A measurement under the floor whose mAP rose since the previous
  one fast enough to reach the floor by the last step (a straight line) holds the target instead
  of stepping back, and a step back regrows at most ``max_cut_per_update`` of the dense prediction.
  Why: the floor rises with the dense shadow and the allowance shrinks to nothing, so a one-shot
  2.1x model recovering 0.5 points per measurement read as failing at step 700 of 800; stepping
  half-way back to dense regrew it to 1.3x and it lost 2.9 points in 50 steps (prune_job_savingfit).
- **The last interval is settled.** At a measurement with no later one before the last step
  (``total_steps - step <= measure_every``), the allocation stands: no cut, no step back, no
  importance rescaling. Why: a change there is never judged, and the model ships after at most one
  interval of recovery at the schedule's lowest learning rates. A late cut took a 0.555 model to
  0.533 in the demo's job (step 100 of 120), and a late regrowth took 0.619 to 0.604 at full size
  (3,200 -> 3,792 channels at step 750 of 800, prune_job_noaug); with the rule, the same path
  shipped 0.617 at 2.24x instead of 0.604 at 1.90x (prune_job_settle_repeat).
- **No regrowth late.** Past ``regrow_until`` of the fine-tune steps a measurement under the floor
  holds the target instead of stepping back. Why: regrown channels come back with the weights they
  had at their cut and have only the schedule's lowest rates to fit back in. Each late step back
  in a full-size run lost: 0.619 -> 0.604 from step 750 of 800 (prune_job_noaug), and 0.628 at
  2.06x -> 0.614 at 1.57x after step backs from step 1350 of 1600 (prune_job_s1600). With the rule
  at 800 steps the job held at 700 and 750 and shipped 2.06x at 2.3 points (prune_job_regrow).
- **Gentle retries.** Once the bisection converges, the schedule may pull the target at most half
  the unresolved gap (to the untried midpoint of the last good and last bad targets) below the last
  good target, and that distance doubles with every measurement that meets the floor (slow start,
  as in TCP's congestion window). Why: a
  retry released straight to the schedule cut a whole ``max_cut_per_update`` at once and lost
  8.6, 11.3 and 10.2 points at its three retries (prune_job_recovery, BN-scale candidate).
- **Capped cuts.** ``max_cut_per_update`` bounds one allocation's predicted saving (share of the
  dense prediction), so a PI correction or a released hold moves over several updates. A one-shot
  candidate (``ramp_fraction = 0``) makes its scheduled cut whole at the end of the warm-up (Li et
  al., "Pruning Filters for Efficient ConvNets", ICLR 2017: prune once, then retrain); the cap
  applies to every move after it. Why one-shot at all: with the gates folded and distillation on,
  one uniform aligned cut at step 0 ended 1.9 mAP points above the gradual latency-aware ramp at
  the same measured latency (2.0x graph, 400 steps; RESULTS.md compare, tp_aligned_distill_fold),
  because the whole fine-tune recovers from one cut.
- **Measured damage.** ``set_damage`` hands the knapsack each unit's sensitivity curve, so it
  compares units by what pruning them costs the model rather than by importance normalised within
  each unit (see :mod:`pruning.allocation`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pruning._controller import CONTROLLERS, Controller
from pruning.allocation import ALLOCATIONS, Allocation, Unit, damage_curve
from pruning.granularity import check_channel_multiple, check_sparsity
from pruning.latency_model import LatencyTable
from pruning.schedules import latency_target

log = logging.getLogger(__name__)


#: Accepted saving scales: a holdout outside this range says the table is wrong, not off by a scale.
SAVING_SCALE_RANGE = (0.5, 1.5)


def saving_scale(dense_ms: float, predicted_ms: float, measured_ms: float) -> float:
    """Measured over predicted saving of one held-out pruned model, ``(dense - measured) / (dense -
    predicted)``, clipped to :data:`SAVING_SCALE_RANGE`; 1.0 when the prediction saves nothing."""
    if not (dense_ms > 0 and predicted_ms > 0 and measured_ms > 0):
        raise ValueError(f"latencies must be > 0 ms; got dense {dense_ms!r}, predicted {predicted_ms!r}, "
                         f"measured {measured_ms!r}")
    saved = dense_ms - predicted_ms
    if saved <= 0.02 * dense_ms:
        return 1.0
    return min(SAVING_SCALE_RANGE[1], max(SAVING_SCALE_RANGE[0], (dense_ms - measured_ms) / saved))


@dataclass(frozen=True)
class AllocationPoint:
    """One allocation (and, at measurement steps, what was measured)."""

    step: int
    target_ms: float  # predicted-latency target handed to the allocator
    predicted_ms: float
    latency_ms: float | None = None
    map: float | None = None
    correction: float | None = None  # the PI's correction after this measurement
    floor: float | None = None  # the floor this measurement was judged against (None: not judged)


@CONTROLLERS.register("allocation")
class AllocationController(Controller):
    """Per-layer kept channels from a latency-saliency knapsack under a scheduled latency target."""

    def __init__(
        self,
        table: LatencyTable,
        latency_budget_ms: float,
        *,
        total_steps: int,
        allocation: str = "latency",
        ramp_fraction: float = 0.5,
        schedule: str = "exponential",
        measure: Callable[[], tuple[float, float]] | None = None,
        measure_every: int = 100,
        map_floor: float | None = None,
        kp: float = 0.1,
        ki: float = 0.5,
        deadband: float = 0.02,
        max_correction: float = 0.5,
        max_unit_sparsity: float = 0.9,
        dip_gain: float = 0.5,
        saving_scale: float = 1.0,
        warmup_steps: int = 0,
        floor_allowance: float = 0.0,
        step_back: float = 0.0,
        max_cut_per_update: float | None = None,
        recovery_steps: int = 0,
        regrow_until: float = 1.0,
    ) -> None:
        super().__init__()
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {sorted(ALLOCATIONS)}; got {allocation!r}")
        if not latency_budget_ms > 0:
            raise ValueError(f"latency_budget_ms must be > 0; got {latency_budget_ms!r}")
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an int >= 1 (the fine-tune length); got {total_steps!r}")
        if not 0.0 <= ramp_fraction <= 1.0:
            raise ValueError(f"ramp_fraction must be in [0, 1] (0 = one-shot); got {ramp_fraction!r}")
        if measure_every < 1:
            raise ValueError(f"measure_every must be >= 1; got {measure_every}")
        check_sparsity(max_unit_sparsity, "max_unit_sparsity")
        if not SAVING_SCALE_RANGE[0] <= saving_scale <= SAVING_SCALE_RANGE[1]:
            raise ValueError(f"saving_scale must be in {list(SAVING_SCALE_RANGE)} (measured saving over predicted); "
                             f"got {saving_scale!r}")
        if not isinstance(warmup_steps, int) or not 0 <= warmup_steps < total_steps:
            raise ValueError(f"warmup_steps must be an int in [0, total_steps); got {warmup_steps!r}")
        if not 0.0 <= floor_allowance <= 1.0:
            raise ValueError(f"floor_allowance is mAP in [0, 1] (0.02 = 2 points); got {floor_allowance!r}")
        if not 0.0 <= step_back <= 1.0:
            raise ValueError(f"step_back must be in [0, 1] (0 = hold under the floor); got {step_back!r}")
        if max_cut_per_update is not None and not 0.0 < max_cut_per_update <= 1.0:
            raise ValueError(f"max_cut_per_update is a share of the dense prediction in (0, 1] or None; "
                             f"got {max_cut_per_update!r}")
        if not isinstance(recovery_steps, int) or recovery_steps < 0:
            raise ValueError(f"recovery_steps must be an int >= 0 (steps after the ramp before the floor is judged); "
                             f"got {recovery_steps!r}")
        if not 0.0 <= regrow_until <= 1.0:
            raise ValueError(f"regrow_until is a share of the fine-tune steps in [0, 1] (1 = step back until the "
                             f"last interval); got {regrow_until!r}")
        latency_target(0, dense_ms=1.0, budget_ms=1.0, end_step=1, kind=schedule)  # validates the name now
        self.table, self.budget, self.allocation_kind = table, float(latency_budget_ms), allocation
        self.total_steps, self.ramp_fraction, self.schedule = total_steps, float(ramp_fraction), schedule
        self.measure, self.measure_every, self.map_floor = measure, measure_every, map_floor
        self.kp, self.ki, self.deadband, self.max_correction = kp, ki, deadband, max_correction
        self.max_unit_sparsity, self.dip_gain = max_unit_sparsity, dip_gain
        self.saving_scale = float(saving_scale)
        self.warmup_steps, self.floor_allowance, self.step_back = warmup_steps, float(floor_allowance), float(step_back)
        self.max_cut_per_update = max_cut_per_update
        self.recovery_steps = recovery_steps
        self.regrow_until = float(regrow_until)
        self.one_shot_done = False  # ramp_fraction 0: the scheduled cut has been made (the cap applies from then)
        self.dense_ms = float(table.predict({}))
        self.channel_multiple = 1
        self.unit_specs: tuple[Unit, ...] = ()
        self.weights: dict[str, float] = {}
        self.damage: dict[str, list[tuple[float, float]]] = {}
        self.correction = 0.0
        self.prev_error: float | None = None
        self.prev_map: float | None = None  # the previous measurement's mAP (judged or not)
        self.under_floor = False
        self.held_steps = 0  # steps the schedule's clock stood still under the mAP floor
        # step back / bisect (step_back > 0): the loosest target known to fail the floor is `bad_ms`,
        # the last one that met it `good_ms`; `hold_ms` is the target floor while either applies
        self.good_ms: float | None = None
        self.bad_ms: float | None = None
        self.hold_ms: float | None = None
        self.retry_ms: float | None = None  # after a converged bisection: how far below good_ms a retry may cut
        self.kept: dict[str, int] = {}
        self.kept_at_measure: dict[str, int] = {}
        self.last: Allocation | None = None
        self.points: list[AllocationPoint] = []

    # ------------------------------------------------------------------ binding
    def bind_groups(self, units: Sequence[Unit], channel_multiple: int) -> None:
        """Called by the pruner (channel granularity): the coupled groups and the channel multiple."""
        self.unit_specs = tuple(units)
        self.channel_multiple = check_channel_multiple(channel_multiple)
        self.kept = {u.name: u.size for u in units}
        self.kept_at_measure = dict(self.kept)
        for u in units:
            self.weights.setdefault(u.name, 1.0)

    def set_sensitivity(self, drops: Mapping[str, float], strength: float = 1.0) -> None:
        """Scale each unit's importance by ``1 + strength · drop / max(drop)`` (a sensitivity scan's mAP drops)."""
        top = max((float(d) for d in drops.values()), default=0.0)
        if top <= 0:
            return
        for unit, drop in drops.items():
            if unit in self.weights and drop > 0:
                self.weights[unit] *= 1.0 + strength * float(drop) / top

    def set_damage(self, curves: Mapping[str, Sequence[tuple[float, float]]]) -> None:
        """Per unit, ``[(sparsity, metric drop), ...]`` with only that unit pruned (a sensitivity scan)."""
        for unit, curve in curves.items():
            damage_curve(curve, f"damage[{unit!r}]")  # validates now, not at the first allocation
        self.damage = {u: [(float(s), float(d)) for s, d in c] for u, c in curves.items()}

    # ------------------------------------------------------------------ loop
    def ramp_end(self) -> int:
        """Schedule steps from the first cut to the budget."""
        return int(round(self.ramp_fraction * self.total_steps))

    def allowance(self, step: int | None = None) -> float:
        """mAP the model may sit under the floor at ``step``: all of ``floor_allowance`` until the
        ramp and the recovery window end, then shrinking linearly to 0 at the last step."""
        step = self.last_step if step is None else step
        end = self.judged_from()
        if step <= end:
            return self.floor_allowance
        return self.floor_allowance * max(0.0, self.total_steps - step) / max(1, self.total_steps - end)

    def judged_from(self) -> int:
        """The step the recovery window ends: after the warm-up, the ramp, the steps held and
        ``recovery_steps``."""
        return self.warmup_steps + self.ramp_end() + self.held_steps + self.recovery_steps

    def in_recovery(self, step: int | None = None) -> bool:
        """Whether ``step`` falls in the recovery window after the ramp (the floor is not judged there)."""
        step = self.last_step if step is None else step
        return self.judged_from() - self.recovery_steps <= step < self.judged_from()

    def schedule_clock(self) -> int:
        """The step the schedule is at: training steps less those held under the mAP floor."""
        return self.last_step - self.held_steps

    def scheduled_ms(self, step: int | None = None) -> float:
        """The target before feedback at schedule step ``step`` (default: :meth:`schedule_clock`):
        dense prediction shrinking to the budget, then held."""
        step = self.schedule_clock() if step is None else step
        if step < self.warmup_steps:  # the warm-up keeps the dense target: a fresh optimizer's dip is not damage
            return self.dense_ms
        step -= self.warmup_steps
        return latency_target(step, dense_ms=self.dense_ms, budget_ms=self.budget, end_step=self.ramp_end(),
                              kind=self.schedule)

    def to_table_ms(self, measured_ms: float) -> float:
        """A latency to aim at on the runtime -> the table's prediction for it (the saving scaled)."""
        return self.dense_ms - (self.dense_ms - measured_ms) / self.saving_scale

    def to_measured_ms(self, predicted_ms: float) -> float:
        """The table's prediction -> the latency expected on the runtime (inverse of :meth:`to_table_ms`)."""
        return self.dense_ms - (self.dense_ms - predicted_ms) * self.saving_scale

    def target_ms(self) -> float:
        """The predicted-latency target the next allocation must meet."""
        t = self.to_table_ms(self.scheduled_ms() * (1.0 - self.correction))
        if self.step_back == 0.0:
            if self.under_floor and self.last is not None:
                t = max(t, self.last.target_ms)  # hold while the model recovers from a dip
        elif self.hold_ms is not None:
            t = max(t, self.hold_ms)
        elif self.retry_ms is not None and self.good_ms is not None:
            t = max(t, self.good_ms - self.retry_ms)
        if self.max_cut_per_update is not None and not self._one_shot_pending():
            prev = self.last.predicted_ms if self.last is not None else self.dense_ms
            t = max(t, prev - self.max_cut_per_update * self.dense_ms)
        return t

    def settled(self, step: int | None = None) -> bool:
        """Whether ``step`` lies in the last measurement interval after a cut: no measurement is left
        to judge a change made there, so the allocation stands (see the module docstring)."""
        step = self.last_step if step is None else step
        return (self.measure is not None and self.last is not None and not self._one_shot_pending()
                and self.total_steps - step <= self.measure_every)

    def late(self, step: int | None = None) -> bool:
        """Whether ``step`` lies past ``regrow_until`` of the fine-tune: under the floor there the target
        holds instead of stepping back (see the module docstring)."""
        step = self.last_step if step is None else step
        return self.regrow_until < 1.0 and step >= self.regrow_until * self.total_steps

    def _one_shot_pending(self) -> bool:
        """A one-shot candidate whose warm-up has ended and whose cut has not been made yet."""
        return self.ramp_fraction == 0.0 and not self.one_shot_done and self.schedule_clock() >= self.warmup_steps

    def _step_back(self, met: bool) -> None:
        """Update the bisection between the last target that met the floor and the last that did not."""
        tried = self.last.target_ms if self.last is not None else self.dense_ms
        if met:
            self.good_ms = tried
            if self.bad_ms is None:
                self.hold_ms = None  # nothing failed yet: follow the schedule
                if self.retry_ms is not None:
                    self.retry_ms *= 2.0  # a retry that met the floor may go twice as far next time
                return
            mid = 0.5 * (self.good_ms + self.bad_ms)
            if self.good_ms - mid < 0.01 * self.dense_ms:  # converged: forget the failure, retry gently
                self.retry_ms = max(self.good_ms - mid, 0.005 * self.dense_ms)  # first retry: the untried midpoint
                self.bad_ms, self.hold_ms = None, None
            else:
                self.hold_ms = mid
            return
        if self.good_ms is None or tried >= self.good_ms:
            self.good_ms = self.dense_ms  # the last good target failed too (the floor moved): back towards dense
        self.bad_ms = tried
        self.hold_ms = tried + self.step_back * (self.good_ms - tried)
        if self.max_cut_per_update is not None:
            # a regrowth is capped as a cut is: half-way back to dense at step 700 of 800 regrew a 2.1x
            # model to 1.3x and lost 2.9 points in 50 steps (prune_job_savingfit)
            self.hold_ms = min(self.hold_ms, tried + self.max_cut_per_update * self.dense_ms)

    def recovering(self, map_value: float, floor: float) -> bool:
        """Under ``floor`` but rising since the previous measurement fast enough to reach it by the last
        step (a straight line through the two). Such a model is held (no cut, no regrowth): the floor
        rises with the dense shadow and the allowance shrinks, so a model recovering on course reads
        as failing, and regrowing it late undoes the recovery."""
        if self.prev_map is None:
            return False
        rate = map_value - self.prev_map  # per measurement
        left = max(0, self.total_steps - self.last_step) / self.measure_every
        return rate > 0 and rate * left >= floor - map_value

    def step(self) -> None:
        super().step()
        if self.under_floor:
            self.held_steps += 1
        if self.measure is not None and self.last_step % self.measure_every == 0:
            self._on_measurement(*self.measure())

    def _on_measurement(self, latency_ms: float, map_value: float) -> None:
        # The table's error on the model just measured: its latency against what the correction
        # expected of it (its allocation's prediction with the correction undone). Measured against
        # the schedule instead, a target held under the mAP floor read as table error: the integral
        # wound up to its clip and the next allocation cut to half the budget (measured in the
        # prune_job benchmark: predicted 8.4 -> 3.4 ms for a 6.9 ms budget).
        predicted = self.last.predicted_ms if self.last is not None else self.dense_ms
        aimed = self.to_measured_ms(predicted) / (1.0 - self.correction)
        error = (float(latency_ms) - aimed) / aimed
        if abs(error) > self.deadband:
            prev = error if self.prev_error is None else self.prev_error
            c = self.correction + self.kp * (error - prev) + self.ki * error
            self.correction = max(-self.max_correction, min(self.max_correction, c))  # clip = anti-windup
        self.prev_error = error
        # inside the recovery window the floor is not judged: a model cut moments ago has had no
        # steps to recover (a one-shot 1.35x cut with the gates folded: 16.6 points under dense at
        # step 0, 1.8 after 250 steps; RESULTS.md oneshot_recovery_foldse)
        judged = self.map_floor is not None and not self.in_recovery()
        floor = self.map_floor - self.allowance() if judged else None
        settled = self.settled()  # the last interval: nothing changes, the measurement is still recorded
        under = floor is not None and map_value < floor
        late = self.late()
        held = under and (settled or late or self.recovering(map_value, floor))
        self.prev_map = float(map_value)
        if held:
            why = ("last interval: a change now would never be judged" if settled else
                   f"past regrow_until={self.regrow_until:g} of the steps: a regrowth now has too few steps to pay"
                   if late else "recovering on course")
            log.info("mAP %.4f under floor %.4f: target held (%s)", map_value, floor, why)
            if self.step_back > 0.0 and not settled:
                self.hold_ms = self.last.target_ms if self.last is not None else self.dense_ms
        elif floor is not None and self.step_back > 0.0 and not settled:
            self._step_back(map_value >= floor)
        self.under_floor = under
        if under and not settled:
            cuts = {u: 1.0 - self.kept[u] / self.kept_at_measure[u] for u in self.kept if self.kept_at_measure[u]}
            top = max(cuts.values(), default=0.0)
            if top > 0:
                for u, cut in cuts.items():
                    if cut > 0:
                        self.weights[u] *= 1.0 + self.dip_gain * cut / top
                log.info("mAP %.4f under floor %.4f (allowance %.4f): importance of %d recently cut layers "
                         "scaled up", map_value, self.map_floor, self.allowance(), sum(1 for c in cuts.values() if c > 0))
        self.kept_at_measure = dict(self.kept)
        self.points.append(AllocationPoint(self.last_step, self.last.target_ms if settled else self.target_ms(),
                                           self.last.predicted_ms if self.last else self.dense_ms,
                                           float(latency_ms), float(map_value), self.correction, floor))

    def allocate(self, scores: Mapping[str, torch.Tensor]) -> Allocation:
        """Kept channels per unit for the current target, from the pruner's per-unit importance."""
        if not self.unit_specs:
            raise ValueError("AllocationController is not bound to channel groups: pass it to a Pruner with "
                             "granularity='channel'")
        fn = ALLOCATIONS[self.allocation_kind]
        kw: dict[str, Any] = {"channel_multiple": self.channel_multiple, "max_unit_sparsity": self.max_unit_sparsity}
        if self.allocation_kind == "latency":
            kw["weights"] = self.weights
            if self.damage:
                kw["damage"] = self.damage
        if self.settled():
            self.points.append(AllocationPoint(self.last_step, self.last.target_ms, self.last.predicted_ms))
            return self.last
        pending = self._one_shot_pending()
        self.last = fn(self.unit_specs, scores, self.table, self.target_ms(), **kw)
        self.one_shot_done = self.one_shot_done or pending
        self.kept = dict(self.last.kept)
        self.points.append(AllocationPoint(self.last_step, self.last.target_ms, self.last.predicted_ms))
        if len(self.points) > 10_000:
            del self.points[: len(self.points) - 10_000]
        return self.last

    # ------------------------------------------------------------------ outputs
    def target(self, unit: str) -> float:
        spec = next((u for u in self.unit_specs if u.name == unit), None)
        if spec is None or unit not in self.kept:
            return 0.0
        return 1.0 - self.kept[unit] / spec.size

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "correction": self.correction, "prev_error": self.prev_error, "under_floor": self.under_floor,
            "prev_map": self.prev_map,
            "held_steps": self.held_steps, "saving_scale": self.saving_scale, "one_shot_done": self.one_shot_done,
            "good_ms": self.good_ms, "bad_ms": self.bad_ms, "hold_ms": self.hold_ms, "retry_ms": self.retry_ms,
            "weights": dict(self.weights), "damage": {u: list(c) for u, c in self.damage.items()},
            "kept": dict(self.kept), "kept_at_measure": dict(self.kept_at_measure),
            "last": None if self.last is None else asdict(self.last),
            "points": [asdict(p) for p in self.points],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.correction, self.prev_error = float(state["correction"]), state["prev_error"]
        self.under_floor = bool(state["under_floor"])
        self.prev_map = None if state.get("prev_map") is None else float(state["prev_map"])
        self.held_steps = int(state.get("held_steps", 0))
        self.one_shot_done = bool(state.get("one_shot_done", False))
        self.good_ms, self.bad_ms, self.hold_ms = (None if state.get(k) is None else float(state[k])
                                                   for k in ("good_ms", "bad_ms", "hold_ms"))
        self.retry_ms = None if state.get("retry_ms") is None else float(state["retry_ms"])
        self.saving_scale = float(state.get("saving_scale", self.saving_scale))
        self.weights = {k: float(v) for k, v in state["weights"].items()}
        self.damage = {k: [(float(s), float(d)) for s, d in c] for k, c in state.get("damage", {}).items()}
        self.kept = {k: int(v) for k, v in state["kept"].items()}
        self.kept_at_measure = {k: int(v) for k, v in state["kept_at_measure"].items()}
        last = state.get("last")
        self.last = None if last is None else Allocation(**{**last, "order": tuple(last.get("order", ()))})
        self.points = [AllocationPoint(**p) for p in state["points"]]
