"""Schedules (pure functions), controllers' targets and state, and the budget controller's loop."""

from __future__ import annotations

import pytest

from pruning import schedules
from pruning.controllers import (
    CONTROLLERS,
    BudgetController,
    CubicController,
    FixedController,
    LayerAdaptiveController,
    build_controller,
    targets_from_profile,
)

# ----------------------------------------------------------------------------- schedules


def test_cubic_schedule_endpoints_shape_and_hold() -> None:
    kw = dict(final_sparsity=0.8, initial_sparsity=0.1, begin_step=10, end_step=110)
    assert schedules.cubic(0, **kw) == 0.1 and schedules.cubic(10, **kw) == 0.1
    assert schedules.cubic(110, **kw) == pytest.approx(0.8) and schedules.cubic(500, **kw) == pytest.approx(0.8)
    vals = [schedules.cubic(t, **kw) for t in range(10, 111)]
    assert all(b >= a for a, b in zip(vals, vals[1:], strict=False))  # monotone
    # Zhu & Gupta: fast early, slow late; half-way the ramp has done 1 - 0.5^3 = 87.5% of the work.
    assert schedules.cubic(60, **kw) == pytest.approx(0.8 + (0.1 - 0.8) * 0.5**3)
    # frequency: held constant between updates
    kwf = {**kw, "frequency": 20}
    assert schedules.cubic(31, **kwf) == schedules.cubic(49, **kwf) < schedules.cubic(50, **kwf)


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan")])
def test_schedules_reject_sparsity_outside_unit_interval(bad: float) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        schedules.cubic(0, final_sparsity=bad, end_step=10)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        FixedController(bad)


def test_schedule_rejects_empty_ramp() -> None:
    with pytest.raises(ValueError, match="end_step must be > begin_step"):
        schedules.cubic(0, final_sparsity=0.5, begin_step=5, end_step=5)
    assert schedules.linear(5, final_sparsity=0.5, end_step=10) == pytest.approx(0.25)


# ----------------------------------------------------------------------------- simple controllers


def test_registry_lists_names_and_unknown_raises() -> None:
    assert set(CONTROLLERS.names()) == {"budget", "fixed", "cubic", "layer_adaptive", "allocation"}
    with pytest.raises(ValueError, match="unknown controller 'nope'; valid names: .*cubic"):
        build_controller("nope")
    with pytest.raises(ValueError, match="already registered"):
        CONTROLLERS.add("fixed", FixedController)


def test_fixed_cubic_layer_adaptive_targets_and_state_round_trip() -> None:
    fixed = FixedController({"a": 0.3}, default=0.1)
    fixed.bind(["a", "b"])
    assert fixed.targets() == {"a": 0.3, "b": 0.1}

    cubic = CubicController(final_sparsity=0.5, end_step=10)
    cubic.bind(["a"])
    for _ in range(4):
        cubic.step()
    state = cubic.state_dict()
    other = CubicController(final_sparsity=0.5, end_step=10)
    other.bind(["a"])
    other.load_state_dict(state)
    assert other.targets() == cubic.targets() == {"a": pytest.approx(schedules.cubic(4, final_sparsity=0.5, end_step=10))}

    profile = {"robust": [(0.0, 0.0), (0.5, 0.001), (0.75, 0.004)], "fragile": [(0.0, 0.0), (0.25, 0.05)]}
    assert targets_from_profile(profile, max_drop=0.01) == {"robust": 0.75, "fragile": 0.0}
    la = LayerAdaptiveController(profile, max_drop=0.01, end_step=10, default_sparsity=0.2)
    la.bind(["robust", "fragile", "unscanned"])
    for _ in range(10):
        la.step()
    assert la.targets() == {"robust": pytest.approx(0.75), "fragile": 0.0, "unscanned": pytest.approx(0.2)}


# ----------------------------------------------------------------------------- budget controller

A, B, C, D = 20.0, 5.0, 0.5, 0.4  # latency = A*(1-s) + B ms; mAP = C - D*s^2
CHANNELS = 1000


def _config_at(u: float) -> dict[str, int]:
    return {"net": round(CHANNELS * (1 - u))}


def _predict(cfg: dict[str, int]) -> float:
    return A * cfg["net"] / CHANNELS + B


def _run(budget: float, floor: float, steps: int = 300, skew: float = 1.1, **kw: float) -> tuple[BudgetController, list]:
    """Closed loop on synthetic metrics; the real latency is ``skew`` x the model's prediction."""
    state = {"ctrl": None}

    def measure() -> tuple[float, float]:
        u = state["ctrl"].u
        return skew * (A * (1 - u) + B), C - D * u * u

    ctrl = BudgetController(budget, floor, _predict, measure, measure_every=5, **kw)
    state["ctrl"] = ctrl
    ctrl.bind(["net"], _config_at)
    trace = []
    for _ in range(steps):
        ctrl.step()
        trace.append((ctrl.u, skew * (A * (1 - ctrl.u) + B), C - D * ctrl.u**2))
    return ctrl, trace


def test_budget_settles_within_5_percent_without_oscillating() -> None:
    budget = 15.0
    ctrl, trace = _run(budget, floor=0.3)
    errors = [(lat - budget) / budget for _, lat, _ in trace]
    assert abs(errors[-1]) <= 0.05
    settled = next(i for i, e in enumerate(errors) if abs(e) <= 0.05)
    assert settled < 150
    # No oscillation: once inside the band it stays there, and sparsity moves in one direction.
    assert all(abs(e) <= 0.05 for e in errors[settled:])
    us = [u for u, _, _ in trace]
    steps = [b - a for a, b in zip(us, us[1:], strict=False) if abs(b - a) > 1e-12]
    assert all(s > 0 for s in steps)  # monotone convergence from the dense model
    # Bounded overshoot: never more than 5% under the budget (it does not prune far past what is needed).
    assert min(errors) >= -0.05
    assert not ctrl.infeasible
    assert ctrl.bias == pytest.approx(1.1, rel=0.02)  # measured latency recalibrated the model


def test_budget_backs_off_when_map_falls_under_floor_and_flags_infeasible_pair() -> None:
    budget, floor = 15.0, 0.45  # the budget needs s ~ 0.57, the floor allows s <= 0.35
    ctrl, trace = _run(budget, floor)
    assert ctrl.infeasible
    us = [u for u, _, _ in trace]
    peak = max(us)
    assert us[-1] < peak  # weights regrew after the floor was crossed
    assert C - D * us[-1] ** 2 >= floor  # ends on the accurate side of the floor
    best = ctrl.best_point
    assert best is not None and best.map is not None and best.map >= floor
    assert best.latency_ms > budget  # the best it could do still misses the budget
    # After backing off it holds still (no limit cycle between floor and budget).
    assert len({round(u, 9) for u in us[-100:]}) == 1


def test_budget_unreachable_even_at_max_sparsity_is_infeasible() -> None:
    ctrl, _ = _run(3.0, floor=0.0, max_sparsity=0.9)  # 3 ms < the 5 ms fixed cost
    assert ctrl.infeasible and ctrl.u == pytest.approx(0.9)


def test_budget_state_round_trip_resumes_identically() -> None:
    ctrl, _ = _run(15.0, 0.3, steps=23)
    state = ctrl.state_dict()
    twin = BudgetController(15.0, 0.3, _predict, lambda: (0.0, 0.0), measure_every=5)
    twin.bind(["net"], _config_at)
    twin.load_state_dict(state)
    twin.measure = ctrl.measure
    for _ in range(30):
        ctrl.step()
        twin.step()
        assert twin.u == ctrl.u and twin.targets() == ctrl.targets()
    assert twin.best_point == ctrl.best_point


def test_budget_argument_validation() -> None:
    with pytest.raises(ValueError, match="latency_budget_ms must be > 0"):
        BudgetController(0.0, 0.3, _predict)
    with pytest.raises(ValueError, match=r"map_floor must be in \[0, 1\]"):
        BudgetController(10.0, 1.5, _predict)
    with pytest.raises(ValueError, match="not bound"):
        BudgetController(10.0, 0.3, _predict).step()


def test_budget_rides_out_a_transient_map_dip_but_backs_off_a_persistent_one() -> None:
    """One measurement under the floor (a freshly pruned model before fine-tuning recovers) holds
    sparsity; ``floor_patience`` in a row back it off for good."""
    readings = iter([(30.0, 0.50), (30.0, 0.30), (30.0, 0.50), (30.0, 0.30), (30.0, 0.30)])
    ctrl = BudgetController(15.0, 0.45, _predict, lambda: next(readings), measure_every=5, floor_patience=2)
    ctrl.bind(["net"], _config_at)
    us = []
    for _ in range(25):
        ctrl.step()
        us.append((ctrl.last_step, ctrl.u, ctrl.ceiling))
    at = {step: (u, ceiling) for step, u, ceiling in us}
    assert at[10][0] == at[14][0] and at[14][1] == ctrl.max_sparsity  # dip at step 10: held, no back-off
    assert at[19][0] > at[14][0]  # recovered at 15: pruning resumed
    assert ctrl.ceiling < at[19][0]  # two dips in a row (20, 25): backed off below that sparsity
    with pytest.raises(ValueError, match="floor_patience"):
        BudgetController(15.0, 0.45, _predict, floor_patience=0)


def test_budget_lifts_its_cap_again_once_fine_tuning_has_recovered_map() -> None:
    readings = iter([(30.0, 0.30), (30.0, 0.30), (30.0, 0.50), (30.0, 0.50), (30.0, 0.50)])
    ctrl = BudgetController(15.0, 0.45, _predict, lambda: next(readings), measure_every=5, floor_patience=2)
    ctrl.bind(["net"], _config_at)
    ceilings = {}
    for _ in range(25):
        ctrl.step()
        ceilings[ctrl.last_step] = ctrl.ceiling
    assert ceilings[10] < ctrl.max_sparsity  # two dips (5, 10): capped
    assert ceilings[20] == pytest.approx(ceilings[10] + ctrl.backoff)  # two recoveries (15, 20): lifted
    assert ceilings[25] == ceilings[20]  # one more good reading alone does not lift again
