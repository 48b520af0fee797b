"""Contact sheet: a grid of sample frames with their ground-truth boxes and class labels."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from perception.io import atomic_write_bytes

# One BGR colour per category id 1..7 (car, truck, bus, pedestrian, cyclist, traffic_light, traffic_sign).
_COLORS = {1: (0, 255, 0), 2: (255, 160, 0), 3: (0, 200, 255), 4: (255, 0, 255), 5: (0, 0, 255),
           6: (255, 255, 0), 7: (128, 255, 128)}


def contact_sheet(images_dir: str | os.PathLike, ann_json: str | os.PathLike, out_png: str | os.PathLike, *,
                  n: int = 12, seed: int = 0, cols: int = 4, tile_width: int = 480) -> Path:
    """Draw boxes and labels on ``n`` frames picked at random (by ``seed``) and tile them into a PNG.

    Returns the written path. The PNG is written atomically.
    """
    import cv2

    if n < 1 or cols < 1:
        raise ValueError(f"n and cols must be >= 1, got n={n}, cols={cols}")
    with open(ann_json, encoding="utf-8") as f:
        doc = json.load(f)
    images = doc.get("images") or []
    if not images:
        raise ValueError(f"{ann_json} lists no images; nothing to put on a contact sheet")
    names = {c["id"]: c["name"] for c in doc.get("categories", [])}
    by_image: dict[int, list[dict]] = {}
    for a in doc.get("annotations", []):
        by_image.setdefault(a["image_id"], []).append(a)
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(images), size=min(n, len(images)), replace=False).tolist())
    tiles = []
    for i in pick:
        rec = images[i]
        path = Path(images_dir) / rec["file_name"]
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise FileNotFoundError(f"image {path} (listed in {ann_json}) is missing or unreadable")
        for a in by_image.get(rec["id"], []):
            x, y, w, h = (int(round(v)) for v in a["bbox"])
            color = _COLORS.get(a["category_id"], (255, 255, 255))
            cv2.rectangle(img, (x, y), (x + w - 1, y + h - 1), color, 1)
            label = names.get(a["category_id"], str(a["category_id"]))
            cv2.putText(img, label, (x, max(8, y - 3)), cv2.FONT_HERSHEY_SIMPLEX, 0.35, color, 1, cv2.LINE_AA)
        scale = tile_width / img.shape[1]
        tiles.append(cv2.resize(img, (tile_width, int(round(img.shape[0] * scale))), interpolation=cv2.INTER_AREA))
    th = max(t.shape[0] for t in tiles)
    tiles = [np.pad(t, ((0, th - t.shape[0]), (0, 0), (0, 0))) for t in tiles]
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.hstack(tiles[r:r + cols]) for r in range(0, len(tiles), cols)]
    sheet = np.vstack(rows)
    ok, buf = cv2.imencode(".png", sheet)
    if not ok:
        raise RuntimeError("OpenCV could not encode the contact sheet as PNG")
    out = Path(out_png)
    atomic_write_bytes(out, buf.tobytes())
    return out
