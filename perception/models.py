"""Detector factory over torchvision's detection builders, with local checkpoints only.

Nothing here downloads: every builder is called with ``weights=None, weights_backbone=None``
and weights come from a file on disk, loaded with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from perception.classes import DEFAULT_NUM_CLASSES
from perception.io import atomic_torch_save, load_torch_file
from perception.names import CHECKPOINT_FORMAT
from pruning.registry import Registry

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class FasterRCNNSampling:
    """Training-time sampling of Faster R-CNN.

    torchvision's defaults (512 RoIs and 256 anchors per image, 2000 proposals) train at about
    1.2 img/s on 2 CPU cores; these smaller defaults train at about 4.9 img/s with usable mAP.
    """

    rpn_batch_size_per_image: int = 128
    box_batch_size_per_image: int = 64
    rpn_pre_nms_top_n_train: int = 600
    rpn_post_nms_top_n_train: int = 300


@dataclass(frozen=True)
class DetectorSpec:
    name: str
    builder: Callable[..., nn.Module]
    family: str  # "ssd", "faster_rcnn", "retinanet", "fcos"
    default_image_size: tuple[int, int]  # (height, width) at the model input


# The project's one registry helper (pruning/registry.py: pure Python, and pruning imports no
# other avprune package, so every layer may use it without an import cycle).
_DETECTORS: Registry[DetectorSpec] = Registry("detector")


def register_detector(spec: DetectorSpec) -> DetectorSpec:
    """Add a detector to the flat registry; a duplicate name raises ValueError."""
    _DETECTORS.add(spec.name, spec)
    return spec


def list_detectors() -> list[str]:
    """Names of every registered detector, sorted."""
    return sorted(_DETECTORS.names())


def detector_spec(name: str) -> DetectorSpec:
    """The registry entry for ``name``; an unknown name raises ValueError listing the valid ones."""
    return _DETECTORS.get(name)


def _tv(fn_name: str) -> Callable[..., nn.Module]:
    def build(**kwargs: Any) -> nn.Module:
        import torchvision.models.detection as det

        return getattr(det, fn_name)(weights=None, weights_backbone=None, **kwargs)

    build.__name__ = fn_name
    return build


for _spec in (
    DetectorSpec("ssdlite320_mobilenet_v3_large", _tv("ssdlite320_mobilenet_v3_large"), "ssd", (320, 320)),
    DetectorSpec(
        "fasterrcnn_mobilenet_v3_large_320_fpn", _tv("fasterrcnn_mobilenet_v3_large_320_fpn"), "faster_rcnn", (320, 320)
    ),
    DetectorSpec("fasterrcnn_mobilenet_v3_large_fpn", _tv("fasterrcnn_mobilenet_v3_large_fpn"), "faster_rcnn", (384, 640)),
    DetectorSpec("retinanet_resnet50_fpn_v2", _tv("retinanet_resnet50_fpn_v2"), "retinanet", (384, 640)),
    DetectorSpec("fcos_resnet50_fpn", _tv("fcos_resnet50_fpn"), "fcos", (384, 640)),
):
    register_detector(_spec)


def _as_hw(image_size: int | tuple[int, int] | list[int] | None, default: tuple[int, int]) -> tuple[int, int]:
    if image_size is None:
        return default
    if isinstance(image_size, int):
        hw = (image_size, image_size)
    else:
        hw = tuple(int(v) for v in image_size)
    if len(hw) != 2 or min(hw) < 32:
        raise ValueError(f"image_size must be an int or (height, width), each >= 32; got {image_size!r}")
    return hw  # type: ignore[return-value]


def build_detector(
    name: str,
    *,
    num_classes: int = DEFAULT_NUM_CLASSES,
    image_size: int | tuple[int, int] | None = None,
    sampling: FasterRCNNSampling | None = None,
    ssd_anchor_scales: tuple[float, float] | None = None,
    checkpoint: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a torchvision detector by name, untrained or from a local checkpoint.

    num_classes counts background (7 drive classes + background = 8). image_size is the
    model-input (height, width): SSD resizes to exactly that; the others keep aspect with
    min_size/max_size from it. ``sampling`` sets Faster R-CNN's training sampling.
    ``ssd_anchor_scales=(min, max)`` sets SSD's default-box scales as fractions of the input
    (torchvision's SSDlite uses (0.2, 0.95): its smallest boxes are 64 px at 320, too coarse for
    distant objects; the box count per location, hence the head, is unchanged).
    """
    spec = detector_spec(name)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (objects + background); got {num_classes}")
    h, w = _as_hw(image_size, spec.default_image_size)
    if spec.family == "faster_rcnn":
        kwargs = {**asdict(sampling or FasterRCNNSampling()), **kwargs}
    elif sampling is not None:
        raise ValueError(f"sampling applies to Faster R-CNN only, not {name!r}")
    if spec.family != "ssd":
        kwargs.setdefault("min_size", min(h, w))
        kwargs.setdefault("max_size", max(h, w))
    model = spec.builder(num_classes=num_classes, **kwargs)
    meta: dict[str, Any] = {"name": name, "num_classes": num_classes, "image_size": [h, w]}
    if spec.family == "ssd":
        model.transform.fixed_size = (w, h)  # torchvision reads fixed_size as (width, height)
        model.transform.min_size = (min(h, w),)
        model.transform.max_size = max(h, w)
        if ssd_anchor_scales is not None:
            _set_ssd_anchor_scales(model, ssd_anchor_scales)
            meta["ssd_anchor_scales"] = [float(v) for v in ssd_anchor_scales]
    elif ssd_anchor_scales is not None:
        raise ValueError(f"ssd_anchor_scales applies to SSD detectors only, not {name!r}")
    model.avprune_meta = meta  # type: ignore[attr-defined]
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model


def _set_ssd_anchor_scales(model: nn.Module, scales: tuple[float, float]) -> None:
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator

    lo, hi = (float(v) for v in scales)
    if not 0.0 < lo < hi <= 1.0:
        raise ValueError(f"ssd_anchor_scales must be (min, max) with 0 < min < max <= 1; got {scales!r}")
    old = model.anchor_generator
    model.anchor_generator = DefaultBoxGenerator(old.aspect_ratios, min_ratio=lo, max_ratio=hi)


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    name: str | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write an avprune checkpoint atomically (weights, plus what rebuilds the architecture).

    Pruned models are physically smaller than the registry's: the state dict's shapes are
    the architecture, and :func:`load_detector` resizes layers to fit them.
    """
    meta = dict(getattr(model, "avprune_meta", {}))
    if name is not None:
        meta["name"] = name
    if "name" not in meta:
        raise ValueError("save_checkpoint needs the detector name (model built outside build_detector)")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": meta,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }
    atomic_torch_save(path, payload)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file (ours or a plain torchvision state_dict) safely."""
    path = Path(path)
    obj = load_torch_file(path)  # one error surface for missing, damaged and pickled-object files
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return obj
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"format": "torchvision-state-dict", "model": {}, "state_dict": obj, "extra": {}}
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and all(
        isinstance(v, torch.Tensor) for v in obj["model"].values()
    ):  # torchvision reference scripts save {"model": state_dict, "optimizer": ...}
        return {"format": "torchvision-state-dict", "model": {}, "state_dict": obj["model"], "extra": {}}
    raise ValueError(f"{path}: not an avprune checkpoint nor a torchvision state_dict")


def load_detector(path: str | Path, **overrides: Any) -> nn.Module:
    """Rebuild a detector from an avprune checkpoint, pruned or dense."""
    ckpt = read_checkpoint(path)
    model = checkpoint_architecture(ckpt["model"], path, **overrides)
    _load_state(model, ckpt["state_dict"], path, allow_resize=True)
    return model


def checkpoint_architecture(meta: dict[str, Any], path: str | Path, **overrides: Any) -> nn.Module:
    """The untrained detector an avprune checkpoint was saved from, at the registry's widths, from its
    metadata (``read_checkpoint(path)["model"]``; ``path`` names it in errors): its name, class count,
    image size, SSD anchor scales and removed blocks (``overrides`` as for :func:`load_detector`). A
    state dict of the checkpoint, or of one pruned from it, loads into it (pruned widths resize);
    built from the registry defaults instead, a model trained with other anchor scales would decode
    its boxes against the wrong anchors."""
    if "name" not in meta:
        raise ValueError(
            f"{path}: a plain state_dict does not say which detector it is; "
            "use build_detector(NAME, checkpoint=PATH) instead"
        )
    kwargs: dict[str, Any] = {
        "num_classes": int(meta.get("num_classes", DEFAULT_NUM_CLASSES)),
        "image_size": tuple(meta["image_size"]) if meta.get("image_size") else None,
        "ssd_anchor_scales": tuple(meta["ssd_anchor_scales"]) if meta.get("ssd_anchor_scales") else None,
        **overrides,  # e.g. a different image_size or Faster R-CNN sampling for fine-tuning
    }
    model = build_detector(meta["name"], **kwargs)
    _check_meta(model, meta, path)
    drop_blocks(model, [str(n) for n in meta.get("removed_blocks", ())])
    return model


def core_input_batches(model: nn.Module, dataset: Any, images: int = 64, batch: int = 16) -> list[torch.Tensor]:
    """The first ``images`` images of ``dataset`` as ``model``'s normalised core inputs ([B, 3, H, W]
    batches of ``batch``, through the detector's own transform): what gate folding and layer
    reconstruction calibrate on."""
    n = min(int(images), len(dataset))
    if n < 1:
        raise ValueError(f"calibration images {images!r}: give at least 1 (the split has {len(dataset)})")
    with torch.no_grad():
        return [model.transform([dataset[i][0] for i in range(s, min(s + batch, n))])[0].tensors
                for s in range(0, n, batch)]


def drop_blocks(model: nn.Module, names: list[str]) -> None:
    """Replace the named residual blocks by ``nn.Identity`` (a depth-pruned checkpoint's architecture,
    as ``pruning.blocks.remove_blocks`` left it) and record them in ``avprune_meta``.

    A name inside another removed block (a folded squeeze-excitation gate of a block that depth
    pruning then removed whole) is recorded and skipped, whichever was removed first: the outer
    identity already took it away. Why: a gate-folded start model pruned with ``channel+block`` saved
    both names, and rebuilding its checkpoint failed on the inner one."""
    removed = set((getattr(model, "avprune_meta", None) or {}).get("removed_blocks", ())) | set(names)
    for name in names:
        if any(name.startswith(outer + ".") for outer in removed):
            continue  # inside a block removed whole
        parent_name, _, last = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            parent.get_submodule(last)
        except AttributeError:
            raise ValueError(f"removed block {name!r} is not a submodule of {type(model).__name__}") from None
        setattr(parent, last, nn.Identity())
    if names:
        meta = dict(getattr(model, "avprune_meta", {}))
        meta["removed_blocks"] = sorted(set(meta.get("removed_blocks", [])) | set(names))
        model.avprune_meta = meta


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load weights of the same architecture into ``model`` (dense or pruned avprune checkpoints)."""
    ckpt = read_checkpoint(path)
    _check_meta(model, ckpt["model"], path)
    _load_state(model, ckpt["state_dict"], path, allow_resize=ckpt["format"] == CHECKPOINT_FORMAT)


def _check_meta(model: nn.Module, meta: dict[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint of another detector or class count before any layer is resized.

    Resizing is only for channel-pruned widths: resizing a head to another class count would
    load but decode wrongly (SSD's scoring head keeps its own ``num_classes``).
    """
    own = getattr(model, "avprune_meta", {})
    for key in ("name", "num_classes"):
        if key in meta and key in own and meta[key] != own[key]:
            raise ValueError(
                f"{path}: checkpoint was saved for {key}={meta[key]!r} but the model has {key}={own[key]!r}; "
                f"build the model with {key}={meta[key]!r} or use load_detector({str(path)!r})"
            )


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, *, allow_resize: bool) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected:
        lines = [f"{path}: checkpoint does not fit {getattr(model, 'avprune_meta', {}).get('name', type(model).__name__)}"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
        lines.append("  check the model name and num_classes the checkpoint was trained with")
        raise ValueError("\n".join(lines))
    if mismatched:
        if not allow_resize:
            shown = "; ".join(f"{k}: checkpoint {a} vs model {b}" for k, a, b in mismatched[:8])
            raise ValueError(
                f"{path}: {len(mismatched)} tensor shapes do not fit the architecture: {shown}"
                f"{' ...' if len(mismatched) > 8 else ''}. Check num_classes and the model name."
            )
        resize_to_state_dict(model, state)
    model.load_state_dict(state, strict=True)


def resize_to_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Resize Conv2d/BatchNorm/Linear layers so a channel-pruned state dict loads.

    Channel pruning keeps the module tree and changes widths only, so the state dict's
    shapes define the architecture. Depthwise convs keep groups == in_channels.
    """
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        w = state.get(prefix + "weight")
        if isinstance(mod, nn.Conv2d) and w is not None and tuple(w.shape) != tuple(mod.weight.shape):
            depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
            out_c = w.shape[0]
            in_c = out_c if depthwise else w.shape[1] * mod.groups
            if not depthwise and mod.groups != 1:
                raise ValueError(f"cannot resize grouped conv {mod_name} (groups={mod.groups})")
            mod.out_channels, mod.in_channels = out_c, in_c
            if depthwise:
                mod.groups = out_c
            mod.weight = nn.Parameter(torch.empty_like(w))
            if mod.bias is not None:
                mod.bias = nn.Parameter(torch.empty(out_c))
        elif isinstance(mod, nn.BatchNorm2d | nn.BatchNorm1d) and prefix + "running_mean" in state:
            n = state[prefix + "running_mean"].shape[0]
            if n != mod.num_features:
                mod.num_features = n
                if mod.affine:
                    mod.weight = nn.Parameter(torch.empty(n))
                    mod.bias = nn.Parameter(torch.empty(n))
                mod.running_mean = torch.zeros(n)
                mod.running_var = torch.ones(n)
        elif isinstance(mod, nn.Linear) and w is not None and tuple(w.shape) != tuple(mod.weight.shape):
            mod.out_features, mod.in_features = w.shape
            mod.weight = nn.Parameter(torch.empty_like(w))
            if mod.bias is not None:
                mod.bias = nn.Parameter(torch.empty(w.shape[0]))


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (pruned models count their physically smaller layers)."""
    return sum(p.numel() for p in model.parameters())


def set_score_threshold(model: nn.Module, thresh: float) -> nn.Module:
    """Set the detector's final score threshold (deployment post-processing), returning the model.

    torchvision's defaults are COCO-benchmark settings (SSDlite: 0.001, which sends ~1400 near-zero
    boxes per frame through NMS); deployments keep fewer. Export copies the value into the artifact.
    """
    if not 0.0 < float(thresh) < 1.0:
        raise ValueError(f"score threshold {thresh!r} must be in (0, 1), e.g. 0.01 or 0.3")
    target = model.roi_heads if hasattr(model, "roi_heads") else model
    if not hasattr(target, "score_thresh"):
        raise TypeError(f"{type(model).__name__} has no score_thresh to set (not a torchvision detector?)")
    target.score_thresh = float(thresh)
    return model
