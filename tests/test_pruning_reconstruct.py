"""pruning.reconstruct: least-squares re-solve of the layers that read pruned channels."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from avprune.prune_job.reconstruct_step import ReconstructStep
from pruning import Pruner
from pruning.controllers import build_controller
from pruning.masks import add_mask
from pruning.reconstruct import pointwise_consumers, reconstruct


def _dup_net() -> nn.Sequential:
    """conv1 (3 -> 4) -> BN -> ReLU -> 1x1 conv2 (4 -> 5) -> BN, eval statistics set. Channel 3 of
    conv1 repeats channel 0 (same filter and BN), channel 2 is a constant 1 after its ReLU (zero
    filter, BN beta 1): both can be removed with no loss, if conv2 and its BN are re-solved."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 5, 1, bias=False), nn.BatchNorm2d(5))
    with torch.no_grad():
        net[0].weight[3] = net[0].weight[0]
        net[0].weight[2] = 0.0
        bn = net[1]
        bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.0, 0.1]))
        bn.running_var.copy_(torch.tensor([1.5, 0.7, 1.0, 1.5]))
        bn.weight.copy_(torch.tensor([1.2, 0.8, 0.0, 1.2]))
        bn.bias.copy_(torch.tensor([0.1, 0.3, 1.0, 0.1]))
        net[4].running_mean.normal_()
        net[4].running_var.uniform_(0.5, 2.0)
    return net.eval()


def _mask_channels(net: nn.Sequential, drop: list[int]) -> None:
    """Mask conv1's output channels ``drop`` (filter and BN gamma/beta) and conv2's inputs from them."""
    for mod in (net[0], net[1], net[3]):
        add_mask(mod, "weight")
    add_mask(net[1], "bias")
    with torch.no_grad():
        for c in drop:
            net[0].parametrizations.weight[0].mask[c] = 0
            net[1].parametrizations.weight[0].mask[c] = 0
            net[1].parametrizations.bias[0].mask[c] = 0
            net[3].parametrizations.weight[0].mask[:, c] = 0


def _batches(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 12, 12, generator=g) for _ in range(n)]


def test_removed_duplicate_and_constant_channels_are_recovered_exactly() -> None:
    teacher = _dup_net()
    student = copy.deepcopy(teacher)
    _mask_channels(student, [2, 3])
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        before = (student(x) - teacher(x)).abs().max().item()
    assert pointwise_consumers(student) == ["3"]
    fits = reconstruct(student, teacher, _batches(), ridge=1e-9)
    with torch.no_grad():
        after = (student(x) - teacher(x)).abs().max().item()
    assert before > 0.1  # the masked channels mattered
    assert after < 1e-4, after  # channel 3 folded into channel 0's weight, channel 2's constant into BN's mean
    (fit,) = fits
    assert (fit.layer, fit.kept_inputs, fit.inputs, fit.intercept) == ("3", 2, 4, "bn:4")
    assert fit.error_after < 1e-6 < fit.error_before
    # masked weights stay masked: the effective weight still reads nothing from channels 2 and 3
    assert torch.all(student[3].weight[:, 2:] == 0)


def test_without_a_following_batchnorm_the_constant_goes_to_the_bias() -> None:
    teacher = _dup_net()
    teacher[3] = nn.Conv2d(4, 5, 1, bias=True)  # now a conv with a bias feeds BN: the bias takes the intercept
    teacher = teacher.eval()
    student = copy.deepcopy(teacher)
    _mask_channels(student, [2])
    reconstruct(student, teacher, _batches(), ridge=1e-9)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert (student(x) - teacher(x)).abs().max().item() < 1e-4
        assert torch.equal(student[4].running_mean, teacher[4].running_mean)  # the bias took it, not the BN


def test_pruner_masks_then_reconstruct_then_finalize_matches_and_beats_plain() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    for bn in (net[1], net[4]):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 10, 10)

    def pruned(recon: bool) -> tuple[float, float]:
        model = copy.deepcopy(net)
        pruner = Pruner(model, example_inputs=x, controller=build_controller("fixed", sparsity=0.5),
                        channel_multiple=4, layer_filter=lambda n, m: n in ("0", "3"))
        pruner.update()
        if recon:
            reconstruct(model, net, _batches(4))
        with torch.no_grad():
            masked = model(x)
            small = pruner.finalize().eval()
            assert small[0].out_channels == 8
            gap = (small(x) - masked).abs().max().item()
            return (masked - net(x)).pow(2).mean().item(), gap

    plain, gap_plain = pruned(False)
    solved, gap_solved = pruned(True)
    assert gap_plain < 1e-5 and gap_solved < 1e-5  # the finalized model computes what the masked one did
    assert solved < 0.5 * plain, (plain, solved)


def test_bad_input_is_refused_with_the_fix() -> None:
    teacher = _dup_net()
    student = copy.deepcopy(teacher)
    _mask_channels(student, [3])
    with pytest.raises(ValueError, match="calibration batches"):
        reconstruct(student, teacher, [])
    with pytest.raises(ValueError, match="not a pointwise conv"):
        reconstruct(student, teacher, _batches(), layers=["0"])
    with pytest.raises(ValueError, match="positive ridge"):
        reconstruct(student, teacher, _batches(), ridge=0.0)
    other = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1)).eval()
    with pytest.raises(ValueError, match="masked \\(not finalized\\) student"):
        reconstruct(student, other, _batches())


class _Ctx:
    def __init__(self, step: int) -> None:
        self.step = step


def test_reconstruct_step_runs_once_when_the_cut_is_ready_and_not_again_after_resume() -> None:
    teacher = _dup_net()
    student = copy.deepcopy(teacher)
    _mask_channels(student, [2, 3])
    ready = {"now": False}
    hook = ReconstructStep(student, teacher, _batches, from_step=10, last_step=30, update_every=5,
                           ready=lambda: ready["now"])
    assert not hook.due(5) and not hook.due(10) and not hook.due(12)  # before the ramp's end; not ready
    ready["now"] = True
    assert not hook.due(12)  # not a mask-update step
    for step in range(0, 15):  # ctx.step is 0-based: step 14 completes the 15th optimizer step
        hook(_Ctx(step))
    assert hook.done_step == 10 and hook.summary["layers"] == 1
    assert hook.summary["mean_error_after"] < hook.summary["mean_error_before"]
    resumed = ReconstructStep(student, teacher, _batches, from_step=10, last_step=30, update_every=5)
    resumed.load_state_dict(hook.state_dict())
    assert not resumed.due(15) and not resumed.due(30)
    late = ReconstructStep(student, teacher, _batches, from_step=10, last_step=30, update_every=5, ready=lambda: False)
    assert not late.due(25) and late.due(30)  # the last update solves whatever the allocation reached
