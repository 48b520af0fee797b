"""Granularities: which elements one pruning decision covers, and how a threshold becomes a mask.

Thresholds live on *normalised* importance: a unit's (layer's or coupled group's) scores divided
by their mean, ŝ = s / mean(s). A threshold of 1.0 therefore means "below this layer's average
importance", comparable across layers whose raw scales differ by orders of magnitude (|w| of a
stem conv vs. a 1x1 projection). The controller sets a target sparsity per unit; the threshold is
the largest normalised score that was pruned, so it is exactly the cut the target implies (ties
are broken by rank, which keeps the resulting sparsity exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pruning.nm import nm_mask
from pruning.registry import Registry

GRANULARITIES: Registry[str] = Registry("granularity")
for _name, _doc in (
    ("unstructured", "single weights"),
    ("channel", "output channels, coupled through Torch-Pruning's dependency graph"),
    ("nm", "N:M along input channels, TensorRT layout"),
):
    GRANULARITIES.add(_name, _doc)


def check_granularity(name: str) -> str:
    """Return ``name`` if it is a registered granularity, else raise listing the valid ones."""
    GRANULARITIES.get(name)
    return name


def check_sparsity(value: float, what: str = "sparsity") -> float:
    """Raise ValueError unless ``value`` is in [0, 1)."""
    if not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{what} must be in [0, 1); got {value!r}")
    return float(value)


@dataclass(frozen=True)
class MaskResult:
    """A unit's new mask and what explains it."""

    mask: torch.Tensor  # same shape as the scores (per-weight) or [C] (per-channel)
    threshold: float  # on normalised importance; elements at or below it are pruned
    sparsity: float  # fraction of the unit's elements masked


def normalise(scores: torch.Tensor) -> torch.Tensor:
    """ŝ = s / mean(s); all-zero scores stay zero (nothing distinguishes the elements)."""
    mean = scores.float().mean()
    return scores.float() / mean if mean > 0 else torch.zeros_like(scores, dtype=torch.float32)


def _rank_cut(norm: torch.Tensor, n_prune: int) -> tuple[torch.Tensor, float]:
    """Mask exactly the ``n_prune`` lowest entries; return (keep mask, threshold).

    ``kthvalue`` finds the cut in O(n) (a full sort or a large top-k is much slower on the
    million-weight layers of a detector); entries tied at the cut are kept in index order until
    exactly ``n_prune`` are masked, so all-zero weights still give the requested sparsity.
    """
    flat = norm.reshape(-1)
    keep = torch.ones_like(flat)
    if n_prune <= 0:
        return keep.view_as(norm), 0.0
    thr = flat.kthvalue(n_prune).values
    keep = (flat > thr).to(flat.dtype)
    surplus = int((keep == 0).sum()) - n_prune  # > 0 when several entries tie at the cut
    if surplus > 0:
        tied = torch.nonzero(flat == thr).flatten()
        keep[tied[:surplus]] = 1.0
    return keep.view_as(norm), float(thr)


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> MaskResult:
    """Per-weight mask pruning the ``round(sparsity * numel)`` least important weights."""
    check_sparsity(sparsity)
    n_prune = int(round(sparsity * scores.numel()))
    keep, thr = _rank_cut(normalise(scores), n_prune)
    return MaskResult(keep, thr, n_prune / scores.numel())


def kept_channels(channels: int, sparsity: float, round_to: int = 1) -> int:
    """Channels kept at ``sparsity``, rounded *up* to a multiple of ``round_to``.

    Rounding up keeps more channels than asked: safe for accuracy, and odd channel counts make
    GPU kernels slower than the rounded-up count would (FIELD_NOTES: round to 8, 32 for INT8). A
    layer narrower than ``round_to`` is never pruned, since it cannot land on the multiple.
    """
    check_sparsity(sparsity)
    if round_to < 1:
        raise ValueError(f"round_to must be >= 1; got {round_to}")
    if channels <= round_to:
        return channels
    keep = channels - int(round(sparsity * channels))
    keep = max(round_to, math.ceil(keep / round_to) * round_to)
    return min(channels, keep)


def check_channel_multiple(value: object, what: str = "channel_multiple") -> int:
    """Return ``value`` if it is an int >= 1, else raise naming the field and the fix."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an int >= 1 (16 for ORT's NCHWc blocks on AVX-512, 8 on AVX2, "
                         f"32 for INT8 / tensor cores); got {value!r}")
    return value


def aligned_levels(channels: int, multiple: int) -> list[int]:
    """The kept counts a layer may take, widest first: all channels, then every multiple below it.

    Channels go in whole groups of ``multiple`` (ORT's NCHWc block, a tensor-core tile): a layer
    of 72 channels with multiple 16 may keep 72, 64, 48, 32 or 16. A layer no wider than one group
    is never pruned (it cannot lose a group and stay non-empty).
    """
    check_channel_multiple(multiple)
    if channels <= multiple:
        return [channels]
    top = (channels - 1) // multiple * multiple
    return [channels, *range(top, 0, -multiple)]


def channel_mask(scores: torch.Tensor, sparsity: float, round_to: int = 1) -> MaskResult:
    """Keep the most important channels of a coupled group (``scores`` is [C]).

    Keeping the top ``k`` channels (``k`` a multiple of ``round_to``) is keeping the top ``k /
    round_to`` groups when a group is ``round_to`` channels consecutive in importance rank, and a
    group's importance is the sum over its channels: the rank cut and the group cut agree.
    """
    return channel_mask_kept(scores, kept_channels(scores.numel(), sparsity, round_to))


def channel_mask_kept(scores: torch.Tensor, kept: int) -> MaskResult:
    """Keep exactly the ``kept`` most important channels (``scores`` is [C]); e.g. from an allocation."""
    c = scores.numel()
    if not 1 <= kept <= c:
        raise ValueError(f"kept channels must be in [1, {c}]; got {kept}")
    n_prune = c - kept
    keep, thr = _rank_cut(normalise(scores), n_prune)
    return MaskResult(keep, thr, n_prune / c)


def stable_channel_mask(scores: torch.Tensor, kept: int, previous: torch.Tensor) -> MaskResult:
    """Keep ``kept`` channels, changing the ``previous`` keep vector only by the count's change.

    A cut drops the least important of the channels kept so far; growth revives the most important
    of the pruned ones; at an unchanged count nothing moves. :func:`channel_mask_kept` re-ranks every
    channel instead, so a pruned channel that outscores a kept one swaps in. That is Dynamic Network
    Surgery's splicing (Guo et al., NeurIPS 2016), and each swap is a fresh cut of a trained channel
    plus the return of one that stopped training when it was cut. Gradual magnitude pruning's masks
    only move with the target (Zhu & Gupta, "To prune, or not to prune", 2017); this is that rule,
    with regrowth kept for a target that recedes. The threshold is the rank cut's, as for
    :func:`channel_mask_kept`.
    """
    c = scores.numel()
    if not 1 <= kept <= c:
        raise ValueError(f"kept channels must be in [1, {c}]; got {kept}")
    if previous.numel() != c:
        raise ValueError(f"previous keep vector has {previous.numel()} entries for {c} channels")
    norm = normalise(scores).reshape(-1)
    was = previous.reshape(-1) > 0
    keep = was.clone()
    change = kept - int(was.sum())
    if change > 0:  # revive the best pruned channels
        pool = torch.nonzero(~was).flatten()
        keep[pool[torch.argsort(norm[pool], descending=True, stable=True)[:change]]] = True
    elif change < 0:  # drop the weakest kept channels
        pool = torch.nonzero(was).flatten()
        keep[pool[torch.argsort(norm[pool], stable=True)[:-change]]] = False
    _, thr = _rank_cut(norm, c - kept)
    return MaskResult(keep.to(torch.float32).view_as(scores), thr, (c - kept) / c)


def swapped_channels(previous: torch.Tensor, new: torch.Tensor) -> int:
    """Channels that changed side beyond what the kept count's change explains: a pruned one in
    for a kept one out counts 1."""
    was, now = previous.reshape(-1) > 0, new.reshape(-1) > 0
    flipped = int((was != now).sum())
    return (flipped - abs(int(now.sum()) - int(was.sum()))) // 2


def nm_layer_mask(scores: torch.Tensor, sparsity: float, n: int, m: int) -> MaskResult:
    """N:M mask whose zeros per group follow the target: ``min(M-N, floor(sparsity*M))``.

    A ramped target (e.g. cubic to 0.5) therefore passes through 1:4-zero masks before the final
    2:4 pattern; at and beyond (M-N)/M the mask is the exact TensorRT pattern.
    """
    check_sparsity(sparsity)
    zeros = min(m - n, int(math.floor(sparsity * m + 1e-9)))
    mask = nm_mask(scores, n, m, zeros)
    pruned = mask == 0
    norm = normalise(scores)
    thr = float(norm[pruned].max()) if bool(pruned.any()) else 0.0
    return MaskResult(mask, thr, zeros / m)
