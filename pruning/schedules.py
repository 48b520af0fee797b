"""Sparsity schedules: pure functions of the training step.

The cubic ramp is Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning for
model compression" (ICLR-W 2018, arXiv:1710.01878):

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3   for t0 <= t <= t0 + n*dt

It prunes fast early, while the network has many redundant weights, and slowly late, when each
removal hurts more ("low early, high late" in total sparsity, with a decreasing rate).
"""

from __future__ import annotations

import math


def _check_sparsity(name: str, value: float) -> None:
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise ValueError(f"{name} must be in [0, 1); got {value!r}")


def constant(step: int, sparsity: float) -> float:
    """The same sparsity at every step."""
    _check_sparsity("sparsity", sparsity)
    return float(sparsity)


def cubic(
    step: int,
    *,
    final_sparsity: float,
    initial_sparsity: float = 0.0,
    begin_step: int = 0,
    end_step: int,
    frequency: int = 1,
) -> float:
    """Zhu & Gupta's cubic ramp from ``initial_sparsity`` at ``begin_step`` to ``final_sparsity``.

    The ramp advances only every ``frequency`` steps (their Δt), so masks change in discrete
    jumps that fine-tuning can recover from. Before ``begin_step`` returns the initial value,
    after ``end_step`` the final value.
    """
    _check_sparsity("final_sparsity", final_sparsity)
    _check_sparsity("initial_sparsity", initial_sparsity)
    if end_step <= begin_step:
        raise ValueError(f"end_step must be > begin_step; got begin_step={begin_step}, end_step={end_step}")
    if frequency < 1:
        raise ValueError(f"frequency must be >= 1; got {frequency}")
    if step <= begin_step:
        return float(initial_sparsity)
    if step >= end_step:
        return float(final_sparsity)
    t = ((step - begin_step) // frequency) * frequency  # hold between updates
    progress = min(1.0, t / (end_step - begin_step))
    return float(final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** 3)


def linear(step: int, *, final_sparsity: float, begin_step: int = 0, end_step: int) -> float:
    """Linear ramp from 0 to ``final_sparsity`` (a baseline to compare the cubic ramp against)."""
    _check_sparsity("final_sparsity", final_sparsity)
    if end_step <= begin_step:
        raise ValueError(f"end_step must be > begin_step; got begin_step={begin_step}, end_step={end_step}")
    progress = min(1.0, max(0.0, (step - begin_step) / (end_step - begin_step)))
    return float(final_sparsity * progress)


LATENCY_SCHEDULES = ("exponential", "cubic")


def latency_target(step: int, *, dense_ms: float, budget_ms: float, end_step: int, kind: str = "exponential") -> float:
    """A latency target shrinking from ``dense_ms`` at step 0 to ``budget_ms`` at ``end_step``, then held.

    ``exponential`` (HALP's schedule) moves by the same *ratio* every step: T = D·(B/D)^p;
    ``cubic`` follows Zhu & Gupta's shape on latency: T = B + (D − B)(1 − p)³ (fast early, slow late).
    ``end_step <= 0`` is one-shot: the budget from the first step.
    """
    if kind not in LATENCY_SCHEDULES:
        raise ValueError(f"latency schedule must be one of {LATENCY_SCHEDULES}; got {kind!r}")
    if not (dense_ms > 0 and budget_ms > 0):
        raise ValueError(f"dense_ms and budget_ms must be > 0; got {dense_ms!r}, {budget_ms!r}")
    if end_step <= 0 or step >= end_step:
        return float(budget_ms)
    p = max(0.0, step / end_step)
    if kind == "exponential":
        return float(dense_ms * (budget_ms / dense_ms) ** p)
    return float(budget_ms + (dense_ms - budget_ms) * (1.0 - p) ** 3)
