"""Least-squares reconstruction of the layers that read pruned channels, before any fine-tuning.

Removing channels changes what every consumer layer sees, and fine-tuning has to win the
difference back. Channel-pruning papers close much of it at once, without training: solve for
each consumer's remaining weights so that its outputs match the dense model's on a few
calibration images (He, Zhang & Sun, "Channel Pruning for Accelerating Very Deep Neural
Networks", ICCV 2017, arXiv:1707.06168; Luo, Wu & Lin, "ThiNet", ICCV 2017, arXiv:1707.06342).
Layers are solved in execution order on the *pruned* model's inputs, so each one also absorbs
the error the layers before it left.

Here the solved layers are pointwise (1x1, ungrouped) convs whose input channels are masked
(:mod:`pruning.masks`; a masked model computes what the finalized one does, so this runs before
:meth:`pruning.Pruner.finalize`). The target is the dense layer's output before its BatchNorm, at
positions sampled from the calibration images, and the solve is ridge regression pulled toward
the current weights (a layer fed by a global pool sees one sample per image, fewer than its
inputs)::

    W*, b* = argmin ||Y - W X - b||^2 + lam ||W - W0||^2,   lam = ridge * mean(diag(X X^T))

The intercept ``b`` goes into the conv's bias or, where a BatchNorm reads the conv directly, into
that BatchNorm's running mean (BN with mean mu of ``y + b`` equals BN with mean ``mu - b`` of
``y``); where neither exists it is not fitted. Depthwise convs need nothing: each output channel
reads its own input channel. Masked weights are left as they are (a channel that regrows during
a dynamic-threshold fine-tune comes back with its old weights).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pruning.groups import find_following_bn, run_forward
from pruning.masks import get_mask, stored

log = logging.getLogger(__name__)

ForwardFn = Callable[[nn.Module, Any], Any]


@dataclass(frozen=True)
class LayerFit:
    """One solved layer: how many inputs it kept and its output error relative to the dense output
    (``||Y - Y_hat||^2 / ||Y - mean(Y)||^2`` on the calibration samples) before and after."""

    layer: str
    kept_inputs: int
    inputs: int
    samples: int
    intercept: str  # "bias", "bn:<name>" or "none"
    error_before: float
    error_after: float


class _Stop(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward is not run."""


def fit_summary(fits: Sequence[LayerFit]) -> dict[str, float]:
    """How many layers were solved and their mean relative output error before and after."""
    n = max(len(fits), 1)
    return {"layers": len(fits), "mean_error_before": sum(f.error_before for f in fits) / n,
            "mean_error_after": sum(f.error_after for f in fits) / n}


def _is_pointwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
            and module.stride == (1, 1) and module.padding in ((0, 0), "valid"))


def _kept(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (kept output channels, kept input channels) of a conv under its mask (all if unmasked)."""
    wm = get_mask(module, "weight")
    if wm is None:
        return (torch.ones(module.out_channels, dtype=torch.bool), torch.ones(module.in_channels, dtype=torch.bool))
    mask = wm.mask.detach()
    return mask.amax(dim=(1, 2, 3)) > 0, mask.amax(dim=(0, 2, 3)) > 0


def pointwise_consumers(model: nn.Module, *, masked_inputs_only: bool = True) -> list[str]:
    """Pointwise convs of ``model`` (in registration order); by default only those with masked input channels."""
    names = []
    for name, mod in model.named_modules():
        if not _is_pointwise(mod):
            continue
        keep_out, keep_in = _kept(mod)
        if not keep_out.any():
            continue  # a layer pruned away entirely has nothing to fit
        if masked_inputs_only and bool(keep_in.all()):
            continue
        names.append(name)
    return names


def _execution_order(model: nn.Module, names: Sequence[str], batch: Any, forward_fn: ForwardFn | None) -> list[str]:
    order: list[str] = []
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_pre_hook(lambda m, a, n=n: order.append(n) if n not in order else None)
               for n in names]
    try:
        with torch.no_grad():
            run_forward(model, batch, forward_fn)
    finally:
        for h in handles:
            h.remove()
    return order


def _sample(t: torch.Tensor, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of a [B, C, H, W] tensor as [B*H*W, C], and the indices of ``k`` sampled rows (all if fewer)."""
    rows = t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    if rows.shape[0] <= k:
        return rows, torch.arange(rows.shape[0])
    return rows, torch.randperm(rows.shape[0], generator=gen)[:k]


def _capture(model: nn.Module, layer: str, batch: Any, forward_fn: ForwardFn | None, *, output: bool) -> torch.Tensor:
    """``layer``'s input (or output) on ``batch``; the forward stops there."""
    got: list[torch.Tensor] = []
    mod = dict(model.named_modules())[layer]

    def grab(t: torch.Tensor) -> None:
        got.append(t.detach())
        raise _Stop

    h = (mod.register_forward_hook(lambda m, a, o: grab(o)) if output
         else mod.register_forward_pre_hook(lambda m, a: grab(a[0])))
    try:
        with torch.no_grad():
            run_forward(model, batch, forward_fn)
    except _Stop:
        pass
    finally:
        h.remove()
    if not got:
        raise ValueError(f"layer {layer!r} did not run in the forward pass; pass layers the forward reaches")
    return got[0]


@torch.no_grad()
def reconstruct(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Any],
    *,
    layers: Sequence[str] | None = None,
    forward_fn: ForwardFn | None = None,
    samples_per_batch: int = 4096,
    ridge: float = 1e-3,
    seed: int = 0,
) -> list[LayerFit]:
    """Re-solve ``student``'s pointwise consumers of pruned channels to match ``teacher`` (the dense
    model ``student`` was masked from: same module names and shapes), in place; returns one
    :class:`LayerFit` per solved layer, in execution order.

    ``batches``: calibration inputs for ``forward_fn(model, batch)`` (default ``model(batch)``),
    e.g. a few dozen training images; they are iterated once per layer. ``layers``: which convs to
    solve (default :func:`pointwise_consumers`); a name that is not a pointwise conv in both models
    is refused. Both models are put in eval mode for the passes and restored after.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("reconstruct needs calibration batches (got none): pass a few dozen training images")
    if not ridge > 0:
        raise ValueError(f"ridge {ridge!r}: give a positive ridge (e.g. 1e-3), it keeps under-sampled layers near their weights")
    s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
    names = list(pointwise_consumers(student)) if layers is None else list(layers)
    for n in names:
        if not (_is_pointwise(s_mods.get(n, nn.Identity())) and _is_pointwise(t_mods.get(n, nn.Identity()))):
            raise ValueError(f"layer {n!r} is not a pointwise conv in both student and teacher; reconstruct solves "
                             "1x1 ungrouped convs of a masked student against the dense model it was masked from")
        if stored(s_mods[n]).shape != t_mods[n].weight.shape:
            raise ValueError(f"layer {n!r}: student weight {tuple(stored(s_mods[n]).shape)} and teacher "
                             f"{tuple(t_mods[n].weight.shape)} differ; reconstruct a masked (not finalized) student")
    if not names:
        return []
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    try:
        order = _execution_order(student, names, batches[0], forward_fn)
        bn_after = find_following_bn(student, order, batches[0], forward_fn)
        fits = [_solve(n, s_mods[n], student, teacher, batches, forward_fn, bn_after.get(n), samples_per_batch,
                       ridge, seed + i) for i, n in enumerate(order)]
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    return fits


def _solve(name: str, conv: nn.Conv2d, student: nn.Module, teacher: nn.Module, batches: list[Any],
           forward_fn: ForwardFn | None, bn: tuple[str, nn.Module] | None, k: int, ridge: float,
           seed: int) -> LayerFit:
    keep_out, keep_in = _kept(conv)
    w_store = stored(conv)
    w0 = w_store.detach()[keep_out][:, keep_in, 0, 0].double()  # [o, i]
    if conv.bias is not None:
        intercept, b0 = "bias", conv.bias.detach()[keep_out].double()
    elif bn is not None:
        intercept, b0 = f"bn:{bn[0]}", torch.zeros(int(keep_out.sum()), dtype=torch.float64)
    else:
        intercept, b0 = "none", None
    i = int(keep_in.sum())
    d = i + (b0 is not None)
    gram = torch.zeros(d, d, dtype=torch.float64)
    cross = torch.zeros(d, w0.shape[0], dtype=torch.float64)
    y_sq, y_sum, n = torch.zeros((), dtype=torch.float64), torch.zeros(w0.shape[0], dtype=torch.float64), 0
    for b, batch in enumerate(batches):
        gen = torch.Generator().manual_seed(seed * 100_003 + b)
        x_all, idx = _sample(_capture(student, name, batch, forward_fn, output=False), k, gen)
        y_all, _ = _sample(_capture(teacher, name, batch, forward_fn, output=True), k, gen)
        x = x_all[idx][:, keep_in].double()
        y = y_all[idx][:, keep_out].double()
        if b0 is not None:
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
        gram += x.T @ x
        cross += x.T @ y
        y_sq += (y * y).sum()
        y_sum += y.sum(0)
        n += x.shape[0]
    theta0 = w0.T if b0 is None else torch.cat([w0.T, b0[None]], dim=0)  # [d, o]
    lam = ridge * float(gram.diagonal()[:i].mean()) if i else ridge
    reg = torch.eye(d, dtype=torch.float64) * lam
    if b0 is not None:
        reg[-1, -1] = 0.0  # the intercept is free
    theta = torch.linalg.solve(gram + reg, cross + reg @ theta0)

    def err(th: torch.Tensor) -> float:
        sse = y_sq - 2 * (th * cross).sum() + (th * (gram @ th)).sum()
        var = y_sq - (y_sum * y_sum).sum() / max(n, 1)
        return float(sse / var) if var > 0 else 0.0

    before, after = err(theta0), err(theta)
    if not after <= before:  # the ridge pull can only lose on samples the old weights fit better: keep them
        log.info("reconstruct %s: no gain (%.4f -> %.4f), weights kept", name, before, after)
        return LayerFit(name, i, conv.in_channels, n, intercept, before, before)
    new_w = w_store.detach().clone()
    rows = keep_out.nonzero().flatten()
    cols = keep_in.nonzero().flatten()
    new_w[rows[:, None], cols[None, :], 0, 0] = theta[:i].T.to(new_w.dtype)
    w_store.copy_(new_w)
    if intercept == "bias":
        conv.bias[keep_out] = theta[i].to(conv.bias.dtype)
    elif bn is not None:
        mean = bn[1].running_mean
        mean[keep_out] -= theta[i].to(mean.dtype)
    log.info("reconstruct %s: %d/%d inputs, %d samples, error %.4f -> %.4f", name, i, conv.in_channels, n, before, after)
    return LayerFit(name, i, conv.in_channels, n, intercept, before, after)
