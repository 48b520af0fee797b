"""The NMS-free core graph of each detector family, and the pre/post-processing every runtime shares.

A torchvision detector is ``transform -> backbone -> heads -> decode + NMS``. The first and last
steps are data dependent (per-image resize, per-class loops, variable-length NMS output), which
is what makes full-graph exports slow in ONNX Runtime and awkward in TensorRT. We split it:

* :func:`deploy.runtimes.preprocess.preprocess_frames` – resize and normalise each frame like torchvision's
  ``GeneralizedRCNNTransform`` (same output size and sampling, to float rounding), then paste it
  top-left on a fixed canvas of the model input size, so the graph always sees ``[N, 3, H, W]``
  (static shapes).
* :class:`CoreModule` – backbone + heads only; raw outputs named by meaning:

  ==============  =========================================================================
  ssd, retinanet  ``bbox_regression`` [N, A, 4], ``cls_logits`` [N, A, C]
  fcos            ``bbox_regression``, ``cls_logits``, ``bbox_ctrness`` [N, A, 1]
  faster_rcnn     ``rpn_objectness`` [N, A], ``rpn_bbox_deltas`` [N, A, 4], ``features_<k>``
  ==============  =========================================================================

  Faster R-CNN is two-stage: the region stage needs the proposals, which depend on an NMS. Its
  core graph is backbone + FPN + RPN head; proposal selection and RoIAlign run in our
  post-processing, and the box head (most of the compute) is a second small graph
  (:class:`Stage2Module`, input ``box_features`` [K, C, 7, 7] with dynamic K).
* :class:`Postprocessor` – decoding with torchvision's *own* anchor generator, box coder and
  ``postprocess_detections`` (one batched NMS per image), then boxes mapped back to each frame's
  pixels. The same object runs eagerly after ONNX Runtime / TensorRT / PyTorch and traced inside
  the *full* graph (:class:`FullModule`), so all forms share one implementation.
"""

from __future__ import annotations

import functools
import json
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from perception.detections import Detections
from pruning.filters import backbone_levels, core_head, detector_core

FAMILIES = ("ssd", "faster_rcnn", "retinanet", "fcos")
INPUT_NAME = "images"
FULL_OUTPUTS = ("boxes", "scores", "labels")
STAGE2_INPUT = "box_features"
STAGE2_OUTPUTS = ("class_logits", "box_regression")

# Post-processing knobs copied from the live model into the artifact, so a user's changed
# thresholds survive export (attribute paths on the torchvision model).
_POST_ATTRS: dict[str, tuple[str, ...]] = {
    "ssd": ("score_thresh", "nms_thresh", "detections_per_img", "topk_candidates"),
    "retinanet": ("score_thresh", "nms_thresh", "detections_per_img", "topk_candidates"),
    "fcos": ("score_thresh", "nms_thresh", "detections_per_img", "topk_candidates"),
    "faster_rcnn": (
        "rpn._pre_nms_top_n",
        "rpn._post_nms_top_n",
        "rpn.nms_thresh",
        "rpn.score_thresh",
        "rpn.min_size",
        "roi_heads.score_thresh",
        "roi_heads.nms_thresh",
        "roi_heads.detections_per_img",
    ),
}


@dataclass(frozen=True)
class ModelMeta:
    """Everything pre/post-processing needs, stored in the ONNX metadata and engine sidecars."""

    name: str
    family: str
    num_classes: int
    image_size: tuple[int, int]  # model input canvas (height, width)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    min_size: int
    max_size: int
    feature_sizes: tuple[tuple[int, int], ...]  # (h, w) of each backbone level at image_size
    feature_keys: tuple[str, ...]
    post_params: dict[str, Any] = field(default_factory=dict)
    # the detector's avprune_meta minus its name: rebuilds the same anchors/coders (e.g. ssd_anchor_scales)
    build_kwargs: dict[str, Any] = field(default_factory=dict)

    def core_output_names(self) -> tuple[str, ...]:
        if self.family == "faster_rcnn":
            return ("rpn_objectness", "rpn_bbox_deltas", *(f"features_{k}" for k in self.feature_keys))
        if self.family == "fcos":
            return ("bbox_regression", "cls_logits", "bbox_ctrness")
        return ("bbox_regression", "cls_logits")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> ModelMeta:
        d = json.loads(text)
        d["image_size"] = tuple(d["image_size"])
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        d["feature_sizes"] = tuple(tuple(s) for s in d["feature_sizes"])
        d["feature_keys"] = tuple(d["feature_keys"])
        return ModelMeta(**d)


def _getattr_path(obj: Any, path: str) -> Any:
    return functools.reduce(getattr, path.split("."), obj)


def _setattr_path(obj: Any, path: str, value: Any) -> None:
    head, _, last = path.rpartition(".")
    setattr(_getattr_path(obj, head) if head else obj, last, value)


def _family(model: nn.Module) -> tuple[str, dict[str, Any]]:
    from perception.models import detector_spec

    meta = getattr(model, "avprune_meta", None)
    if not meta or "name" not in meta:
        raise ValueError(
            "model has no avprune_meta (name, num_classes, image_size); build it with "
            "perception.models.build_detector or load_detector"
        )
    return detector_spec(meta["name"]).family, meta


def model_meta(model: nn.Module) -> ModelMeta:
    """Describe a factory detector (pruned or dense) for export and post-processing."""
    family, meta = _family(model)
    h, w = (int(v) for v in meta["image_size"])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        feats = backbone_levels(model.backbone, torch.zeros(1, 3, h, w))
    model.train(was_training)
    t = model.transform
    post = {p: _getattr_path(model, p) for p in _POST_ATTRS[family]}
    return ModelMeta(
        name=meta["name"],
        family=family,
        num_classes=int(meta["num_classes"]),
        image_size=(h, w),
        mean=tuple(float(v) for v in t.image_mean),
        std=tuple(float(v) for v in t.image_std),
        min_size=int(t.min_size[-1]),
        max_size=int(t.max_size),
        feature_sizes=tuple((int(f.shape[-2]), int(f.shape[-1])) for f in feats.values()),
        feature_keys=tuple(str(k) for k in feats),
        post_params=post,
        build_kwargs={k: v for k, v in meta.items() if k != "name"},
    )


# ----------------------------------------------------------------------------- preprocessing


def to_frame_coords(
    det: Mapping[str, Tensor], resized: tuple[int, int], original: tuple[int, int]
) -> Detections:
    """Map one image's canvas-coordinate detections to its frame's pixels (torchvision's resize_boxes)."""
    boxes = det["boxes"].detach().float().reshape(-1, 4)
    rh, rw = resized
    oh, ow = original
    boxes = boxes * torch.tensor([ow / rw, oh / rh, ow / rw, oh / rh], dtype=torch.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, ow)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, oh)
    return Detections(
        boxes=boxes.numpy().astype(np.float32),
        scores=det["scores"].detach().float().reshape(-1).numpy(),
        labels=det["labels"].detach().reshape(-1).numpy().astype(np.int64),
    )


# ----------------------------------------------------------------------------- graphs


class CoreModule(nn.Module):
    """Backbone + heads (:func:`pruning.filters.detector_core`): the static, NMS-free part that
    runtimes accelerate, with each family's outputs flattened and named (see the module docstring)."""

    def __init__(self, model: nn.Module, meta: ModelMeta) -> None:
        super().__init__()
        self.family = meta.family
        self.backbone = model.backbone
        self.head = core_head(model)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        from torchvision.models.detection.rpn import permute_and_flatten

        feats, out = detector_core(self, images)
        levels = list(feats.values())
        if self.family == "faster_rcnn":
            objectness, deltas = out
            n = images.shape[0]
            obj = torch.cat([o.permute(0, 2, 3, 1).reshape(n, -1) for o in objectness], dim=1)
            reg = torch.cat(
                [permute_and_flatten(d, n, d.shape[1] // 4, 4, d.shape[2], d.shape[3]) for d in deltas], dim=1
            )
            return (obj, reg, *levels)
        if self.family == "fcos":
            return out["bbox_regression"], out["cls_logits"], out["bbox_ctrness"]
        return out["bbox_regression"], out["cls_logits"]


class Stage2Module(nn.Module):
    """Faster R-CNN's box head + predictor on pooled RoI features (dynamic number of RoIs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.box_head = model.roi_heads.box_head
        self.box_predictor = model.roi_heads.box_predictor

    def forward(self, box_features: Tensor) -> tuple[Tensor, Tensor]:
        return self.box_predictor(self.box_head(box_features))


Stage2Fn = Callable[[Tensor], tuple[Tensor, Tensor]]


class Postprocessor:
    """Decode raw core outputs with torchvision's own components of ``skeleton`` (a detector of the
    same name/classes/size; only its anchor generator, box coders, RoI pooler and thresholds are
    used, never its weights)."""

    def __init__(self, skeleton: nn.Module, meta: ModelMeta) -> None:
        self.meta = meta
        self.model = skeleton
        for path, value in meta.post_params.items():
            _setattr_path(skeleton, path, value)
        self._anchor_cache: dict[int, list[Tensor]] = {}

    @staticmethod
    def from_meta(meta: ModelMeta) -> Postprocessor:
        from perception.models import build_detector

        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.build_kwargs.items()}
        kwargs.update(num_classes=meta.num_classes, image_size=meta.image_size)
        skeleton = build_detector(meta.name, **kwargs).eval()
        return Postprocessor(skeleton, meta)

    def anchors(self, n: int) -> list[Tensor]:
        """torchvision's anchors for ``n`` canvases; they depend on shapes only, so cache them."""
        if n not in self._anchor_cache:
            from torchvision.models.detection.image_list import ImageList

            H, W = self.meta.image_size
            gen = self.model.rpn.anchor_generator if self.meta.family == "faster_rcnn" else self.model.anchor_generator
            images = ImageList(torch.zeros(n, 1, H, W), [(H, W)] * n)
            feats = [torch.zeros(1, 1, h, w) for h, w in self.meta.feature_sizes]
            self._anchor_cache[n] = [a.detach() for a in gen(images, feats)]
        return self._anchor_cache[n]

    def detect(
        self, raw: Mapping[str, Tensor], image_sizes: Sequence[tuple[int, int]], stage2: Stage2Fn | None = None
    ) -> list[dict[str, Tensor]]:
        """Raw core outputs (by name) -> per-image boxes/scores/labels in canvas coordinates."""
        m, fam = self.model, self.meta.family
        n = len(image_sizes)
        anchors = self.anchors(n)
        sizes = [tuple(s) for s in image_sizes]
        if fam == "ssd":
            head = {"bbox_regression": raw["bbox_regression"], "cls_logits": raw["cls_logits"]}
            return m.postprocess_detections(head, anchors, [self.meta.image_size] * n)
        if fam in ("retinanet", "fcos"):
            hw = [h * w for h, w in self.meta.feature_sizes]
            per_loc = raw["cls_logits"].shape[1] // sum(hw)
            split = [v * per_loc for v in hw]
            keys = ("bbox_regression", "cls_logits", "bbox_ctrness") if fam == "fcos" else ("bbox_regression", "cls_logits")
            head = {k: list(raw[k].split(split, dim=1)) for k in keys}
            return m.postprocess_detections(head, [list(a.split(split)) for a in anchors], sizes)
        return self._two_stage(raw, sizes, anchors, stage2)

    def _two_stage(
        self, raw: Mapping[str, Tensor], sizes: list, anchors: list[Tensor], stage2: Stage2Fn | None
    ) -> list[dict[str, Tensor]]:
        if stage2 is None:
            raise ValueError("Faster R-CNN post-processing needs the stage-2 (box head) runner")
        rpn, roi = self.model.rpn, self.model.roi_heads
        n = len(sizes)
        per_loc = rpn.anchor_generator.num_anchors_per_location()[0]
        num_per_level = [h * w * per_loc for h, w in self.meta.feature_sizes]
        objectness = raw["rpn_objectness"].reshape(-1, 1)
        proposals = rpn.box_coder.decode(raw["rpn_bbox_deltas"].reshape(-1, 4).detach(), anchors).view(n, -1, 4)
        boxes, _ = rpn.filter_proposals(proposals, objectness, sizes, num_per_level)
        features = OrderedDict((k, raw[f"features_{k}"]) for k in self.meta.feature_keys)
        # the pooler infers each level's stride from feature size / image size: give it the canvas
        box_features = roi.box_roi_pool(features, boxes, [self.meta.image_size] * n)
        class_logits, box_regression = stage2(box_features)
        b, s, lab = roi.postprocess_detections(class_logits, box_regression, boxes, sizes)
        return [{"boxes": bi, "scores": si, "labels": li} for bi, si, li in zip(b, s, lab, strict=True)]


class FullModule(nn.Module):
    """Core graph + our post-processing traced into one graph (batch 1: torchvision's per-image
    loops unroll at trace time). Outputs ``boxes`` (canvas coordinates), ``scores``, ``labels``."""

    def __init__(self, model: nn.Module, meta: ModelMeta) -> None:
        super().__init__()
        self.meta = meta
        self.core = CoreModule(model, meta)
        self.stage2 = Stage2Module(model) if meta.family == "faster_rcnn" else None
        self.post = Postprocessor(model, meta)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raw = dict(zip(self.meta.core_output_names(), self.core(images), strict=True))
        det = self.post.detect(raw, [self.meta.image_size], self.stage2)[0]
        return det["boxes"], det["scores"], det["labels"]
