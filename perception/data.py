"""COCO-format detection data sets, validated on load.

The dataset follows torchvision's ``CocoDetection`` wrapped for transforms v2 (images plus
``tv_tensors.BoundingBoxes`` through ``torchvision.transforms.v2``), but reads the annotation file
once, itself, so that every record is checked before training starts and a bad record is named
(file, image id, annotation id, file name) instead of failing deep inside a training step.

Labels are COCO category ids, used directly as torchvision class indices (0 = background), so a
model needs ``num_classes > max(category id)``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perception.coco_json import AnnotationError as AnnotationError  # re-exported: raised by the data sets
from perception.coco_json import read_coco_json

log = logging.getLogger(__name__)


def _silent_coco(dataset: dict[str, Any]):
    """A pycocotools COCO index built from a dict, without its prints on stdout."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoDetectionDataset(torch.utils.data.Dataset):
    """A COCO detection split: ``dataset[i] -> (image float[3,H,W] in [0,1], target)``.

    ``target`` holds ``boxes`` (float[N,4] xyxy pixels), ``labels`` (int64[N], COCO category
    ids) and ``image_id``. ``train=True`` adds the training augmentation of
    :mod:`perception.transforms`. Crowd annotations are kept for evaluation but not trained on.
    ``validate=False`` skips the per-image file check (slow on network file systems); the
    record checks of :func:`read_coco_json` always run.
    """

    def __init__(
        self,
        images_dir: str | Path,
        ann_file: str | Path,
        *,
        train: bool = False,
        validate: bool = True,
    ) -> None:
        self.images_dir = Path(images_dir)
        self.ann_file = Path(ann_file)
        if not self.images_dir.is_dir():
            raise NotADirectoryError(f"images folder not found: {self.images_dir}")
        # validate=False still checks the records, only not that every image file exists
        self.coco = _silent_coco(read_coco_json(self.ann_file, self.images_dir if validate else None))
        cats = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])
        self.category_ids: list[int] = [c["id"] for c in cats]
        self.categories: list[str] = [c["name"] for c in cats]
        self.category_names: dict[int, str] = {c["id"]: c["name"] for c in cats}
        self.image_ids: list[int] = sorted(self.coco.getImgIds())
        self.train = train
        self._transform: Callable | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def _path(self, i: int) -> Path:
        return self.images_dir / self.coco.imgs[self.image_ids[i]]["file_name"]

    def load_image(self, i: int) -> np.ndarray:
        """The i-th image as an HxWx3 uint8 RGB array (what deploy runtimes receive)."""
        from PIL import Image

        with Image.open(self._path(i)) as im:
            return np.array(im.convert("RGB"))  # a writable copy: torch refuses read-only arrays

    def annotations(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (float32[N,4] xyxy) and labels (int64[N]) of the i-th image, crowd boxes excluded."""
        anns = [a for a in self.coco.imgToAnns.get(self.image_ids[i], []) if not a.get("iscrowd", 0)]
        boxes = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        return boxes, np.array([a["category_id"] for a in anns], np.int64)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        from torchvision import tv_tensors

        from perception.transforms import eval_transform, train_transform

        if self._transform is None:  # built lazily so the dataset pickles cheaply to workers
            self._transform = train_transform() if self.train else eval_transform()
        frame = self.load_image(i)
        boxes, labels = self.annotations(i)
        h, w = frame.shape[:2]
        image = tv_tensors.Image(torch.from_numpy(frame).permute(2, 0, 1).contiguous())
        target = {
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(boxes), format="XYXY", canvas_size=(h, w)),
            "labels": torch.from_numpy(labels),
        }
        image, target = self._transform(image, target)
        # Plain tensors out: the detectors need nothing from the tv_tensor subclasses.
        return image.as_subclass(torch.Tensor), {
            "boxes": target["boxes"].as_subclass(torch.Tensor).float(),
            "labels": target["labels"],
            "image_id": int(self.image_ids[i]),
        }

    def with_image_ids(self, image_ids: Sequence[int]) -> CocoDetectionDataset:
        """A view on some of this split's images; ``coco`` stays the full index (evaluation
        restricts pycocotools to ``image_ids``)."""
        unknown = [i for i in image_ids if i not in self.coco.imgs]
        if unknown:
            raise ValueError(f"{self.ann_file}: unknown image ids {unknown[:5]}")
        view = copy.copy(self)
        view.image_ids = list(image_ids)
        return view

    def augmented(self, train: bool) -> CocoDetectionDataset:
        """The same images with training augmentation switched on or off."""
        if train == self.train:
            return self
        view = copy.copy(self)
        view.train, view._transform = train, None
        return view

    def num_boxes(self) -> int:
        """Number of (non-crowd) boxes over this split's images."""
        return sum(len(self.annotations(i)[1]) for i in range(len(self)))


def load_split(root: str | Path, split: str, *, train: bool | None = None) -> CocoDetectionDataset:
    """Load ``root/{split}/`` images with ``root/annotations/instances_{split}.json``.

    ``train`` (augmentation) defaults to ``split == "train"``.
    """
    root = Path(root)
    ann = root / "annotations" / f"instances_{split}.json"
    if not ann.is_file():
        found = sorted(p.name for p in (root / "annotations").glob("instances_*.json")) if root.is_dir() else []
        raise FileNotFoundError(
            f"no annotations for split {split!r}: {ann} is missing"
            + (f" (found: {', '.join(found)})" if found else "")
            + "; ROOT must hold {split}/ images and annotations/instances_{split}.json "
            "(e.g. the 'coco' folder written by `avprune data synth`)"
        )
    return CocoDetectionDataset(root / split, ann, train=(split == "train") if train is None else train)


def collate(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Detection batches are lists: images differ in size and targets in box count."""
    images, targets = zip(*batch, strict=True) if batch else ((), ())
    return list(images), list(targets)


def subset(dataset: CocoDetectionDataset, n: int, *, seed: int = 0) -> CocoDetectionDataset:
    """``n`` images drawn at random (deterministic in ``seed``), in image-id order."""
    if n <= 0:
        raise ValueError(f"subset size must be positive, got {n}")
    if n >= len(dataset):
        return dataset
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(dataset), size=n, replace=False).tolist())
    return dataset.with_image_ids([dataset.image_ids[i] for i in picked])


def dataset_summary(dataset: CocoDetectionDataset) -> dict[str, Any]:
    """Counts a report can print: images, boxes, boxes per class."""
    per_class = dict.fromkeys(dataset.categories, 0)
    total = 0
    for i in range(len(dataset)):
        _, labels = dataset.annotations(i)
        total += len(labels)
        for lab in labels.tolist():
            per_class[dataset.category_names[lab]] += 1
    return {"images": len(dataset), "boxes": total, "boxes_per_class": per_class}
