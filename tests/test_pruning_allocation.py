"""Aligned channel groups and latency-aware allocation (HALP) on toy models with a deterministic latency table."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pruning import LatencyTable, Pruner, build_controller
from pruning.alignment import choose_channel_multiple
from pruning.allocation import Unit, allocate_latency, allocate_uniform
from pruning.allocation_controller import AllocationController
from pruning.granularity import aligned_levels, kept_channels
from pruning.latency_model import LayerSpec
from pruning.schedules import latency_target
from tests.conftest import X, flops_ms, small_net


class TwoBranch(nn.Module):
    """Two independent branches of equal width; branch b's first conv is 5x5, a's 3x3 (25 vs 9 MACs per channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.b = nn.Conv2d(3, 32, 5, padding=2)
        self.ha, self.hb = nn.Conv2d(32, 8, 1), nn.Conv2d(32, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ha(torch.relu(self.a(x))) + self.hb(torch.relu(self.b(x)))


def _two_branch() -> tuple[nn.Module, LatencyTable, list[Unit]]:
    model = TwoBranch()
    table = LatencyTable.measure(model, torch.zeros(1, 3, 16, 16), flops_ms, runtime="synthetic", device="test",
                                 fractions=(0.25, 0.5, 0.75, 1.0), multiple=8)
    return model, table, [Unit("a", 32, ("a",)), Unit("b", 32, ("b",))]


def _controller(table: LatencyTable, budget: float, **kw) -> AllocationController:
    return AllocationController(table, budget, total_steps=kw.pop("total_steps", 10), ramp_fraction=kw.pop("ramp", 0.0),
                                **kw)


def test_aligned_levels_and_bad_multiple() -> None:
    assert aligned_levels(72, 16) == [72, 64, 48, 32, 16]
    assert aligned_levels(64, 16) == [64, 48, 32, 16]
    assert aligned_levels(16, 16) == [16]  # too narrow to lose a group: never pruned
    for bad in (0, -8, 2.5, True):
        with pytest.raises(ValueError, match="channel_multiple must be an int >= 1"):
            Pruner(small_net(), example_inputs=X, controller=build_controller("fixed", sparsity=0.5),
                   channel_multiple=bad)
    with pytest.raises(ValueError, match="disagree"):
        Pruner(small_net(), example_inputs=X, controller=build_controller("fixed"), channel_multiple=8, round_to=16)
    assert Pruner(small_net(), example_inputs=X, controller=build_controller("fixed"), round_to=16).channel_multiple == 16


def test_allocation_meets_target_with_multiples_and_per_layer_thresholds() -> None:
    model = small_net()
    table = LatencyTable.measure(model, X, flops_ms, runtime="synthetic", device="test", multiple=8)
    dense = table.predict({})
    ctrl = _controller(table, 0.45 * dense, max_unit_sparsity=0.5)
    pruner = Pruner(model, example_inputs=X, controller=ctrl, channel_multiple=8)
    rec = pruner.update()
    config = pruner.channel_config()
    assert table.predict(config) <= 0.45 * dense + 1e-9
    assert ctrl.last is not None and ctrl.last.feasible
    sizes = {g.root: g.size for g in pruner.groups}
    for root, kept in ctrl.last.kept.items():
        assert kept == sizes[root] or kept % 8 == 0, (root, kept)
    pruned = {u: r for u, r in rec.layers.items() if r.sparsity > 0}
    assert len(pruned) >= 2
    ratios = {round(r.sparsity, 3) for r in pruned.values()}
    assert len(ratios) >= 2  # layers pruned at different ratios: not one global level
    thresholds = {round(r.threshold, 4) for r in pruned.values()}
    assert len(thresholds) >= 2 and all(t > 0 for t in thresholds)
    small = pruner.finalize()
    plain = {n: m.out_channels for n, m in small.named_modules() if isinstance(m, nn.Conv2d)}
    for root, kept in ctrl.last.kept.items():
        if kept < sizes[root]:
            assert plain[root] == kept and plain[root] % 8 == 0


def test_latency_allocation_cuts_the_layer_with_more_latency_per_importance() -> None:
    _, table, units = _two_branch()
    scores = {"a": torch.ones(32), "b": torch.ones(32)}
    target = 0.85 * table.predict({})
    alloc = allocate_latency(units, scores, table, target, channel_multiple=8)
    assert alloc.feasible and alloc.predicted_ms <= target
    assert alloc.kept["b"] < alloc.kept["a"]  # b's 5x5 groups save more ms for the same importance
    # Importance scaled up on b (mAP feedback): its groups are now the last to go.
    weighted = allocate_latency(units, scores, table, target, channel_multiple=8, weights={"b": 50.0})
    assert weighted.feasible and weighted.kept["b"] > alloc.kept["b"] and weighted.kept["a"] < alloc.kept["a"]


def test_damage_curves_decide_between_units_and_importance_ranks_within() -> None:
    _, table, units = _two_branch()
    scores = {"a": torch.ones(32), "b": torch.ones(32)}
    target = 0.85 * table.predict({})
    by_importance = allocate_latency(units, scores, table, target, channel_multiple=8)
    assert by_importance.kept["b"] < by_importance.kept["a"]
    # b (the cheaper cut per ms under normalised importance) measured far more harmful to prune: a goes instead
    damage = {"a": [(0.25, 0.01), (0.5, 0.02), (0.75, 0.05)], "b": [(0.25, 1.0), (0.5, 3.0), (0.75, 9.0)]}
    by_damage = allocate_latency(units, scores, table, target, channel_multiple=8, damage=damage)
    assert by_damage.feasible and by_damage.predicted_ms <= target
    assert by_damage.kept["b"] == 32 and by_damage.kept["a"] < 32
    # a unit without a curve takes the median of the measured ones (here: one of them), not "free"
    only_b = allocate_latency(units, scores, table, target, channel_multiple=8, damage={"b": damage["b"]})
    assert only_b.feasible and only_b.kept == by_importance.kept
    # flat (all-zero) curves leave the importance tie-break: the weakest channels of a unit go first
    ranked = {"a": torch.arange(32.0) + 1, "b": torch.arange(32.0) + 1}
    flat = allocate_latency(units, ranked, table, target, channel_multiple=8,
                            damage={"a": [(0.5, 0.0)], "b": [(0.5, 0.0)]})
    assert flat.feasible and flat.kept["b"] < 32


def test_damage_curve_is_monotone_and_extends_past_the_last_point() -> None:
    from pruning.allocation import damage_curve

    f = damage_curve([(0.25, 0.2), (0.5, 0.1), (0.75, 0.6)])  # 0.1 at 0.5 is noise: held at 0.2
    assert f(0.0) == 0.0 and f(0.125) == pytest.approx(0.1)
    assert f(0.5) == pytest.approx(0.2) and f(0.75) == pytest.approx(0.6)
    assert f(0.9) == pytest.approx(0.6 + 0.6 / 0.75 * 0.15)  # slope origin -> last point: the floor is never free
    assert damage_curve([(0.5, -0.3)])(0.5) == 0.0  # a negative drop (the metric improved) costs nothing
    for bad, match in (([], "empty"), ([(1.0, 0.1)], r"\[0, 1\)")):
        with pytest.raises(ValueError, match=match):
            damage_curve(bad)
    ctrl = _controller(_two_branch()[1], 1.0)
    with pytest.raises(ValueError, match=r"damage\['a'\]"):
        ctrl.set_damage({"a": [(1.5, 0.1)]})


def test_uniform_allocation_is_one_global_ratio() -> None:
    model = small_net()
    table = LatencyTable.measure(model, X, flops_ms, runtime="synthetic", device="test", multiple=8)
    pruner = Pruner(copy.deepcopy(model), example_inputs=X, controller=build_controller("fixed"), channel_multiple=8)
    units = [Unit(g.root, g.size, g.out_layers) for g in pruner.groups]
    scores = {u.name: torch.rand(u.size, generator=torch.Generator().manual_seed(1)) for u in units}
    target = 0.6 * table.predict({})
    alloc = allocate_uniform(units, scores, table, target, channel_multiple=8)
    assert alloc.feasible
    ratio = next(r / 200 for r in range(181) if all(
        alloc.kept[u.name] == kept_channels(u.size, r / 200, 8) for u in units))
    assert ratio > 0
    # and it is the smallest such ratio: one step less misses the target
    prev = {u.name: kept_channels(u.size, ratio - 0.005, 8) for u in units}
    assert prev == alloc.kept or table.predict({lay: prev[u.name] for u in units for lay in u.out_layers}) > target


def test_mask_regrows_when_a_layers_importance_is_scaled_up() -> None:
    model = small_net()
    table = LatencyTable.measure(model, X, flops_ms, runtime="synthetic", device="test", multiple=8)
    ctrl = _controller(table, 0.5 * table.predict({}))
    pruner = Pruner(model, example_inputs=X, controller=ctrl, channel_multiple=8)
    pruner.update()
    first = dict(ctrl.last.kept)
    sizes = {g.root: g.size for g in pruner.groups}
    cut = max((u for u in first if first[u] < sizes[u]), key=lambda u: sizes[u] - first[u])
    before = int(pruner.mask_of(cut).flatten(1).amax(1).sum())
    ctrl.set_sensitivity({cut: 1.0}, strength=100.0)
    pruner.update()
    assert ctrl.last.kept[cut] > first[cut]
    assert int(pruner.mask_of(cut).flatten(1).amax(1).sum()) > before  # masked filters came back


def test_map_dip_scales_up_recently_cut_layers_and_holds_target() -> None:
    model = small_net()
    table = LatencyTable.measure(model, X, flops_ms, runtime="synthetic", device="test", multiple=8)
    readings = iter([(1.0, 0.1)])
    ctrl = _controller(table, 0.5 * table.predict({}), measure=lambda: next(readings), measure_every=2,
                       map_floor=0.5, ki=0.0, kp=0.0)
    pruner = Pruner(model, example_inputs=X, controller=ctrl, channel_multiple=8)
    pruner.step()  # step 1: allocation cuts some layers
    cut = {u for u, k in ctrl.kept.items() if k < ctrl.kept_at_measure[u]}
    assert cut
    pruner.step()  # step 2: measurement under the floor
    assert ctrl.under_floor
    assert all(ctrl.weights[u] > 1.0 for u in cut)
    assert all(ctrl.weights[u] == 1.0 for u in ctrl.weights if u not in cut)


def test_target_schedule_shrinks_then_holds_and_pi_corrects_from_measurement() -> None:
    for kind in ("exponential", "cubic"):
        ts = [latency_target(s, dense_ms=10.0, budget_ms=5.0, end_step=50, kind=kind) for s in range(0, 101, 10)]
        assert ts[0] == 10.0 and all(a >= b for a, b in zip(ts, ts[1:], strict=False)) and ts[5:] == [5.0] * 6
    with pytest.raises(ValueError, match="latency schedule"):
        latency_target(1, dense_ms=10.0, budget_ms=5.0, end_step=5, kind="linear")
    _, table, _ = _two_branch()
    dense = table.predict({})
    ctrl = AllocationController(table, 0.5 * dense, total_steps=100, ramp_fraction=0.5, measure_every=60)
    ctrl.bind_groups([Unit("a", 32, ("a",)), Unit("b", 32, ("b",))], 8)
    for _ in range(25):
        ctrl.step()
    assert 0.5 * dense < ctrl.target_ms() < dense  # mid-ramp


def _measured_pruner(table_error: float, map_value: float, **kw) -> tuple[Pruner, AllocationController]:
    """A pruner whose 'measured' latency is its allocation's prediction (dense before the first) times ``table_error``."""
    model = small_net()
    table = LatencyTable.measure(model, X, flops_ms, runtime="synthetic", device="test", multiple=8)
    box: list[AllocationController] = []
    ctrl = _controller(table, 0.5 * table.predict({}), total_steps=kw.pop("total_steps", 40), ramp=0.5, measure_every=5,
                       measure=lambda: (table_error * (box[0].last.predicted_ms if box[0].last else box[0].dense_ms), map_value),
                       **kw)
    box.append(ctrl)
    return Pruner(model, example_inputs=X, controller=ctrl, channel_multiple=8, update_every=5), ctrl


def test_pi_corrects_the_tables_error_on_the_measured_model() -> None:
    pruner, ctrl = _measured_pruner(1.25, 0.9)  # the table under-predicts by 20%
    for _ in range(40):
        pruner.step()
    assert ctrl.correction == pytest.approx(0.2, abs=0.03)  # it settles where (1 - c) * 1.25 = 1
    measured = [pt for pt in ctrl.points if pt.latency_ms is not None]
    assert measured[-1].correction == ctrl.correction and measured[-1].floor is None  # recorded per measurement
    assert ctrl.target_ms() == pytest.approx((1 - ctrl.correction) * ctrl.budget)


def test_a_target_held_under_the_floor_is_not_read_as_table_error() -> None:
    # mAP under the floor at every measurement: the target holds while the schedule shrinks, so the
    # measured latency stays above the schedule. The table is exact: nothing to correct.
    pruner, ctrl = _measured_pruner(1.0, 0.1, map_floor=0.5)
    for _ in range(40):
        pruner.step()
    assert ctrl.under_floor and ctrl.last.predicted_ms > 1.05 * ctrl.budget
    assert ctrl.correction == 0.0 and ctrl.target_ms() >= ctrl.last.target_ms


def test_a_hold_under_the_floor_pauses_the_schedule_instead_of_skipping_it() -> None:
    # mAP under the floor at the measurements of steps 5 and 10, recovered at 15: the schedule
    # stood still for 10 steps, so the allocation after the release aims where the hold began,
    # not where the schedule would be at step 15 (a whole hold's cut in one update).
    maps = iter([0.1, 0.1] + [0.9] * 10)
    model = small_net()
    table = LatencyTable.measure(model, X, flops_ms, runtime="synthetic", device="test", multiple=8)
    ctrl = _controller(table, 0.5 * table.predict({}), total_steps=40, ramp=0.5, measure_every=5,
                       measure=lambda: (ctrl.last.predicted_ms if ctrl.last else ctrl.dense_ms, next(maps)),
                       map_floor=0.5)
    pruner = Pruner(model, example_inputs=X, controller=ctrl, channel_multiple=8, update_every=5)
    for _ in range(40):
        pruner.step()
    aimed = {p.step: p.target_ms for p in ctrl.points if p.latency_ms is None}
    assert ctrl.held_steps == 10 and ctrl.schedule_clock() == 30
    assert aimed[15] == pytest.approx(ctrl.scheduled_ms(5))
    assert aimed[15] > 1.05 * ctrl.scheduled_ms(15)
    assert aimed[25] > 1.02 * ctrl.budget  # the ramp ends 10 steps late ...
    assert aimed[30] == pytest.approx(ctrl.budget)  # ... and reaches the budget then
    # the hold survives a resume
    again = _controller(table, 0.5 * table.predict({}), total_steps=40, ramp=0.5, measure_every=5, map_floor=0.5)
    again.load_state_dict(ctrl.state_dict())
    assert again.held_steps == 10


def test_resume_round_trip_gives_identical_masks_and_allocations() -> None:
    model = small_net()
    table = LatencyTable.measure(model, X, flops_ms, runtime="synthetic", device="test", multiple=8)

    def make(m: nn.Module) -> Pruner:
        ctrl = AllocationController(table, 0.5 * table.predict({}), total_steps=20, ramp_fraction=0.5)
        return Pruner(m, example_inputs=X, controller=ctrl, channel_multiple=8, update_every=2)

    a = make(copy.deepcopy(model))
    for _ in range(6):
        a.step()
    a.controller.set_sensitivity({a.units[0]: 1.0})
    state = copy.deepcopy(a.state_dict())
    b = make(copy.deepcopy(model))
    b.load_state_dict(state)
    assert b.controller.weights == a.controller.weights and b.controller.kept == a.controller.kept
    for _ in range(8):
        a.step()
        b.step()
    assert a.controller.last == b.controller.last
    for key, wm in a.masks.items():
        assert torch.equal(wm.mask, b.masks[key].mask), key


def test_auto_channel_multiple_picks_the_fastest_with_a_reason() -> None:
    def blocked_ms(module: nn.Module, shape: tuple[int, ...]) -> float:
        """A runtime with 16-channel blocks: counts are padded up to the block."""
        pad = lambda c: -(-c // 16) * 16  # noqa: E731
        return 1e-6 * pad(module.in_channels) * pad(module.out_channels) * shape[-1] * shape[-2]

    spec = LayerSpec(type="conv", in_channels=96, out_channels=192, kernel=(1, 1), stride=(1, 1), padding=(0, 0),
                     groups=1, input_hw=(8, 8), batch=1)
    choice = choose_channel_multiple(blocked_ms, [spec])
    assert choice.multiple == 16
    assert dict(choice.measured)[1] > dict(choice.measured)[16] and "lowest time per MAC" in choice.reason
    with pytest.raises(ValueError, match="at least one layer"):
        choose_channel_multiple(blocked_ms, [])


def test_smoothing_removes_a_timing_outlier_the_knapsack_would_chase() -> None:
    _, table, units = _two_branch()
    spec = table.layers["a"]
    full = spec.key(spec.grid_in[-1], spec.grid_out[-1])
    clean = table.entries[full]
    table.entries[full] = 20 * clean  # one grid point timed behind another job
    scores = {"a": torch.ones(32), "b": torch.ones(32)}
    noisy = allocate_latency(units, scores, table, 0.9 * table.predict({}), channel_multiple=8)
    assert table.smooth() == len(table.layers)
    assert table.entries[full] < 5 * clean  # the outlier is pulled back toward the layer's trend
    smoothed = allocate_latency(units, scores, table, 0.9 * table.predict({}), channel_multiple=8)
    assert noisy.kept["a"] < noisy.kept["b"]  # the outlier made a's groups look expensive
    assert smoothed.kept["b"] <= smoothed.kept["a"]  # after smoothing, b (5x5) is cut first again


def test_saving_scale_from_a_holdout_aims_the_first_allocation_at_the_budget() -> None:
    from pruning.allocation_controller import saving_scale

    assert saving_scale(10.0, 6.0, 7.0) == pytest.approx(0.75)  # 3 ms saved of 4 predicted
    assert saving_scale(10.0, 9.9, 12.0) == 1.0  # a prediction that saves nothing tells nothing
    assert saving_scale(10.0, 6.0, 9.9) == 0.5  # clipped: the table is wrong, not off by a scale
    with pytest.raises(ValueError, match="> 0 ms"):
        saving_scale(10.0, 0.0, 5.0)

    # a runtime that delivers 75% of every predicted saving
    def runs(ctrl: AllocationController) -> float:
        return ctrl.dense_ms - 0.75 * (ctrl.dense_ms - (ctrl.last.predicted_ms if ctrl.last else ctrl.dense_ms))

    ends = {}
    for scale in (1.0, 0.75):
        model = small_net()
        table = LatencyTable.measure(model, X, flops_ms, runtime="synthetic", device="test", multiple=1)
        box: list[AllocationController] = []
        # 30 steps, run for 20: the allocations at 10 and 15 are outside the last interval, which stands
        ctrl = _controller(table, 0.7 * table.predict({}), total_steps=30, ramp=1 / 3, measure_every=10,
                           measure=lambda b=box: (runs(b[0]), 0.9), saving_scale=scale)
        box.append(ctrl)
        pruner = Pruner(model, example_inputs=X, controller=ctrl, channel_multiple=1, update_every=5)
        for _ in range(20):
            pruner.step()
        # the allocation at the ramp's end (step 10), measured at step 20, over the budget
        measured = next(pt.latency_ms for pt in ctrl.points if pt.step == 20 and pt.latency_ms is not None)
        ends[scale] = (measured / ctrl.budget, ctrl.correction)
        assert AllocationController(table, 1.0, total_steps=5).load_state_dict(ctrl.state_dict()) is None
    assert ends[1.0][0] > 1.05 and ends[1.0][1] > 0.05  # unscaled: over the budget; the PI learns why, late
    assert ends[0.75][0] == pytest.approx(1.0, abs=0.04) and ends[0.75][1] == 0.0  # scaled: on it, nothing to correct
    with pytest.raises(ValueError, match="saving_scale"):
        AllocationController(table, 1.0, total_steps=5, saving_scale=2.0)


def test_floor_allowance_is_whole_through_the_ramp_then_shrinks_to_zero_at_the_end() -> None:
    _, table, _ = _two_branch()
    ctrl = AllocationController(table, 0.5 * table.predict({}), total_steps=100, ramp_fraction=0.3, warmup_steps=10,
                                floor_allowance=0.02)
    assert ctrl.allowance(0) == ctrl.allowance(40) == 0.02  # warm-up + 30-step ramp
    assert ctrl.allowance(70) == pytest.approx(0.01)
    assert ctrl.allowance(100) == 0.0
    with pytest.raises(ValueError, match="floor_allowance"):
        AllocationController(table, 1.0, total_steps=10, floor_allowance=2.0)
    with pytest.raises(ValueError, match="step_back"):
        AllocationController(table, 1.0, total_steps=10, step_back=-0.1)
    with pytest.raises(ValueError, match="warmup_steps"):
        AllocationController(table, 1.0, total_steps=10, warmup_steps=10)


def test_a_dip_inside_the_allowance_does_not_hold_the_ramp() -> None:
    # 3 points under the floor at every measurement: with a 5-point allowance the ramp runs on and
    # reaches the budget; without one it holds where the first dip was measured.
    def run(allowance: float) -> AllocationController:
        pruner, ctrl = _measured_pruner(1.0, 0.47, map_floor=0.5, floor_allowance=allowance)
        for _ in range(20):
            pruner.step()
        return ctrl
    ran = run(0.05)
    assert not ran.under_floor and ran.last.predicted_ms <= ran.budget  # the ramp reached the budget
    held = run(0.0)
    assert held.under_floor and held.last.predicted_ms > 1.05 * held.budget


def _scripted_step_back(maps: list[float], *, total_steps: int, ramp: float, **kw):
    """A step-back controller (floor 0.5, budget half of dense) whose measurements return the
    allocation's prediction as latency and ``maps`` in turn as mAP, with its pruner."""
    scripted = iter(maps)
    model = small_net()
    table = LatencyTable.measure(model, X, flops_ms, runtime="synthetic", device="test", multiple=8)
    ctrl = _controller(table, 0.5 * table.predict({}), total_steps=total_steps, ramp=ramp, measure_every=5,
                       measure=lambda: (ctrl.last.predicted_ms if ctrl.last else ctrl.dense_ms, next(scripted)),
                       map_floor=0.5, step_back=0.5, **kw)
    return Pruner(model, example_inputs=X, controller=ctrl, channel_multiple=8, update_every=5), ctrl, table


def test_step_back_regrows_towards_the_last_good_target_then_bisects() -> None:
    # the ramp reaches the budget; a measurement under the floor there steps the target half-way back
    # to the last target that met the floor; after the recovery the next target is the midpoint
    pruner, ctrl, table = _scripted_step_back([0.9, 0.9, 0.9, 0.9, 0.1] + [0.9] * 10, total_steps=60, ramp=0.25)
    for _ in range(20):  # the ramp reaches the budget, and that model meets the floor at step 20
        pruner.step()
    cut = ctrl.last
    assert cut.target_ms == pytest.approx(ctrl.budget) and ctrl.good_ms == pytest.approx(cut.target_ms)
    for _ in range(5):  # ... and falls under it at 25: the same target failed, so back half-way to dense
        pruner.step()
    assert ctrl.under_floor and ctrl.bad_ms == pytest.approx(cut.target_ms)
    assert ctrl.hold_ms == pytest.approx(cut.target_ms + 0.5 * (ctrl.dense_ms - cut.target_ms))
    assert ctrl.last.predicted_ms > cut.predicted_ms  # the allocation after the dip widened: groups regrew
    good, bad = ctrl.hold_ms, ctrl.bad_ms
    for _ in range(5):  # recovered at the stepped-back target: the next one is the midpoint towards the failure
        pruner.step()
    assert not ctrl.under_floor and ctrl.good_ms == pytest.approx(good) and ctrl.bad_ms == bad
    assert ctrl.hold_ms == pytest.approx(0.5 * (good + bad)) and ctrl.target_ms() == pytest.approx(ctrl.hold_ms)
    again = _controller(table, 0.5 * table.predict({}), total_steps=60, ramp=0.25, step_back=0.5)
    again.load_state_dict(ctrl.state_dict())
    assert (again.good_ms, again.bad_ms, again.hold_ms) == (ctrl.good_ms, ctrl.bad_ms, ctrl.hold_ms)


def test_after_the_bisection_converges_a_retry_cuts_to_the_untried_midpoint_then_twice_as_far() -> None:
    # the budget fails once, everything else meets the floor
    pruner, ctrl, table = _scripted_step_back([0.9, 0.9, 0.9, 0.9, 0.1] + [0.9] * 40, total_steps=200, ramp=0.1)
    for _ in range(150):
        pruner.step()
        if ctrl.retry_ms is not None:
            break
    assert ctrl.retry_ms is not None and ctrl.bad_ms is None and ctrl.hold_ms is None  # converged, failure forgotten
    gap, good = ctrl.retry_ms, ctrl.good_ms
    assert 0 < gap < 0.01 * ctrl.dense_ms and good - gap > ctrl.budget
    assert ctrl.target_ms() == pytest.approx(good - gap)  # not the schedule's budget: the untried midpoint
    for _ in range(5):  # that retry met the floor: the next may go twice as far
        pruner.step()
    assert ctrl.good_ms == pytest.approx(good - gap) and ctrl.retry_ms == pytest.approx(2 * gap)
    assert ctrl.target_ms() == pytest.approx(max(ctrl.budget, good - 3 * gap))  # the schedule bounds it too
    again = _controller(table, 0.5 * table.predict({}), total_steps=200, ramp=0.1, step_back=0.5)
    again.load_state_dict(ctrl.state_dict())
    assert again.retry_ms == ctrl.retry_ms and again.target_ms() == pytest.approx(ctrl.target_ms())


def test_max_cut_per_update_spreads_a_steep_ramp_over_updates() -> None:
    pruner, ctrl = _measured_pruner(1.0, 0.9, max_cut_per_update=0.1)
    ctrl.ramp_fraction = 0.01  # a ramp that reaches the budget at the first update
    for _ in range(5):
        pruner.step()
    assert ctrl.last.target_ms == pytest.approx(0.9 * ctrl.dense_ms)  # one capped cut, not the budget
    for _ in range(35):
        pruner.step()
    assert ctrl.last.predicted_ms <= ctrl.budget  # reached over several updates


def test_a_one_shot_cut_is_whole_at_the_end_of_the_warm_up_and_capped_after() -> None:
    # ramp 0: the scheduled cut is the point of the candidate, so max_cut_per_update does not split
    # it; a PI correction after it is capped as ever
    pruner, ctrl = _measured_pruner(1.0, 0.9, max_cut_per_update=0.05, warmup_steps=5)
    ctrl.ramp_fraction = 0.0
    assert ctrl.scheduled_ms(4) == ctrl.dense_ms and ctrl.scheduled_ms(5) == pytest.approx(ctrl.budget)
    for _ in range(4):  # inside the warm-up: nothing cut
        pruner.step()
    assert ctrl.last is None and not ctrl.one_shot_done
    pruner.step()
    assert ctrl.one_shot_done and ctrl.last.target_ms == pytest.approx(ctrl.budget)  # the whole cut in one update
    ctrl.correction = 0.9  # as if measured far over the table: the next target may cut 5% of dense at most
    assert ctrl.target_ms() == pytest.approx(ctrl.last.predicted_ms - 0.05 * ctrl.dense_ms)
    again = _controller(ctrl.table, ctrl.budget, total_steps=40)
    again.load_state_dict(ctrl.state_dict())
    assert again.one_shot_done


def test_the_floor_is_not_judged_inside_the_recovery_window() -> None:
    # every measurement 30 points under the floor: with a 20-step window after a one-shot cut the
    # model keeps its cut through the measurements at steps 5-15, then steps back at 20; without a
    # window it steps back at once
    def run(window: int, steps: int) -> AllocationController:
        pruner, ctrl = _measured_pruner(1.0, 0.2, map_floor=0.5, step_back=0.5, recovery_steps=window)
        ctrl.ramp_fraction = 0.0
        for _ in range(steps):
            pruner.step()
        return ctrl
    kept = run(20, 19)
    assert kept.in_recovery(19) and not kept.in_recovery(20)
    assert not kept.under_floor and kept.last.target_ms == pytest.approx(kept.budget)
    assert kept.allowance(20) == kept.floor_allowance  # the allowance's shrink starts after the window
    judged = run(20, 20)  # the measurement at step 20 is the first judged
    assert judged.under_floor and judged.last.target_ms > judged.budget
    at_once = run(0, 10)
    assert at_once.under_floor and at_once.last.target_ms > at_once.budget
    with pytest.raises(ValueError, match="recovery_steps"):
        _controller(kept.table, 1.0, recovery_steps=-1)


@pytest.mark.parametrize("then", [0.47, 0.43])
def test_a_model_recovering_on_course_under_the_floor_is_held_not_regrown(then: float) -> None:
    # meets the floor through the ramp, dips under it at step 25 (falling: a step back), then at 30
    # either rises on course to the floor (0.47: +0.03 a measurement, 6 measurements left, 0.03 to go)
    # and is held where it is, or keeps falling (0.43) and steps back further
    pruner, ctrl, _ = _scripted_step_back([0.9, 0.9, 0.9, 0.9, 0.44, then] + [0.9] * 10, total_steps=60, ramp=0.25)
    for _ in range(25):
        pruner.step()
    first_back = ctrl.hold_ms
    assert ctrl.under_floor and first_back > ctrl.budget and ctrl.prev_map == 0.44
    for _ in range(5):
        pruner.step()
    assert ctrl.under_floor  # under the floor either way
    if then > 0.44:
        assert ctrl.hold_ms == pytest.approx(ctrl.last.target_ms) == pytest.approx(first_back)  # held there
    else:
        assert ctrl.hold_ms > first_back  # regrown further
    again = _controller(ctrl.table, ctrl.budget, total_steps=60, step_back=0.5)
    again.load_state_dict(ctrl.state_dict())
    assert again.prev_map == then


def test_recovering_needs_a_rise_that_reaches_the_floor_by_the_last_step() -> None:
    _, ctrl, _ = _scripted_step_back([], total_steps=100, ramp=0.25)
    ctrl.last_step = 50  # 10 measurements left
    assert not ctrl.recovering(0.45, 0.5)  # no previous measurement: no trend
    ctrl.prev_map = 0.44
    assert ctrl.recovering(0.45, 0.5)  # +0.01 x 10 >= 0.05
    assert not ctrl.recovering(0.42, 0.5)  # falling
    ctrl.prev_map = 0.449
    assert not ctrl.recovering(0.45, 0.5)  # +0.001 x 10 < 0.05: rising too slowly to make it


def test_a_step_back_regrows_at_most_max_cut_per_update() -> None:
    # the floor moved under a target that met it: the plain rule goes half-way back to dense at once
    def first_back(cap: float | None) -> tuple[float, float]:
        pruner, ctrl, _ = _scripted_step_back([0.9, 0.9, 0.9, 0.9, 0.1] + [0.9] * 10, total_steps=60, ramp=0.25,
                                              max_cut_per_update=cap)
        for _ in range(25):
            pruner.step()
        return ctrl.hold_ms - ctrl.bad_ms, ctrl.dense_ms
    plain, dense = first_back(None)
    capped, _ = first_back(0.05)
    assert plain > 0.1 * dense and capped == pytest.approx(0.05 * dense)


def test_the_last_interval_keeps_its_allocation_under_the_floor() -> None:
    # the same dip under the floor steps back at step 25 of 60, and changes nothing at step 55, where
    # no measurement is left before the end to judge a regrowth
    def dip_at(step: int, total: int) -> tuple[AllocationController, dict, float]:
        maps = [0.9] * (step // 5 - 1) + [0.1] + [0.9] * 10
        pruner, ctrl, _ = _scripted_step_back(maps, total_steps=total, ramp=0.25)
        for _ in range(step - 5):
            pruner.step()
        before, target = dict(ctrl.kept), ctrl.last.target_ms
        for _ in range(5):
            pruner.step()
        return ctrl, before, target
    early, before, target = dip_at(25, 60)
    assert early.under_floor and not early.settled() and early.kept != before and early.last.target_ms > target
    late, before, target = dip_at(55, 60)
    assert late.settled() and not late.settled(54)
    assert late.under_floor and late.kept == before and late.last.target_ms == target
    assert late.hold_ms is None and late.bad_ms is None  # no step back recorded either
    measured = next(pt for pt in late.points if pt.step == 55 and pt.map is not None)
    assert measured.map == 0.1 and measured.floor == pytest.approx(0.5)  # the measurement is still recorded


@pytest.mark.parametrize("regrow_until", [1.0, 0.8])
def test_past_regrow_until_a_dip_holds_instead_of_regrowing(regrow_until: float) -> None:
    # a dip under the floor at step 50 of 60 (two measurements left, so not the settled last interval):
    # with regrowth allowed to the end the target steps back; past regrow_until the allocation holds
    maps = [0.9] * 9 + [0.1] + [0.9] * 10
    pruner, ctrl, _ = _scripted_step_back(maps, total_steps=60, ramp=0.25, regrow_until=regrow_until)
    for _ in range(45):
        pruner.step()
    before, target = dict(ctrl.kept), ctrl.last.target_ms
    for _ in range(5):
        pruner.step()
    assert ctrl.under_floor and not ctrl.settled()
    assert ctrl.late() == (regrow_until < 1.0) and not ctrl.late(47)
    if regrow_until < 1.0:
        assert ctrl.kept == before and ctrl.bad_ms is None and ctrl.hold_ms == pytest.approx(target)
    else:
        assert ctrl.bad_ms == pytest.approx(target) and ctrl.hold_ms > target and ctrl.kept != before
    with pytest.raises(ValueError, match="regrow_until"):
        _controller(ctrl.table, ctrl.budget, total_steps=60, regrow_until=1.5)


def test_the_last_interval_takes_no_further_cut() -> None:
    # one schedule (the ramp reaches the budget at step 40), two fine-tune lengths: ending at step 40,
    # the allocations at 35 and 40 stand where step 30's left them; running on to 80, they cut further
    def kept_at_40(total: int) -> tuple[AllocationController, dict, dict]:
        pruner, ctrl = _measured_pruner(1.0, 0.9, total_steps=total)
        ctrl.ramp_fraction = 40 / total
        for _ in range(30):
            pruner.step()
        at_30 = dict(ctrl.kept)
        for _ in range(10):
            pruner.step()
        return ctrl, at_30, dict(ctrl.kept)
    ending, at_30, at_40 = kept_at_40(40)
    assert ending.settled() and at_40 == at_30 and ending.target_ms() < ending.last.target_ms
    running, at_30_too, cut = kept_at_40(80)
    assert not running.settled() and at_30_too == at_30  # the same schedule up to step 30 ...
    assert sum(cut.values()) < sum(at_30.values())  # ... which cuts further by step 40
