"""Distillation: losses vanish for identical models, are positive otherwise, and train the student only."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pruning.distill import FeatureTap, attention_loss, freeze, kd_logits_loss
from tests.conftest import X, small_net


def test_generic_losses_zero_for_identical_models_positive_otherwise() -> None:
    teacher = freeze(small_net())
    student = copy.deepcopy(teacher).eval()
    for p in student.parameters():
        p.requires_grad_(True)
    with FeatureTap(teacher, ["expand", "tail"]) as tt, FeatureTap(student, ["expand", "tail"]) as ts:
        with torch.no_grad():
            t_out = teacher(X)
        s_out = student(X)
        feats = (list(ts.outputs.values()), list(tt.outputs.values()))
        assert float(kd_logits_loss(s_out, t_out).detach()) == pytest.approx(0.0, abs=1e-6)
        assert float(attention_loss(*feats).detach()) == pytest.approx(0.0, abs=1e-9)
    with torch.no_grad():
        student.tail[0].weight.mul_(-0.5)
    with FeatureTap(student, ["expand", "tail"]) as ts, FeatureTap(teacher, ["expand", "tail"]) as tt:
        with torch.no_grad():
            t_out = teacher(X)
        s_out = student(X)
        loss = kd_logits_loss(s_out, t_out) + attention_loss(list(ts.outputs.values()), list(tt.outputs.values()))
    assert float(loss) > 0
    loss.backward()
    assert student.tail[0].weight.grad is not None and float(student.tail[0].weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_attention_loss_compares_maps_of_different_channel_counts() -> None:
    torch.manual_seed(0)
    t = torch.randn(2, 32, 8, 8)
    assert float(attention_loss([t[:, :16] * 0 + t[:, :16]], [t[:, :16]])) == pytest.approx(0.0, abs=1e-9)
    assert float(attention_loss([t[:, :16]], [t])) > 0  # a pruned student's map vs the full teacher's
    with pytest.raises(ValueError, match="logits shapes differ"):
        kd_logits_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_detector_distillation_student_only() -> None:
    from perception.distill import DistilledDetector
    from perception.models import build_detector

    torch.manual_seed(0)
    teacher = build_detector("ssdlite320_mobilenet_v3_large", num_classes=4, image_size=(160, 160))
    student = copy.deepcopy(teacher)
    wrapped = DistilledDetector(student, teacher, feature_weight=1.0).train()
    for m in student.modules():  # same normalisation as the (eval-mode) teacher: outputs identical
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    images = [torch.rand(3, 160, 160), torch.rand(3, 160, 160)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 80.0, 90.0]]), "labels": torch.tensor([1])}] * 2
    losses = wrapped(images, targets)
    assert {"distill_cls", "distill_box", "distill_feat"} <= set(losses)
    for k in ("distill_cls", "distill_box", "distill_feat"):
        assert float(losses[k]) == pytest.approx(0.0, abs=1e-5), k
    assert not any(n.startswith("_teacher") for n, _ in wrapped.named_parameters())
    with torch.no_grad():
        for p in student.head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    losses = wrapped(images, targets)
    assert float(losses["distill_cls"]) > 0 and float(losses["distill_box"]) > 0
    sum(losses[k] for k in ("distill_cls", "distill_box")).backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in student.head.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    wrapped.eval()
    assert isinstance(wrapped(images), list)  # eval: the student's detections
