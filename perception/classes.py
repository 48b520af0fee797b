"""The embedded default label set (COCO category ids 1..7; 0 is background for torchvision)."""

from __future__ import annotations

DRIVE_CLASSES: tuple[str, ...] = (
    "car",
    "truck",
    "bus",
    "pedestrian",
    "cyclist",
    "traffic_light",
    "traffic_sign",
)

#: torchvision detectors count the background class: 7 objects + background.
DEFAULT_NUM_CLASSES = len(DRIVE_CLASSES) + 1


def category_id(name: str) -> int:
    """COCO category id (1-based) of a class name of the default set."""
    try:
        return DRIVE_CLASSES.index(name) + 1
    except ValueError:
        raise ValueError(f"unknown class {name!r}; valid classes: {', '.join(DRIVE_CLASSES)}") from None
