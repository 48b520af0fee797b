"""The one detection record every runtime, evaluator and report exchanges."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Detections:
    """Detections for one image, in that image's own pixel coordinates.

    boxes: float32 (N, 4) as x1, y1, x2, y2; scores: float32 (N,); labels: int64 (N,)
    holding COCO category ids (1-based, 0 is never emitted).
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.scores)
        assert self.boxes.shape == (n, 4), self.boxes.shape
        assert self.labels.shape == (n,), self.labels.shape

    def __len__(self) -> int:
        return len(self.scores)

    @staticmethod
    def empty() -> Detections:
        return Detections(
            np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int64)
        )

    @staticmethod
    def from_torchvision(output: dict) -> Detections:
        """Convert one torchvision detector output dict (boxes/scores/labels tensors)."""
        return Detections(
            boxes=output["boxes"].detach().cpu().numpy().astype(np.float32).reshape(-1, 4),
            scores=output["scores"].detach().cpu().numpy().astype(np.float32).reshape(-1),
            labels=output["labels"].detach().cpu().numpy().astype(np.int64).reshape(-1),
        )

    def above(self, score_threshold: float) -> Detections:
        keep = self.scores >= score_threshold
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep])
