"""The controller protocol shared by every threshold controller (see :mod:`pruning.controllers`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pruning.registry import Registry

CONTROLLERS: Registry[Callable[..., Controller]] = Registry("controller")

ConfigAt = Callable[[float], dict[str, int]]


class Controller:
    """Base class: a step counter plus per-unit targets."""

    def __init__(self) -> None:
        self.last_step = 0
        self.units: tuple[str, ...] = ()
        self.config_at: ConfigAt | None = None

    def bind(self, units: Sequence[str], config_at: ConfigAt | None = None) -> None:
        """Tell the controller which units it drives (called by the pruner)."""
        self.units = tuple(units)
        self.config_at = config_at

    def step(self) -> None:
        """Advance one training step."""
        self.last_step += 1

    def target(self, unit: str) -> float:
        raise NotImplementedError

    def targets(self) -> dict[str, float]:
        """Target sparsity per unit at the current step."""
        return {u: self.target(u) for u in self.units}

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.last_step = int(state["last_step"])
