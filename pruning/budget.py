"""Budget controller: hold a latency budget and an accuracy floor at once.

The controller drives one global sparsity level ``u`` (every unit gets the same target; the
per-layer importance thresholds then decide *which* channels go). Each step it predicts the
latency of the channel configuration ``u`` implies with a cheap model (a HALP-style lookup table,
:mod:`pruning.latency_model`); every ``measure_every`` steps it measures real latency and mAP.

- Latency over budget (beyond a dead band) and mAP above the floor: raise ``u``.
- Latency under budget (beyond the dead band): lower ``u``, giving capacity back.
- Measured mAP under the floor: hold ``u`` (a freshly pruned model dips, then recovers with
  fine-tuning: NetAdapt's "prune, fine-tune briefly, then judge"). If it is still under the floor
  ``floor_patience`` measurements in a row, drop ``u`` below that sparsity (``backoff``) and cap it
  there; masked weights regrow because masks are recomputed from stored weights. Fine-tuning keeps
  improving the model, so a cap is not forever: after ``floor_patience`` measurements in a row at
  least ``lift_margin`` above the floor, the cap rises by ``backoff`` again (the margin is the
  hysteresis that keeps cap and floor from chattering).

Control law: discrete PI in velocity form, ``Δu = kp·(e_t − e_{t−1}) + ki·e_t`` with the relative
error ``e = (latency − budget) / budget``. In velocity form ``u`` itself is the integrator, so
clipping ``u`` to ``[0, ceiling]`` is the anti-windup (no hidden integral keeps growing while
saturated). A dead band (hysteresis) around the budget freezes ``u`` once within it, so the loop
settles instead of dithering on quantised channel counts, and ``max_rate`` bounds how fast
sparsity may move so fine-tuning keeps up. Measured latency recalibrates the prediction
(``bias = measured / predicted``), which corrects a table measured on a different load.

If ``u`` sits at its ceiling (set by the mAP floor, or ``max_sparsity``) while latency is still
over budget for ``patience`` steps, the budget pair is infeasible: ``.infeasible`` turns True and
``.best_point`` holds the best measured point (lowest latency among points meeting the floor).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pruning._controller import CONTROLLERS, Controller
from pruning.granularity import check_sparsity

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OperatingPoint:
    """One measured (or predicted, when nothing is measured) point of the loop."""

    step: int
    sparsity: float
    latency_ms: float
    map: float | None  # None when no mAP was measured at this point


@CONTROLLERS.register("budget")
class BudgetController(Controller):
    """PI control of global sparsity against a latency budget, bounded by an mAP floor."""

    def __init__(
        self,
        latency_budget_ms: float,
        map_floor: float,
        predict_latency: Callable[[dict[str, int]], float],
        measure: Callable[[], tuple[float, float]] | None = None,
        measure_every: int = 100,
        *,
        kp: float = 0.1,
        ki: float = 0.5,
        deadband: float = 0.02,
        max_rate: float = 0.05,
        max_sparsity: float = 0.95,
        backoff: float = 0.05,
        patience: int = 3,
        warmup_steps: int = 0,
        floor_patience: int = 2,
        lift_margin: float = 0.01,
    ) -> None:
        super().__init__()
        if not latency_budget_ms > 0:
            raise ValueError(f"latency_budget_ms must be > 0; got {latency_budget_ms!r}")
        if not 0.0 <= map_floor <= 1.0:
            raise ValueError(f"map_floor must be in [0, 1] (COCO mAP); got {map_floor!r}")
        if measure_every < 1:
            raise ValueError(f"measure_every must be >= 1; got {measure_every}")
        if not 0.0 <= deadband < 0.5:
            raise ValueError(f"deadband must be in [0, 0.5) (relative latency error); got {deadband!r}")
        if not 0.0 < max_rate <= 1.0:
            raise ValueError(f"max_rate must be in (0, 1]; got {max_rate!r}")
        check_sparsity(max_sparsity, "max_sparsity")
        if floor_patience < 1:
            raise ValueError(f"floor_patience must be >= 1 (measurements under the mAP floor before backing off); got {floor_patience}")
        self.latency_budget_ms, self.map_floor = float(latency_budget_ms), float(map_floor)
        self.predict_latency, self.measure, self.measure_every = predict_latency, measure, measure_every
        self.kp, self.ki, self.deadband, self.max_rate = kp, ki, deadband, max_rate
        self.max_sparsity, self.backoff, self.patience, self.warmup_steps = max_sparsity, backoff, patience, warmup_steps
        self.u = 0.0  # global sparsity level
        self.ceiling = max_sparsity
        self.bias = 1.0  # measured / predicted latency
        self.prev_error: float | None = None
        self.saturated_steps = 0
        self.floor_patience, self.under_floor = floor_patience, 0
        self.lift_margin, self.above_margin = float(lift_margin), 0
        self.infeasible = False
        self.points: list[OperatingPoint] = []
        self.last_latency_ms: float | None = None

    # ------------------------------------------------------------------ loop
    def predicted(self, u: float) -> float:
        """Predicted latency (ms) at global sparsity ``u``, bias-corrected by measurements."""
        if self.config_at is None:
            raise ValueError("BudgetController is not bound: pass it to a Pruner (or call bind(units, config_at))")
        return float(self.predict_latency(self.config_at(u))) * self.bias

    def step(self) -> None:
        super().step()
        if self.last_step <= self.warmup_steps:
            return
        if self.measure is not None and self.last_step % self.measure_every == 0:
            self._on_measurement(*self.measure())
        latency = self.predicted(self.u)
        self.last_latency_ms = latency
        error = (latency - self.latency_budget_ms) / self.latency_budget_ms
        if self.measure is None:
            self._record(OperatingPoint(self.last_step, self.u, latency, None))
        if self.under_floor and error > 0:
            self.prev_error = error  # under the mAP floor: let fine-tuning recover before pruning more
            return
        if abs(error) <= self.deadband:
            self.prev_error = error  # inside the band: hold u (hysteresis)
            self.saturated_steps = 0
            return
        prev = error if self.prev_error is None else self.prev_error
        du = self.kp * (error - prev) + self.ki * error
        du = max(-self.max_rate, min(self.max_rate, du))
        self.u = max(0.0, min(self.ceiling, self.u + du))  # clipping the integrator = anti-windup
        self.prev_error = error
        at_top = self.u >= self.ceiling - 1e-9
        self.saturated_steps = self.saturated_steps + 1 if (error > self.deadband and at_top) else 0
        if self.saturated_steps >= self.patience and not self.infeasible:
            self.infeasible = True
            log.warning(
                "latency budget %.3f ms and mAP floor %.3f cannot both be met: sparsity is capped at %.3f "
                "(%s) with latency %.3f ms; best point %s",
                self.latency_budget_ms, self.map_floor, self.ceiling,
                "mAP floor" if self.ceiling < self.max_sparsity else "max_sparsity", latency, self.best_point,
            )
        elif error <= self.deadband:
            self.infeasible = False

    def _on_measurement(self, latency_ms: float, map_value: float) -> None:
        predicted_raw = self.predicted(self.u) / self.bias
        if predicted_raw > 0 and latency_ms > 0:
            # Clamp: one noisy measurement must not rescale the whole model.
            self.bias = max(0.5, min(2.0, latency_ms / predicted_raw))
        self._record(OperatingPoint(self.last_step, self.u, float(latency_ms), float(map_value)))
        if map_value >= self.map_floor:
            self.under_floor = 0
            self.above_margin = self.above_margin + 1 if map_value >= self.map_floor + self.lift_margin else 0
            if self.above_margin >= self.floor_patience and self.ceiling < self.max_sparsity:
                self.ceiling = min(self.max_sparsity, self.ceiling + self.backoff)
                self.above_margin = 0
            return
        self.above_margin = 0
        self.under_floor += 1
        if self.under_floor >= self.floor_patience:
            # Still under after a recovery window: back off below this sparsity for good (re-trying
            # it would oscillate).
            self.ceiling = max(0.0, min(self.ceiling, self.u - self.backoff))
            self.u = min(self.u, self.ceiling)
            self.prev_error = None
            self.under_floor = 0

    def _record(self, point: OperatingPoint) -> None:
        self.points.append(point)
        if len(self.points) > 10_000:  # keep memory bounded on long runs
            del self.points[: len(self.points) - 10_000]

    # ------------------------------------------------------------------ outputs
    def target(self, unit: str) -> float:
        return self.u

    @property
    def best_point(self) -> OperatingPoint | None:
        """Lowest-latency point meeting the mAP floor (highest-mAP point if none does)."""
        if not self.points:
            return None
        ok = [p for p in self.points if p.map is None or p.map >= self.map_floor]
        if ok:
            return min(ok, key=lambda p: (p.latency_ms, -(p.map or 0.0)))
        return max(self.points, key=lambda p: p.map or 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "u": self.u, "ceiling": self.ceiling, "bias": self.bias, "prev_error": self.prev_error,
            "saturated_steps": self.saturated_steps, "infeasible": self.infeasible, "under_floor": self.under_floor,
            "above_margin": self.above_margin,
            "last_latency_ms": self.last_latency_ms,
            "points": [asdict(p) for p in self.points],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.u, self.ceiling, self.bias = float(state["u"]), float(state["ceiling"]), float(state["bias"])
        self.prev_error = state["prev_error"]
        self.saturated_steps, self.infeasible = int(state["saturated_steps"]), bool(state["infeasible"])
        self.under_floor = int(state.get("under_floor", 0))
        self.above_margin = int(state.get("above_margin", 0))
        self.last_latency_ms = state["last_latency_ms"]
        self.points = [OperatingPoint(**p) for p in state["points"]]
