"""SSD decoding and NMS at the cost of what survives the score threshold.

torchvision's ``SSD.postprocess_detections`` decodes every anchor of every image, then loops in
Python over images and classes (threshold, top-k, concatenate) before one NMS per image. At the
deployed threshold (0.01) only a few hundred of the ``anchors x classes`` scores survive, so we
reorder the same arithmetic and do it once for the whole batch:

1. softmax over classes (all of it: every score needs the full denominator), then the score
   threshold, keeping ``(image, anchor, class)`` triples of the survivors;
2. torchvision's per-class top-k (``topk_candidates`` per image and class) on the survivors only,
   as one sort (skipped when no class of any image has more survivors than ``k``);
3. decode only the survivors' boxes (torchvision's ``BoxCoder.decode_single`` arithmetic, row by
   row, so each box is the same float computation) and clip them to the canvas;
4. ONE ``torchvision.ops.nms`` call for the batch, with each (image, class) group moved to its own
   region of the plane (the coordinate trick of ``torchvision.ops.batched_nms``) in float64, so no
   group can suppress another and the shifted coordinates lose no precision;
5. the first ``detections_per_img`` of each image by score.

Greedy NMS decides each box from higher-scored boxes only, so NMS over each image's best
``2 x detections_per_img`` candidates decides those exactly; only when an image keeps fewer than
``detections_per_img`` of them does the next, larger prefix run.

The result equals ``postprocess_detections`` at the same threshold and top-k (same boxes, scores
and labels). Where scores tie exactly, which of the tied boxes the top-k and NMS keep is
implementation-defined in torchvision too, and may differ. Alternatives measured side by side in
:mod:`benchmarks.engine`: ``cv2.dnn.NMSBoxesBatched`` kept the same boxes but was 2-8x slower;
``torchvision.ops.batched_nms`` (one NMS per class above 1000 boxes, a Python loop) beats the single
shifted call on thousands of candidates (NMS costs ~ kept x candidates), which the prefix above
avoids for a trained detector at a deployed threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class SSDPost:
    """Everything SSD decoding needs: canvas anchors, box-coder weights and torchvision's knobs."""

    anchors: Tensor  # (A, 4) x1, y1, x2, y2 on the canvas, float32
    canvas: tuple[int, int]  # (height, width) boxes are clipped to
    score_thresh: float
    nms_thresh: float
    detections_per_img: int
    topk_candidates: int
    weights: tuple[float, float, float, float]
    bbox_xform_clip: float

    @staticmethod
    def from_model(model: Any, anchors: Tensor, canvas: tuple[int, int]) -> SSDPost:
        """Read the knobs from a torchvision SSD (or its post-processing skeleton)."""
        coder = model.box_coder
        return SSDPost(
            anchors=anchors.detach().to(torch.float32).contiguous(), canvas=(int(canvas[0]), int(canvas[1])),
            score_thresh=float(model.score_thresh), nms_thresh=float(model.nms_thresh),
            detections_per_img=int(model.detections_per_img), topk_candidates=int(model.topk_candidates),
            weights=tuple(float(w) for w in coder.weights), bbox_xform_clip=float(coder.bbox_xform_clip),
        )

    def detect(self, bbox_regression: Tensor, cls_logits: Tensor) -> list[dict[str, Tensor]]:
        """Raw head outputs ``[N, A, 4]`` and ``[N, A, C]`` -> per-image boxes/scores/labels (canvas)."""
        n, a, c = cls_logits.shape
        if bbox_regression.shape != (n, a, 4) or self.anchors.shape != (a, 4):
            raise ValueError(
                f"SSD outputs disagree: bbox_regression {tuple(bbox_regression.shape)}, cls_logits "
                f"{tuple(cls_logits.shape)}, anchors {tuple(self.anchors.shape)}; re-export the model"
            )
        img, anchor, cls, score = self._candidates(torch.softmax(cls_logits, dim=-1)[:, :, 1:])
        per_image = torch.bincount(img, minlength=n)
        limit = max(2 * self.detections_per_img, 1)
        # Greedy NMS decides each box from the higher-scored boxes only, so NMS over each image's best
        # `limit` candidates decides those exactly. Once an image keeps detections_per_img of them,
        # its lower-scored candidates cannot make the output. (Usually every candidate fits at once.)
        order = rank = None
        while True:
            if int(per_image.max()) <= limit:
                take = torch.arange(score.numel())
            else:
                if order is None:  # candidates grouped by image, best first, and their rank in the image
                    order = torch.sort(score, descending=True, stable=True).indices
                    if n > 1:
                        order = order[torch.sort(img[order], stable=True).indices]
                    img_sorted = img[order]
                    rank = torch.arange(order.numel()) - torch.searchsorted(img_sorted, img_sorted)
                take = order[rank < limit]
            boxes = self._decode(bbox_regression[img[take], anchor[take]], self.anchors[anchor[take]])
            kept = _nms_grouped(boxes, score[take], img[take] * (c - 1) + cls[take], self.nms_thresh)
            kept_per_image = torch.bincount(img[take][kept], minlength=n)
            short = (kept_per_image < self.detections_per_img) & (per_image > limit)
            if not bool(short.any()):
                break
            # grow the prefix to where the keep rate seen so far would give detections_per_img (+25%)
            worst = max(int(kept_per_image[short].min()), 1)
            limit = max(2 * limit, int(1.25 * limit * self.detections_per_img / worst) + 1)
        take_k = take[kept]
        img_k, boxes, score_k, labels = img[take_k], boxes[kept], score[take_k], cls[take_k] + 1
        if n > 1:  # kept is sorted by score (descending); a stable sort by image keeps that order per image
            by_image = torch.sort(img_k, stable=True).indices
            img_k, boxes, score_k, labels = img_k[by_image], boxes[by_image], score_k[by_image], labels[by_image]
        out, start = [], 0
        for count in kept_per_image.tolist():
            stop = start + min(count, self.detections_per_img)
            out.append({"boxes": boxes[start:stop], "scores": score_k[start:stop], "labels": labels[start:stop]})
            start += count
        return out

    def _candidates(self, scores: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(image, anchor, class, score) of the foreground scores above the threshold, at most
        ``topk_candidates`` per image and class (torchvision's per-class top-k)."""
        hit = scores > self.score_thresh
        k = min(self.topk_candidates, scores.shape[1])
        if int(hit.sum(dim=1).max()) <= k:  # the usual case at a deployed threshold: no top-k to apply
            img, anchor, cls = hit.nonzero(as_tuple=True)
            return img, anchor, cls, scores[img, anchor, cls]
        values, index = scores.transpose(1, 2).topk(k, dim=2)  # [N, C-1, k], one call for every class
        img, cls, j = (values > self.score_thresh).nonzero(as_tuple=True)
        return img, index[img, cls, j], cls, values[img, cls, j]

    def _decode(self, rel: Tensor, anchors: Tensor) -> Tensor:
        """torchvision's ``BoxCoder.decode_single`` on rows, then ``clip_boxes_to_image``."""
        widths = anchors[:, 2] - anchors[:, 0]
        heights = anchors[:, 3] - anchors[:, 1]
        ctr_x = anchors[:, 0] + 0.5 * widths
        ctr_y = anchors[:, 1] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        dx, dy = rel[:, 0] / wx, rel[:, 1] / wy
        dw = torch.clamp(rel[:, 2] / ww, max=self.bbox_xform_clip)
        dh = torch.clamp(rel[:, 3] / wh, max=self.bbox_xform_clip)
        pred_ctr_x = dx * widths + ctr_x
        pred_ctr_y = dy * heights + ctr_y
        half_w = 0.5 * (torch.exp(dw) * widths)
        half_h = 0.5 * (torch.exp(dh) * heights)
        h, w = self.canvas
        return torch.stack((
            (pred_ctr_x - half_w).clamp(0, w), (pred_ctr_y - half_h).clamp(0, h),
            (pred_ctr_x + half_w).clamp(0, w), (pred_ctr_y + half_h).clamp(0, h),
        ), dim=1)


def _nms_grouped(boxes: Tensor, scores: Tensor, group: Tensor, iou: float) -> Tensor:
    """One NMS over all groups: boxes of different groups never overlap after the shift."""
    from torchvision.ops import nms

    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    b = boxes.to(torch.float64)
    shift = group.to(torch.float64) * (b.max() + 1.0)
    return nms(b + shift[:, None], scores.to(torch.float64), iou)
