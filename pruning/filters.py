"""Which submodules may be pruned, as ``(name, module) -> bool`` filter functions.

A filter selects layers whose *weights* may be masked (unstructured, N:M) and whose *output
channels* may be removed (channel granularity: a coupled group is prunable only if every layer
whose outputs it removes passes the filter). Detectors must keep their final class/box output
convs: their channel counts are the number of classes and box coordinates times anchors.

The detector *core* (backbone + heads, no decoding/NMS) is defined here too, once for the whole
project: it is what pruning traces, and pruning may import nothing else of avprune.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pruning.groups import flatten_tensors

LayerFilter = Callable[[str, nn.Module], bool]

# Final output layers of torchvision detectors (RetinaNet/FCOS name them; SSD's are the last conv
# of each head's module_list entry; Faster R-CNN's live in the RPN head and the box predictor).
_OUTPUT_PREFIXES = (
    "head.classification_head.cls_logits",
    "head.regression_head.bbox_reg",
    "head.regression_head.bbox_ctrness",
    "rpn.head.cls_logits",
    "rpn.head.bbox_pred",
    "roi_heads.box_predictor",
    "roi_heads.mask_predictor",
    "roi_heads.keypoint_predictor",
)
# Faster R-CNN's box head sits after RoIAlign, which the dependency graph does not trace through.
_UNTRACEABLE_PREFIXES = ("roi_heads.",)


def _is_prunable_type(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear))


def all_layers(name: str, module: nn.Module) -> bool:
    """Every Conv1d/Conv2d/Linear (output layers are still protected by the dependency graph)."""
    return _is_prunable_type(module)


def is_detector(model: nn.Module) -> bool:
    """True for torchvision-style detectors (a ``backbone`` plus a ``head`` or an ``rpn``)."""
    return hasattr(model, "backbone") and (hasattr(model, "head") or hasattr(model, "rpn"))


def detector_output_layers(model: nn.Module) -> set[str]:
    """Names of a torchvision detector's final class/box output layers."""
    names: set[str] = set()
    for name, mod in model.named_modules():
        if _is_prunable_type(mod) and any(name == p or name.startswith(p + ".") for p in _OUTPUT_PREFIXES):
            names.add(name)
    head = getattr(model, "head", None)
    for branch in ("classification_head", "regression_head"):
        module_list = getattr(getattr(head, branch, None), "module_list", None)
        if module_list is None:
            continue
        for i, entry in enumerate(module_list):  # SSD: a conv; SSDlite: Sequential(dw block, 1x1 conv)
            last = [n for n, m in entry.named_modules() if _is_prunable_type(m)][-1]
            names.add(f"head.{branch}.module_list.{i}" + (f".{last}" if last else ""))
    return names


def detector_default_filter(model: nn.Module) -> LayerFilter:
    """Prune backbone, FPN/extra layers and head towers; never the final class/box output layers."""
    protected = detector_output_layers(model)

    def keep(name: str, module: nn.Module) -> bool:
        return (
            _is_prunable_type(module)
            and name not in protected
            and not any(name.startswith(p) for p in _UNTRACEABLE_PREFIXES)
        )

    return keep


def default_filter(model: nn.Module) -> LayerFilter:
    """:func:`detector_default_filter` for detectors, :func:`all_layers` otherwise."""
    return detector_default_filter(model) if is_detector(model) else all_layers


def by_prefix(*prefixes: str, base: LayerFilter = all_layers) -> LayerFilter:
    """Only layers under one of ``prefixes`` (e.g. ``"backbone."``), further restricted by ``base``."""
    return lambda name, module: base(name, module) and any(name.startswith(p) for p in prefixes)


def backbone_levels(backbone: nn.Module, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
    """A detector backbone's feature maps by level name (a single-map backbone's map is level "0")."""
    feats = backbone(images)
    return OrderedDict([("0", feats)]) if isinstance(feats, torch.Tensor) else feats


def core_head(model: nn.Module) -> nn.Module:
    """The head the core runs after the backbone: ``head`` (one-stage) or ``rpn.head`` (Faster R-CNN)."""
    return model.head if hasattr(model, "head") else model.rpn.head


def detector_core(model: nn.Module, images: Any) -> tuple[OrderedDict[str, torch.Tensor], Any]:
    """The detector's NMS-free core (backbone + heads) on a normalised [B, 3, H, W] batch.

    Returns the backbone levels and the head's raw outputs (a dict for SSD/RetinaNet/FCOS, the RPN
    head's ``(objectness, deltas)`` lists for Faster R-CNN). This is *the* core forward: pruning
    traces it, ``deploy.core_graph.CoreModule`` exports it, benchmarks time it. ``model`` is a
    detector or any module with its ``backbone`` and a ``head`` (e.g. :class:`DetectorCore`).
    """
    if isinstance(images, (list, tuple)):
        images = torch.stack(list(images))
    levels = backbone_levels(model.backbone, images)
    return levels, core_head(model)(list(levels.values()))


def detector_core_forward(model: nn.Module, images: Any) -> Any:
    """The head outputs of :func:`detector_core`: the ``forward_fn`` pruning traces detectors with.

    Tracing the full detector would drag box decoding and NMS into the dependency graph
    (coupling all head outputs through top-k); the core is what gets pruned and exported.
    """
    return detector_core(model, images)[1]


class DetectorCore(nn.Module):
    """A detector's core as a tensor-in, tensors-out module (what Torch-Pruning and ONNX export trace).

    It shares the detector's submodules (names ``backbone.*``, ``head.*``), so pruning the core
    prunes the detector in place; outputs are the head's tensors, flattened in order.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        if not is_detector(detector):
            raise ValueError(f"{type(detector).__name__} is not a torchvision-style detector (backbone + head or rpn)")
        self.backbone = detector.backbone
        self.head = core_head(detector)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(flatten_tensors(detector_core_forward(self, images)))


def followed_by_batchnorm(
    model: nn.Module, example_inputs: Any = None, base: LayerFilter | None = None
) -> LayerFilter:
    """Layers (passing ``base``, default :func:`default_filter`) that feed a BatchNorm directly.

    Use it with ``importance="bn_scale"``, which needs a BN γ for every pruned layer (SE-block
    convs and classifier layers have none).
    """
    from pruning.groups import find_following_bn

    base = base or default_filter(model)
    candidates = [n for n, m in model.named_modules() if base(n, m)]
    fwd = detector_core_forward if is_detector(model) else None
    with_bn = set(find_following_bn(model, candidates, example_inputs, fwd))
    return lambda name, module: name in with_bn
