"""In-graph calibration of the latency table, with deterministic 'runtimes' standing in for ONNX Runtime.

The isolated 'runtime' charges every layer its MACs plus a layout-conversion cost for its input and
output maps (what ORT pays around a layer timed alone); the whole-graph 'runtime' charges MACs only
(the graph converts layouts once). The 3x3 branch carries a large conversion cost, so the isolated
table over-credits it; calibration must move the knapsack to the 5x5 branch, whose channels really cost more.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pruning import LatencyTable
from pruning.allocation import Unit, allocate_latency
from pruning.graph_calibration import calibrate_in_graph, fit_layer_scales
from tests.test_pruning_allocation import TwoBranch
from tests.test_pruning_latency import flops_ms

X16 = torch.zeros(1, 3, 16, 16)


def isolated_ms(module: nn.Module, input_shape: tuple[int, ...]) -> float:
    """MACs + a per-channel layout conversion that only 3x3 layers pay (heavily) when timed alone."""
    reorder = 0.2 if module.kernel_size == (3, 3) else 0.0
    return flops_ms(module, input_shape) + reorder * (module.in_channels + module.out_channels)


def graph_ms(model: nn.Module) -> float:
    """The whole model's 'latency': Σ MACs of its convs at their real (physically pruned) shapes."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:  # returns None: inputs untouched
            shapes.setdefault(name, tuple(args[0].shape))

        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(X16)
    for h in hooks:
        h.remove()
    return sum(flops_ms(model.get_submodule(n), s) for n, s in shapes.items()) + 0.5  # + a fixed graph overhead


def _table(model: nn.Module) -> LatencyTable:
    table = LatencyTable.measure(model, X16, isolated_ms, runtime="synthetic", device="test",
                                 fractions=(0.25, 0.5, 0.75, 1.0), multiple=8)
    table.scale, table.overhead_ms = graph_ms(model) / table.layer_sum({}), 0.0  # the benchmark's proportional start
    return table


def test_calibration_matches_the_graph_and_moves_the_knapsack(tmp_path) -> None:
    torch.manual_seed(0)
    model = TwoBranch().eval()
    table = _table(model)
    units = [Unit("a", 32, ("a",)), Unit("b", 32, ("b",))]
    scores = {"a": torch.ones(32), "b": torch.ones(32)}
    before = allocate_latency(units, scores, table, 0.8 * table.predict({}), channel_multiple=8)
    assert before.kept["a"] < before.kept["b"]  # the isolated table blames the 3x3 branch

    seen: list[int] = []

    def measure_many(models):
        seen.append(len(models))
        return [graph_ms(m) for m in models]

    cal = calibrate_in_graph(table, model, X16, measure_many, channel_multiple=8, probe_sparsity=0.75,
                             holdout=(0.5, {"a": 0.25, "b": 0.5}))
    assert seen == [1 + 2 + 2]  # dense + one probe per group + holdouts, in ONE interleaved call
    assert cal.dense_ms == pytest.approx(graph_ms(model))
    assert table.predict({}) == pytest.approx(cal.dense_ms, rel=1e-9)
    assert {p[0] for p in cal.probes} == {"a", "b"} and all(p[1] == 8 for p in cal.probes)
    for pred, meas in cal.holdout:  # out of sample: within 3% of the graph (isolated-table prediction was far off)
        assert pred == pytest.approx(meas, rel=0.03)
    assert cal.layer_scale["a"] < cal.layer_scale["b"]  # the 3x3 layer's isolated cost was mostly conversion

    after = allocate_latency(units, scores, table, 0.8 * table.predict({}), channel_multiple=8)
    assert after.kept["b"] < after.kept["a"]  # now the knapsack cuts the branch the graph rewards
    assert after.feasible
    # The calibration survives a round trip through the table file.
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table.to_dict()))
    again = LatencyTable.load(path)
    assert again.layer_scale == table.layer_scale
    assert again.predict({"a": 16}) == pytest.approx(table.predict({"a": 16}))


def test_isolated_table_mispredicts_without_calibration() -> None:
    model = TwoBranch().eval()
    table = _table(model)
    from pruning.controllers import FixedController
    from pruning.pruner import Pruner

    pruner = Pruner(model, controller=FixedController({"a": 0.75}), example_inputs=X16, channel_multiple=8)
    pruner.update()
    cfg = pruner.channel_config()
    measured = graph_ms(pruner.finalize())
    assert abs(table.predict(cfg) / measured - 1) > 0.05  # the setting the calibration has to fix


def test_fit_rejects_bad_points() -> None:
    table = _table(TwoBranch().eval())
    with pytest.raises(ValueError, match="dense model"):
        fit_layer_scales(table, [({"a": 16}, 1.0)])
    with pytest.raises(ValueError, match="thinned"):
        fit_layer_scales(table, [({}, 1.0)])
    with pytest.raises(ValueError, match="ridge"):
        fit_layer_scales(table, [({}, 1.0), ({"a": 16}, 0.9)], ridge=0.0)


def test_fit_pins_negative_factors_at_zero() -> None:
    table = _table(TwoBranch().eval())
    # A thinner 'a' measured *slower* (noise): its layers may not get a negative cost.
    scales, _ = fit_layer_scales(table, [({}, 1.0), ({"a": 8}, 1.2), ({"b": 8}, 0.7)])
    assert all(0 <= v <= 3.0 + 1e-9 for v in scales.values())
    # A probe 'saving' far beyond what its layers could cost (noise) is capped, not fitted.
    capped, _ = fit_layer_scales(table, [({}, 10.0), ({"a": 8}, 1.0)], max_factor=2.0)
    assert max(capped.values()) == pytest.approx(2.0)
    assert table.predict({"b": 8}) < table.predict({})


def test_proportional_prior_ignores_the_tables_earlier_calibration() -> None:
    """The job's table arrives calibrated with a constant overhead (scale 1): ``prior="proportional"``
    re-starts from the measured dense graph over the isolated sum, as the benchmark does by hand."""
    torch.manual_seed(0)
    model = TwoBranch().eval()
    by_hand = _table(model)  # scale = graph / isolated sum, overhead 0
    job = _table(model)
    job.scale, job.layer_scale = 1.0, {"a": 5.0}
    job.calibrate(graph_ms(model))  # the job's additive calibration: overhead absorbs the difference
    assert job.scale != pytest.approx(by_hand.scale)

    def measure_many(models):
        return [graph_ms(m) for m in models]

    calibrate_in_graph(by_hand, model, X16, measure_many, channel_multiple=8)
    calibrate_in_graph(job, model, X16, measure_many, channel_multiple=8, prior="proportional")
    assert job.scale == pytest.approx(by_hand.scale)
    assert job.layer_scale == pytest.approx(by_hand.layer_scale)
    assert job.predict({"a": 16}) == pytest.approx(by_hand.predict({"a": 16}))
    with pytest.raises(ValueError, match="prior"):
        calibrate_in_graph(job, model, X16, measure_many, prior="global")


def test_saving_fit_keeps_the_dense_point_and_fits_the_measured_savings() -> None:
    """The isolated table anchored by a constant over-predicts every saving (its layers carry
    conversion costs the graph does not pay); the fit keeps the dense prediction exact and brings the
    uniform cuts' predictions to what the graph measures."""
    from pruning.graph_calibration import fit_saving

    torch.manual_seed(0)
    model = TwoBranch().eval()
    table = LatencyTable.measure(model, X16, isolated_ms, runtime="synthetic", device="test",
                                 fractions=(0.25, 0.5, 0.75, 1.0), multiple=8)
    dense = graph_ms(model)
    table.calibrate(dense)  # the job's additive anchor: the overhead absorbs the isolated excess (< 0 here)
    assert table.overhead_ms < 0
    seen: list[int] = []

    def measure_many(models):
        seen.append(len(models))
        return [graph_ms(m) for m in models]

    fit = fit_saving(table, model, X16, measure_many, sparsities=(0.25, 0.5, 0.75), channel_multiple=8)
    assert seen == [4]  # dense + three uniform cuts, in ONE interleaved call
    assert fit.dense_ms == pytest.approx(dense) and table.predict({}) == pytest.approx(dense, rel=1e-9)
    assert 0 < fit.scale_factor < 1  # the constant anchor over-predicted the savings
    for (s, fitted, measured), before in zip(fit.points, fit.before, strict=True):
        assert abs(fitted - measured) < 0.25 * abs(before - measured), s  # the fit closes most of the error
        assert before < measured  # before: the table promised more saving than the graph gave
    assert fit.residual_rms_ms < 0.05 * dense


def test_saving_fit_refuses_what_it_cannot_fit() -> None:
    from pruning.graph_calibration import fit_saving

    model = TwoBranch().eval()
    table = LatencyTable.measure(model, X16, isolated_ms, runtime="synthetic", device="test",
                                 fractions=(0.5, 1.0), multiple=8)
    with pytest.raises(ValueError, match="at least one uniform sparsity"):
        fit_saving(table, model, X16, lambda ms: [1.0] * len(ms), sparsities=())
    with pytest.raises(ValueError, match="sparsities"):
        fit_saving(table, model, X16, lambda ms: [1.0] * len(ms), sparsities=(1.5,))
    # a thinner model that measured slower: the machine was noisy, not the table wrong
    with pytest.raises(ValueError, match="no faster than the dense graph"):
        fit_saving(table, model, X16, lambda ms: [1.0] + [2.0] * (len(ms) - 1), sparsities=(0.5,), channel_multiple=8)
    with pytest.raises(ValueError, match="returned 1 latencies for 2 models"):
        fit_saving(table, model, X16, lambda ms: [1.0], sparsities=(0.5,), channel_multiple=8)
