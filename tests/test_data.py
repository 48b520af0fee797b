"""COCO data set loading and validation, KITTI import, train-time augmentation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from perception.classes import DRIVE_CLASSES
from perception.data import AnnotationError, CocoDetectionDataset, collate, load_split, subset
from tests.conftest import write_tiny_coco


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    write_tiny_coco(tmp_path, "train")
    write_tiny_coco(tmp_path, "val", seed=1)
    return tmp_path


def _edit(ann_file: Path, fn) -> None:
    data = json.loads(ann_file.read_text())
    fn(data)
    ann_file.write_text(json.dumps(data))


def test_load_split_returns_images_and_targets(tiny: Path) -> None:
    ds = load_split(tiny, "val")
    assert len(ds) == 6 and ds.image_ids == [1, 2, 3, 4, 5, 6]
    assert ds.categories == list(DRIVE_CLASSES) and not ds.train
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 96, 128)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    expected = [a for a in ds.coco.dataset["annotations"] if a["image_id"] == 1]
    assert target["image_id"] == 1 and len(target["boxes"]) == len(expected) > 0
    x, y, w, h = expected[0]["bbox"]
    assert target["boxes"][0].tolist() == [x, y, x + w, y + h]
    assert target["labels"].dtype == torch.int64 and target["labels"][0] == expected[0]["category_id"]
    frame = ds.load_image(0)
    assert frame.dtype == np.uint8 and frame.shape == (96, 128, 3)
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy() * 255, frame, atol=0.5)
    empty_img, empty = ds[5]  # the negative image
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    images, targets = collate([ds[0], ds[1]])
    assert len(images) == len(targets) == 2


def test_training_flip_moves_boxes_with_pixels(tiny: Path) -> None:
    ds = load_split(tiny, "train")
    assert ds.train
    torch.manual_seed(0)
    flipped = 0
    for _ in range(12):
        image, target = ds[0]
        ref_boxes, _ = ds.annotations(0)
        for box in target["boxes"]:
            x1, y1, x2, y2 = (int(round(v)) for v in box.tolist())
            assert [x1, y1, x2, y2] in ref_boxes.astype(int).tolist() or [
                128 - x2, y1, 128 - x1, y2
            ] in ref_boxes.astype(int).tolist()
            # the box still frames the rectangle: its inside differs from the grey background
            inside = image[:, y1 + 2 : y2 - 2, x1 + 2 : x2 - 2]
            assert (inside.mean(dim=(1, 2)) - image[:, 0, 0]).abs().max() > 0.02 or x2 - x1 < 6
        flipped += int(target["boxes"][0, 0] != float(ref_boxes[0, 0]))
    assert 0 < flipped < 12  # flips happen, but not always


def test_subset_is_deterministic_and_keeps_coco(tiny: Path) -> None:
    ds = load_split(tiny, "val")
    a, b = subset(ds, 3, seed=4), subset(ds, 3, seed=4)
    assert a.image_ids == b.image_ids and len(a) == 3 and a.coco is ds.coco
    assert all(i in ds.coco.imgs for i in a.image_ids)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda d: d["annotations"][0].update(bbox=[120, 10, 30, 20]), "extends past"),
        (lambda d: d["annotations"][0].update(bbox=[10, 10, 0, 20]), "degenerate box"),
        (lambda d: d["annotations"][0].update(category_id=42), "unknown category id 42"),
        (lambda d: d["annotations"][0].update(image_id=999), "not in 'images'"),
        (lambda d: d["images"][0].update(file_name="nope.png"), "image file missing"),
        (lambda d: d.update(images=[], annotations=[]), "empty"),
    ],
)
def test_bad_annotations_name_file_and_record(tiny: Path, edit, needle: str) -> None:
    ann = tiny / "annotations" / "instances_val.json"
    _edit(ann, edit)
    with pytest.raises(AnnotationError, match=needle) as err:
        load_split(tiny, "val")
    msg = str(err.value)
    assert str(ann) in msg
    if needle not in ("empty", "image file missing"):
        first = json.loads(ann.read_text())["annotations"][0]
        assert f"annotation id {first['id']}" in msg


def test_missing_split_says_what_is_expected(tiny: Path) -> None:
    with pytest.raises(FileNotFoundError, match="instances_test.json"):
        load_split(tiny, "test")
    with pytest.raises(NotADirectoryError):
        CocoDetectionDataset(tiny / "nowhere", tiny / "annotations" / "instances_val.json")


def test_kitti_to_coco_maps_classes(tmp_path: Path) -> None:
    from PIL import Image

    from perception.kitti import kitti_to_coco

    (tmp_path / "label_2").mkdir()
    (tmp_path / "image_2").mkdir()
    Image.fromarray(np.zeros((100, 200, 3), np.uint8)).save(tmp_path / "image_2" / "000007.png")
    rows = [
        "Car 0.00 0 -1.5 10.0 20.0 60.0 70.0 1.5 1.6 3.9 1.0 1.0 10.0 -1.5",
        "Van 0.00 0 -1.5 100.0 20.0 150.0 60.0 2 1.8 4.5 1.0 1.0 10.0 -1.5",
        "Tram 0.00 0 -1.5 0.0 0.0 50.0 40.0 3 2.5 14.0 1.0 1.0 10.0 -1.5",
        "Person_sitting 0.00 0 0 150.0 50.0 170.0 90.0 1 0.6 0.8 1.0 1.0 10.0 0",
        "DontCare -1 -1 -10 5.0 5.0 20.0 20.0 -1 -1 -1 -1000 -1000 -1000 -10",
        "Misc 0.00 0 0 20.0 20.0 40.0 40.0 1 1 1 1 1 1 0",
        "Cyclist 0.00 0 0 180.0 50.0 200.4 100.3 1.7 0.6 1.8 1.0 1.0 10.0 0",
    ]
    (tmp_path / "label_2" / "000007.txt").write_text("\n".join(rows) + "\n")
    out = kitti_to_coco(tmp_path / "label_2", tmp_path / "image_2", tmp_path / "kitti.json")
    ds = CocoDetectionDataset(tmp_path / "image_2", out)
    assert ds.image_ids == [7]
    names = [ds.category_names[a["category_id"]] for a in ds.coco.dataset["annotations"]]
    assert names == ["car", "car", "bus", "pedestrian", "cyclist"]
    assert ds.annotations(0)[0][-1].tolist() == pytest.approx([180.0, 50.0, 200.0, 100.0])  # clipped
    (tmp_path / "label_2" / "000007.txt").write_text("Boat 0 0 0 1 1 5 5 1 1 1 1 1 1 0\n")
    with pytest.raises(ValueError, match="unknown KITTI type 'Boat'"):
        kitti_to_coco(tmp_path / "label_2", tmp_path / "image_2", tmp_path / "kitti.json")
