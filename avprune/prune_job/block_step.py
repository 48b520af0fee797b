"""Depth pruning inside a trial (``granularity: block | channel+block``, issue #14).

One budget over both dimensions, by a simple joint rule: at the end of the learning-rate warm-up
(when :class:`pruning.block_gates.BlockGates` has a Taylor importance for every block) the blocks
are ranked by importance per millisecond (the latency-table stage's per-block cost), and the
cheapest-to-lose blocks are scheduled off, one after another, while the predicted latency is
still above the budget: for ``block`` the dense prediction, for ``channel+block`` the channels'
widest reach (every group at ``max_sparsity``), i.e. blocks cover the part of the budget the
channels cannot. Each chosen block ramps from 1 to 0 over the candidate's ramp. The channel
controller then sees the budget plus the blocks' saving (:attr:`BlockStep.removed_ms`), so it does
not cut width for latency the blocks already won.

The hook's :meth:`state_dict` (gates, decision) is saved with the fine-tune checkpoint, so a
``--resume`` mid-ramp restores the gates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from perception.train import StepContext
    from pruning.block_gates import BlockGates

log = logging.getLogger(__name__)


def pick_blocks(per_ms: Mapping[str, float], block_ms: Mapping[str, float], predicted_ms: float,
                budget_ms: float) -> list[str]:
    """Lowest importance per ms first, while ``predicted_ms`` minus the removed blocks is over the budget."""
    chosen: list[str] = []
    for name in sorted(per_ms, key=lambda n: (per_ms[n], n)):
        if predicted_ms <= budget_ms:
            break
        if block_ms.get(name, 0.0) <= 0:
            continue
        chosen.append(name)
        predicted_ms -= block_ms[name]
    return chosen


class BlockStep:
    """Train hook: steps the gates every step; decides which blocks go at ``decide_step``."""

    def __init__(self, gates: BlockGates, block_ms: Mapping[str, float], *, budget_ms: float,
                 reach_ms: Callable[[], float], decide_step: int, ramp_steps: int) -> None:
        self.gates, self.block_ms = gates, dict(block_ms)
        self.budget_ms, self.reach_ms = float(budget_ms), reach_ms
        self.decide_step, self.ramp_steps = max(1, decide_step), max(1, ramp_steps)
        self.chosen: list[str] | None = None

    @property
    def removed_ms(self) -> float:
        """Predicted saving of the blocks scheduled off (0 before the decision)."""
        return sum(self.block_ms.get(n, 0.0) for n in self.chosen or ())

    def __call__(self, ctx: StepContext) -> None:
        self.gates.step()
        if self.chosen is None and ctx.step + 1 >= self.decide_step:
            per_ms = self.gates.importance_per_ms(self.block_ms)
            self.chosen = pick_blocks(per_ms, self.block_ms, self.reach_ms(), self.budget_ms)
            self.gates.set_targets(remove=self.chosen, ramp_steps=self.ramp_steps)
            log.info("blocks scheduled off at step %d: %s (%.2f ms predicted)", ctx.step + 1, self.chosen,
                     self.removed_ms)

    def settle(self) -> None:
        """End of fine-tuning: a gate still mid-ramp goes to its nearer end (finalize needs 0 or 1)."""
        for n in self.gates.ramping():
            self.gates.set_gate(n, 0.0 if self.gates.gate(n) < 0.5 else 1.0)

    def finalize(self) -> list[str]:
        """:meth:`BlockGates.finalize` on the gated model (gated-off blocks become identities) and the
        removed names in its ``avprune_meta``, so the checkpoint rebuilds without them."""
        from perception.models import drop_blocks

        self.settle()
        gone = self.gates.removed()
        model = self.gates.finalize()
        drop_blocks(model, gone)  # already identities: records them in the checkpoint's meta
        return gone

    def apply_to(self, model: nn.Module) -> None:
        """The blocks fully gated off, removed from a finalized copy (for measuring it)."""
        from perception.models import drop_blocks

        drop_blocks(model, self.gates.removed())

    def state_dict(self) -> dict[str, Any]:
        return {"gates": self.gates.state_dict(), "chosen": self.chosen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.gates.load_state_dict(state["gates"])
        self.chosen = None if state.get("chosen") is None else list(state["chosen"])


__all__ = ["BlockStep", "pick_blocks"]
