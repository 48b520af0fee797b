"""COCO-format records for rendered frames, and durable image / JSON writes.

Annotations carry the standard fields (``bbox`` x,y,w,h in pixels, ``area`` = w·h so the COCO
small/medium/large ranges refer to box size, ``iscrowd`` 0) plus ``occluded`` (fraction of the
object's silhouette that is hidden by nearer objects or cut off by the image border, 0 = fully
visible), ``visible_fraction`` (1 − occluded) and ``track_id`` (stable within a drive).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from perception.classes import DRIVE_CLASSES
from perception.io import atomic_write_bytes, atomic_write_json
from perception.synthetic.render import ObjectBox


def coco_categories() -> list[dict[str, Any]]:
    """Category records with ids 1..7 in ``DRIVE_CLASSES`` order."""
    return [{"id": i, "name": name, "supercategory": "drive"} for i, name in enumerate(DRIVE_CLASSES, start=1)]


def image_record(image_id: int, file_name: str, width: int, height: int, **extra: Any) -> dict[str, Any]:
    """One entry of the ``images`` list (extra keys, e.g. ``timestamp_ns``, are appended)."""
    return {"id": image_id, "file_name": file_name, "width": width, "height": height, **extra}


def annotation_records(boxes: Iterable[ObjectBox], image_id: int, first_id: int) -> list[dict[str, Any]]:
    """COCO annotations of one frame, numbered from ``first_id``."""
    out = []
    for n, b in enumerate(boxes):
        x, y, w, h = b.bbox
        out.append({
            "id": first_id + n, "image_id": image_id, "category_id": b.category_id,
            "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
            "occluded": round(1.0 - b.visible_fraction, 4), "visible_fraction": b.visible_fraction,
            "track_id": b.track_id,
        })
    return out


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG bytes of a BGR uint8 image (fast zlib level: the data are noisy anyway)."""
    import cv2

    ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {image.shape} {image.dtype} image as PNG")
    return buf.tobytes()


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of a BGR uint8 image (used for MCAP CompressedImage payloads)."""
    import cv2

    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {image.shape} {image.dtype} image as JPEG")
    return buf.tobytes()


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Atomically write ``image`` as a PNG file."""
    atomic_write_bytes(path, encode_png(image))


def coco_document(images: list[dict[str, Any]], annotations: list[dict[str, Any]], *,
                  description: str, extra_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """A complete COCO instances document (info, licenses, images, annotations, categories)."""
    info = {"description": description, "version": "1.0", "contributor": "avprune synthetic generator",
            **(extra_info or {})}
    return {"info": info, "licenses": [], "images": images, "annotations": annotations,
            "categories": coco_categories()}


def write_coco_json(path: str | os.PathLike, document: dict[str, Any]) -> None:
    """Atomically write a COCO document (compact: these files can hold 10^5 boxes)."""
    atomic_write_json(path, document, indent=None)
