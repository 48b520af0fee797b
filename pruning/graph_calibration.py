"""In-graph calibration of a per-layer latency table: each layer's cost as the whole graph pays it.

HALP (Shen et al., "Structural Pruning via Latency-Saliency Knapsack", NeurIPS 2022) allocates
channels by a per-layer latency table. On CPU runtimes a layer timed *alone* is a poor proxy for
its share of the graph: ONNX Runtime converts NCHW to its blocked NCHWc layout around every
isolated layer, so a layer with large maps (SSDlite320's 160x160 expansion) looks like half the
network, while in the graph those reorders happen once at the graph's edges. A knapsack on such a
table cuts the layer the graph does not reward (measured: latency-aware 0.86x where uniform was 2.47x).

The fix keeps the table's *shape* (how each layer's cost moves with its in/out channels, which the
isolated timings get right) and re-fits its *magnitude* per layer to the whole graph:

1. Probe: the whole model dense, plus one copy per coupled channel group with only that group thinned
   (to ``probe_sparsity``, aligned), all timed by the caller's ``measure_many`` (interleaved rounds,
   so drift hits every probe alike). That is ~1 + #groups whole-graph timings (37 for SSDlite320).
2. Fit: measured ``T(probe) - T(dense) = Σ_l e_l · (t_l(probe) - t_l(dense))`` over the probes,
   where ``t_l`` is the isolated table entry of layer ``l`` and ``e_l`` its in-graph factor, by ridge
   least squares toward the table's global scale (layers no probe moves keep it) and ``e_l >= 0``.
3. The table's ``layer_scale`` becomes ``e_l / scale`` and its overhead is set so the dense
   prediction equals the measured dense graph; the allocator's marginal latency of a group then
   reads the in-graph costs with no change to the allocator.

The measuring callable is injected (ONNX Runtime, TensorRT ... live in the caller), so this module
stays pure PyTorch.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from pruning.granularity import check_sparsity, kept_channels
from pruning.latency_model import LatencyTable

log = logging.getLogger(__name__)

MeasureMany = Callable[[Sequence[nn.Module]], Sequence[float]]
Config = Mapping[str, int | tuple[int, int]]


@dataclass(frozen=True)
class GraphCalibration:
    """What the in-graph fit saw and did."""

    dense_ms: float
    probes: tuple[tuple[str, int, float, float], ...]  # (group root, kept, measured ms, fitted ms)
    layer_scale: dict[str, float]
    residual_rms_ms: float  # RMS of (fitted - measured) over the probes
    holdout: tuple[tuple[float, float], ...] = field(default=())  # (predicted ms, measured ms) per holdout config


def fit_layer_scales(table: LatencyTable, points: Sequence[tuple[Config, float]], *, ridge: float = 0.05,
                     max_factor: float = 3.0, dense_ms: float | None = None) -> tuple[dict[str, float], float]:
    """Fit per-layer in-graph factors to measured ``(channel config, ms)`` points and apply them to ``table``.

    ``points`` must include the dense model as ``({}, ms)`` unless ``dense_ms`` is given. ``ridge``
    (relative to the mean squared column norm) pulls each factor toward the table's current global
    ``scale``: it decides how the saving of one probe is shared among the layers that probe moves.
    Factors are bounded to ``[0, max_factor · scale]``: a probe whose saving is lost in timing noise
    must not hand a layer with a tiny isolated cost a hundred-fold factor.
    Returns ``(layer_scale, residual RMS ms)``; ``table.layer_scale`` and ``overhead_ms`` are updated.
    """
    if max_factor <= 0:
        raise ValueError(f"max_factor must be > 0; got {max_factor}")
    if ridge <= 0:
        raise ValueError(f"ridge must be > 0 (it keeps unprobed layers at the global scale); got {ridge}")
    if dense_ms is None:
        dense = [ms for cfg, ms in points if not cfg]
        if not dense:
            raise ValueError("fit_layer_scales needs the dense model's latency: a ({}, ms) point or dense_ms=")
        dense_ms = float(sum(dense) / len(dense))
    names = list(table.layers)
    prior = float(table.scale)
    base = table.resolve({})
    base_t = torch.tensor([table.isolated_latency(n, *base[n]) for n in names], dtype=torch.float64)
    rows, ys = [], []
    for cfg, ms in points:
        if not cfg:
            continue
        res = table.resolve(cfg)
        t = torch.tensor([table.isolated_latency(n, *res[n]) for n in names], dtype=torch.float64)
        rows.append(t - base_t)
        ys.append(float(ms) - dense_ms)
    if not rows:
        raise ValueError("fit_layer_scales needs at least one thinned (non-dense) point")
    a, y = torch.stack(rows), torch.tensor(ys, dtype=torch.float64)
    moved = (a.abs().sum(0) > 0)
    free = moved.clone()
    e = torch.full((len(names),), prior, dtype=torch.float64)
    cap = max_factor * prior
    for _ in range(len(names)):  # active set: a factor fitted out of [0, cap] is pinned at the bound, the rest re-fitted
        cols = free.nonzero().squeeze(1)
        if cols.numel() == 0:
            break
        ac = a[:, cols]
        lam = ridge * float((ac ** 2).sum(0).mean())
        rhs = y - a[:, ~free] @ e[~free]
        lhs = ac.T @ ac + lam * torch.eye(cols.numel(), dtype=torch.float64)
        sol = torch.linalg.solve(lhs, ac.T @ rhs + lam * torch.full((cols.numel(),), prior, dtype=torch.float64))
        e[cols] = sol
        low, high = cols[sol < 0], cols[sol > cap]
        if low.numel() == 0 and high.numel() == 0:
            break
        e[low], e[high] = 0.0, cap
        free[low], free[high] = False, False
    resid = a @ e - y
    rms = float(resid.pow(2).mean().sqrt())
    table.layer_scale = {n: float(e[i]) / prior if prior > 0 else float(e[i]) for i, n in enumerate(names) if moved[i]}
    table.overhead_ms = dense_ms - table.scale * table.layer_sum({})
    table.meta["in_graph"] = {"points": len(rows), "ridge": ridge, "residual_rms_ms": rms, "dense_ms": dense_ms}
    return dict(table.layer_scale), rms


def thinned_copy(model: nn.Module, spec: float | Mapping[str, float], example_inputs: Any, *, channel_multiple: int,
                 **pruner_kwargs: Any) -> tuple[nn.Module, dict[str, int]]:
    """A physically pruned copy of ``model`` at ``spec`` (one sparsity for every group, or one per
    group root) and its channel config as the table reads it. ``model`` itself is not modified."""
    from pruning.controllers import FixedController
    from pruning.pruner import Pruner

    kw = {"granularity": "channel", **pruner_kwargs}
    pruner = Pruner(copy.deepcopy(model), controller=FixedController(spec), example_inputs=example_inputs,
                    channel_multiple=channel_multiple, **kw)
    pruner.update()
    cfg = pruner.channel_config()  # read before finalize: the masks go with it
    return pruner.finalize().eval(), cfg


def probe_sparsities(groups: Sequence[Any], probe_sparsity: float, channel_multiple: int) -> dict[str, float]:
    """Per group root, the sparsity of its probe (groups that cannot thin at this multiple are left out)."""
    check_sparsity(probe_sparsity, "probe_sparsity")
    return {g.root: probe_sparsity for g in groups
            if kept_channels(g.size, probe_sparsity, channel_multiple) < g.size}


def calibrate_in_graph(
    table: LatencyTable,
    model: nn.Module,
    example_inputs: Any,
    measure_many: MeasureMany,
    *,
    channel_multiple: int = 8,
    probe_sparsity: float = 0.75,
    ridge: float = 0.05,
    max_factor: float = 3.0,
    holdout: Sequence[float | Mapping[str, float]] = (),
    pruner_kwargs: Mapping[str, Any] | None = None,
    prior: Literal["table", "proportional"] = "table",
) -> GraphCalibration:
    """Probe ``model`` whole with one channel group thinned at a time and fit ``table`` to it (in place).

    ``measure_many(models) -> ms per model`` times physically pruned copies of ``model`` (dense first,
    then one per group, then ``holdout``) side by side; ``holdout`` entries (a global sparsity or a
    per-group sparsity map) are measured with the probes but left out of the fit, and returned as
    (predicted, measured) pairs to check the fit out of sample. ``model`` itself is not modified.

    ``prior`` is what the ridge pulls every factor toward: ``"table"`` keeps the table's current
    ``scale`` (the caller calibrated it); ``"proportional"`` first sets ``scale`` to the measured dense
    graph over the isolated sum, with no constant overhead and any earlier per-layer factors dropped
    (a table whose constant overhead absorbed the isolated timings' excess is a poor prior: its scale is 1).
    """
    if prior not in ("table", "proportional"):
        raise ValueError(f"prior must be 'table' or 'proportional'; got {prior!r}")
    from pruning.controllers import FixedController
    from pruning.groups import Coupling
    from pruning.pruner import Pruner

    kw = dict(pruner_kwargs or {})
    kw.setdefault("granularity", "channel")

    def thinned(spec: float | Mapping[str, float], coupling: Coupling | None) -> tuple[nn.Module, dict[str, int]]:
        return thinned_copy(model, spec, example_inputs, channel_multiple=channel_multiple, coupling=coupling, **kw)

    ref = Pruner(copy.deepcopy(model), controller=FixedController(0.0), example_inputs=example_inputs,
                 channel_multiple=channel_multiple, **kw)
    coupling = Coupling(groups=ref.groups, skipped=ref.skipped)
    sizes = {g.root: g.size for g in ref.groups}
    probes = probe_sparsities(ref.groups, probe_sparsity, channel_multiple)
    models: list[nn.Module] = [copy.deepcopy(model).eval()]
    configs: list[dict[str, int]] = [{}]
    for root, sp in probes.items():
        m, cfg = thinned({root: sp}, coupling)
        models.append(m)
        configs.append(cfg)
    hold_cfgs = []
    for spec in holdout:
        m, cfg = thinned(spec, coupling)
        models.append(m)
        hold_cfgs.append(cfg)
    log.info("in-graph calibration: timing %d whole-graph probes (%d groups, %d holdout)",
             len(models), len(probes), len(hold_cfgs))
    ms = [float(v) for v in measure_many(models)]
    if len(ms) != len(models):
        raise ValueError(f"measure_many returned {len(ms)} latencies for {len(models)} models")
    n_fit = 1 + len(probes)
    if prior == "proportional":
        table.layer_scale = {}
        table.scale, table.overhead_ms = ms[0] / table.layer_sum({}), 0.0
    points = list(zip(configs, ms[:n_fit], strict=True))
    layer_scale, rms = fit_layer_scales(table, points, ridge=ridge, max_factor=max_factor)
    fitted = tuple((root, kept_channels(sizes[root], sp, channel_multiple), m, table.predict(cfg))
                   for (root, sp), cfg, m in zip(probes.items(), configs[1:], ms[1:n_fit], strict=True))
    held = tuple((table.predict(cfg), m) for cfg, m in zip(hold_cfgs, ms[n_fit:], strict=True))
    log.info("in-graph calibration: dense %.2f ms, probe residual RMS %.3f ms, holdout %s", ms[0], rms,
             [f"{p:.2f} pred / {m:.2f} meas" for p, m in held])
    return GraphCalibration(dense_ms=ms[0], probes=fitted, layer_scale=layer_scale, residual_rms_ms=rms, holdout=held)


@dataclass(frozen=True)
class SavingFit:
    """What the whole-graph saving fit saw and did (ms as ``measure_many`` timed them)."""

    dense_ms: float
    points: tuple[tuple[float, float, float], ...]  # (uniform sparsity, fitted ms, measured ms)
    before: tuple[float, ...]  # each point's prediction before the fit (the table as it came)
    scale_factor: float  # the fitted scale over the table's scale before the fit
    residual_rms_ms: float  # RMS of (fitted - measured) over the thinned points


def fit_saving(
    table: LatencyTable,
    model: nn.Module,
    example_inputs: Any,
    measure_many: MeasureMany,
    *,
    sparsities: Sequence[float] = (0.25, 0.5, 0.75),
    channel_multiple: int = 8,
    pruner_kwargs: Mapping[str, Any] | None = None,
) -> SavingFit:
    """Fit ``table``'s overall scale to whole-graph timings of ``model`` thinned uniformly (in place).

    Why: layers timed alone overcount what the graph pays (each pays its own layout conversions), and
    not by a constant: SSDlite320's isolated layers sum to 16.5 ms on ONNX Runtime CPU where the
    folded graph runs 7.0. Anchored to the dense model by a constant overhead (-9.5 ms), the table
    predicted 1.84 ms for a model measuring 4.7-5.0, so a controller aiming at a 3.5 ms budget cut to
    1.63x and its PI correction sat at its clip (benchmarks/RESULTS.md prune_job_oneshot2).

    The fit keeps every layer's relative cost (what an allocator ranks by) and re-fits two numbers:
    the line passes through the measured dense model exactly (budgets are shares of it) and its
    slope is the least-squares ratio of measured to tabled savings, ``scale' = Σ Δx·Δy / Σ Δx²`` over
    the thinned copies (``Δx`` the drop of :meth:`LatencyTable.layer_sum`, ``Δy`` the measured drop).
    Far cheaper than :func:`calibrate_in_graph` (1 + len(sparsities) timings, not one per group);
    that one also fixes each layer's share, which a latency-aware knapsack needs.
    """
    if not sparsities:
        raise ValueError("fit_saving needs at least one uniform sparsity to thin the model to")
    for s in sparsities:
        check_sparsity(s, "sparsities")
    kw = dict(pruner_kwargs or {})
    models: list[nn.Module] = [copy.deepcopy(model).eval()]
    configs: list[dict[str, int]] = [{}]
    for s in sparsities:
        m, cfg = thinned_copy(model, float(s), example_inputs, channel_multiple=channel_multiple, **kw)
        models.append(m)
        configs.append(cfg)
    log.info("saving fit: timing the dense graph and %d uniformly thinned copies", len(sparsities))
    ms = [float(v) for v in measure_many(models)]
    if len(ms) != len(models):
        raise ValueError(f"measure_many returned {len(ms)} latencies for {len(models)} models")
    before = tuple(table.predict(cfg) for cfg in configs[1:])
    xs = [table.layer_sum(cfg) for cfg in configs]
    dx = [xs[0] - x for x in xs[1:]]
    dy = [ms[0] - y for y in ms[1:]]
    den = sum(d * d for d in dx)
    if den <= 1e-12:
        raise ValueError(f"fit_saving: no thinned copy changes the table's prediction at channel multiple "
                         f"{channel_multiple} (sparsities {list(sparsities)}); use larger sparsities")
    slope = sum(a * b for a, b in zip(dx, dy, strict=True)) / den
    if slope <= 0:
        raise ValueError(f"fit_saving: the thinned copies measured no faster than the dense graph "
                         f"({ms[0]:.3f} ms dense, {[round(y, 3) for y in ms[1:]]} thinned); re-measure on a "
                         "quieter machine")
    factor = slope / table.scale
    table.scale, table.overhead_ms = float(slope), float(ms[0] - slope * xs[0])
    fitted = [table.predict(cfg) for cfg in configs[1:]]
    rms = (sum((f - y) ** 2 for f, y in zip(fitted, ms[1:], strict=True)) / len(fitted)) ** 0.5
    log.info("saving fit: dense %.2f ms, scale x%.3f, %s", ms[0], factor,
             [f"{s:.2f}: {f:.2f} fit / {y:.2f} meas" for s, f, y in zip(sparsities, fitted, ms[1:], strict=True)])
    return SavingFit(dense_ms=ms[0], points=tuple((float(s), f, y) for s, f, y in zip(sparsities, fitted, ms[1:],
                                                                                         strict=True)),
                     before=before, scale_factor=float(factor), residual_rms_ms=float(rms))
