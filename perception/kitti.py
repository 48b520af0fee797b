"""KITTI object ``label_2`` files -> a COCO detection file over the drive classes.

KITTI label line (space separated, 15 fields): ``type truncated occluded alpha x1 y1 x2 y2
h w l x y z rotation_y``; boxes are in pixels, ``x2``/``y2`` inclusive-ish floats.

Class mapping (KITTI has no bus, traffic light or sign class):

==================  ===========  ===========================================================
KITTI type          drive class  why
==================  ===========  ===========================================================
Car, Van            car          passenger vehicles
Truck               truck
Tram                bus          large passenger vehicle on a fixed route; closest drive class
Pedestrian          pedestrian
Person_sitting      pedestrian
Cyclist             cyclist
DontCare, Misc      (dropped)    DontCare regions are unlabelled; Misc is heterogeneous
==================  ===========  ===========================================================

Any other type is an error (a typo in a label file should not silently drop objects).
"""

from __future__ import annotations

import logging
from pathlib import Path

from perception.classes import DRIVE_CLASSES, category_id
from perception.io import atomic_write_json

log = logging.getLogger(__name__)

KITTI_TO_DRIVE: dict[str, str | None] = {
    "Car": "car",
    "Van": "car",
    "Truck": "truck",
    "Tram": "bus",
    "Pedestrian": "pedestrian",
    "Person_sitting": "pedestrian",
    "Cyclist": "cyclist",
    "DontCare": None,
    "Misc": None,
}

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _image_for(image_dir: Path, stem: str) -> Path:
    for suffix in _IMAGE_SUFFIXES:
        p = image_dir / f"{stem}{suffix}"
        if p.is_file():
            return p
    raise FileNotFoundError(f"no image for label {stem}.txt in {image_dir} (looked for {stem}.png/.jpg)")


def kitti_to_coco(label_dir: str | Path, image_dir: str | Path, out_json: str | Path) -> Path:
    """Convert every ``label_dir/*.txt`` (with its image in ``image_dir``) to one COCO file.

    Image ids follow the sorted label file names (``000123.txt`` -> id 123 when numeric).
    Boxes are clipped to the image (KITTI boxes can exceed it by a fraction of a pixel) and
    boxes left with no area are dropped. ``file_name`` is relative to ``image_dir``.
    """
    from PIL import Image

    label_dir, image_dir = Path(label_dir), Path(image_dir)
    if not label_dir.is_dir():
        raise NotADirectoryError(f"KITTI label folder not found: {label_dir} (expected training/label_2)")
    labels = sorted(label_dir.glob("*.txt"))
    if not labels:
        raise ValueError(f"{label_dir}: no *.txt label files; point at KITTI's training/label_2 folder")
    images, annotations = [], []
    for n, label_path in enumerate(labels):
        img_path = _image_for(image_dir, label_path.stem)
        with Image.open(img_path) as im:
            width, height = im.size
        image_id = int(label_path.stem) if label_path.stem.isdigit() else n
        images.append({"id": image_id, "file_name": img_path.name, "width": width, "height": height})
        for line_no, line in enumerate(label_path.read_text().splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 8:
                raise ValueError(f"{label_path}:{line_no}: expected >= 8 fields (type ... x1 y1 x2 y2), got {line!r}")
            kind = fields[0]
            if kind not in KITTI_TO_DRIVE:
                raise ValueError(
                    f"{label_path}:{line_no}: unknown KITTI type {kind!r}; known: {', '.join(KITTI_TO_DRIVE)}"
                )
            cls = KITTI_TO_DRIVE[kind]
            if cls is None:
                continue
            x1, y1, x2, y2 = (float(v) for v in fields[4:8])
            x1, y1 = max(0.0, x1), max(0.0, y1)
            x2, y2 = min(float(width), x2), min(float(height), y2)
            if x2 <= x1 or y2 <= y1:
                log.debug("%s:%d: box has no area inside the image; dropped", label_path, line_no)
                continue
            w, h = x2 - x1, y2 - y1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id(cls),
                    "bbox": [round(x1, 2), round(y1, 2), round(w, 2), round(h, 2)],
                    "area": round(w * h, 2),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": name, "supercategory": "drive"} for i, name in enumerate(DRIVE_CLASSES)]
    out_json = Path(out_json)
    atomic_write_json(out_json, {"images": images, "annotations": annotations, "categories": categories})
    log.info("KITTI -> COCO: %d images, %d boxes -> %s", len(images), len(annotations), out_json)
    return out_json
