"""Pruner on small conv nets: every criterion x granularity, coupling, finalize, errors, resume."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from pruning import CRITERIA, GRANULARITIES, Pruner, build_controller
from pruning.filters import followed_by_batchnorm
from pruning.masks import stored
from tests.conftest import X, small_net


def make_pruner(model: nn.Module, importance: str, granularity: str, sparsity: float = 0.5, **kw) -> Pruner:
    """A pruner ready to update: taylor gets a backward pass, activation calibration data."""
    if importance == "bn_scale":
        kw.setdefault("layer_filter", followed_by_batchnorm(model, X))
    pruner = Pruner(model, importance=importance, granularity=granularity,
                    controller=build_controller("fixed", sparsity=sparsity), example_inputs=X, **kw)
    if importance == "activation":
        pruner.observe_activations([X])
    return pruner


def one_training_step(model: nn.Module, pruner: Pruner, opt: torch.optim.Optimizer | None = None) -> None:
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    opt.zero_grad()
    model.train()
    model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean().backward()
    opt.step()
    pruner.step()
    model.eval()


@pytest.mark.parametrize("granularity", GRANULARITIES.names())
@pytest.mark.parametrize("importance", CRITERIA.names())
def test_every_criterion_and_granularity_on_small_net(importance: str, granularity: str) -> None:
    model = small_net()
    pruner = make_pruner(model, importance, granularity)
    one_training_step(model, pruner)
    rec = pruner.history[-1]
    assert set(rec.layers) == set(pruner.units)
    for unit, lr in rec.layers.items():
        assert lr.target == 0.5
        assert lr.importance["min"] <= lr.importance["median"] <= lr.importance["max"], unit
        assert lr.sparsity == pytest.approx(0.5, abs=0.26), unit  # rounding to 8 channels / N:M quanta
    assert 0.2 < pruner.masked_fraction() < 0.8
    for (mod, tname), wm in pruner.masks.items():  # masked entries are zero in forward
        assert torch.all(getattr(pruner.modules[mod], tname)[wm.mask == 0] == 0)
    with torch.no_grad():
        assert torch.isfinite(model(X)).all()


def out_keep(mask: torch.Tensor) -> torch.Tensor:
    """Which output channels a weight mask keeps (any entry kept)."""
    return (mask.flatten(1).amax(1) > 0).float()


def test_channel_masks_cover_every_coupled_tensor() -> None:
    model = small_net()
    pruner = make_pruner(model, "magnitude", "channel")
    pruner.update()
    stem_keep = out_keep(pruner.mask_of("stem.0"))
    pruned = torch.nonzero(stem_keep == 0).flatten()
    assert len(pruned) == 16
    # Residual partner, both BNs, and every consumer's input slice drop the same channels.
    assert torch.equal(out_keep(pruner.mask_of("project.0")), stem_keep)
    for bn in ("stem.1", "project.1"):
        assert torch.all(pruner.mask_of(bn, "weight")[pruned] == 0) and torch.all(pruner.mask_of(bn, "bias")[pruned] == 0)
    assert torch.all(pruner.mask_of("expand.0")[:, pruned] == 0)
    assert torch.all(pruner.mask_of("tail.0")[:, pruned] == 0)
    # Depthwise conv and SE fc2 outputs follow the expand group.
    exp_keep = out_keep(pruner.mask_of("expand.0"))
    assert exp_keep.sum() == 32
    assert torch.equal(out_keep(pruner.mask_of("dw.0")), exp_keep)
    assert torch.equal(out_keep(pruner.mask_of("se.fc2")), exp_keep)
    assert torch.equal(out_keep(pruner.mask_of("se.fc1").transpose(0, 1)), exp_keep)
    assert torch.equal(out_keep(pruner.mask_of("project.0").transpose(0, 1)), exp_keep)
    # The classifier's outputs are the model's outputs: never a channel unit.
    assert "fc" not in pruner.units and "fc" in pruner.skipped


@pytest.mark.parametrize("round_to", [8, 16])
def test_channel_finalize_equals_masked_model(round_to: int) -> None:
    model = small_net()
    pruner = make_pruner(model, "magnitude", "channel", sparsity=0.6, round_to=round_to)
    one_training_step(model, pruner)
    with torch.no_grad():
        y_masked = model(X)
    n_before = sum(p.numel() for p in model.parameters())
    config = pruner.channel_config()
    pruned_in_groups = sum(int((v == 0).sum()) for (_, t, d), v in pruner.channel_keep_vectors.items() if (t, d) == ("weight", 0))
    assert not pruner.finalized and pruned_in_groups > 0
    plain = pruner.finalize()
    assert pruner.finalized and not any(parametrize.is_parametrized(m) for m in plain.modules())
    with pytest.raises(ValueError, match="already finalized"):
        pruner.finalize()
    with pytest.raises(ValueError, match="finalized"):
        pruner.step()
    with torch.no_grad():
        y_final = plain(X)
    torch.testing.assert_close(y_final, y_masked, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in plain.parameters()) < n_before
    for name, mod in plain.named_modules():
        if isinstance(mod, nn.Conv2d):
            assert mod.out_channels == config[name]
            assert mod.out_channels % round_to == 0, (name, mod.out_channels)
    assert plain.fc.out_features == 10
    # The result is an ordinary model: it trains and round-trips through a state_dict.
    plain.train()
    plain(X).sum().backward()
    twin = copy.deepcopy(plain)
    twin.load_state_dict(plain.state_dict())


def test_sparsity_zero_keeps_everything_and_finalize_is_identity() -> None:
    model = small_net()
    ref = copy.deepcopy(model)
    pruner = make_pruner(model, "magnitude", "channel", sparsity=0.0)
    pruner.step()
    assert pruner.masked_fraction() == 0.0
    plain = pruner.finalize()
    with torch.no_grad():
        torch.testing.assert_close(plain(X), ref(X))


def test_invalid_arguments_name_value_and_valid_range() -> None:
    model = small_net()
    fixed = build_controller("fixed", sparsity=0.5)
    with pytest.raises(ValueError, match="unknown importance criterion 'l3'; valid names: magnitude, taylor"):
        Pruner(model, importance="l3", controller=fixed, example_inputs=X)
    with pytest.raises(ValueError, match="unknown granularity 'block'; valid names: unstructured, channel, nm"):
        Pruner(model, granularity="block", controller=fixed, example_inputs=X)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\); got 1.0"):
        build_controller("fixed", sparsity=1.0)
    with pytest.raises(ValueError, match="N=5, M=4"):
        Pruner(model, granularity="nm", nm=(5, 4), controller=fixed)
    with pytest.raises(ValueError, match="layer_filter selected no Conv/Linear layer"):
        Pruner(model, controller=fixed, example_inputs=X, layer_filter=lambda n, m: n.startswith("nope"))
    with pytest.raises(ValueError, match="bn_scale importance needs a BatchNorm right after .*se.fc1"):
        Pruner(small_net(), importance="bn_scale", granularity="unstructured", controller=fixed, example_inputs=X)
    p = Pruner(small_net(), importance="activation", granularity="channel", controller=fixed, example_inputs=X)
    with pytest.raises(ValueError, match="observe_activations"):
        p.update()
    with pytest.raises(ValueError, match="no calibration batches"):
        p.observe_activations([])
    with pytest.raises(ValueError, match="needs example_inputs"):
        Pruner(small_net(), granularity="channel", controller=fixed)
    with pytest.raises(ValueError, match="update_every must be an int >= 1; got 0"):
        Pruner(small_net(), granularity="unstructured", controller=fixed, update_every=0)
    with pytest.raises(TypeError, match="controller must be"):
        Pruner(small_net(), granularity="unstructured", controller="cubic")


@pytest.mark.parametrize("granularity", ["channel", "unstructured"])
def test_state_dict_round_trip_resumes_identically(granularity: str) -> None:
    def setup() -> tuple[nn.Module, Pruner, torch.optim.Optimizer]:
        model = small_net()
        pruner = Pruner(model, importance="taylor", granularity=granularity, example_inputs=X, update_every=2,
                        controller=build_controller("cubic", final_sparsity=0.6, end_step=8))
        return model, pruner, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def steps(model: nn.Module, pruner: Pruner, opt: torch.optim.Optimizer, seeds: range) -> None:
        for s in seeds:
            torch.manual_seed(s)
            one_training_step(model, pruner, opt)

    model, pruner, opt = setup()
    steps(model, pruner, opt, range(3))
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), pruner.state_dict()))
    steps(model, pruner, opt, range(3, 7))

    model2, pruner2, opt2 = setup()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    pruner2.load_state_dict(saved[2])
    steps(model2, pruner2, opt2, range(3, 7))
    assert pruner2.step_count == pruner.step_count == 7
    assert [r.to_dict() for r in pruner2.history] == [r.to_dict() for r in pruner.history]
    for (k, v), (k2, v2) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k


def test_hook_protocol_update_every_and_channel_config() -> None:
    model = small_net()
    pruner = Pruner(model, granularity="channel", example_inputs=X, update_every=3,
                    controller=build_controller("cubic", final_sparsity=0.5, end_step=9),
                    predict_latency=lambda cfg: float(sum(cfg.values())))
    for step in range(1, 10):
        pruner(SimpleNamespace(step=step, model=model))
    assert [r.step for r in pruner.history] == [3, 6, 9]
    lats = [r.predicted_latency_ms for r in pruner.history]
    assert lats[0] > lats[-1]  # fewer channels predicted faster
    unit = next(g.root for g in pruner.groups if "expand.0" in g.out_layers)
    spars = [r.layers[unit].sparsity for r in pruner.history]
    assert spars == sorted(spars) and spars[-1] == 0.5
    cfg = pruner.channel_config()
    assert cfg["expand.0"] == 32 and cfg["fc"] == 10
    assert pruner.layer_channels()["tail.0"][0] == cfg["stem.0"]


def test_pruned_channel_regrows_when_importance_rises() -> None:
    model = small_net()
    pruner = make_pruner(model, "magnitude", "unstructured")
    pruner.update()
    mask = pruner.mask_of("tail.0")
    idx = tuple(torch.nonzero(mask == 0)[0].tolist())
    with torch.no_grad():
        stored(model.tail[0])[idx] = 100.0
    pruner.update()
    assert pruner.mask_of("tail.0")[idx] == 1


def test_activation_apoz_mode_scores_fraction_of_positive_activations() -> None:
    model = small_net()
    pruner = Pruner(model, importance="activation", granularity="channel", example_inputs=X,
                    importance_kwargs={"mode": "apoz"}, controller=build_controller("fixed", sparsity=0.5))
    assert pruner.observe_activations([X, torch.randn(2, 3, 32, 32)]) == 2
    stats = pruner.criterion.out_stats["expand.0"]  # measured after expand's BatchNorm
    assert stats.shape == (64,) and torch.all((stats >= 0) & (stats <= 1))
    pruner.update()
    assert pruner.masked_fraction() > 0.2
    with pytest.raises(ValueError, match="activation mode must be 'mean' or 'apoz'"):
        Pruner(small_net(), importance="activation", granularity="unstructured",
               importance_kwargs={"mode": "max"}, controller=build_controller("fixed", sparsity=0.5))


def test_regrown_channel_gets_back_its_batchnorm_running_statistics() -> None:
    """While masked, a channel's BN running stats decay toward its zero input; on regrowth the
    stats it had when masked come back (else eval would divide it by ~sqrt(eps))."""
    model = small_net()
    ctrl = build_controller("fixed", sparsity=0.5)
    pruner = Pruner(model, importance="magnitude", granularity="channel", example_inputs=X, controller=ctrl)
    pruner.update()
    bn_member = next(m for g in pruner.groups for m in g.members if m.role == "bn")
    bn = pruner.modules[bn_member.module]
    masked = bn_member.idxs[pruner.mask_of(bn_member.module)[bn_member.idxs] == 0]
    assert len(masked) > 0
    before = (bn.running_mean[masked].clone(), bn.running_var[masked].clone())
    model.train()
    with torch.no_grad():
        for _ in range(30):  # training-mode forwards: masked channels' stats decay toward 0
            model(torch.randn(4, 3, 32, 32))
    assert torch.all(bn.running_var[masked] < 0.1 * before[1])
    pruner.controller = build_controller("fixed", sparsity=0.0)
    pruner.controller.bind(pruner.units, pruner.config_at)
    pruner.update()  # everything regrows
    assert torch.all(pruner.mask_of(bn_member.module) == 1)
    assert torch.equal(bn.running_mean[masked], before[0]) and torch.equal(bn.running_var[masked], before[1])
    restored = Pruner(small_net(), importance="magnitude", granularity="channel", example_inputs=X,
                      controller=build_controller("fixed", sparsity=0.5))
    restored.load_state_dict(pruner.state_dict())
    assert set(restored.bn_stats.saved) == set(pruner.bn_stats.saved)


def test_freeze_after_stops_mask_updates_but_not_the_controller() -> None:
    ctrl = build_controller("cubic", final_sparsity=0.6, end_step=20)
    pruner = Pruner(small_net(), importance="magnitude", granularity="channel", example_inputs=X,
                    controller=ctrl, update_every=2, freeze_after=6)
    for _ in range(6):
        pruner.step()
    frozen = {k: wm.mask.clone() for k, wm in pruner.masks.items()}
    updates = len(pruner.history)
    for _ in range(14):
        pruner.step()
    assert ctrl.last_step == 20 and len(pruner.history) == updates == 3
    assert all(torch.equal(frozen[k], wm.mask) for k, wm in pruner.masks.items())
    assert pruner.masked_fraction() < 0.6 * 0.9  # the schedule went on; the masks stayed at step 6's
    with pytest.raises(ValueError, match="freeze_after"):
        Pruner(small_net(), example_inputs=X, controller=ctrl, freeze_after=-1)


def _boost_pruned_out_channel(model: nn.Module, pruner: Pruner, layer: str) -> int:
    """Make one pruned output channel of ``layer`` the group's strongest by magnitude; its index."""
    idx = int(torch.nonzero(out_keep(pruner.mask_of(layer)) == 0)[0])
    with torch.no_grad():
        stored(pruner.modules[layer])[idx] *= 100.0
    return idx


@pytest.mark.parametrize("stable", [False, True])
def test_stable_masks_move_only_with_the_kept_count_and_updates_count_swaps(stable: bool) -> None:
    """By default an update re-ranks every channel: a pruned channel that now outscores the kept ones
    swaps in (and the update records the swaps). With stable_masks it waits for the count to grow, then comes back
    first; a cut drops the weakest kept channels."""
    model = small_net()
    ctrl = build_controller("fixed", sparsity=0.5)
    pruner = Pruner(model, importance="magnitude", granularity="channel", example_inputs=X, controller=ctrl,
                    stable_masks=stable)
    first = pruner.update()
    assert all(lr.swapped == 0 for lr in first.layers.values())  # from all-kept: a cut, not a swap
    layer = "expand.0"  # one of the outputs of the group rooted at se.fc2
    unit = next(g.root for g in pruner.groups if any(m.module == layer and m.role == "out" for m in g.members))
    kept_before = out_keep(pruner.mask_of(layer)).clone()
    idx = _boost_pruned_out_channel(model, pruner, layer)
    rec = pruner.update()
    kept_now = out_keep(pruner.mask_of(layer))
    assert int(kept_now.sum()) == int(kept_before.sum())  # the count did not move
    if stable:
        assert torch.equal(kept_now, kept_before) and rec.layers[unit].swapped == 0
    else:
        # the boost also moved the member's mean, so other ranks may flip too: every flip is a swap
        assert kept_now[idx] == 1 and rec.layers[unit].swapped >= 1
        assert int((kept_now != kept_before).sum()) == 2 * rec.layers[unit].swapped
    if stable:  # growth revives the strongest pruned channel first
        pruner.controller = build_controller("fixed", sparsity=0.25)
        pruner.controller.bind(pruner.units, pruner.config_at)
        grown = pruner.update()
        kept_grown = out_keep(pruner.mask_of(layer))
        assert kept_grown[idx] == 1 and torch.all(kept_grown[kept_before == 1] == 1)
        assert grown.layers[unit].swapped == 0
        # a cut drops the weakest kept channels and never revives a pruned one
        pruner.controller = build_controller("fixed", sparsity=0.5)
        pruner.controller.bind(pruner.units, pruner.config_at)
        pruner.update()
        kept_cut = out_keep(pruner.mask_of(layer))
        assert kept_cut[idx] == 1 and torch.all(kept_cut <= kept_grown)
    with pytest.raises(TypeError, match="stable_masks must be a bool"):
        Pruner(small_net(), example_inputs=X, controller=ctrl, stable_masks="yes")
