"""Schema of ``avprune train`` YAML files (see ``avprune/config/examples/train_default.yaml``).

Relative paths are resolved against the current working directory, like command-line paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from avprune.config.base import StrictModel

DetectorName = Literal[
    "ssdlite320_mobilenet_v3_large",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "retinanet_resnet50_fpn_v2",
    "fcos_resnet50_fpn",
]


class ModelSection(StrictModel):
    """Which detector to build, and optionally the local checkpoint to start from."""

    name: DetectorName = "ssdlite320_mobilenet_v3_large"
    num_classes: int = Field(8, ge=2, description="object classes + background")
    image_size: tuple[int, int] | None = Field(None, description="model input (height, width); null = the detector's")
    ssd_anchor_scales: tuple[float, float] | None = Field(None, description="SSD default-box scales (min, max)")
    checkpoint: Path | None = Field(None, description="local .pt to fine-tune from (ours or a torchvision state_dict)")


class DataSection(StrictModel):
    """A COCO folder: ``root/{split}/`` images and ``root/annotations/instances_{split}.json``."""

    root: Path
    train_split: str = "train"
    val_split: str | None = Field("val", description="evaluated after training; null to skip")
    eval_every_minutes: float | None = Field(None, gt=0, description="evaluate on val during training")
    max_eval_images: int | None = Field(None, ge=1)


class TrainSection(StrictModel):
    """Fields of :class:`perception.train.TrainSettings`, plus a wall-time limit."""

    steps: int = Field(..., ge=1)
    batch_size: int = Field(8, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(2e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(50, ge=0)
    min_lr_ratio: float = Field(0.02, ge=0, le=1)
    checkpoint_every: int = Field(200, ge=1)
    seed: int = 0
    num_workers: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(10.0, gt=0)
    augment: bool = True
    threads: int | None = Field(None, ge=1, description="torch CPU threads; null = torch's default (or $AVPRUNE_THREADS)")
    time_limit_minutes: float | None = Field(None, gt=0, description="stop (and checkpoint) after this much training")
    device: str = "cpu"


class TrainConfig(StrictModel):
    """One training run: model, data, optimisation, output folder."""

    model: ModelSection = ModelSection()
    data: DataSection
    train: TrainSection
    out: Path = Path("runs/train")

    @model_validator(mode="after")
    def _ssd_batch(self) -> TrainConfig:
        if self.model.name.startswith("ssd") and self.train.batch_size < 2:
            raise ValueError("train.batch_size must be >= 2 for SSD (BatchNorm on 1x1 feature maps)")
        return self

    def settings(self):
        """The :class:`perception.train.TrainSettings` of this config."""
        import os

        from perception.train import TrainSettings

        t = self.train
        threads = t.threads or (int(os.environ["AVPRUNE_THREADS"]) if os.environ.get("AVPRUNE_THREADS") else None)
        return TrainSettings(
            steps=t.steps, batch_size=t.batch_size, optimizer=t.optimizer, lr=t.lr, momentum=t.momentum,
            weight_decay=t.weight_decay, warmup_steps=t.warmup_steps, min_lr_ratio=t.min_lr_ratio,
            checkpoint_every=t.checkpoint_every, seed=t.seed, num_workers=t.num_workers,
            max_grad_norm=t.max_grad_norm, augment=t.augment, num_threads=threads,
        )
