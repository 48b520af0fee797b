"""The baselines of ``benchmarks/compare.py``: dense, Torch-Pruning one-shot, network slimming, unstructured L1.

- ``dense``: no pruning, trained for the same steps (an under-trained dense model flatters pruning).
- ``tp_magnitude``: Torch-Pruning one-shot global L2 channel pruning (``MetaPruner`` +
  ``MagnitudeImportance``) to the latency target, then fine-tuning.
- ``tp_aligned``: Torch-Pruning one-shot L2, the same ratio in every layer (``global_pruning=False``)
  with counts rounded to the comparison's channel multiple (what avprune's aligned rows use), to the
  latency target, then the same fine-tune (issue #12's fair baseline).
- ``tp_aligned_distill``: ``tp_aligned`` fine-tuned with distillation from the dense checkpoint, as
  ``avprune_latency`` is: what is left of the gap is the allocation's.
- ``tp_iterative``: the same pruner on Torch-Pruning's own iterative schedule (``iterative_steps``):
  one pruning step at the start of each of the first half's phases, each phase fine-tuned.
- ``slimming``: network slimming (Liu et al., ICCV 2017): L1 on BatchNorm gamma while training,
  one global gamma threshold to the target, then a short fine-tune in the same step budget.
- ``unstructured_l1``: ``torch.nn.utils.prune.global_unstructured`` (L1) at the best channel
  method's parameter sparsity (magnitude pruning as in Han et al., NeurIPS 2015). The tensors stay
  dense, so dense CPU kernels get no faster: the row shows it.

Every method prunes the same layers: all convs but the detector head's class/box output convs.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks.compare_methods import (
    MethodContext,
    MethodOutput,
    MethodSpec,
    dense_scaled_ms,
    finetune,
    fold_start_model,
    load_base,
    plain_copy,
    start_point,
)

log = logging.getLogger(__name__)

def head_output_convs(detector: nn.Module) -> list[nn.Module]:
    """The convs whose outputs are class scores or box offsets: their widths are fixed by the task."""
    if not (hasattr(detector, "backbone") and hasattr(detector, "head")):
        raise ValueError(
            f"{type(detector).__name__}: the comparison prunes one-stage detectors (backbone + head: "
            "SSD, RetinaNet, FCOS); use ssdlite320_mobilenet_v3_large"
        )
    outs: list[nn.Module] = []
    for sub in detector.head.children():  # classification_head, regression_head
        for block in getattr(sub, "module_list", [sub]):
            convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
            if convs:
                outs.append(convs[-1])
    if not outs:
        raise ValueError(f"{type(detector).__name__}: found no head output convs to protect")
    return outs


def prunable_convs(detector: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """Convs a pruning method may touch: all but the head's output convs (same set for every method)."""
    protected = {id(m) for m in head_output_convs(detector)}
    return [(n, m) for n, m in detector.named_modules() if isinstance(m, nn.Conv2d) and id(m) not in protected]


def tp_channel_prune(
    detector: nn.Module, ratio: float, example_inputs: torch.Tensor, importance: Any = None, *, global_pruning: bool = True,
    round_to: int = 8,
) -> nn.Module:
    """Channel pruning of ``detector`` in place with Torch-Pruning (MetaPruner), one shot: global
    ranking by default, or ``ratio`` of every group with ``global_pruning=False``.

    ``round_to=8`` by default because odd channel counts slow dense kernels down (FIELD_NOTES);
    the aligned baselines pass the comparison's channel multiple.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
    if ratio == 0.0:
        return detector
    was_training = detector.training
    detector.eval()
    pruner = tp_pruner(detector, ratio, example_inputs, importance, global_pruning=global_pruning, round_to=round_to)
    pruner.step()
    detector.train(was_training)
    return detector


def tp_pruner(
    detector: nn.Module, ratio: float, example_inputs: torch.Tensor, importance: Any = None, *, global_pruning: bool,
    round_to: int, iterative_steps: int = 1,
) -> Any:
    """Torch-Pruning's MetaPruner over the detector's core (backbone + head), the head's output convs
    kept whole; ``iterative_steps`` > 1 reaches ``ratio`` over that many ``step()`` calls."""
    import torch_pruning as tp

    from pruning.filters import DetectorCore

    return tp.pruner.MetaPruner(
        DetectorCore(detector),
        example_inputs,
        importance=importance if importance is not None else tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio,
        global_pruning=global_pruning,
        ignored_layers=head_output_convs(detector),
        round_to=round_to,
        iterative_steps=iterative_steps,
    )


MAX_RATIO = 0.8  # beyond this a one-shot detector backbone is destroyed rather than pruned


def bisect_ratio(
    prune_copy: Callable[[float], nn.Module],
    measure_ms: Callable[[nn.Module], float],
    target_ms: float,
    *,
    lo: float = 0.0,
    hi: float = MAX_RATIO,
    iters: int = 6,
) -> tuple[float, float]:
    """Smallest global ratio whose measured latency is at or under ``target_ms`` (bisection).

    Latency falls monotonically with the ratio up to measurement noise and rounding to 8, so a
    few bisection steps suffice; each costs one prune (≈0.3 s) and one short measurement.
    Returns (ratio, its measured latency); ``hi`` when even ``hi`` misses the target.
    """
    best = (hi, measure_ms(prune_copy(hi)))
    if best[1] > target_ms:
        log.warning("ratio %.2f still measures %.2f ms > target %.2f ms", hi, best[1], target_ms)
        return best
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        ms = measure_ms(prune_copy(mid))
        if ms <= target_ms:
            hi, best = mid, (mid, ms)
        else:
            lo = mid
    return best




def run_dense(ctx: MethodContext) -> MethodOutput:
    """The unpruned detector trained for the same number of steps as every pruning method."""
    model = load_base(ctx)
    traj = start_point(ctx, lambda: plain_copy(model))
    traj += finetune(model, ctx, steps=ctx.steps, snapshot=lambda: plain_copy(model))
    return MethodOutput(model.eval(), traj)


def run_tp_magnitude(ctx: MethodContext) -> MethodOutput:
    """Torch-Pruning one-shot global magnitude (L2) channel pruning to the latency target, then fine-tune.

    The ratio comes from the setup's bisection on measured latency (same for every seed, since
    magnitude ranks of the shared checkpoint do not depend on the seed).
    """
    model = load_base(ctx)
    tp_channel_prune(model, ctx.channel_ratio, ctx.example_inputs)
    traj = start_point(ctx, lambda: plain_copy(model))
    traj += finetune(model, ctx, steps=ctx.steps, snapshot=lambda: plain_copy(model))
    return MethodOutput(model.eval(), traj, {"ratio": ctx.channel_ratio})


def run_tp_aligned(ctx: MethodContext, *, distill: bool = False, fold: bool = False) -> MethodOutput:
    """Torch-Pruning one-shot L2, one ratio per layer, counts multiples of ``ctx.channel_multiple``, to
    the latency target (the setup's bisection), then the same fine-tune as every method; with
    ``distill``, the dense checkpoint teaches it as it teaches ``avprune_latency`` (the lever isolated).
    With ``fold``, avprune's gate fold comes first and the ratio is bisected again on the folded model
    to the same measured latency (``avprune_latency_fold``'s other lever isolated)."""
    model = load_base(ctx)
    ratio, extra = ctx.aligned_ratio, {}
    if fold:
        dense = load_base(ctx).eval()
        gates, folded_ms = fold_start_model(ctx, model, dense)

        def pruned_copy(r: float) -> nn.Module:
            m = copy.deepcopy(model)
            tp_channel_prune(m, r, ctx.example_inputs, global_pruning=False, round_to=ctx.channel_multiple)
            return m

        ratio, ms = bisect_ratio(pruned_copy, lambda m: dense_scaled_ms(ctx, m, dense), ctx.aligned_ms,
                                 iters=ctx.bisect_iters)
        extra = {"folded_gates": gates, "folded_ms": folded_ms, "bisected_ms": ms}
    tp_channel_prune(model, ratio, ctx.example_inputs, global_pruning=False, round_to=ctx.channel_multiple)
    traj = start_point(ctx, lambda: plain_copy(model))
    trained: nn.Module = model
    if distill:
        from perception.distill import DistilledDetector

        trained = DistilledDetector(model, load_base(ctx).eval())
    traj += finetune(trained, ctx, steps=ctx.steps, snapshot=lambda: plain_copy(model))
    return MethodOutput(model.eval(), traj, {**extra, "ratio": ratio, "round_to": ctx.channel_multiple,
                                             "distill": distill})


def run_tp_aligned_distill(ctx: MethodContext) -> MethodOutput:
    return run_tp_aligned(ctx, distill=True)


TP_ITERATIVE_STEPS = 4  # pruning steps, spread over the first half of the fine-tune (then recovery)


def run_tp_iterative(ctx: MethodContext) -> MethodOutput:
    """Torch-Pruning's iterative schedule to the aligned ratio: ``TP_ITERATIVE_STEPS`` pruning steps
    (its linear schedule), one at the start of each phase of the first half, then the rest of the steps.

    Physical pruning changes parameter shapes, so every phase fine-tunes with a fresh optimizer
    (warm-up and decay per phase): what a Torch-Pruning user's loop does.
    """
    import torch_pruning as tp

    model = load_base(ctx)
    pruner = tp_pruner(model, ctx.aligned_ratio, ctx.example_inputs, tp.importance.MagnitudeImportance(p=2),
                       global_pruning=False, round_to=ctx.channel_multiple, iterative_steps=TP_ITERATIVE_STEPS)
    phase = max(1, ctx.steps // (2 * TP_ITERATIVE_STEPS))
    traj: list[Any] = []
    done = 0
    for k in range(TP_ITERATIVE_STEPS):
        model.eval()
        pruner.step()
        steps = phase if k < TP_ITERATIVE_STEPS - 1 else ctx.steps - done
        traj += finetune(model, ctx, steps=steps, snapshot=lambda: plain_copy(model), step_offset=done)
        done += steps
    return MethodOutput(model.eval(), traj, {"ratio": ctx.aligned_ratio, "round_to": ctx.channel_multiple,
                                             "iterative_steps": TP_ITERATIVE_STEPS, "phase_steps": phase})


# Network slimming (Liu et al., "Learning Efficient Convolutional Networks through Network
# Slimming", ICCV 2017): sparsify BatchNorm scales gamma with an L1 penalty while training, prune
# the channels whose |gamma| falls under one global threshold, fine-tune the thinner network.
SLIM_PENALTY_FRACTION = 0.6  # share of the step budget spent training with the penalty
SLIM_LAMBDA = 0.5  # L1 strength relative to the learning rate (see slimming_hook)


def slimming_hook(model: nn.Module, lam: float, skip: set[int]) -> Callable[[Any], None]:
    """Proximal L1 step on every prunable BatchNorm gamma after each optimizer step.

    Liu et al. add lam*sign(gamma) to the gradient under SGD. Our training hooks run after the
    step, so we apply the same penalty as its proximal operator (soft-thresholding,
    gamma <- sign(gamma) * max(|gamma| - lr*lam, 0)), which is the exact minimiser of the L1 term
    for one step and drives unimportant gammas to exactly zero. With Adam-type optimizers a data
    gradient moves a weight by about lr per step, so lam is expressed relative to lr: lam = 0.5
    lets the penalty win only where the loss barely pulls back.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and id(m) not in skip]

    def hook(sc: Any) -> None:
        shrink = sc.lr * lam
        with torch.no_grad():
            for bn in bns:
                g = bn.weight
                g.copy_(torch.sign(g) * torch.clamp(g.abs() - shrink, min=0.0))

    return hook


def run_slimming(ctx: MethodContext) -> MethodOutput:
    """Network slimming: L1-on-gamma fine-tune, global gamma threshold to the latency target, fine-tune.

    The threshold is the global ratio of Torch-Pruning's BNScaleImportance (a global percentile of
    |gamma| over coupled channel groups) bisected on measured latency, so it lands on the target.
    """
    import torch_pruning as tp

    model = load_base(ctx)
    penalty_steps = int(round(SLIM_PENALTY_FRACTION * ctx.steps))
    traj = start_point(ctx, lambda: plain_copy(model))
    hook = slimming_hook(model, SLIM_LAMBDA, skip=set())
    traj += finetune(model, ctx, steps=penalty_steps, snapshot=lambda: plain_copy(model), hooks=(hook,))

    def pruned_copy(r: float) -> nn.Module:
        return tp_channel_prune(plain_copy(model), r, ctx.example_inputs, tp.importance.BNScaleImportance())

    ratio, _ = bisect_ratio(pruned_copy, ctx.measure_ms, ctx.latency_target_ms, iters=ctx.bisect_iters)
    zeroed = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    tp_channel_prune(model, ratio, ctx.example_inputs, tp.importance.BNScaleImportance())
    traj += start_point(ctx, lambda: plain_copy(model), penalty_steps)
    traj += finetune(
        model, ctx, steps=ctx.steps - penalty_steps, snapshot=lambda: plain_copy(model), step_offset=penalty_steps
    )
    return MethodOutput(model.eval(), traj, {"ratio": ratio, "gammas_zeroed_by_l1": zeroed})


def run_unstructured(ctx: MethodContext) -> MethodOutput:
    """Global L1 unstructured pruning (``torch.nn.utils.prune``) at the best channel method's sparsity.

    The masks stay applied (forward pre-hooks) during the fine-tune and are made permanent at the
    end. The tensors stay dense, so on dense CPU kernels latency should not move: the row shows it.
    """
    from torch.nn.utils import prune

    if ctx.param_sparsity is None:
        raise ValueError("unstructured_l1 needs param_sparsity (run a channel method first)")
    model = load_base(ctx)
    convs = [m for _, m in prunable_convs(model)]
    total = sum(p.numel() for p in model.parameters())
    prunable = sum(m.weight.numel() for m in convs)
    # Same share of the model's parameters removed as the channel method removed.
    amount = min(ctx.param_sparsity * total / prunable, 0.99)
    prune.global_unstructured([(m, "weight") for m in convs], pruning_method=prune.L1Unstructured, amount=amount)

    def snapshot() -> nn.Module:
        # torch.nn.utils.prune keeps ``weight`` as a computed (non-leaf) tensor, which deepcopy
        # refuses: rebuild a plain model from weight_orig * weight_mask instead.
        state = {}
        for k, v in model.state_dict().items():
            if k.endswith("weight_orig"):
                state[k[: -len("_orig")]] = v * model.state_dict()[k[: -len("_orig")] + "_mask"]
            elif not k.endswith("weight_mask"):
                state[k] = v
        snap = load_base(ctx)
        snap.load_state_dict(state)
        return snap.eval()

    traj = start_point(ctx, snapshot)
    traj += finetune(model, ctx, steps=ctx.steps, snapshot=snapshot)
    for m in convs:
        prune.remove(m, "weight")
    return MethodOutput(model.eval(), traj, {"param_sparsity": ctx.param_sparsity, "conv_weight_sparsity": amount})


#: The baselines, in run order (benchmarks.compare_registry names them).
METHODS = (
    MethodSpec("dense", run_dense, "dense", "dense, same steps"),
    # Issue #12: what a user would try instead of pruning. FIELD_NOTES: U8S8 runs 1.06-1.28x fp32 on
    # AVX-512 VNNI CPUs (S8S8, ORT's default, runs 2.5x slower there).
    MethodSpec("dense_int8", run_dense, "dense", "dense INT8 (ORT static QDQ, uint8 activations)",
               deploy="int8", reuses="dense"),
    MethodSpec("tp_magnitude", run_tp_magnitude, "channel", "Torch-Pruning one-shot L2"),
    MethodSpec("tp_aligned", run_tp_aligned, "channel", "Torch-Pruning one-shot L2, per layer, aligned"),
    MethodSpec("tp_iterative", run_tp_iterative, "channel", "Torch-Pruning iterative L2, per layer, aligned"),
    MethodSpec("tp_aligned_distill", run_tp_aligned_distill, "channel",
               "Torch-Pruning one-shot L2, per layer, aligned, distilled"),
    # not one of the fair references: Torch-Pruning has no gate fold; this row isolates what the fold
    # gives avprune_latency_fold
    MethodSpec("tp_aligned_distill_fold", functools.partial(run_tp_aligned, distill=True, fold=True), "channel",
               "Torch-Pruning one-shot L2, per layer, aligned, distilled, after avprune's gate fold"),
    MethodSpec("slimming", run_slimming, "channel", "network slimming"),
    MethodSpec("unstructured_l1", run_unstructured, "unstructured", "torch prune L1 unstructured", True),
)
