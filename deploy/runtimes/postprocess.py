"""SSD decoding and NMS at the cost of what survives the score threshold, in numpy.

torchvision's ``SSD.postprocess_detections`` decodes every anchor of every image, then loops in
Python over images and classes (threshold, top-k, concatenate) before one NMS per image. At the
deployed threshold (0.01) a trained detector leaves a few hundred of the ``anchors x classes``
scores, so we reorder the same arithmetic, do it once for the whole batch, and keep every small
array in numpy (a torch op costs ~5-10 us of dispatch here; these arrays hold a few hundred rows):

1. a conservative pre-filter on the logits: a foreground score ``softmax(x)_c`` is at most
   ``exp(x_c - x_0)`` (the denominator holds the background term), so only anchors with some
   ``x_c - x_0 > log(score_thresh)`` can pass; torch's softmax then runs on those rows only (a row's
   softmax does not depend on other rows: the scores are bit-identical to torchvision's);
2. the score threshold, keeping ``(image, anchor, class)`` triples of the survivors; torchvision's
   per-class top-k (``topk_candidates`` per image and class, one sort) only once the NMS prefix
   below outgrows ``k`` (before that it cannot change which candidates the prefix holds);
3. decode only the survivors' boxes (torchvision's ``BoxCoder.decode_single`` float32 arithmetic,
   with the anchors' widths and centres computed once) and clip them to the canvas;
4. ONE ``torchvision.ops.nms`` call for the batch, with each (image, class) group moved to its own
   region of the plane (the coordinate trick of ``torchvision.ops.batched_nms``) in float64, so no
   group can suppress another and the shifted coordinates lose no precision;
5. the first ``detections_per_img`` of each image by score.

Greedy NMS decides each box from higher-scored boxes only, so NMS over each image's best
``2 x detections_per_img`` candidates decides those exactly; only when an image keeps fewer than
``detections_per_img`` of them does the next, larger prefix run.

The result equals ``postprocess_detections`` at the same threshold and top-k (same scores and
labels, boxes to float rounding: numpy's and torch's ``exp`` may differ in the last bit). Where
scores tie exactly, which of the tied boxes the top-k and NMS keep is implementation-defined in
torchvision too, and may differ. Alternatives measured side by side in :mod:`benchmarks.engine`
(``cv2.dnn.NMSBoxesBatched``, ``torchvision.ops.batched_nms``, the torch version of this module).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

#: (boxes float32 (K, 4) x1, y1, x2, y2 on the canvas, scores float32 (K,), labels int64 (K,)) of one image
ImageDets = tuple[np.ndarray, np.ndarray, np.ndarray]


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
    # anchor widths/heights (A, 2) and centres (A, 2), float32, as decode_single computes them
    _size: np.ndarray = field(init=False, repr=False, compare=False)
    _ctr: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        a = self.anchors.detach().to(torch.float32).cpu().numpy()
        size = a[:, 2:] - a[:, :2]
        object.__setattr__(self, "_size", np.ascontiguousarray(size))
        object.__setattr__(self, "_ctr", np.ascontiguousarray(a[:, :2] + np.float32(0.5) * size))

    @staticmethod
    def knobs(model: Any) -> tuple[float, float, int, int, tuple[float, ...], float]:
        """The post-processing settings of a torchvision SSD (what a cached :class:`SSDPost` depends on)."""
        coder = model.box_coder
        return (float(model.score_thresh), float(model.nms_thresh), int(model.detections_per_img),
                int(model.topk_candidates), tuple(float(w) for w in coder.weights), float(coder.bbox_xform_clip))

    @staticmethod
    def from_model(model: Any, anchors: Tensor, canvas: tuple[int, int]) -> SSDPost:
        """Read the knobs from a torchvision SSD (or its post-processing skeleton)."""
        score, nms, per_img, topk, weights, clip = SSDPost.knobs(model)
        return SSDPost(
            anchors=anchors.detach().to(torch.float32).contiguous(), canvas=(int(canvas[0]), int(canvas[1])),
            score_thresh=score, nms_thresh=nms, detections_per_img=per_img, topk_candidates=topk,
            weights=weights, bbox_xform_clip=clip,
        )

    def detect(self, bbox_regression: Tensor, cls_logits: Tensor) -> list[dict[str, Tensor]]:
        """Raw head outputs ``[N, A, 4]`` and ``[N, A, C]`` (tensors) -> per-image boxes/scores/labels tensors."""
        out = self.detect_arrays(_np(bbox_regression), _np(cls_logits))
        return [{"boxes": torch.from_numpy(b), "scores": torch.from_numpy(s), "labels": torch.from_numpy(lab)}
                for b, s, lab in out]

    def detect_arrays(self, bbox_regression: np.ndarray, cls_logits: np.ndarray) -> list[ImageDets]:
        """Raw head outputs ``[N, A, 4]`` and ``[N, A, C]`` (float32 arrays) -> per image (boxes, scores,
        labels) on the canvas, best first."""
        n, a, c = cls_logits.shape
        if bbox_regression.shape != (n, a, 4) or self._size.shape != (a, 2):
            raise ValueError(
                f"SSD outputs disagree: bbox_regression {tuple(bbox_regression.shape)}, cls_logits "
                f"{tuple(cls_logits.shape)}, anchors {tuple(self.anchors.shape)}; re-export the model"
            )
        img, anchor, cls, score = self._candidates(cls_logits)
        per_image = np.bincount(img, minlength=n)
        limit = max(2 * self.detections_per_img, 1)
        # Greedy NMS decides each box from the higher-scored boxes only, so NMS over each image's best
        # `limit` candidates decides those exactly. Once an image keeps detections_per_img of them,
        # its lower-scored candidates cannot make the output. (Usually every candidate fits at once.)
        # torchvision's per-class top-k waits until the prefix outgrows k: a candidate among its image's
        # best `limit <= k` has fewer than k better ones in its class, so the top-k keeps it anyway
        # (at 0.001 that skips a sort of ~1900 candidates by class: 0.26 ms of 1.5 measured).
        k = min(self.topk_candidates, a)
        class_topk_done = False
        order = rank = None
        while True:
            if limit > k and not class_topk_done:
                img, anchor, cls, score = _class_topk(img, anchor, cls, score, n, c, k)
                per_image, order, class_topk_done = np.bincount(img, minlength=n), None, True
            if per_image.max(initial=0) <= limit:
                take = None
            elif n == 1:  # the best `limit` by a partial sort (the NMS orders them itself)
                take = np.argpartition(-score, limit - 1)[:limit]
            else:
                if order is None:  # candidates grouped by image, best first, and their rank in the image
                    order = np.lexsort((-score, img))
                    img_sorted = img[order]
                    rank = np.arange(order.size) - np.searchsorted(img_sorted, img_sorted)
                take = order[rank < limit]
            t_img, t_anchor, t_cls, t_score = (img, anchor, cls, score) if take is None else (
                img[take], anchor[take], cls[take], score[take])
            boxes = self._decode(bbox_regression[t_img, t_anchor], t_anchor)
            kept = nms_grouped(boxes, t_score, t_img * (c - 1) + t_cls, self.nms_thresh)
            kept_per_image = np.bincount(t_img[kept], minlength=n)
            short = (kept_per_image < self.detections_per_img) & (per_image > limit)
            if not short.any():
                break
            # grow the prefix to where the keep rate seen so far would give detections_per_img (+25%)
            worst = max(int(kept_per_image[short].min()), 1)
            limit = max(2 * limit, int(1.25 * limit * self.detections_per_img / worst) + 1)
        img_k, boxes, score_k, labels = t_img[kept], boxes[kept], t_score[kept], t_cls[kept].astype(np.int64) + 1
        if n == 1:
            k = min(kept.size, self.detections_per_img)
            return [(boxes[:k], score_k[:k], labels[:k])]
        # kept is sorted by score (descending); a stable sort by image keeps that order per image
        by_image = np.argsort(img_k, kind="stable")
        img_k, boxes, score_k, labels = img_k[by_image], boxes[by_image], score_k[by_image], labels[by_image]
        out, start = [], 0
        for count in kept_per_image.tolist():
            stop = start + min(count, self.detections_per_img)
            out.append((boxes[start:stop], score_k[start:stop], labels[start:stop]))
            start += count
        return out

    def _candidates(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(image, anchor, class, score) of the foreground scores above the threshold (``class``
        0-based over the foreground classes); torchvision's per-class top-k is :func:`_class_topk`,
        applied by :meth:`detect_arrays` only where it can change the result."""
        n, a, c = logits.shape
        flat = logits.reshape(n * a, c)
        if self.score_thresh > 0 and c > 1:
            # softmax(x)_c <= exp(x_c - x_0): rows where no foreground logit beats the background by
            # log(thresh) cannot pass (a margin of 1e-3 in log space absorbs float rounding). The max
            # over classes column by column: numpy's reduction over a short last axis is 4x slower.
            best = flat[:, 1].copy()
            for j in range(2, c):
                np.maximum(best, flat[:, j], out=best)
            best -= flat[:, 0]
            rows = np.flatnonzero(best > math.log(self.score_thresh) - 1e-3)
        else:
            rows = np.arange(n * a)
        # torch's softmax on those rows (its kernel works row by row: the scores are bit-identical
        # to torchvision's softmax over the whole tensor; numpy's is 2x slower on thousands of rows)
        probs = torch.softmax(torch.from_numpy(flat[rows]), dim=-1).numpy()[:, 1:]
        r, cls = np.nonzero(probs > self.score_thresh)
        score = probs[r, cls]
        row = rows[r]
        img, anchor = np.divmod(row, a) if n > 1 else (np.zeros_like(row), row)
        return img, anchor, cls, score

    def _decode(self, rel: np.ndarray, anchor: np.ndarray) -> np.ndarray:
        """torchvision's ``BoxCoder.decode_single`` on rows (float32), then ``clip_boxes_to_image``."""
        size, ctr = self._size[anchor], self._ctr[anchor]
        wx, wy, ww, wh = self.weights
        rel = rel.astype(np.float32, copy=False)
        d_ctr = rel[:, :2] / np.array([wx, wy], dtype=np.float32)
        d_size = np.minimum(rel[:, 2:] / np.array([ww, wh], dtype=np.float32), np.float32(self.bbox_xform_clip))
        pred_ctr = d_ctr * size + ctr
        half = np.float32(0.5) * (np.exp(d_size) * size)
        h, w = self.canvas
        hi = np.array([w, h], dtype=np.float32)
        out = np.empty((rel.shape[0], 4), dtype=np.float32)
        np.clip(pred_ctr - half, 0, hi, out=out[:, :2])
        np.clip(pred_ctr + half, 0, hi, out=out[:, 2:])
        return out


def _class_topk(img: np.ndarray, anchor: np.ndarray, cls: np.ndarray, score: np.ndarray, n: int, c: int,
                k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torchvision's per-class top-k: at most ``k`` candidates per (image, class), the best by score."""
    if cls.size <= k:
        return img, anchor, cls, score
    group = img * (c - 1) + cls
    if np.bincount(group).max() <= k:
        return img, anchor, cls, score
    order = np.lexsort((-score, group))  # rank within each (image, class) by score; keep the best k
    g = group[order]
    rank = np.arange(order.size) - np.searchsorted(g, g)
    keep = np.sort(order[rank < k])
    return img[keep], anchor[keep], cls[keep], score[keep]


def nms_grouped(boxes: np.ndarray, scores: np.ndarray, group: np.ndarray, iou: float) -> np.ndarray:
    """One NMS over all groups (indices into ``boxes``, best first): boxes of different groups never
    overlap after the shift (float64: the shifted coordinates are exact)."""
    import torchvision.ops  # noqa: F401  (registers torch.ops.torchvision)

    if boxes.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    b = boxes.astype(np.float64)
    b += (group.astype(np.float64) * (float(b.max()) + 1.0))[:, None]
    return torch.ops.torchvision.nms(torch.from_numpy(b), torch.from_numpy(scores.astype(np.float64)), iou).numpy()


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
