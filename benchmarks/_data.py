"""The synthetic COCO set the benchmarks train and evaluate on, generated once per work folder."""

from __future__ import annotations

from pathlib import Path


def synthetic_coco(folder: Path, *, images: int, seed: int) -> Path:
    """``folder/coco`` (train/val splits of the synthetic drive set), generated when missing."""
    coco = folder / "coco"
    if (coco / "annotations" / "instances_val.json").is_file():
        return coco
    from perception.synthetic.generate import generate_dataset

    generate_dataset(folder, images=images, drives=0, seed=seed)
    return coco
