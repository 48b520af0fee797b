"""Learning rate as a pure function of the step: linear warm-up, then cosine decay.

A function of the step alone (no scheduler object) makes resuming exact by construction:
the resumed run computes the same rate for step k as the uninterrupted one.
Cosine decay after Loshchilov & Hutter, "SGDR" (ICLR 2017); warm-up after Goyal et al.,
"Accurate, Large Minibatch SGD" (2017).
"""

from __future__ import annotations

import math

#: The warm-up starts at this fraction of the peak rate.
WARMUP_START = 0.01


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Rate for optimizer step ``step`` (0-based) of ``total_steps``.

    Steps ``0 .. warmup_steps-1`` ramp linearly from ``WARMUP_START * base_lr`` towards
    ``base_lr``; the rest follow a half cosine from ``base_lr`` down to ``min_lr_ratio * base_lr``
    at the last step.
    """
    if step < warmup_steps:
        frac = (step + 1) / warmup_steps
        return base_lr * (WARMUP_START + (1.0 - WARMUP_START) * frac)
    decay_steps = max(1, total_steps - warmup_steps - 1)
    t = min(1.0, (step - warmup_steps) / decay_steps)
    floor = base_lr * min_lr_ratio
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
