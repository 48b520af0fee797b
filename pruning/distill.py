"""Knowledge distillation from the dense model while a pruned one fine-tunes (generic parts).

- Output distillation (Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network",
  2015): KL divergence between temperature-softened class distributions, scaled by T².
- Feature distillation with attention maps (Zagoruyko & Komodakis, "Paying More Attention to
  Attention", ICLR 2017): each feature map becomes a spatial map mean_c(x²), L2-normalised per
  sample, so student and teacher compare even when pruning changed the student's channel count.

The teacher never receives gradients: its outputs are detached here (callers also run it under
``torch.no_grad``). Detector-specific wiring lives in :mod:`perception.distill`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class FeatureTap:
    """Capture the outputs of named submodules on every forward (``tap.outputs[name]``).

    Use as a context manager or call :meth:`remove`; hooks hold no reference to the tensors after
    :meth:`clear`.
    """

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        mods = dict(model.named_modules())
        missing = [n for n in names if n not in mods]
        if missing:
            raise ValueError(f"FeatureTap: no submodule named {missing} (see model.named_modules())")
        self.outputs: dict[str, Any] = {}
        self._handles = [mods[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            self.outputs[name] = out

        return hook

    def clear(self) -> None:
        self.outputs = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def kd_logits_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over all leading positions (classes last)."""
    if student.shape != teacher.shape:
        raise ValueError(f"logits shapes differ: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature!r}")
    c = student.shape[-1]
    s = F.log_softmax(student.reshape(-1, c) / temperature, dim=-1)
    t = F.log_softmax(teacher.detach().reshape(-1, c) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def attention_map(x: torch.Tensor) -> torch.Tensor:
    """Per-sample spatial attention of an [N, C, H, W] map: mean over channels of x², flattened, L2-normalised."""
    if x.dim() != 4:
        raise ValueError(f"attention_map needs an [N, C, H, W] tensor; got shape {tuple(x.shape)}")
    return F.normalize(x.pow(2).mean(1).flatten(1), dim=1)


def attention_loss(student: Iterable[torch.Tensor], teacher: Iterable[torch.Tensor]) -> torch.Tensor:
    """Σ over paired feature maps of the mean squared difference of their attention maps (any channel counts)."""
    total: torch.Tensor | None = None
    for s, t in zip(student, teacher, strict=True):
        t = t.detach()
        if s.shape[-2:] != t.shape[-2:]:
            t = F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=False)
        term = (attention_map(s) - attention_map(t)).pow(2).mean()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("attention_loss got no feature maps")
    return total


def as_tensors(out: Any) -> list[torch.Tensor]:
    """Feature maps of a module output in order (a tensor, a list/tuple, or a dict such as a backbone's)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    return [t for o in out for t in as_tensors(o)]


def freeze(teacher: nn.Module) -> nn.Module:
    """Put the teacher in eval mode with no parameter requiring gradients; returns it."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
