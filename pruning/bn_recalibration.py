"""BatchNorm running statistics re-estimated for the network as it is now ("adaptive BN").

Why: a channel cut changes what every later BatchNorm sees, and its running statistics follow only
at the BN momentum. torchvision's SSDlite builds its BatchNorms with momentum 0.03, so five steps
after a cut a running mean still holds ~86% of its pre-cut value (0.97**5), and it takes ~75 steps
to fall under 10%. Evaluated in that window the model reads far worse than it is: the demo's
checkpoint (0.558 mAP) cut uniformly by 10/20/30% reads 0.173/0.055/0.001 as cut and
0.484/0.447/0.288 with its statistics re-estimated on 64 training images, no training in between
(benchmarks/RESULTS.md, prune_job). A controller that judges its floor by the first reads steps
back (regrows) cuts that training would have recovered.

Li et al., "EagleEye: Fast Sub-net Evaluation for Efficient Neural Network Pruning" (ECCV 2020)
show that evaluating a pruned sub-net after re-estimating its BN statistics on a few training
batches ("adaptive BN") ranks sub-nets as their fine-tuned accuracy does, and vanilla evaluation
does not. :func:`recalibrate_batchnorm` is that step: every tracked BatchNorm's statistics reset
and re-estimated as a cumulative average over the given batches, in eval mode otherwise (no dropout,
no weights touched), under ``torch.no_grad``.

A masked channel's statistics are re-estimated from the zeros it now carries, as training would
have decayed them; :class:`pruning.bn_stats.BatchNormStatsKeeper` still holds what they were when
the channel was masked and puts those back if it regrows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

Forward = Callable[[nn.Module, Any], object]


def tracked_batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm modules of ``model`` that keep running statistics (what evaluation reads)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def _call(model: nn.Module, batch: Any) -> object:
    return model(batch)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Sequence[Any], forward: Forward = _call) -> int:
    """Re-estimate every tracked BatchNorm's running mean and variance over ``batches``.

    ``forward(model, batch)`` runs one batch (default ``model(batch)``). Other modules stay in eval
    mode while it runs; every module's mode and every BN's momentum are restored afterwards, and on
    an error the statistics are restored too. Returns the number of BatchNorms re-estimated.
    """
    if len(batches) == 0:
        raise ValueError("recalibrate_batchnorm: no batches given; pass at least one batch of training inputs")
    bns = tracked_batchnorms(model)
    if not bns:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    saved = [(bn, bn.momentum, bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
             for bn in bns]
    ok = False
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: every batch counts alike
            bn.train()
        for batch in batches:
            forward(model, batch)
        ok = True
    finally:
        for bn, momentum, mean, var, count in saved:
            bn.momentum = momentum
            if not ok:  # nothing half-estimated is left behind
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.copy_(count)
        for m, training in modes:
            m.training = training
    return len(bns)


__all__ = ["recalibrate_batchnorm", "tracked_batchnorms"]
