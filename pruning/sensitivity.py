"""Per-layer sensitivity scans: the metric as one layer alone is pruned to increasing sparsity.

The profile feeds the ``layer_adaptive`` controller and the report's sensitivity curves, in the
spirit of Li et al. ("Pruning Filters for Efficient ConvNets", ICLR 2017, Fig. 2) and NetAdapt
(Yang et al., ECCV 2018). :func:`scan_layer` handles one layer so a caller (e.g. the prune job,
on Ray) can scan layers in parallel; masks are applied to a private copy of the
model, so the caller's model is never touched.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from pruning.controllers import FixedController
from pruning.granularity import check_sparsity
from pruning.groups import Coupling

log = logging.getLogger(__name__)

EvaluateFn = Callable[[nn.Module], float]
DEFAULT_SPARSITIES = (0.0, 0.25, 0.5, 0.75)


def _unit_of(pruner: Any, layer_name: str) -> str:
    if layer_name in pruner.units:
        return layer_name
    for g in pruner.groups:  # a residual partner scans its whole coupled group
        if layer_name in g.out_layers:
            return g.root
    raise ValueError(
        f"layer {layer_name!r} is not prunable with granularity={pruner.granularity!r}; "
        f"prunable units: {pruner.units[:8]}{' ...' if len(pruner.units) > 8 else ''}"
    )


def scan_layer(
    model: nn.Module,
    layer_name: str,
    evaluate_fn: EvaluateFn,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    *,
    importance: str = "magnitude",
    granularity: str = "channel",
    **pruner_kwargs: Any,
) -> list[tuple[float, float]]:
    """``[(sparsity, metric), ...]`` with only ``layer_name`` (its unit) pruned, on a copy of ``model``.

    ``evaluate_fn(model) -> metric`` (higher is better, e.g. mAP) sees the masked copy.
    ``pruner_kwargs`` go to :class:`pruning.Pruner` (``example_inputs`` for channel granularity).
    """
    from pruning.pruner import Pruner

    for s in sparsities:
        check_sparsity(s)
    work = copy.deepcopy(model)
    controller = FixedController({}, default=0.0)
    pruner = Pruner(work, importance=importance, granularity=granularity, controller=controller, **pruner_kwargs)
    unit = _unit_of(pruner, layer_name)
    curve = []
    for s in sparsities:
        controller.per_unit = {unit: float(s)}
        pruner.update()
        curve.append((float(s), float(evaluate_fn(work))))
    return curve


def sensitivity_scan(
    model: nn.Module,
    evaluate_fn: EvaluateFn,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    *,
    layers: Sequence[str] | None = None,
    importance: str = "magnitude",
    granularity: str = "channel",
    **pruner_kwargs: Any,
) -> dict[str, list[tuple[float, float]]]:
    """:func:`scan_layer` for every prunable unit (or ``layers``), sequentially."""
    from pruning.pruner import Pruner

    probe = Pruner(copy.deepcopy(model), importance="magnitude", granularity=granularity,
                   controller=FixedController(0.0), **pruner_kwargs)
    if layers is None:
        layers = list(probe.units)
    if granularity == "channel" and "coupling" not in pruner_kwargs:
        # Trace the dependency graph once, not once per layer.
        pruner_kwargs["coupling"] = Coupling(groups=probe.groups, skipped=probe.skipped)
    profile = {}
    for name in layers:
        profile[name] = scan_layer(model, name, evaluate_fn, sparsities, importance=importance,
                                   granularity=granularity, **pruner_kwargs)
        log.info("sensitivity %s: %s", name, profile[name])
    return profile


def metric_drops(profile: Mapping[str, Sequence[tuple[float, float]]]) -> dict[str, list[tuple[float, float]]]:
    """Turn ``{layer: [(s, metric)]}`` into ``{layer: [(s, metric(0) - metric(s))]}`` (needs s = 0 scanned)."""
    out = {}
    for layer, curve in profile.items():
        base = dict(curve).get(0.0)
        if base is None:
            raise ValueError(f"sensitivity curve of {layer!r} has no sparsity-0 point to measure drops from")
        out[layer] = [(s, base - v) for s, v in curve]
    return out
