"""Mask semantics: per-weight masks, zeros in every forward, regrowth, optimizer state cannot resurrect."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pruning import Pruner, build_controller
from pruning.masks import WeightMask, add_mask, get_mask, iter_masks, remove_masks, stored


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def test_seed_semantics_per_weight_masks_zero_in_forward_and_regrow() -> None:
    """What the seed's sample meant: each weight under its layer's threshold is zero in forward
    (not whole tensors zeroed by their mean), and a weight whose importance rises comes back."""
    model = _mlp()
    pruner = Pruner(model, importance="magnitude", granularity="unstructured",
                    controller=build_controller("fixed", sparsity=0.5))
    pruner.step()
    layer = model[0]
    w_stored = stored(layer).detach().clone()
    mask = pruner.mask_of("0")
    # Per-weight: about half of the weights of *every* layer masked, not whole tensors.
    for name, s in pruner.layer_sparsity().items():
        assert s == pytest.approx(0.5, abs=1 / 64), name
    assert 0 < int(mask.sum()) < mask.numel()
    # Masked exactly where |w| is at or below the recorded threshold on normalised importance.
    norm = w_stored.abs() / w_stored.abs().mean()
    thr = pruner.history[-1].layers["0"].threshold
    assert torch.equal(mask == 0, norm <= thr)
    # Zero in forward: the effective weight and the layer's output ignore masked weights.
    assert torch.all(layer.weight[mask == 0] == 0)
    x = torch.randn(5, 16)
    assert torch.allclose(layer(x), x @ (w_stored * mask).T + layer.bias)
    # Regrowth: make one pruned weight the largest in the layer; the next update unmasks it.
    idx = tuple(torch.nonzero(mask == 0)[0].tolist())
    with torch.no_grad():
        stored(layer)[idx] = 10 * w_stored.abs().max()
    pruner.step()
    assert pruner.mask_of("0")[idx] == 1
    assert float(layer.weight[idx].detach()) == pytest.approx(float(10 * w_stored.abs().max()))


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adamw"])
def test_optimizer_momentum_and_weight_decay_cannot_resurrect(opt_name: str) -> None:
    model = _mlp()
    pruner = Pruner(model, importance="magnitude", granularity="unstructured",
                    controller=build_controller("fixed", sparsity=0.6), update_every=1000)
    pruner.update()  # masks fixed from here on: only the optimizer moves weights
    if opt_name == "sgd_momentum":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=1e-2)
    masks = {n: pruner.mask_of(n).clone() for n in ("0", "2")}
    before = stored(model[0]).detach().clone()
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
        pruner.step()
    for n, m in masks.items():
        layer = model.get_submodule(n)
        assert torch.equal(pruner.mask_of(n), m)  # mask intact
        assert torch.all(layer.weight[m == 0] == 0)  # forward still sees zeros
    # Straight-through: stored values of masked weights did move (DNS: they keep learning).
    moved = (stored(model[0]).detach() - before)[masks["0"] == 0]
    assert moved.abs().max() > 0


def test_straight_through_gradient_reaches_masked_weights_and_can_be_disabled() -> None:
    for ste in (True, False):
        lin = nn.Linear(4, 3)
        wm = add_mask(lin, "weight", straight_through=ste)
        wm.mask[0].zero_()
        lin(torch.randn(2, 4)).sum().backward()
        g = stored(lin).grad
        assert bool(g[0].abs().sum() > 0) is ste
        assert torch.all(lin.weight[0] == 0)


def test_add_mask_keeps_parameter_identity_and_remove_bakes_mask() -> None:
    lin = nn.Linear(4, 3)
    p = lin.weight
    wm = add_mask(lin)
    assert isinstance(wm, WeightMask) and get_mask(lin) is wm and add_mask(lin) is wm
    assert stored(lin) is p  # an optimizer built before masking still updates the right tensor
    wm.mask[1].zero_()
    assert [n for n, _, _ in iter_masks(nn.Sequential(lin))] == ["0"]
    remove_masks(lin)
    assert type(lin) is nn.Linear and get_mask(lin) is None
    assert torch.all(lin.weight[1] == 0) and isinstance(lin.weight, nn.Parameter)


def test_finalizing_a_deep_copy_leaves_the_original_masked_model_intact() -> None:
    import copy

    model = _mlp()
    pruner = Pruner(model, granularity="unstructured", controller=build_controller("fixed", sparsity=0.5))
    pruner.step()
    twin = copy.deepcopy(model)
    remove_masks(twin)
    assert type(twin[0]) is nn.Linear
    x = torch.randn(3, 16)
    torch.testing.assert_close(model(x), twin(x))  # the original still has its masked weight
    assert get_mask(model[0]) is not None and torch.all(model[0].weight[pruner.mask_of("0") == 0] == 0)


def test_stable_channel_mask_changes_the_previous_mask_by_the_count_alone() -> None:
    from pruning.granularity import channel_mask_kept, stable_channel_mask, swapped_channels

    scores = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 6.0])
    previous = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])  # kept 0, 1, 3; the strongest (5) pruned
    same = stable_channel_mask(scores, 3, previous)
    assert torch.equal(same.mask, previous)
    ranked = channel_mask_kept(scores, 3)
    assert ranked.mask.tolist() == [1, 0, 1, 0, 0, 1] and swapped_channels(previous, ranked.mask) == 2
    assert same.threshold == pytest.approx(ranked.threshold) and same.sparsity == pytest.approx(0.5)
    grown = stable_channel_mask(scores, 5, previous)  # revives the best pruned: 5 (6.0), then 2 (4.0)
    assert grown.mask.tolist() == [1, 1, 1, 1, 0, 1] and swapped_channels(previous, grown.mask) == 0
    cut = stable_channel_mask(scores, 1, previous)  # drops the weakest kept: 1 (1.0), then 3 (2.0)
    assert cut.mask.tolist() == [1, 0, 0, 0, 0, 0] and swapped_channels(previous, cut.mask) == 0
    with pytest.raises(ValueError, match="kept channels must be in"):
        stable_channel_mask(scores, 0, previous)
    with pytest.raises(ValueError, match="previous keep vector has 3 entries"):
        stable_channel_mask(scores, 2, previous[:3])
