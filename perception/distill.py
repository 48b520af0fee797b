"""Distil a (pruned) SSD detector from its dense teacher during fine-tuning.

``DistilledDetector(student, teacher)`` is a drop-in model for :func:`perception.train.train`: in
training mode its forward returns the student's own loss dict plus

- ``distill_cls``: Hinton KD on the head's class logits (softened, T²-scaled; see
  :func:`pruning.distill.kd_logits_loss`),
- ``distill_box``: smooth-L1 between student and teacher box regressions, weighted per anchor by
  the teacher's foreground probability (background anchors carry no box knowledge),
- ``distill_feat`` (optional): attention transfer on the backbone feature maps, which compares
  maps of any channel count (the student's may be pruned).

The teacher sees exactly the student's transformed batch (captured at the student's backbone
input), runs under ``torch.no_grad`` and is not a registered submodule, so the optimizer, the
gradient clip and ``state_dict`` see the student only. In eval mode the wrapper is the student.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pruning.distill import as_tensors, attention_loss, freeze, kd_logits_loss


def _is_ssd(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("backbone", "head", "transform", "anchor_generator"))


def head_distill_losses(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
                        temperature: float = 2.0) -> dict[str, torch.Tensor]:
    """KD on SSD head outputs ``{"cls_logits": [N, A, K], "bbox_regression": [N, A, 4]}`` (class 0 = background)."""
    cls = kd_logits_loss(student["cls_logits"], teacher["cls_logits"], temperature)
    with torch.no_grad():
        fg = 1.0 - teacher["cls_logits"].softmax(-1)[..., 0]  # [N, A]
    box = F.smooth_l1_loss(student["bbox_regression"], teacher["bbox_regression"].detach(), reduction="none").sum(-1)
    box = (box * fg).sum() / fg.sum().clamp_min(1.0)
    return {"distill_cls": cls, "distill_box": box}


class DistilledDetector(nn.Module):
    """An SSD student whose training loss adds distillation from a frozen dense teacher."""

    def __init__(self, student: nn.Module, teacher: nn.Module, *, head_weight: float = 1.0,
                 feature_weight: float = 0.0, temperature: float = 2.0) -> None:
        super().__init__()
        if not (_is_ssd(student) and _is_ssd(teacher)):
            raise TypeError("DistilledDetector supports torchvision SSD / SSDlite detectors (backbone + head); "
                            f"got {type(student).__name__} and {type(teacher).__name__}")
        if head_weight < 0 or feature_weight < 0 or head_weight + feature_weight == 0:
            raise ValueError(f"head_weight and feature_weight must be >= 0 and not both 0; got {head_weight}, "
                             f"{feature_weight}")
        self.student = student
        object.__setattr__(self, "_teacher", freeze(teacher))  # not a submodule: no optimizer, no state_dict
        self.head_weight, self.feature_weight, self.temperature = head_weight, feature_weight, temperature
        self._captured: dict[str, Any] = {}
        student.backbone.register_forward_hook(self._capture("backbone"))
        student.head.register_forward_hook(self._capture("head"))

    @property
    def teacher(self) -> nn.Module:
        return self._teacher

    def _capture(self, key: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if self.training:
                self._captured[key] = (args[0], out)

        return hook

    def train(self, mode: bool = True) -> DistilledDetector:
        super().train(mode)
        self._teacher.eval()  # BatchNorm statistics of the teacher stay frozen
        return self

    def forward(self, images: Any, targets: Any = None) -> Any:
        if not self.training:
            return self.student(images, targets)
        self._captured = {}
        losses = dict(self.student(images, targets))
        x, feats = self._captured["backbone"]
        _, head = self._captured["head"]
        self._captured = {}
        with torch.no_grad():
            t_feats = self._teacher.backbone(x)
            t_head = self._teacher.head(as_tensors(t_feats))
        if self.head_weight > 0:
            for k, v in head_distill_losses(head, t_head, self.temperature).items():
                losses[k] = self.head_weight * v
        if self.feature_weight > 0:
            losses["distill_feat"] = self.feature_weight * attention_loss(as_tensors(feats), as_tensors(t_feats))
        return losses
