"""HALP-style latency table: interpolation, channel-config resolution, persistence, sensitivity scans."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from perception.io import atomic_write_json
from pruning import LatencyTable, Pruner, build_controller, metric_drops, scan_layer, sensitivity_scan
from pruning.latency_model import torch_measure_fn
from tests.conftest import X, flops_ms, small_net


def _measure_plain(model: nn.Module) -> float:
    """Sum of per-layer 'latencies' of a (physically pruned) model at its real shapes."""
    shapes = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            shapes.setdefault(name, tuple(args[0].shape))

        return hook

    hooks = [m.register_forward_pre_hook(record(n))
             for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(X)
    for h in hooks:
        h.remove()
    return sum(flops_ms(model.get_submodule(n), s) for n, s in shapes.items())


def test_prediction_matches_physically_pruned_model() -> None:
    model = small_net()
    table = LatencyTable.measure(model, X, flops_ms, runtime="synthetic", device="cpu-test")
    full = _measure_plain(model)
    assert table.calibrate(full + 2.0) == pytest.approx(2.0)  # overhead = measured - sum of layers
    assert table.predict({}) == pytest.approx(full + 2.0)
    pruner = Pruner(model, granularity="channel", example_inputs=X, controller=build_controller("fixed", sparsity=0.6))
    pruner.step()
    config = pruner.channel_config()
    predicted = table.predict(config)
    # The same prediction from explicit (in, out) pairs: input channels were inferred correctly.
    assert table.predict(pruner.layer_channels()) == pytest.approx(predicted)
    plain = pruner.finalize()
    assert predicted == pytest.approx(_measure_plain(plain) + 2.0, rel=1e-6)
    assert predicted - 2.0 < 0.8 * full  # the pruned layers are predicted cheaper


def test_two_point_calibration_recovers_scale_and_overhead() -> None:
    """A runtime whose whole graph is 0.6 x (sum of isolated layers) + 1.5 ms is predicted exactly."""
    model = small_net()
    table = LatencyTable.measure(model, X, flops_ms, runtime="synthetic", device="cpu-test")
    pruner = Pruner(copy.deepcopy(model), granularity="channel", example_inputs=X,
                    controller=build_controller("fixed", sparsity=0.5))
    pruner.step()
    half = pruner.channel_config()
    runtime = lambda cfg: 0.6 * table.layer_sum(cfg) + 1.5  # noqa: E731
    scale, overhead = table.calibrate_points([({}, runtime({})), (half, runtime(half))])
    assert (scale, overhead) == (pytest.approx(0.6), pytest.approx(1.5))
    other = Pruner(copy.deepcopy(model), granularity="channel", example_inputs=X,
                   controller=build_controller("fixed", sparsity=0.3))
    other.step()
    assert table.predict(other.channel_config()) == pytest.approx(runtime(other.channel_config()))
    with pytest.raises(ValueError, match="non-positive latency scale"):
        table.calibrate_points([({}, 1.0), (half, 5.0)])  # thinner measured slower


def test_bilinear_interpolation_between_grid_points() -> None:
    conv = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1))
    table = LatencyTable.measure(conv, torch.randn(1, 16, 8, 8), flops_ms, runtime="synthetic", device="cpu-test",
                                 fractions=(0.5, 1.0))
    spec = table.layers["0"]
    assert spec.grid_in == (8, 16) and spec.grid_out == (16, 32)
    assert len(table.entries) == 4  # only grid points were measured
    for cin, cout in [(12, 24), (10, 20), (16, 16)]:
        exact = flops_ms(nn.Conv2d(cin, cout, 3, padding=1), (1, cin, 8, 8))
        assert table.layer_latency("0", cin, cout) == pytest.approx(exact, rel=1e-6)


def test_save_load_round_trip_and_tags(tmp_path) -> None:
    model = small_net()
    table = LatencyTable.measure(model, X, flops_ms, runtime="onnxruntime-cpu", device="test-box",
                                 model_latency_ms=5.0)
    path = tmp_path / "table.json"
    atomic_write_json(path, table.to_dict())  # pruning writes no files: callers persist to_dict()
    assert json.loads(path.read_text())["runtime"] == "onnxruntime-cpu"
    loaded = LatencyTable.load(path, runtime="onnxruntime-cpu", device="test-box")
    cfg = {"stem.0": 16, "expand.0": 32}
    assert loaded.predict(cfg) == pytest.approx(table.predict(cfg))
    assert loaded.layers == table.layers
    with pytest.raises(ValueError, match="measured on runtime='onnxruntime-cpu', not 'tensorrt'"):
        LatencyTable.load(path, runtime="tensorrt")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not an avprune latency table"):
        LatencyTable.load(tmp_path / "bad.json")


def test_torch_measure_fn_times_a_layer() -> None:
    ms = torch_measure_fn(repeats=3, warmup=1)(nn.Conv2d(8, 8, 3), (1, 8, 16, 16))
    assert ms > 0


def test_sensitivity_scan_one_layer_and_all_layers_leave_model_untouched() -> None:
    model = small_net()
    ref = copy.deepcopy(model)
    with torch.no_grad():
        y_ref = model(X)

    def evaluate(m: nn.Module) -> float:  # higher is better: agreement with the dense model
        with torch.no_grad():
            return -float((m(X) - y_ref).pow(2).mean())

    curve = scan_layer(model, "tail.0", evaluate, (0.0, 0.5, 0.75), granularity="channel", example_inputs=X)
    assert [s for s, _ in curve] == [0.0, 0.5, 0.75]
    assert curve[0][1] == pytest.approx(0.0, abs=1e-10)
    assert curve[1][1] < 0 and curve[2][1] <= curve[1][1]
    profile = sensitivity_scan(model, evaluate, (0.0, 0.5), granularity="channel", example_inputs=X)
    assert len(profile) >= 3 and all(len(c) == 2 for c in profile.values())
    drops = metric_drops(profile)
    assert all(d[0] == (0.0, 0.0) and d[1][1] >= 0 for d in drops.values())
    for (k, v), (k2, v2) in zip(model.state_dict().items(), ref.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)


def test_budget_controller_drives_pruner_to_predicted_latency_budget() -> None:
    model = small_net()
    table = LatencyTable.measure(model, X, flops_ms, runtime="synthetic", device="cpu-test")
    dense = table.predict({})
    budget = 0.6 * dense
    ctrl = build_controller("budget", latency_budget_ms=budget, map_floor=0.0, predict_latency=table.predict,
                            measure=None, measure_every=10, max_rate=0.05)
    pruner = Pruner(model, granularity="channel", example_inputs=X, controller=ctrl, round_to=1)
    for _ in range(60):
        pruner.step()
    achieved = table.predict(pruner.channel_config())
    assert abs(achieved - budget) / budget <= 0.05
    assert pruner.history[-1].predicted_latency_ms == pytest.approx(achieved)
    assert not ctrl.infeasible and 0.0 < ctrl.u < 0.9


def test_a_macs_table_predicts_the_multiply_accumulates_of_a_physically_pruned_model() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from pruning.latency_model import macs_measure_fn

    def macs(m: nn.Module) -> float:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            m(X)
        return fc.get_total_flops() / 2 / 1e6

    model = small_net()
    table = LatencyTable.measure(model, X, macs_measure_fn(), runtime="macs", device="analytic")
    assert table.predict({}) == pytest.approx(macs(model), rel=1e-6)
    pruner = Pruner(copy.deepcopy(model), controller=build_controller("fixed", sparsity=0.5), example_inputs=X)
    pruner.update()
    config = pruner.channel_config()
    small = pruner.finalize()
    assert macs(small) < 0.6 * macs(model)
    assert table.predict(config) == pytest.approx(macs(small), rel=1e-6)
    with pytest.raises(TypeError, match="Conv2d and Linear"):
        macs_measure_fn()(nn.ReLU(), (1, 3))


def test_macs_table_predicts_the_dense_latency_and_refuses_a_bad_one() -> None:
    """``pruning.latency_model.macs_table`` (the job's ``latency_costs: macs`` and the compare benchmark's
    row build it): the dense model predicts the latency it was given; halving a conv's outputs saves."""
    import torch
    from torch import nn

    from pruning.latency_model import macs_table

    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
    table = macs_table(model, torch.zeros(1, 3, 16, 16), dense_ms=8.0, multiple=8)
    assert table.predict({}) == pytest.approx(8.0) and table.overhead_ms == 0.0
    assert table.predict({"0": 16}) < 8.0
    with pytest.raises(ValueError, match="dense_ms"):
        macs_table(model, torch.zeros(1, 3, 16, 16), dense_ms=0.0)
