"""The pruning methods compared by ``benchmarks/compare.py``, one function each, registered by name.

Every method receives the same :class:`MethodContext`: the same starting checkpoint, the same
number of fine-tuning steps, the same latency target (ONNX Runtime, CPU) and a seed. It returns a
plain, physically pruned torchvision detector plus its trajectory in the mAP-latency plane.
Methods never measure their own final row: ``compare.py`` measures every final model side by side
in one pass, so a method cannot flatter itself with a lucky latency sample.

Methods (papers cited where they are implemented):
- ``dense``: no pruning, trained for the same steps (an under-trained dense model flatters pruning).
- ``tp_magnitude``: Torch-Pruning one-shot global L2 channel pruning, then fine-tuning.
- ``slimming``: network slimming (Liu et al., ICCV 2017), L1 on BatchNorm gamma, global threshold.
- ``unstructured_l1``: ``torch.nn.utils.prune.global_unstructured`` at the best channel method's
  parameter sparsity (Han et al., NeurIPS 2015 style magnitude pruning; dense kernels get no faster).
- ``avprune_*``: this project's pruner (``pruning.Pruner``), see :mod:`benchmarks.compare_avprune`.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrajectoryPoint:
    """One probe during a method's fine-tune: latency of the model as it would deploy now, and mAP."""

    step: int
    latency_ms: float
    map: float


@dataclass(frozen=True)
class MethodContext:
    """Everything a method may use; identical for every method of one comparison but the seed."""

    seed: int
    steps: int  # total fine-tuning optimizer steps the method may spend
    batch_size: int
    lr: float
    base_checkpoint: Path  # the shared starting point (dense, trained)
    train_set: Any  # perception.data.CocoDetectionDataset (augmented)
    latency_target_ms: float  # on the comparison's runtime, from compare.py's setup
    dense_ms: float  # the starting checkpoint's measured latency on that runtime
    channel_ratio: float  # Torch-Pruning global ratio measured to hit the target (setup bisection)
    measure_ms: Callable[[nn.Module], float]  # quick latency of a plain model on the target runtime
    probe: Callable[[nn.Module, int], TrajectoryPoint]  # latency + mAP on the probe subset
    probe_every: int  # steps between trajectory points (0: no probes at all, for tests)
    map_of: Callable[[nn.Module], float]  # mAP on a train subset (feedback controllers; never val)
    map_floor: float  # absolute mAP floor a feedback controller defends
    example_inputs: torch.Tensor  # [1, 3, H, W] at the model's input size
    bisect_iters: int = 6
    measure_every: int = 30  # feedback controllers: steps between measured latency + mAP
    latency_table: Path | None = None  # pruning.LatencyTable JSON for predicted latency (setup)
    param_sparsity: float | None = None  # for unstructured_l1: the best channel method's sparsity
    workers: int = 0


@dataclass
class MethodOutput:
    """What a method hands back: a plain detector (saved by the harness) and its story."""

    model: nn.Module
    trajectory: list[TrajectoryPoint]
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- shared pieces


@functools.lru_cache(maxsize=2)
def _template(path: str, mtime_ns: int) -> nn.Module:
    from perception.models import load_detector

    return load_detector(path)


def load_checkpoint_like_base(path: Path, base: Path) -> nn.Module:
    """Load a checkpoint derived from ``base`` (pruned or not) without rebuilding the detector.

    torchvision's SSDlite builder runs a dummy forward at full size to size its heads, about a
    second each time; a deep copy of the cached base resized to the checkpoint's shapes is the
    same model (``perception.models.load_detector`` does this resize after the build).
    """
    from perception.models import read_checkpoint, resize_to_state_dict

    template = _template(str(base), base.stat().st_mtime_ns)
    model = copy.deepcopy(template)
    if path == base:
        return model
    ckpt = read_checkpoint(path)
    meta, own = ckpt["model"], template.avprune_meta
    differ = [k for k in ("name", "num_classes") if meta.get(k) != own[k]]
    differ += ["image_size"] if list(meta.get("image_size") or []) != list(own["image_size"]) else []
    if differ:
        raise ValueError(f"{path}: {', '.join(differ)} differ from the base checkpoint {base}; not one of this comparison's models")
    resize_to_state_dict(model, ckpt["state_dict"])
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model


def load_base(ctx: MethodContext) -> nn.Module:
    """A fresh copy of the shared starting checkpoint, seeded so every method starts alike."""
    torch.manual_seed(ctx.seed)
    return load_checkpoint_like_base(ctx.base_checkpoint, ctx.base_checkpoint)


class DetectorCore(nn.Module):
    """Backbone + head of a one-stage detector as a tensor-in, tensors-out module.

    Torch-Pruning traces its dependency graph through this module; it shares the detector's
    submodules, so pruning the core prunes the detector in place. Anchor generation, decoding and
    NMS depend on no channel count and stay outside.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        if not (hasattr(detector, "backbone") and hasattr(detector, "head")):
            raise ValueError(
                f"{type(detector).__name__}: the comparison prunes one-stage detectors (backbone + head: "
                "SSD, RetinaNet, FCOS); use ssdlite320_mobilenet_v3_large"
            )
        self.backbone = detector.backbone
        self.head = detector.head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.backbone(x)
        feats = list(feats.values()) if isinstance(feats, dict) else [feats]
        out = self.head(feats)
        return tuple(out[k] for k in sorted(out))


def head_output_convs(detector: nn.Module) -> list[nn.Module]:
    """The convs whose outputs are class scores or box offsets: their widths are fixed by the task."""
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


def tp_channel_prune(detector: nn.Module, ratio: float, example_inputs: torch.Tensor, importance: Any = None) -> nn.Module:
    """Global channel pruning of ``detector`` in place with Torch-Pruning (MetaPruner), one shot.

    ``round_to=8`` because odd channel counts slow dense kernels down (FIELD_NOTES).
    """
    import torch_pruning as tp

    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
    if ratio == 0.0:
        return detector
    was_training = detector.training
    detector.eval()
    pruner = tp.pruner.MetaPruner(
        DetectorCore(detector),
        example_inputs,
        importance=importance if importance is not None else tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio,
        global_pruning=True,
        ignored_layers=head_output_convs(detector),
        round_to=8,
    )
    pruner.step()
    detector.train(was_training)
    return detector


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


def finetune(
    model: nn.Module,
    ctx: MethodContext,
    *,
    steps: int,
    snapshot: Callable[[], nn.Module],
    hooks: Sequence[Callable[[Any], None]] = (),
    step_offset: int = 0,
    lr_scale: float = 1.0,
) -> list[TrajectoryPoint]:
    """Fine-tune ``model`` for ``steps`` with perception.train, probing every ``ctx.probe_every``.

    Probes fall on multiples of ``probe_every`` counted over the method's whole budget
    (``step_offset`` shifts a second phase), strictly before its last step.

    ``snapshot()`` returns the model as it would deploy now (physically pruned, plain): the probe
    measures that, so every method's trajectory is in the same units as its final row.
    """
    from perception.train import TrainSettings, train

    points: list[TrajectoryPoint] = []
    if steps <= 0:
        return points

    def probe_hook(sc: Any) -> None:
        done = step_offset + sc.step + 1  # steps completed so far, counted over the whole method
        if ctx.probe_every and done % ctx.probe_every == 0 and done < ctx.steps:
            points.append(ctx.probe(snapshot(), done))

    settings = TrainSettings(
        steps=steps,
        batch_size=ctx.batch_size,
        lr=ctx.lr * lr_scale,
        warmup_steps=min(20, steps // 10),
        seed=ctx.seed + 1000 * step_offset,  # a second phase must not replay the first one's batches
        num_workers=ctx.workers,
    )
    train(model, ctx.train_set, settings, hooks=(*hooks, probe_hook), resume=False, progress=False)
    # No probe at the very end: the final pass measures the final model, side by side with the others.
    return points


def start_point(ctx: MethodContext, snapshot: Callable[[], nn.Module], step: int = 0) -> list[TrajectoryPoint]:
    """A probe outside the training loop (after a one-shot prune, say); none when probes are off."""
    return [ctx.probe(snapshot(), step)] if ctx.probe_every else []


def plain_copy(model: nn.Module) -> nn.Module:
    """A detached deep copy in eval mode, safe to export while training goes on."""
    return copy.deepcopy(model).eval()


# ----------------------------------------------------------------------------- baselines


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


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: ``kind`` is "channel" (hits the latency target by removing channels),
    "unstructured" or "dense"; ``needs_sparsity`` methods run after the channel methods."""

    name: str
    run: Callable[[MethodContext], MethodOutput]
    kind: str
    label: str
    needs_sparsity: bool = False


_METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method; a duplicate name is a programming error."""
    if spec.name in _METHODS:
        raise ValueError(f"method {spec.name!r} is already registered")
    _METHODS[spec.name] = spec
    return spec


def _registry() -> dict[str, MethodSpec]:
    """The registry, with avprune's methods added on first use (they import this module)."""
    if not any(n.startswith("avprune_") for n in _METHODS):
        from benchmarks.compare_avprune import register_all

        register_all()
    return _METHODS


def list_methods() -> list[str]:
    """Registered method names, in run order (dense first, unstructured last)."""
    _registry()
    return [m.name for m in sorted(_METHODS.values(), key=lambda s: (s.needs_sparsity, s.kind != "dense"))]


def get_method(name: str) -> MethodSpec:
    """The method called ``name``; an unknown name raises ValueError listing the valid ones."""
    try:
        return _registry()[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(list_methods())}") from None


def param_sparsity_of(params: int, dense_params: int) -> float:
    """Share of the dense model's parameters a pruned model removed."""
    if dense_params <= 0 or math.isnan(params):
        raise ValueError(f"bad parameter counts {params} / {dense_params}")
    return max(0.0, 1.0 - params / dense_params)


register(MethodSpec("dense", run_dense, "dense", "dense, same steps"))
register(MethodSpec("tp_magnitude", run_tp_magnitude, "channel", "Torch-Pruning one-shot L2"))
register(MethodSpec("slimming", run_slimming, "channel", "network slimming"))
register(MethodSpec("unstructured_l1", run_unstructured, "unstructured", "torch prune L1 unstructured", True))


def timed(spec: MethodSpec, ctx: MethodContext) -> tuple[MethodOutput, float]:
    """Run a method and return its output with its wall time (the table's "method wall time")."""
    t0 = time.perf_counter()
    out = spec.run(ctx)
    return out, time.perf_counter() - t0
