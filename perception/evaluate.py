"""COCO mAP (pycocotools' COCOeval, the reference implementation) for any detector.

Anything that maps frames (HxWx3 uint8 RGB) to :class:`~perception.detections.Detections` in
frame pixels is a :data:`Predictor`: an eager torch model through :func:`torch_predictor`, an
ONNX Runtime session or a TensorRT engine through ``deploy.runtimes`` (``runtime.infer``). The
same code scores all of them, so their mAPs are comparable.

Buckets without ground truth (e.g. no large boxes in the evaluated images) come out as NaN,
not pycocotools' -1; classes without ground truth are left out of ``per_class``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from perception.detections import Detections

if TYPE_CHECKING:
    from torch import nn

    from perception.data import CocoDetectionDataset

log = logging.getLogger(__name__)

Predictor = Callable[[list[np.ndarray]], list[Detections]]


@dataclass(frozen=True)
class CocoMetrics:
    """COCO box metrics in [0, 1] (NaN where the bucket has no ground truth)."""

    map: float  # AP@[.5:.95]
    map50: float
    map75: float
    map_small: float  # area < 32^2 px in the evaluated images' own pixels
    map_medium: float
    map_large: float
    per_class: dict[str, float]  # AP@[.5:.95] per class name
    num_images: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; NaN becomes None."""

        def clean(v: Any) -> Any:
            return None if isinstance(v, float) and math.isnan(v) else v

        d = asdict(self)
        d["per_class"] = {k: clean(v) for k, v in self.per_class.items()}
        return {k: clean(v) if k != "per_class" else v for k, v in d.items()}


def _stat(v: float) -> float:
    return float("nan") if v < 0 else float(v)


def evaluate_detections(dataset: CocoDetectionDataset, detections: dict[int, Detections]) -> CocoMetrics:
    """Score ``{image_id: Detections}`` against the dataset's ground truth on those images."""
    from pycocotools.cocoeval import COCOeval

    from perception.data import _silent_coco

    gt = dataset.coco
    if not detections:
        raise ValueError("no detections to evaluate: pass one Detections (possibly empty) per image id")
    unknown = [i for i in detections if i not in gt.imgs]
    if unknown:
        raise ValueError(f"image ids {unknown[:5]} are not in {dataset.ann_file}")
    results = []
    for image_id, det in detections.items():
        for box, score, label in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist(), strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            results.append(
                {
                    "id": len(results) + 1,
                    "image_id": int(image_id),
                    "category_id": int(label),
                    "bbox": [box[0], box[1], w, h],
                    "score": float(score),
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    # Built by hand rather than COCO.loadRes: loadRes prints and fails on an empty result list.
    dt = _silent_coco({"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": results})
    ev = COCOeval(gt, dt, iouType="bbox")
    ev.params.imgIds = sorted(int(i) for i in detections)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools reports on stdout
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = ev.stats
    # precision: [IoU thresholds, recall points, categories, area ranges, max dets]
    precision = ev.eval["precision"]
    per_class: dict[str, float] = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        has_gt = any(gt.getAnnIds(imgIds=ev.params.imgIds, catIds=[cat_id], iscrowd=False))
        if has_gt:
            per_class[dataset.category_names[cat_id]] = float(np.mean(p[p > -1])) if (p > -1).any() else 0.0
    return CocoMetrics(
        map=_stat(s[0]),
        map50=_stat(s[1]),
        map75=_stat(s[2]),
        map_small=_stat(s[3]),
        map_medium=_stat(s[4]),
        map_large=_stat(s[5]),
        per_class=per_class,
        num_images=len(detections),
    )


def evaluate(
    predict: Predictor,
    dataset: CocoDetectionDataset,
    *,
    batch_size: int = 8,
    max_images: int | None = None,
    progress: bool = False,
) -> CocoMetrics:
    """Run ``predict`` over the dataset's images (the first ``max_images``) and score it."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    if n < 1:
        raise ValueError(f"nothing to evaluate: {dataset.ann_file} has {len(dataset)} images, max_images={max_images}")
    from tqdm import tqdm

    detections: dict[int, Detections] = {}
    with tqdm(total=n, desc="eval", unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, n, batch_size):
            idx = range(start, min(start + batch_size, n))
            frames = [dataset.load_image(i) for i in idx]
            outs = predict(frames)
            if len(outs) != len(frames):
                raise ValueError(f"predictor returned {len(outs)} results for {len(frames)} frames")
            for i, det in zip(idx, outs, strict=True):
                detections[dataset.image_ids[i]] = det
            bar.update(len(frames))
    return evaluate_detections(dataset, detections)


def torch_predictor(model: nn.Module, *, device: str = "cpu") -> Predictor:
    """Wrap a torchvision detector (labels = COCO category ids) as a :data:`Predictor`.

    The model is put in eval mode; the caller restores train mode if it keeps training.
    """
    import torch

    model.eval().to(device)

    @torch.inference_mode()
    def predict(frames: list[np.ndarray]) -> list[Detections]:
        images = [torch.as_tensor(np.array(f, copy=True)).to(device).permute(2, 0, 1).float().div_(255.0) for f in frames]
        return [Detections.from_torchvision(o) for o in model(images)]

    return predict


def evaluate_model(model: nn.Module, dataset: CocoDetectionDataset, *, device: str = "cpu", **kw: Any) -> CocoMetrics:
    """:func:`evaluate` for a torch detector; restores the model's train/eval mode afterwards."""
    was_training = model.training
    try:
        return evaluate(torch_predictor(model, device=device), dataset, **kw)
    finally:
        model.train(was_training)
