"""N:M semi-structured masks in TensorRT's layout.

TensorRT / cuSPARSELt 2:4 sparsity (Mishra et al., "Accelerating Sparse Deep Neural Networks",
arXiv:2104.08378) groups weights along the *input-channel* (reduction) axis: for a conv weight
``[O, I, kh, kw]``, for every output channel and every kernel position, each run of M consecutive
input channels must hold at least M-N zeros. For a linear weight ``[O, I]`` the groups run along I.
``torch.ao.pruning.WeightNormSparsifier`` cannot express this for Conv2d, hence this module.
"""

from __future__ import annotations

import torch
from torch import nn


def check_nm(n: int, m: int) -> None:
    """Raise ValueError unless 1 <= n <= m (and m >= 2)."""
    if not isinstance(n, int) or not isinstance(m, int) or m < 2 or n < 1 or n > m:
        raise ValueError(f"N:M must satisfy 1 <= N <= M and M >= 2; got N={n!r}, M={m!r}")


def nm_skip_reason(module: nn.Module, m: int) -> str | None:
    """Why ``module`` cannot carry an N:M pattern in TensorRT's layout, or None if it can."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"grouped/depthwise conv (groups={module.groups}) has no dense input-channel axis"
        if module.in_channels % m:
            return f"in_channels={module.in_channels} is not a multiple of M={m}"
        return None
    if isinstance(module, nn.Linear):
        return None if module.in_features % m == 0 else f"in_features={module.in_features} is not a multiple of M={m}"
    return f"{type(module).__name__} is not Conv2d/Linear"


def _to_groups(t: torch.Tensor, m: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """View a [O, I, *k] tensor as [..., M] groups along I (TensorRT's layout); return the permuted shape."""
    if t.dim() == 2:
        p = t
    else:  # [O, I, kh, kw] -> [O, kh, kw, I]: groups of M consecutive input channels per position
        p = t.permute(0, *range(2, t.dim()), 1)
    return p.reshape(*p.shape[:-1], p.shape[-1] // m, m), tuple(p.shape)


def _from_groups(g: torch.Tensor, permuted_shape: tuple[int, ...], ndim: int) -> torch.Tensor:
    p = g.reshape(permuted_shape)
    if ndim == 2:
        return p
    return p.permute(0, ndim - 1, *range(1, ndim - 1)).contiguous()


def nm_mask(scores: torch.Tensor, n: int, m: int, zeros: int | None = None) -> torch.Tensor:
    """Mask keeping the highest-scoring entries of every group of M along the input-channel axis.

    ``zeros`` is the number of entries masked per group (default M-N, the full pattern); a smaller
    value is used while a schedule ramps towards N:M. Exactly ``zeros`` entries are masked in every
    group even when scores tie (e.g. weights that are already zero): ``topk`` breaks ties by
    position, so the pattern is exact rather than "at least".
    """
    check_nm(n, m)
    zeros = m - n if zeros is None else zeros
    if not 0 <= zeros <= m - n:
        raise ValueError(f"zeros per group must be in [0, {m - n}] for {n}:{m}; got {zeros}")
    if scores.dim() not in (2, 4) or scores.shape[1] % m:
        raise ValueError(f"N:M needs a [O, I] or [O, I, kh, kw] tensor with I % {m} == 0; got {tuple(scores.shape)}")
    groups, pshape = _to_groups(scores, m)
    mask = torch.ones_like(groups)
    if zeros:
        drop = torch.topk(groups, zeros, dim=-1, largest=False, sorted=False).indices
        mask.scatter_(-1, drop, 0.0)
    return _from_groups(mask, pshape, scores.dim())


def nm_group_reduce(scores: torch.Tensor, m: int) -> torch.Tensor:
    """Sum of scores per N:M group (shape [..., I/M]): the importance of a whole group."""
    groups, _ = _to_groups(scores, m)
    return groups.sum(-1)


def zeros_per_group(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Number of exact zeros in every group of M along the input-channel axis (for checks and tests)."""
    groups, _ = _to_groups(weight, m)
    return (groups == 0).sum(-1)
