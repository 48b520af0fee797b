"""BatchNorm running statistics of masked channels, kept for the channels' return.

A masked channel feeds zeros into its BatchNorm, so in training mode the BN's running mean and
variance for that channel decay toward 0. If the channel later regrows (dynamic network surgery:
Guo et al., NeurIPS 2016), evaluation would normalise it by ~sqrt(eps) and blow its activations
up by orders of magnitude until the statistics recover. This keeper saves a channel's running
statistics when it is masked and puts them back when it returns, so a regrown channel is
normalised as it was when it left.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class BatchNormStatsKeeper:
    """Saved (running_mean, running_var) per BatchNorm, updated on mask transitions."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = modules
        self.saved: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def transition(self, name: str, idxs: torch.Tensor, old_keep: torch.Tensor, new_keep: torch.Tensor) -> None:
        """Channels ``idxs`` of BatchNorm ``name`` change keep state from ``old_keep`` to ``new_keep``."""
        bn = self.modules[name]
        if not isinstance(bn, _BatchNorm) or bn.running_mean is None or bn.running_var is None:
            return
        leaving = idxs[(old_keep > 0) & (new_keep == 0)]
        returning = idxs[(old_keep == 0) & (new_keep > 0)]
        if len(leaving) == 0 and len(returning) == 0:
            return
        mean, var = self.saved.setdefault(name, (bn.running_mean.detach().clone(), bn.running_var.detach().clone()))
        with torch.no_grad():
            mean[leaving], var[leaving] = bn.running_mean[leaving], bn.running_var[leaving]
            bn.running_mean[returning], bn.running_var[returning] = mean[returning], var[returning]

    def state_dict(self) -> dict[str, Any]:
        return {k: (m.clone(), v.clone()) for k, (m, v) in self.saved.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.saved = {k: (m.clone(), v.clone()) for k, (m, v) in state.items()}
