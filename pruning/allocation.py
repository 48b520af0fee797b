"""Latency-aware per-layer allocation of aligned channel groups (the dynamic thresholds).

HALP (Shen, Yin, Molchanov, Mao, Liu, Alvarez, "Structural Pruning via Latency-Saliency
Knapsack", NeurIPS 2022) chooses, for a latency target, which channel groups every layer keeps so
that the summed importance of the kept groups is maximal while the latency predicted by a per-layer
lookup table stays within the target. We solve that knapsack greedily: starting from the dense
network, repeatedly drop the group that loses the least importance per millisecond saved, where the
saving is the *marginal* latency of the group: the layers whose output channels the group removes
plus every layer that consumes them (the next layer's input-channel change), read from the table at
the current counts of all neighbours. Counts move in whole groups of ``channel_multiple`` channels
(the runtime's blocked layout, see :func:`pruning.granularity.aligned_levels`), a group's importance
is the sum of its channels' importance, and a layer's threshold is the importance of its weakest
kept group, so thresholds are per layer and move with the target.

What a dropped group *costs* is, by default, its summed importance, each unit's importance
normalised to mean 1. That ranks channels within a unit, but it does not compare units: a channel
of a 16-wide stem costs what a channel of a 960-wide expansion costs, so the knapsack simply cuts
where a channel is most expensive in milliseconds: the high-resolution early layers, down to their
floor (measured: 112 -> 16 residual channels, -11.6 mAP points against uniform at 2x). With
``damage`` curves (a unit's measured metric drop, e.g. detection-loss increase, at a few
sparsities with only that unit pruned; :mod:`pruning.sensitivity`) the cost of a group is the
increase of its unit's interpolated damage, so units are compared on what pruning them does to the
model, as NetAdapt (Yang et al., ECCV 2018) measures and first-order Taylor importance (HALP's)
estimates; importance still picks *which* channels of a unit go, and breaks ties.

``allocate_uniform`` is the baseline: one global ratio for every layer (aligned), the smallest that
meets the same target.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pruning.granularity import aligned_levels, check_sparsity, kept_channels, normalise
from pruning.latency_model import LatencyTable

log = logging.getLogger(__name__)
Curve = Sequence[tuple[float, float]]  # (sparsity, metric drop) with only this unit pruned
TIE_BREAK = 0.01  # share of a typical unit's damage that importance adds, so flat curves still rank channels


@dataclass(frozen=True)
class Unit:
    """A coupled channel group as the allocator sees it: its width and the layers whose outputs it sets."""

    name: str
    size: int
    out_layers: tuple[str, ...]


@dataclass(frozen=True)
class Allocation:
    """Kept channels per unit, the threshold each implies, and the predicted latency."""

    kept: dict[str, int]
    thresholds: dict[str, float]  # importance of the weakest kept group (0 for an unpruned unit)
    predicted_ms: float
    target_ms: float
    feasible: bool  # False when even the widest allowed pruning stays above the target
    order: tuple[str, ...] = field(default=())  # units in the order their groups were dropped (first = cheapest)


def _sorted_scores(scores: torch.Tensor, weight: float) -> torch.Tensor:
    """Normalised importance (mean 1 per unit, see :mod:`pruning.granularity`), times the unit's weight, descending."""
    return (normalise(scores.detach().float().reshape(-1)) * float(weight)).sort(descending=True).values


def _threshold(sorted_desc: torch.Tensor, kept: int, multiple: int) -> float:
    """Summed importance of the weakest kept group (the last ``multiple`` kept channels in rank order)."""
    if kept >= sorted_desc.numel():
        return 0.0
    return float(sorted_desc[max(0, kept - multiple):kept].sum())


def damage_curve(curve: Curve, what: str = "damage curve") -> Callable[[float], float]:
    """Damage as a function of sparsity: piecewise linear through ``curve`` (and (0, 0)), never
    decreasing (a drop measured lower at a higher sparsity is noise), extended past the last point
    with the slope from the origin to it, so the floor of a unit is never free."""
    pts = sorted((float(s), max(0.0, float(d))) for s, d in curve)
    if not pts:
        raise ValueError(f"{what} is empty: give (sparsity, drop) points, e.g. [(0.5, 0.02), (0.75, 0.09)]")
    if any(not 0.0 <= s < 1.0 for s, _ in pts):
        raise ValueError(f"{what}: sparsities must be in [0, 1); got {[s for s, _ in pts]}")
    if pts[0][0] > 0.0:
        pts.insert(0, (0.0, 0.0))
    xs, ys = [pts[0][0]], [pts[0][1]]
    for x, y in pts[1:]:
        if x > xs[-1]:
            xs.append(x)
            ys.append(max(y, ys[-1]))
    tail = ys[-1] / xs[-1] if xs[-1] > 0 else 0.0

    def at(sparsity: float) -> float:
        if sparsity >= xs[-1]:
            return ys[-1] + tail * (sparsity - xs[-1])
        return float(np.interp(sparsity, xs, ys))

    return at


def _damage_fns(units: Sequence[Unit], damage: Mapping[str, Curve]) -> dict[str, Callable[[float], float]]:
    """A damage function per unit; units without a curve get the median of the measured ones."""
    fns = {u.name: damage_curve(damage[u.name], f"damage[{u.name!r}]") for u in units if u.name in damage}
    if not fns:
        raise ValueError(f"damage has no curve for any unit; units: {[u.name for u in units][:6]} ...")
    missing = [u.name for u in units if u.name not in fns]
    if missing:
        log.info("damage: %d unit(s) without a measured curve take the median curve: %s", len(missing), missing[:6])
        grid = [i / 20 for i in range(20)]
        median = [(s, sorted(f(s) for f in fns.values())[len(fns) // 2]) for s in grid]
        for name in missing:
            fns[name] = damage_curve(median)
    return fns


def _config(units: Mapping[str, Unit], kept: Mapping[str, int]) -> dict[str, int]:
    config: dict[str, int] = {}
    for name, u in units.items():
        for layer in u.out_layers:
            config[layer] = int(kept[name])
    return config


def allocate_latency(
    units: Sequence[Unit],
    scores: Mapping[str, torch.Tensor],
    table: LatencyTable,
    target_ms: float,
    *,
    channel_multiple: int = 1,
    weights: Mapping[str, float] | None = None,
    max_unit_sparsity: float = 0.9,
    damage: Mapping[str, Curve] | None = None,
) -> Allocation:
    """Greedy latency-saliency knapsack: keep the most important groups within ``target_ms`` (predicted).

    ``scores[unit]`` is the unit's per-channel importance ([size]); ``weights[unit]`` scales it (mAP
    feedback: a sensitive layer's groups cost more to drop, so they regrow first). ``damage[unit]``
    (``[(sparsity, drop), ...]``, see the module notes) makes a group's cost its unit's damage
    increase instead. A unit never keeps fewer than ``ceil((1 - max_unit_sparsity) * size)``
    channels rounded up to the multiple, nor fewer than one group.
    """
    check_sparsity(max_unit_sparsity, "max_unit_sparsity")
    by_name = {u.name: u for u in units}
    weights = weights or {}
    ranked = {u.name: _sorted_scores(scores[u.name], weights.get(u.name, 1.0)) for u in units}
    dmg = _damage_fns(units, damage) if damage else None
    if dmg is not None:  # a typical unit's damage at half width scales the importance tie-break
        scale = sorted(f(0.5) for f in dmg.values())[len(dmg) // 2] or 1.0
        totals = {n: float(r.sum()) or 1.0 for n, r in ranked.items()}
    levels = {
        u.name: [k for k in aligned_levels(u.size, channel_multiple)
                 if k == u.size or k >= math.ceil((1.0 - max_unit_sparsity) * u.size)]
        for u in units
    }
    pos = {u.name: 0 for u in units}
    kept = {u.name: u.size for u in units}
    config = _config(by_name, kept)

    consumers = table.consumers()
    affected: dict[str, tuple[str, ...]] = {}
    for u in units:
        own = [layer for layer in u.out_layers if layer in table.layers]
        fed = [c for layer in u.out_layers for c in consumers.get(layer, ())]
        affected[u.name] = tuple(dict.fromkeys(own + fed))
    sharing: dict[str, set[str]] = {}
    layer_units: dict[str, set[str]] = {}
    for name, layers in affected.items():
        for layer in layers:
            layer_units.setdefault(layer, set()).add(name)
    for name, layers in affected.items():
        sharing[name] = set().union(*(layer_units[layer] for layer in layers)) if layers else set()

    def local_ms(layers: Sequence[str], cfg: Mapping[str, int]) -> float:
        return sum(table.layer_latency(n, *table.resolve_one(n, cfg)) for n in layers)

    def candidate(name: str) -> tuple[float, float, int] | None:
        """(importance lost per ms saved, ms saved, next count) for dropping ``name``'s next group."""
        lv = levels[name]
        if pos[name] + 1 >= len(lv):
            return None
        nxt = lv[pos[name] + 1]
        layers = affected[name]
        before = local_ms(layers, config)
        trial = dict(config)
        for layer in by_name[name].out_layers:
            trial[layer] = nxt
        saved = (before - local_ms(layers, trial)) * table.scale
        if saved <= 1e-12:
            return None  # no predicted gain: never worth an importance loss
        lost = float(ranked[name][nxt:kept[name]].sum())
        if dmg is not None:
            size, f = by_name[name].size, dmg[name]
            rise = f(1.0 - nxt / size) - f(1.0 - kept[name] / size)
            lost = weights.get(name, 1.0) * rise + TIE_BREAK * scale * lost / totals[name]
        return lost / saved, saved, nxt

    cands = {u.name: candidate(u.name) for u in units}
    predicted = table.predict(config)
    order: list[str] = []
    while predicted > target_ms:
        live = [(c[0], name) for name, c in cands.items() if c is not None]
        if not live:
            break
        _, best = min(live)
        _, saved, nxt = cands[best]  # type: ignore[misc]
        kept[best] = nxt
        pos[best] += 1
        for layer in by_name[best].out_layers:
            config[layer] = nxt
        predicted -= saved
        order.append(best)
        for name in sharing[best] | {best}:
            cands[name] = candidate(name)
    predicted = table.predict(config)  # exact, free of accumulated interpolation drift
    thresholds = {n: _threshold(ranked[n], kept[n], channel_multiple) for n in kept}
    return Allocation(kept=kept, thresholds=thresholds, predicted_ms=predicted, target_ms=float(target_ms),
                      feasible=predicted <= target_ms * (1 + 1e-9), order=tuple(order))


def allocate_uniform(
    units: Sequence[Unit],
    scores: Mapping[str, torch.Tensor],
    table: LatencyTable,
    target_ms: float,
    *,
    channel_multiple: int = 1,
    max_unit_sparsity: float = 0.9,
    resolution: float = 0.005,
) -> Allocation:
    """One global ratio for every unit (counts aligned), the smallest whose prediction meets ``target_ms``.

    Scanned on a fine grid rather than bisected: aligned counts make predicted latency a staircase,
    not a strictly monotone function of the ratio.
    """
    check_sparsity(max_unit_sparsity, "max_unit_sparsity")
    by_name = {u.name: u for u in units}
    steps = int(round(max_unit_sparsity / resolution))
    best: tuple[float, dict[str, int], float] | None = None
    for i in range(steps + 1):
        ratio = min(max_unit_sparsity, i * resolution)
        kept = {u.name: kept_channels(u.size, ratio, channel_multiple) for u in units}
        ms = table.predict(_config(by_name, kept))
        best = (ratio, kept, ms)
        if ms <= target_ms:
            break
    assert best is not None
    _, kept, ms = best
    ranked = {u.name: _sorted_scores(scores[u.name], 1.0) for u in units}
    thresholds = {n: _threshold(ranked[n], kept[n], channel_multiple) for n in kept}
    return Allocation(kept=kept, thresholds=thresholds, predicted_ms=ms, target_ms=float(target_ms),
                      feasible=ms <= target_ms * (1 + 1e-9))


ALLOCATIONS = {"latency": allocate_latency, "uniform": allocate_uniform}
