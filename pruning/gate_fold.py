"""Fold channel-attention gates (squeeze-excitation) into the next convolution as their mean scale.

A squeeze-excitation module (Hu, Shen & Sun, "Squeeze-and-Excitation Networks", CVPR 2018,
arXiv:1709.01507) multiplies its input by a per-channel scale computed from a global pool of that
input: ``y = x * s(x)``, ``s(x)`` of shape [N, C, 1, 1]. MobileNetV3 (Howard et al., ICCV 2019)
puts one in 8 of SSDlite320's blocks. Its MACs are negligible, but on a CPU runtime it is five
separate passes (pool, two 1x1 convs, activation, broadcast multiply) over a tensor that is
otherwise fused away: 1.14-1.16x of SSDlite320's ORT graph time here (`benchmarks/RESULTS.md`).
EfficientNet-Lite drops the same modules for mobile accelerators (Tan & Le, EfficientNet-Lite,
tensorflow/tpu, 2020) and retrains; here the gate is replaced by its *mean* scale over
calibration images, which keeps the function close enough to fine-tune from (0.648 -> 0.645 mAP
for the trained SSDlite320 before any step), and that constant is folded exactly into the input
columns of the convolution that reads the gate's output, so nothing of the gate remains.

A submodule is a *channel gate* when, on the example input, its output has its input's shape and
equals ``input * s`` for a tensor ``s`` of shape [N, C, 1, 1] that one of its own submodules output
(checked numerically, not by class name). Asking for that submodule, rather than for a scale that
moves with the input, is what tells a gate from an affine layer (a BatchNorm, a layer scale) and
still finds a gate whose activation is saturated: on a pruned SSDlite320 the highest-resolution
gate's hardsigmoid barely moves between inputs, and an input-dependence test missed it. Its *consumer* is the ungrouped convolution whose input tensor is
the gate's output; a gate whose output feeds anything else as well is not folded, because the
fold would change that other reader. Folding is exact for the model with every folded gate held at
its mean scale; :func:`fold_gates` checks this on the calibration batch before it returns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pruning.blocks import remove_blocks
from pruning.groups import hooked_forward, run_forward
from pruning.masks import stored

log = logging.getLogger(__name__)

ForwardFn = Callable[[nn.Module, Any], Any]


@dataclass(frozen=True)
class GateFold:
    """One folded gate: the module replaced by ``nn.Identity``, the conv that took its mean scale,
    and the spread of that scale over the calibration images (how much input dependence was lost)."""

    gate: str
    consumer: str
    channels: int
    mean_scale: float
    scale_spread: float  # mean over channels of the scale's std across calibration images


def find_gates(model: nn.Module, example_inputs: Any, *, forward_fn: ForwardFn | None = None) -> dict[str, str]:
    """Channel gates of ``model`` that can be folded, each mapped to its consumer conv's name.

    One forward on ``example_inputs`` (eval mode, no grad): a module qualifies when its output
    equals its input times a [N, C, 1, 1] tensor that one of its submodules output, and exactly one
    module reads its output: an ungrouped ``nn.Conv2d``. Nested gates are not considered (the outermost match wins).
    """
    io: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    pooled: dict[str, torch.Tensor] = {}  # [N, C, 1, 1] outputs, by module
    ids: dict[str, int] = {}
    alive: list[torch.Tensor] = []
    readers: dict[int, list[str]] = {}
    handles = []
    for name, mod in model.named_modules():
        if not name:
            continue

        def grab(m: nn.Module, a: tuple, o: Any, n: str = name) -> None:
            if not isinstance(o, torch.Tensor) or o.dim() != 4:
                return
            if o.shape[2:] == (1, 1):  # a candidate scale of the gate this module sits in
                pooled.setdefault(n, o.detach().clone())
            if a and isinstance(a[0], torch.Tensor) and a[0].shape == o.shape:
                # copies: a later in-place op (an inplace activation, a residual +=) would rewrite them
                io.setdefault(n, (a[0].detach().clone(), o.detach().clone()))
                ids.setdefault(n, id(o))
                alive.append(o)  # ids are only unique while their objects live

        def read(m: nn.Module, a: tuple, n: str = name) -> None:
            for t in a:
                if isinstance(t, torch.Tensor):
                    readers.setdefault(id(t), []).append(n)
                    alive.append(t)

        handles += [mod.register_forward_hook(grab), mod.register_forward_pre_hook(read)]
    hooked_forward(model, example_inputs, forward_fn, handles)
    mods = dict(model.named_modules())
    gates: dict[str, str] = {}
    for name, (x, y) in io.items():
        if any(name.startswith(g + ".") for g in gates) or isinstance(mods[name], nn.Identity):
            continue
        if x.shape[2] * x.shape[3] < 2 or not bool((x != 0).any()):
            continue  # on a 1x1 map any output is the input times something
        # y = x * s where s is what one of the module's own submodules output (SE's scale activation);
        # an affine layer has no such submodule, however its scale came about
        scales = [t for sub, t in pooled.items() if sub.startswith(name + ".") and t.shape == (*x.shape[:2], 1, 1)]
        if not any(_close(x * t, y) for t in scales):
            continue
        readers_of_y = [r for r in readers.get(ids[name], []) if r != name and not name.startswith(r + ".")]
        # a container that merely passes the tensor on to its first child counts as that child
        leaf = [r for r in readers_of_y if not any(o.startswith(r + ".") for o in readers_of_y)]
        if len(leaf) != 1:
            continue
        conv = mods[leaf[0]]
        if isinstance(conv, nn.Conv2d) and conv.groups == 1:
            gates[name] = leaf[0]
    return gates


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    """Equal up to ``rel`` of ``b``'s norm (activations of an untrained network can be tiny, so no absolute floor)."""
    return bool(torch.linalg.vector_norm(a - b) <= rel * torch.linalg.vector_norm(b))


def _scale(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The per-sample, per-channel s with y = x * s (least absolute: exact where y is x times a constant)."""
    return (y * x.sign()).sum(dim=(2, 3), keepdim=True) / x.abs().sum(dim=(2, 3), keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def fold_gates(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    gates: Sequence[str] | None = None,
    forward_fn: ForwardFn | None = None,
) -> list[GateFold]:
    """Replace each channel gate of ``model`` by ``nn.Identity`` after multiplying its consumer
    conv's input columns by the gate's mean scale over ``batches``; in place.

    ``gates``: names to fold (default: every gate :func:`find_gates` finds on the first batch); a
    name that is not a foldable gate is refused. The model is in eval mode for the passes and its
    mode is restored after. Returns one :class:`GateFold` per folded gate.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("fold_gates needs calibration batches (got none): pass a few dozen training images")
    found = find_gates(model, batches[0], forward_fn=forward_fn)
    if gates is None:
        chosen = dict(found)
    else:
        missing = [g for g in gates if g not in found]
        if missing:
            raise ValueError(f"{missing} are not foldable channel gates of {type(model).__name__} "
                             f"(found: {sorted(found) or 'none'}); pass names find_gates returns")
        chosen = {g: found[g] for g in gates}
    if not chosen:
        return []
    mods = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    squares: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}

    def record(m: nn.Module, a: tuple, o: torch.Tensor, n: str) -> None:
        x = a[0]
        s = _scale(x, o).flatten(1).double()  # [N, C]
        seen = (x.abs().sum(dim=(2, 3)) > 0).double()  # an all-zero channel says nothing of its scale
        sums[n] = sums.get(n, 0) + (s * seen).sum(0)
        squares[n] = squares.get(n, 0) + (s * s * seen).sum(0)
        counts[n] = counts.get(n, 0) + seen.sum(0)

    handles = [mods[g].register_forward_hook(lambda m, a, o, n=g: record(m, a, o, n)) for g in chosen]
    was_training = model.training
    model.eval()
    try:
        for b in batches:
            run_forward(model, b, forward_fn)
        for h in handles:
            h.remove()
        handles = []
        reference = _held_at_mean(model, chosen, sums, counts, batches[0], forward_fn)
        folds = []
        for g, consumer in chosen.items():
            mean = _mean(sums[g], counts[g])
            std = ((squares[g] / counts[g].clamp_min(1)) - mean ** 2).clamp_min(0).sqrt()
            w = stored(mods[consumer])  # under a pruning mask, what the optimizer updates
            w.mul_(mean.to(w.dtype).view(1, -1, 1, 1))
            remove_blocks(model, [g])
            folds.append(GateFold(g, consumer, int(mean.numel()), float(mean.mean()), float(std.mean())))
        got = run_forward(model, batches[0], forward_fn)
        _check_same(reference, got)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for f in folds:
        log.info("folded gate %s into %s: %d channels, mean scale %.3f, spread %.3f", f.gate, f.consumer,
                 f.channels, f.mean_scale, f.scale_spread)
    return folds


class _MeanScale(nn.Module):
    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype)


def _mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Mean scale per channel; a channel never seen non-zero keeps scale 1 (what it is multiplied by cannot matter)."""
    return torch.where(count > 0, total / count.clamp_min(1), torch.ones_like(total))


def _held_at_mean(model: nn.Module, chosen: dict[str, str], sums: dict[str, torch.Tensor], counts: dict[str, torch.Tensor],
                  batch: Any, forward_fn: ForwardFn | None) -> Any:
    """The model's output with every chosen gate held at its mean scale (what the fold must equal)."""
    saved = []
    try:
        for g in chosen:
            parent_name, _, last = g.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            saved.append((parent, last, parent._modules[last]))
            setattr(parent, last, _MeanScale(_mean(sums[g], counts[g]).float()))
        return run_forward(model, batch, forward_fn)
    finally:
        for parent, last, mod in reversed(saved):
            setattr(parent, last, mod)


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, list | tuple):
        return [t for v in out for t in _tensors(v)]
    return []


def _check_same(reference: Any, got: Any) -> None:
    for a, b in zip(_tensors(reference), _tensors(got), strict=True):
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-3, atol=1e-4):
            diff = float((a - b).abs().max()) if a.shape == b.shape else float("nan")
            raise AssertionError(f"folded model differs from the gates held at their mean scale (max |diff| {diff:.3g})")
