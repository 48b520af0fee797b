"""Depth pruning inside a trial (``granularity: block | channel+block``, issue #14).

One budget over both dimensions, by a simple joint rule: at the end of the learning-rate warm-up
(when :class:`pruning.block_gates.BlockGates` has a Taylor importance for every block) the blocks
are ranked by importance per millisecond (the latency-table stage's per-block cost), and the
cheapest-to-lose blocks are scheduled off, one after another, until they cover their share of the
saving the budget needs (dense prediction minus budget): for ``block`` all of it; for
``channel+block`` ``depth_share`` of it (default :data:`DEPTH_SHARE`), or more when the channels'
widest reach (every group at ``max_sparsity``) cannot cover the rest. Why a share and not "blocks
only for what channels cannot reach": at the budgets that matter the channels reach everything
alone, so that rule never removed a block, while the measured depth speed-up beats its MAC ratio
(issue #14: 3 blocks 1.5x for 1.35x MACs) and a uniform channel cut costs 4-8 mAP points (issue
#12). Each chosen block ramps from 1 to 0 over the candidate's ramp. The channel controller then
sees the budget plus the blocks' saving (:attr:`BlockStep.removed_ms`), so it does not cut width
for latency the blocks already won.

**Ramp-back.** Every measured mAP goes to :meth:`BlockStep.observe`. When, with the chosen blocks
fully gated off (a dip mid-ramp is expected and not yet recovered), the mAP stays below the floor
for ``patience`` measurements in a row, the most important of them (measured sensitivity when known, else
its Taylor importance) turns around and ramps back to 1 over the same ramp (reversible, as the
channel masks: Guo et al., "Dynamic Network Surgery", NeurIPS 2016); one block per measurement.
A restored block is not scheduled off again, and its saving leaves :attr:`removed_ms`, so the
channel controller takes over that part of the budget.

**Frozen end.** With ``freeze_after`` (the job's last mask-changing step, as for the channel
masks), no block turns around after it, and a block brought back before it ramps up fast enough to
be whole by then: the last measured model is the one that ships (a gate snapped to 0 or 1 by
:meth:`settle` at the end would carry a change that never trained).

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


#: Fraction of the needed saving (dense prediction minus budget) that ``channel+block`` asks of depth.
DEPTH_SHARE = 0.5


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
    """Train hook: steps the gates every step; decides which blocks go at ``decide_step``; brings
    blocks back when the measured mAP stays under the floor (:meth:`observe`).

    ``reach_ms()`` is the latency the other dimension can reach without blocks (the dense
    prediction for ``block``, the channels' widest reach for ``channel+block``); ``dense_ms`` the
    dense prediction (default: ``reach_ms()`` at construction, before the channels exist).
    """

    def __init__(self, gates: BlockGates, block_ms: Mapping[str, float], *, budget_ms: float,
                 reach_ms: Callable[[], float], decide_step: int, ramp_steps: int,
                 dense_ms: float | None = None, depth_share: float = DEPTH_SHARE, patience: int = 2,
                 freeze_after: int | None = None) -> None:
        if not 0.0 <= depth_share <= 1.0:
            raise ValueError(f"depth_share must be in [0, 1]; got {depth_share!r}")
        if int(patience) != patience or patience < 1:
            raise ValueError(f"patience must be an int >= 1; got {patience!r}")
        self.gates, self.block_ms = gates, dict(block_ms)
        self.budget_ms, self.reach_ms = float(budget_ms), reach_ms
        self.dense_ms = float(reach_ms() if dense_ms is None else dense_ms)
        self.depth_share, self.patience = float(depth_share), int(patience)
        self.decide_step, self.ramp_steps = max(1, decide_step), max(1, ramp_steps)
        self.chosen: list[str] | None = None
        self.restored: list[str] = []
        self.misses = 0  # consecutive measurements under the floor
        if freeze_after is not None and (int(freeze_after) != freeze_after or freeze_after < 0):
            raise ValueError(f"freeze_after must be None or an int >= 0 (the last step that changes gates); "
                             f"got {freeze_after!r}")
        self.freeze_after = freeze_after
        self.steps = 0  # training steps seen

    @property
    def removed_ms(self) -> float:
        """Predicted saving of the blocks scheduled off (0 before the decision; restored blocks excluded)."""
        return sum(self.block_ms.get(n, 0.0) for n in self.chosen or ())

    def saving_needed_ms(self) -> float:
        """What the blocks should save: ``depth_share`` of the budget's saving, or more when the
        other dimension cannot reach the rest."""
        need = self.dense_ms - self.budget_ms
        return max(0.0, self.depth_share * need, self.reach_ms() - self.budget_ms)

    def __call__(self, ctx: StepContext) -> None:
        self.steps = ctx.step + 1
        self.gates.step()
        if self.chosen is None and ctx.step + 1 >= self.decide_step:
            per_ms = self.gates.importance_per_ms(self.block_ms)
            self.chosen = pick_blocks(per_ms, self.block_ms, self.budget_ms + self.saving_needed_ms(), self.budget_ms)
            self.gates.set_targets(remove=self.chosen, ramp_steps=self.ramp_steps)
            log.info("blocks scheduled off at step %d: %s (%.2f ms predicted)", ctx.step + 1, self.chosen,
                     self.removed_ms)

    def observe(self, map_value: float, map_floor: float) -> str | None:
        """A measured mAP: after ``patience`` misses of the floor in a row, the most important block
        still going or gone ramps back up. Returns the restored block's name, if any."""
        # misses count only once the chosen blocks are gone: a dip mid-ramp is the ramp's, not yet recovered
        if map_value >= map_floor or not self.chosen or any(self.gates.gate(n) > 0.0 for n in self.chosen):
            self.misses = 0
            return None
        self.misses += 1
        if self.misses < self.patience:
            return None
        left = None if self.freeze_after is None else self.freeze_after - self.steps
        if left is not None and left <= 0:
            log.info("mAP %.4f under the floor %.4f, but the gates are frozen since step %d: no block returns",
                     map_value, map_floor, self.freeze_after)
            return None
        name = max(self.chosen, key=lambda n: (self.gates.sensitivity.get(n, float("-inf")),
                                               self.gates.importance.get(n, 0.0), n))
        self.chosen.remove(name)
        self.restored.append(name)
        # whole by the freeze: the ramp shortens when fewer steps are left than a full swing
        self.gates.set_target(name, 1.0, self.ramp_steps if left is None else min(self.ramp_steps, left))
        self.misses = 0
        log.info("block %s ramps back up: mAP %.4f under the floor %.4f for %d measurements", name, map_value,
                 map_floor, self.patience)
        return name

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

    def report(self) -> dict[str, Any]:
        """For the trial's pruning.json: the gate events, each block's importance, the decision."""
        g = self.gates
        return {
            "block_events": [{"step": e.step, "block": e.block, "event": e.event} for e in g.history],
            "block_importance": {n: g.importance.get(n) for n in g.names},
            "block_sensitivity": dict(g.sensitivity),
            "blocks_chosen": list(self.chosen or []), "blocks_restored": list(self.restored),
            "block_decide_step": self.decide_step,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"gates": self.gates.state_dict(), "chosen": self.chosen, "restored": list(self.restored),
                "misses": self.misses, "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.gates.load_state_dict(state["gates"])
        self.chosen = None if state.get("chosen") is None else list(state["chosen"])
        self.restored = list(state.get("restored") or [])
        self.misses = int(state.get("misses") or 0)
        self.steps = int(state.get("steps") or 0)


__all__ = ["BlockStep", "pick_blocks"]
