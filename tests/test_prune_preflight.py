"""The prune job's model-dependent refusals and the block rule, without Ray (issues #12, #14)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from avprune.prune_job.block_step import pick_blocks
from avprune.prune_job.preflight import (
    budget_unreachable_message,
    check_channel_multiple_fits,
    model_blocks,
    model_gates,
    probe_pruner,
    widest_reach_ms,
)


def test_channel_multiple_not_below_the_widest_group_is_refused():
    check_channel_multiple_fits({"a": 24, "b": 96}, 16, "net")  # fits: b can lose groups
    with pytest.raises(ValueError, match=r"pruning.channel_multiple: 96 is not below the widest prunable channel "
                                         r"group of net \(96 channels\)"):
        check_channel_multiple_fits({"a": 24, "b": 96}, 96, "net")
    with pytest.raises(ValueError, match="pruning.channel_multiple: 512"):
        check_channel_multiple_fits({"a": 24, "b": 96}, 512, "net")


class _Plain(nn.Module):
    """Convs without any residual add: no removable block."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.c = nn.Conv2d(64, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x)))


def _env(model_fn):
    cfg = SimpleNamespace(pruning=SimpleNamespace(granularity="block", importances=["magnitude"]),
                          model=SimpleNamespace(name="plainnet"))
    return SimpleNamespace(config=cfg, build_architecture=model_fn, example_input=lambda b=1: torch.zeros(b, 3, 16, 16),
                           layer_filter=lambda m, imp: (lambda n, mod: n != "c"))


def test_block_granularity_on_a_model_without_blocks_names_the_model():
    with pytest.raises(ValueError, match=r"pruning.granularity 'block': model 'plainnet': .*no removable residual block"):
        model_blocks(_env(_Plain))


def test_fold_gates_on_a_model_without_gates_names_the_model_and_ssdlite_has_eight():
    env = _env(_Plain)
    env.config.pruning.fold_gates = 64
    with pytest.raises(ValueError, match=r"pruning.fold_gates: 64: model 'plainnet' has no channel gate"):
        model_gates(env)
    from perception.models import build_detector

    ssd = _env(lambda: build_detector("ssdlite320_mobilenet_v3_large", image_size=128))
    ssd.config.pruning.fold_gates = 64
    ssd.example_input = lambda b=1: torch.zeros(b, 3, 128, 128)  # the job's input size (16x16 leaves 1x1 maps)
    assert len(model_gates(ssd)) == 8  # untrained: found from the forward, whatever the weights


def test_widest_reach_is_the_tables_prediction_at_max_sparsity_aligned():
    from pruning.latency_model import LatencyTable

    env = _env(_Plain)
    model = _Plain()
    # latency proportional to MACs: the reach is what every group at max_sparsity, rounded to 16, costs
    table = LatencyTable.measure(model, torch.zeros(1, 3, 16, 16),
                                 lambda m, shape: 1e-3 * m.weight.numel() * shape[-1] * shape[-2] / 1e3,
                                 runtime="pytorch", device="cpu", fractions=(0.25, 0.5, 1.0), multiple=16)
    pruner = probe_pruner(env, model, 16)
    dense = table.predict({})
    reach = widest_reach_ms(table, pruner, 0.75)
    assert reach < dense
    assert reach == pytest.approx(table.predict(pruner.config_at(0.75)))
    assert all(v % 16 == 0 or v in (3, 8) for v in pruner.config_at(0.75).values())
    assert widest_reach_ms(table, pruner, 0.75, {"blk": 0.5 * reach}) == pytest.approx(0.5 * reach)
    msg = budget_unreachable_message(reach / 2, reach, dense, 0.75, 16)
    assert f"nearest feasible budget: latency_ms >= {reach:.2f}" in msg and "max_sparsity 0.75" in msg


def test_blocks_go_cheapest_importance_per_ms_first_until_the_budget_is_met():
    per_ms = {"b1": 0.1, "b2": 5.0, "b3": 0.2, "b4": 0.05}
    ms = {"b1": 1.0, "b2": 3.0, "b3": 1.0, "b4": 0.0}
    assert pick_blocks(per_ms, ms, predicted_ms=10.0, budget_ms=8.5) == ["b1", "b3"]  # b4 saves nothing
    assert pick_blocks(per_ms, ms, predicted_ms=10.0, budget_ms=10.0) == []
    assert pick_blocks(per_ms, ms, predicted_ms=10.0, budget_ms=1.0) == ["b1", "b3", "b2"]


def test_drop_blocks_rebuilds_a_depth_pruned_checkpoint(tmp_path: Path):
    from perception.models import build_detector, drop_blocks, load_detector, save_checkpoint
    from pruning.blocks import discover_blocks
    from pruning.filters import detector_core_forward

    model = build_detector("ssdlite320_mobilenet_v3_large", image_size=128).eval()
    names = [b.name for b in discover_blocks(model, torch.zeros(1, 3, 128, 128), detector_core_forward)][:2]
    drop_blocks(model, names)
    save_checkpoint(tmp_path / "m.pt", model)
    back = load_detector(tmp_path / "m.pt").eval()
    assert back.avprune_meta["removed_blocks"] == sorted(names)
    assert all(isinstance(back.get_submodule(n), nn.Identity) for n in names)
    x = torch.rand(1, 3, 128, 128)
    torch.testing.assert_close(detector_core_forward(back, x), detector_core_forward(model, x))
    with pytest.raises(ValueError, match="removed block 'nope.x' is not a submodule"):
        drop_blocks(model, ["nope.x"])


def test_auto_channel_multiple_resolves_once_with_its_reason(tmp_path: Path):
    """`channel_multiple: auto` is probed on the budget's runtime (here eager PyTorch) on the table's
    widest convs; the record gets the multiple and why. An int is taken as configured."""
    import yaml

    from avprune.config.prune import PruneJobConfig
    from avprune.prune_job.latency_table import resolve_channel_multiple
    from pruning.latency_model import LatencyTable

    ckpt = tmp_path / "x.pt"
    ckpt.write_bytes(b"x")
    root = Path(__file__).resolve().parents[1]
    data = yaml.safe_load((root / "avprune/config/examples/prune_tiny.yaml").read_text())
    data["model"]["checkpoint"] = str(ckpt)
    data["budget"]["runtime"] = "pytorch"
    data["pruning"]["channel_multiple"] = "auto"
    cfg = PruneJobConfig.model_validate(data)
    net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 128, 3, padding=1), nn.Conv2d(128, 64, 1))
    table = LatencyTable.measure(net, torch.zeros(1, 3, 16, 16), lambda m, shape: 0.01, runtime="pytorch",
                                 device="cpu", fractions=(0.5, 1.0), multiple=16)
    multiple, reason = resolve_channel_multiple(cfg, table)
    assert multiple in (1, 8, 16, 32) and reason.startswith("auto: multiple") and "per M MACs" in reason
    fixed = cfg.model_copy(update={"pruning": cfg.pruning.model_copy(update={"channel_multiple": 8})})
    assert resolve_channel_multiple(fixed, table) == (8, "pruning.channel_multiple: 8 in the job config")


def test_allocation_controller_holds_the_dense_target_through_the_warmup():
    from pruning.allocation_controller import AllocationController
    from pruning.latency_model import LatencyTable

    net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1))
    table = LatencyTable.measure(net, torch.zeros(1, 3, 16, 16), lambda m, shape: 0.001 * m.weight.numel() ** 0.5,
                                 runtime="pytorch", device="cpu", fractions=(0.5, 1.0), multiple=16)
    dense = table.predict({})
    ctl = AllocationController(table, dense / 2, total_steps=40, ramp_fraction=0.5, warmup_steps=10)
    for _ in range(10):
        ctl.step()
        assert ctl.scheduled_ms() == pytest.approx(dense)  # warm-up: nothing to prune for
    for _ in range(20):
        ctl.step()
    assert ctl.scheduled_ms() == pytest.approx(dense / 2)  # ramp of 20 steps after the warm-up: at the budget
