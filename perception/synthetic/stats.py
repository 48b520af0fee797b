"""Summary statistics of a COCO annotation file: is the data set hard enough, and learnable?

"Small" follows the COCO convention (box area < 32² px) but measured *at the detector input*:
each box is scaled by (input_w / image_w, input_h / image_h) first, because a 640×384 frame
resized to SSDlite's 320×320 shrinks every box by about 2.4× in area.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

from perception.classes import DRIVE_CLASSES

SMALL_AREA = 32 * 32
MEDIUM_AREA = 96 * 96
#: An annotation counts as occluded when more than this fraction of its silhouette is hidden.
OCCLUDED_THRESHOLD = 0.05


def dataset_stats(ann_json: str | os.PathLike, model_input_hw: tuple[int, int] = (320, 320)) -> dict[str, Any]:
    """Boxes per class, fraction small at the model input, fraction occluded, mean objects per image.

    ``model_input_hw`` is (height, width) of the detector input. Reads the ``occluded`` attribute
    written by the synthetic generator; files without it report ``fraction_occluded`` as None.
    """
    with open(ann_json, encoding="utf-8") as f:
        doc = json.load(f)
    try:
        images = {im["id"]: im for im in doc["images"]}
        anns = doc["annotations"]
        cats = {c["id"]: c["name"] for c in doc["categories"]}
    except (KeyError, TypeError) as e:
        raise ValueError(f"{ann_json}: not a COCO instances file (missing {e}); expected images, "
                         "annotations and categories") from None
    in_h, in_w = model_input_hw
    per_class: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    n_occ = n_with_occ = 0
    for a in anns:
        im = images.get(a["image_id"])
        if im is None:
            raise ValueError(f"{ann_json}: annotation {a.get('id')} refers to unknown image_id {a['image_id']}")
        per_class[cats.get(a["category_id"], str(a["category_id"]))] += 1
        _, _, w, h = a["bbox"]
        area_in = (w * in_w / im["width"]) * (h * in_h / im["height"])
        sizes["small" if area_in < SMALL_AREA else "medium" if area_in < MEDIUM_AREA else "large"] += 1
        if "occluded" in a:
            n_with_occ += 1
            n_occ += a["occluded"] > OCCLUDED_THRESHOLD
    n = len(anns)
    order = [c for c in DRIVE_CLASSES if c in per_class] + sorted(set(per_class) - set(DRIVE_CLASSES))
    return {
        "images": len(images),
        "boxes": n,
        "boxes_per_class": {c: per_class[c] for c in order},
        "model_input_hw": list(model_input_hw),
        "fraction_small_at_model_input": sizes["small"] / n if n else 0.0,
        "fraction_medium_at_model_input": sizes["medium"] / n if n else 0.0,
        "fraction_large_at_model_input": sizes["large"] / n if n else 0.0,
        "fraction_occluded": (n_occ / n_with_occ) if n_with_occ else None,
        "mean_objects_per_image": n / len(images) if images else 0.0,
    }


def format_stats(stats: dict[str, Any]) -> str:
    """A short markdown table of :func:`dataset_stats` output (for RESULTS.md / the CLI)."""
    lines = ["| metric | value |", "|---|---|",
             f"| images | {stats['images']} |", f"| boxes | {stats['boxes']} |",
             f"| mean objects / image | {stats['mean_objects_per_image']:.2f} |",
             f"| small at model input {tuple(stats['model_input_hw'])} (area < 32²) | "
             f"{stats['fraction_small_at_model_input']:.1%} |"]
    if stats["fraction_occluded"] is not None:
        lines.append(f"| occluded (> {OCCLUDED_THRESHOLD:.0%} hidden) | {stats['fraction_occluded']:.1%} |")
    lines += [f"| {c} | {n} |" for c, n in stats["boxes_per_class"].items()]
    return "\n".join(lines)
