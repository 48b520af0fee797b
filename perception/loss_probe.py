"""The detection loss on a fixed set of batches, as a cheap, smooth metric of a (masked) model.

A per-layer sensitivity scan needs one evaluation per (layer, sparsity): 37 units x 3 levels for
SSDlite. COCO mAP on a few images is slow (decode + NMS + pycocotools) and coarse (a handful of
boxes flip); the training loss on the same fixed batches is a forward pass, deterministic, and
moves with every channel removed. It is what a first-order (Taylor) importance estimates, measured
instead of extrapolated.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from perception.data import CocoDetectionDataset, collate, subset


def _freeze_norms(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Put norm layers in eval mode (running statistics, no update); return what to restore."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved.append((m, m.training))
            m.eval()
    return saved


def loss_metric(dataset: CocoDetectionDataset, *, images: int = 32, batch_size: int = 8,
                seed: int = 0) -> Callable[[nn.Module], float]:
    """``metric(model) -> -loss``: minus the mean detection loss over fixed batches (higher is better).

    The batches are drawn once (``images`` of ``dataset``, deterministic in ``seed``, no
    augmentation) and reused for every call, so two calls differ only by the model. The model runs
    in training mode (torchvision detectors return their losses only there) with BatchNorm frozen,
    without gradients; its mode is restored afterwards.
    """
    if images < 1 or batch_size < 1:
        raise ValueError(f"loss_metric needs images >= 1 and batch_size >= 1; got {images}, {batch_size}")
    picked = subset(dataset, images, seed=seed).augmented(False)  # the same pixels every call
    samples = [picked[i] for i in range(len(picked))]
    batches = [collate(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]

    @torch.no_grad()
    def metric(model: nn.Module) -> float:
        was_training = model.training
        model.train()
        norms = _freeze_norms(model)
        try:
            total, count = 0.0, 0
            for imgs, targets in batches:
                losses = model(imgs, targets)
                total += float(sum(losses.values())) * len(imgs)
                count += len(imgs)
        finally:
            for m, mode in norms:
                m.train(mode)
            model.train(was_training)
        return -total / count

    return metric
