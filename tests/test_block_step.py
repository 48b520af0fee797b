"""The prune job's depth step (issue #14): which blocks go, and a block ramping back up when the
measured mAP stays under the floor."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from avprune.prune_job.block_step import BlockStep
from pruning.block_gates import BlockGates


class _Res(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _Res(4), _Res(4), _Res(4), nn.Conv2d(4, 2, 1)).eval()


def _step(hook: BlockStep, steps: int, start: int = 0) -> int:
    for s in range(start, start + steps):
        hook(SimpleNamespace(step=s))
    return start + steps


def _hook(net: nn.Module, *, reach: float, share: float = 0.5, ramp: int = 4, patience: int = 2) -> BlockStep:
    x = torch.randn(1, 3, 8, 8)
    gates = BlockGates(net, example_inputs=x, ramp_steps=ramp)
    assert gates.names == ["1", "2", "3"]
    gates.importance = {"1": 3.0, "2": 1.0, "3": 2.0}  # as if measured: "1" matters most
    return BlockStep(gates, {"1": 1.0, "2": 1.0, "3": 1.0}, budget_ms=6.0, reach_ms=lambda: reach,
                     decide_step=2, ramp_steps=ramp, dense_ms=10.0, depth_share=share, patience=patience)


def test_channel_and_block_splits_the_saving_and_block_alone_covers_all() -> None:
    # channel+block: the channels could reach 5 ms alone, blocks take half of the 4 ms needed
    both = _hook(_net(), reach=5.0)
    _step(both, 2)
    assert both.chosen == ["2", "3"] and both.removed_ms == 2.0
    # channels that reach only 9 ms: the blocks must cover 3 ms
    weak = _hook(_net(), reach=9.0)
    _step(weak, 2)
    assert weak.chosen == ["2", "3", "1"]
    # block granularity (reach = dense): all of the 4 ms, as far as the three blocks go
    alone = _hook(_net(), reach=10.0, share=1.0)
    _step(alone, 2)
    assert alone.chosen == ["2", "3", "1"]
    with pytest.raises(ValueError, match="depth_share"):
        _hook(_net(), reach=5.0, share=1.5)


def test_a_block_ramps_back_up_after_the_floor_is_missed_and_restores_the_outputs() -> None:
    net = _net()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        dense_out = net(x).clone()
    hook = _hook(net, reach=9.0, ramp=4)
    step = _step(hook, 2 + 4)  # decided at step 2, then a full ramp: all three blocks gone
    assert sorted(hook.gates.removed()) == ["1", "2", "3"] and hook.removed_ms == 3.0
    assert hook.observe(0.40, 0.50) is None  # one miss: patience 2
    assert hook.observe(0.55, 0.50) is None  # back above the floor: the count restarts
    assert hook.observe(0.40, 0.50) is None
    back = hook.observe(0.40, 0.50)
    assert back == "1"  # the most important block comes back first
    assert hook.removed_ms == 2.0 and hook.restored == ["1"] and "1" not in hook.chosen
    step = _step(hook, 2, step)
    assert 0.0 < hook.gates.gate("1") < 1.0  # ramping up, not jumping
    state = hook.state_dict()
    step = _step(hook, 2, step)
    assert hook.gates.gate("1") == 1.0 and sorted(hook.gates.removed()) == ["2", "3"]
    # restored outputs: gates 2 and 3 back on too gives the dense model bit for bit
    for n in ("2", "3"):
        hook.gates.set_gate(n, 1.0)
    with torch.no_grad():
        assert torch.equal(net(x), dense_out)
    events = [(e.block, e.event) for e in hook.gates.history if e.block == "1"]
    assert events == [("1", "fading"), ("1", "removed"), ("1", "restoring"), ("1", "restored")]
    report = hook.report()
    assert report["blocks_restored"] == ["1"] and report["blocks_chosen"] == ["2", "3"]
    assert report["block_importance"]["1"] == 3.0

    # --resume mid-ramp-back: the restored list and the gates come back
    again = _hook(_net(), reach=9.0, ramp=4)
    again.load_state_dict(state)
    assert again.restored == ["1"] and again.chosen == ["2", "3"] and 0.0 < again.gates.gate("1") < 1.0
    _step(again, 2, 10)
    assert again.gates.gate("1") == 1.0


def test_sensitivity_when_measured_decides_which_block_returns() -> None:
    hook = _hook(_net(), reach=9.0, patience=1, ramp=4)
    _step(hook, 3)
    assert hook.observe(0.1, 0.5) is None  # mid-ramp: the dip is the ramp's
    _step(hook, 4, 3)
    hook.gates.set_sensitivity("2", 0.05)  # measured: removing "2" alone costs 5 points
    assert hook.observe(0.1, 0.5) == "2"
    assert hook.observe(0.1, 0.5) == "1"  # then by Taylor importance
    assert hook.observe(0.1, 0.5) == "3" and hook.observe(0.1, 0.5) is None  # nothing left to bring back


def test_report_rows_name_when_each_block_went_its_share_and_its_cost() -> None:
    from avprune.prune_job.report_blocks import block_rows, blocks_html

    pruning = {"block_events": [{"step": 10, "block": "a", "event": "fading"},
                                {"step": 30, "block": "a", "event": "removed"},
                                {"step": 10, "block": "b", "event": "fading"},
                                {"step": 20, "block": "b", "event": "restoring"}],
               "block_importance": {"a": 0.1, "b": 0.7}, "blocks_restored": ["b"]}
    rows = block_rows(["a"], pruning, {"a": 0.5, "b": 0.25}, 5.0, {"a": 0.3, "b": 1.2})
    assert [(r["block"], r["status"]) for r in rows] == [("a", "removed"), ("b", "ramped back")]
    a, b = rows
    assert a["share"] == pytest.approx(0.1) and a["fading_step"] == 10 and a["removed_step"] == 30
    assert a["map_cost_points"] == 0.3 and a["importance"] == 0.1 and a["restoring_step"] is None
    assert b["restoring_step"] == 20 and b["removed_step"] is None
    page = blocks_html({"removed_blocks": [a], "restored_blocks": [b], "block_events": pruning["block_events"]})
    assert "Removed blocks (1)" in page and "ramped back" in page and "restoring" in page
    assert blocks_html({}) == ""


def test_gates_freeze_with_the_masks_a_late_return_is_whole_by_then() -> None:
    # ramp 4, decided at step 2: the three blocks are gone at step 6; the freeze is at step 9
    hook = _hook(_net(), reach=9.0, patience=1, ramp=4)
    hook.freeze_after = 9
    step = _step(hook, 7)
    assert sorted(hook.gates.removed()) == ["1", "2", "3"]
    assert hook.observe(0.1, 0.5) == "1"  # 2 steps before the freeze: the ramp shortens to 2
    _step(hook, 2, step)
    assert hook.gates.gate("1") == 1.0  # whole at the freeze, not snapped there by settle()
    assert hook.observe(0.1, 0.5) is None  # frozen: nothing returns after step 9
    assert sorted(hook.gates.removed()) == ["2", "3"] and hook.restored == ["1"]
    with pytest.raises(ValueError, match="freeze_after"):
        BlockStep(hook.gates, {"1": 1.0}, budget_ms=1.0, reach_ms=lambda: 2.0, decide_step=1, ramp_steps=1,
                  freeze_after=-1)
