"""COCO annotation files read and checked record by record, without torch (milliseconds).

Split from :mod:`perception.data` (which builds torch data sets on top) so that a job's data is
checked before torch is imported: ``avprune prune`` refuses a split without images or boxes in
well under a second. :mod:`perception.data` re-exports both names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: A box may stick out of its image by this many pixels (rounding in exporters) before it is an error.
BOX_TOLERANCE_PX = 1.0
_MAX_LISTED = 5  # problems listed in one error message


class AnnotationError(ValueError):
    """An annotation file that cannot be used; the message names the file, the records and the fix."""


def read_coco_json(ann_file: str | Path, images_dir: str | Path | None = None) -> dict[str, Any]:
    """Read and validate a COCO detection annotation file; return the (normalised) dict.

    Checks: at least one image; every image has a file (when ``images_dir`` is given), a
    positive width and height; every annotation refers to a known image and category, has a
    box ``[x, y, w, h]`` with ``w, h > 0`` inside the image (±1 px). Missing ``area`` and
    ``iscrowd`` are filled in (pycocotools' evaluator needs them).
    """
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"annotation file not found: {ann_file}")
    try:
        data = json.loads(ann_file.read_text())
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{ann_file}: not valid JSON ({e}); regenerate or fix the file") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise AnnotationError(f"{ann_file}: not a COCO detection file (needs 'images', 'annotations', 'categories')")
    images, anns, cats = data["images"], data.get("annotations") or [], data.get("categories") or []
    if not images:
        raise AnnotationError(f"{ann_file}: the data set is empty (no images); point at a split with images")
    if not cats:
        raise AnnotationError(f"{ann_file}: no 'categories'; list every class as {{'id': 1, 'name': 'car'}}")

    problems: list[str] = []
    cat_ids = {c["id"] for c in cats}
    if 0 in cat_ids:
        problems.append("category id 0 is reserved for the background; number categories from 1")
    sizes: dict[int, tuple[float, float, str]] = {}
    for img in images:
        iid, fname = img.get("id"), img.get("file_name", "?")
        w, h = img.get("width", 0), img.get("height", 0)
        if iid in sizes:
            problems.append(f"image id {iid} ({fname}): duplicate image id")
        if not (w > 0 and h > 0):
            problems.append(f"image id {iid} ({fname}): width/height missing or not positive ({w}x{h})")
        if images_dir is not None and not (Path(images_dir) / fname).is_file():
            problems.append(f"image id {iid}: image file missing: {Path(images_dir) / fname}")
        sizes[iid] = (float(w), float(h), fname)
    tol = BOX_TOLERANCE_PX
    for ann in anns:
        aid, iid = ann.get("id"), ann.get("image_id")
        where = f"annotation id {aid} (image id {iid}"
        if iid not in sizes:
            problems.append(f"{where}): refers to an image id that is not in 'images'")
            continue
        W, H, fname = sizes[iid]
        where += f", {fname})"
        if ann.get("category_id") not in cat_ids:
            problems.append(f"{where}: unknown category id {ann.get('category_id')!r}; known: {sorted(cat_ids)}")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4):
            problems.append(f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
            continue
        x, y, bw, bh = (float(v) for v in bbox)
        if not (bw > 0 and bh > 0):
            problems.append(f"{where}: degenerate box {bbox} (width and height must be > 0)")
        elif x < -tol or y < -tol or x + bw > W + tol or y + bh > H + tol:
            problems.append(f"{where}: box {bbox} extends past the {W:g}x{H:g} image")
        ann.setdefault("area", bw * bh)
        ann.setdefault("iscrowd", 0)
    if problems:
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise AnnotationError(
            f"{ann_file}: {len(problems)} invalid record(s):\n  "
            + "\n  ".join(problems[:_MAX_LISTED])
            + more
            + "\nFix or drop these records (or regenerate the data set) and load again."
        )
    data["annotations"] = anns
    return data
