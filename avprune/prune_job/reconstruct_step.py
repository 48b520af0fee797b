"""Train hook: re-solve the layers reading pruned channels once, when the cut has reached the budget.

``pruning.reconstruct_images`` > 0 turns it on. A candidate's masks grow over its ramp; once the
allocation has caught up with the ramp's end (the target is the budget and the last mask update
met it), :func:`pruning.reconstruct.reconstruct` re-fits every 1x1 conv that reads pruned channels
to the dense model's outputs on that many training images, and the rest of the fine-tune starts
from there. Once, not at every update: a solve costs one partial forward pass per layer and image
(~1-3 min on one CPU thread for SSDlite320 on 64 images), and measured one-shot it is the first cut
that loses the most (``benchmarks/RESULTS.md`` ``oneshot_recovery_recon``: step-0 mAP of a 1.53x
cut 0.31 -> 0.57, dense 0.645).

It runs after the pruner's hook (that step's masks) and before the measuring hook, so the step's
measurement sees the re-solved model. The solved weights are in the checkpoints the trial writes,
and so is this hook's state: a trial resumed after the solve step does not solve again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch import nn

log = logging.getLogger(__name__)


class ReconstructStep:
    """Call :func:`pruning.reconstruct.reconstruct` at the first mask-update step >= ``from_step``
    where ``ready()`` holds (or at ``last_step``, whichever comes first), once."""

    def __init__(self, model: nn.Module, teacher: nn.Module, batches: Callable[[], list[Any]], *,
                 from_step: int, last_step: int, update_every: int, ready: Callable[[], bool] = lambda: True,
                 forward_fn: Callable[[nn.Module, Any], Any] | None = None) -> None:
        if update_every < 1:
            raise ValueError(f"update_every {update_every!r}: give the pruner's mask-update interval (>= 1)")
        self.model, self.teacher, self.batches, self.forward_fn = model, teacher, batches, forward_fn
        self.from_step, self.last_step, self.update_every, self.ready = from_step, last_step, update_every, ready
        self.done_step: int | None = None
        self.summary: dict[str, float] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"done_step": self.done_step, "summary": dict(self.summary)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done_step = state.get("done_step")
        self.summary = dict(state.get("summary") or {})

    def due(self, steps_done: int) -> bool:
        """Whether the solve runs after ``steps_done`` optimizer steps (the pruner's step count)."""
        if self.done_step is not None or steps_done % self.update_every or steps_done < min(self.from_step, self.last_step):
            return False
        return steps_done >= self.last_step or bool(self.ready())

    def __call__(self, ctx: Any) -> None:
        steps_done = ctx.step + 1  # the pruner counts completed steps; it updated masks when this divides
        if not self.due(steps_done):
            return
        import time

        from pruning.reconstruct import fit_summary, reconstruct

        t0 = time.perf_counter()
        was_training = self.model.training
        fits = reconstruct(self.model, self.teacher, self.batches(), forward_fn=self.forward_fn)
        self.model.train(was_training)
        self.done_step = steps_done
        self.summary = {"step": steps_done, "seconds": time.perf_counter() - t0, **fit_summary(fits)}
        log.info("reconstruction at step %d: %d layers in %.0f s, mean relative error %.3f -> %.3f", steps_done,
                 len(fits), self.summary["seconds"], self.summary["mean_error_before"], self.summary["mean_error_after"])
