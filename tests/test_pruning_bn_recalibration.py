"""Adaptive BN: BatchNorm statistics re-estimated for the network as cut now (pruning.bn_recalibration)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pruning.bn_recalibration import recalibrate_batchnorm, tracked_batchnorms


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    # SSDlite's BatchNorm momentum: statistics follow a change only slowly
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=0.03), nn.ReLU(),
                         nn.Dropout(0.5), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4, momentum=0.03))


def _settle(net: nn.Sequential, batches: list[torch.Tensor], rounds: int = 200) -> None:
    """Train-mode passes until the running statistics match the network (as a trained model's do)."""
    net.train()
    with torch.no_grad():
        for _ in range(rounds):
            for b in batches:
                net(b)


def _batches(n: int = 4, size: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(size, 3, 8, 8, generator=g) for _ in range(n)]


def test_statistics_are_the_average_of_the_batches_statistics():
    net, batches = _net(), _batches()
    recalibrate_batchnorm(net, batches)
    feats = [net[0](b) for b in batches]
    bn = net[1]
    want_mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    want_var = torch.stack([f.transpose(0, 1).reshape(8, -1).var(dim=1, unbiased=True) for f in feats]).mean(0)
    assert torch.allclose(bn.running_mean, want_mean, atol=1e-5)
    assert torch.allclose(bn.running_var, want_var, rtol=1e-4)


def test_a_cut_read_through_stale_statistics_is_restored():
    """A channel cut (masked conv outputs) measured with the statistics of before it reads far off
    what the cut network computes; re-estimated, eval mode matches the cut network's own statistics."""
    net, batches = _net(), _batches()
    _settle(net, batches)
    with torch.no_grad():
        net[0].weight[::2] = 0  # cut half of the first conv's output channels
        net[0].bias[::2] = 0
    x = torch.cat(batches)
    net.eval()
    stale = net(x)
    net.train()
    with torch.no_grad():
        net[3].eval()  # the dropout off: batch statistics alone
        reference = net(x)  # BatchNorm over the very images, as the cut network computes them
    net.eval()
    recalibrate_batchnorm(net, batches)
    with torch.no_grad():
        fresh = net(x)
    stale_err = (stale - reference).abs().mean()
    fresh_err = (fresh - reference).abs().mean()
    assert fresh_err < 0.05 * stale_err, (float(fresh_err), float(stale_err))


def test_modes_momenta_and_weights_are_restored():
    net, batches = _net(), _batches()
    net.train()
    net[3].eval()  # a mixed-mode model comes back as it was
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    modes = [m.training for m in net.modules()]
    assert recalibrate_batchnorm(net, batches) == len(tracked_batchnorms(net)) == 2
    assert [m.training for m in net.modules()] == modes
    assert all(bn.momentum == 0.03 for bn in tracked_batchnorms(net))
    for k, v in net.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k


def test_dropout_is_off_while_it_runs():
    """Only the BatchNorms run in train mode: a dropout left on would scale the statistics."""
    net, batches = _net(), _batches()
    net.train()
    recalibrate_batchnorm(net, batches)
    a = net[5].running_mean.clone()
    net.train()
    recalibrate_batchnorm(net, batches)
    assert torch.equal(a, net[5].running_mean)  # deterministic: no dropout mask drawn


def test_a_failure_part_way_leaves_the_old_statistics():
    net, batches = _net(), _batches()
    _settle(net, batches, rounds=5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    calls = []

    def forward(model, batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("worker lost")
        return model(batch)

    with pytest.raises(RuntimeError, match="worker lost"):
        recalibrate_batchnorm(net, batches, forward)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(bn.momentum == 0.03 for bn in tracked_batchnorms(net))


def test_no_batches_is_refused_and_a_model_without_batchnorm_is_left_alone():
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_batchnorm(_net(), [])
    plain = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    assert recalibrate_batchnorm(plain, _batches(1)) == 0
