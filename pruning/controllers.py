"""Threshold controllers: how much of each prunable unit to prune at each step.

Every controller follows the LR-scheduler protocol (``step()``, ``state_dict()``,
``load_state_dict()``) and answers ``targets() -> {unit: sparsity}``; the pruner turns each target
into a per-unit threshold on normalised importance (see :mod:`pruning.granularity`) and records
both. ``bind()`` is called once by the pruner with the unit names and a function giving the
channel configuration a uniform sparsity would produce (for latency predictions).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pruning import schedules
from pruning._controller import CONTROLLERS, ConfigAt, Controller
from pruning.allocation_controller import AllocationController  # registers "allocation"
from pruning.budget import BudgetController, OperatingPoint
from pruning.granularity import check_sparsity


@CONTROLLERS.register("fixed")
class FixedController(Controller):
    """A constant sparsity, global or per unit (``{"layer": 0.3}``; ``default`` for the rest)."""

    def __init__(self, sparsity: float | Mapping[str, float] = 0.5, default: float = 0.0) -> None:
        super().__init__()
        if isinstance(sparsity, Mapping):
            self.per_unit = {k: check_sparsity(v, f"sparsity[{k!r}]") for k, v in sparsity.items()}
            self.default = check_sparsity(default, "default sparsity")
        else:
            self.per_unit = {}
            self.default = check_sparsity(sparsity)

    def target(self, unit: str) -> float:
        return self.per_unit.get(unit, self.default)


@CONTROLLERS.register("cubic")
class CubicController(Controller):
    """Zhu & Gupta's gradual ramp (low early, high late), the same target for every unit."""

    def __init__(
        self, final_sparsity: float, end_step: int, begin_step: int = 0, initial_sparsity: float = 0.0, frequency: int = 1
    ) -> None:
        super().__init__()
        self.kw = dict(final_sparsity=final_sparsity, initial_sparsity=initial_sparsity, begin_step=begin_step,
                       end_step=end_step, frequency=frequency)
        schedules.cubic(0, **self.kw)  # validate now, not at step 1000

    def target(self, unit: str) -> float:
        return schedules.cubic(self.last_step, **self.kw)


def targets_from_profile(
    profile: Mapping[str, Sequence[tuple[float, float]]], max_drop: float, max_sparsity: float = 0.9
) -> dict[str, float]:
    """Per layer, the largest scanned sparsity whose metric drop stays within ``max_drop``.

    ``profile[layer]`` is a sensitivity curve ``[(sparsity, metric_drop), ...]`` as returned by
    :func:`pruning.sensitivity.sensitivity_scan` (drop = dense metric - pruned metric).
    """
    check_sparsity(max_sparsity, "max_sparsity")
    out: dict[str, float] = {}
    for layer, curve in profile.items():
        ok = [s for s, drop in sorted(curve) if drop <= max_drop and s <= max_sparsity]
        out[layer] = max(ok) if ok else 0.0
    return out


@CONTROLLERS.register("layer_adaptive")
class LayerAdaptiveController(Controller):
    """Per-layer final targets from a sensitivity profile, each reached by a cubic ramp.

    Robust layers (flat sensitivity curves) end sparse, sensitive ones stay dense; layers absent
    from the profile get ``default_sparsity``.
    """

    def __init__(
        self,
        profile: Mapping[str, Sequence[tuple[float, float]]],
        max_drop: float,
        end_step: int,
        begin_step: int = 0,
        max_sparsity: float = 0.9,
        default_sparsity: float = 0.0,
        frequency: int = 1,
    ) -> None:
        super().__init__()
        self.finals = targets_from_profile(profile, max_drop, max_sparsity)
        self.default = check_sparsity(default_sparsity, "default_sparsity")
        self.ramp = dict(begin_step=begin_step, end_step=end_step, frequency=frequency)
        schedules.cubic(0, final_sparsity=0.0, **self.ramp)

    def target(self, unit: str) -> float:
        final = self.finals.get(unit, self.default)
        return schedules.cubic(self.last_step, final_sparsity=final, **self.ramp)


def build_controller(name: str, **kwargs: Any) -> Controller:
    """Instantiate a registered controller: ``fixed``, ``cubic``, ``layer_adaptive``, ``budget``, ``allocation``."""
    return CONTROLLERS.get(name)(**kwargs)


__all__ = [
    "CONTROLLERS",
    "ConfigAt",
    "AllocationController",
    "BudgetController",
    "Controller",
    "CubicController",
    "FixedController",
    "LayerAdaptiveController",
    "OperatingPoint",
    "build_controller",
    "targets_from_profile",
]
