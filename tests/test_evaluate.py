"""COCO mAP: ground truth scores 1.0, perturbed boxes less, wrong labels 0 for their class."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from perception.data import load_split
from perception.detections import Detections
from perception.evaluate import evaluate, evaluate_detections, evaluate_model
from tests.conftest import write_tiny_coco


@pytest.fixture()
def val(tmp_path: Path):
    write_tiny_coco(tmp_path, "val", n=8, seed=3)
    return load_split(tmp_path, "val")


def _gt(ds, i: int, *, shift: float = 0.0, relabel: dict[int, int] | None = None) -> Detections:
    boxes, labels = ds.annotations(i)
    boxes = boxes + shift
    if relabel:
        labels = np.array([relabel.get(int(v), int(v)) for v in labels], np.int64)
    return Detections(boxes.astype(np.float32), np.ones(len(labels), np.float32), labels)


def _gt_predictor(ds, **kw):
    by_frame = {ds.load_image(i).tobytes(): i for i in range(len(ds))}  # frames are distinct images

    def predict(frames):
        return [_gt(ds, by_frame[f.tobytes()], **kw) for f in frames]

    return predict


def test_ground_truth_scores_one(val) -> None:
    m = evaluate(_gt_predictor(val), val, batch_size=3)
    assert m.map == pytest.approx(1.0) and m.map50 == pytest.approx(1.0) and m.map75 == pytest.approx(1.0)
    assert m.num_images == 8
    present = {val.category_names[int(c)] for i in range(len(val)) for c in val.annotations(i)[1]}
    assert set(m.per_class) == present and all(v == pytest.approx(1.0) for v in m.per_class.values())
    assert math.isnan(m.map_large)  # no box over 96x96 px in 96x128 images: no ground truth there
    d = m.to_dict()
    assert d["map_large"] is None and d["per_class"] == m.per_class


def test_perturbed_boxes_score_less(val) -> None:
    exact = evaluate(_gt_predictor(val), val).map
    shifted = evaluate(_gt_predictor(val, shift=4.0), val).map
    assert shifted < exact
    assert 0.0 < shifted


def test_wrong_label_scores_zero_for_that_class(val) -> None:
    # Every "car" (id 1) is reported as "bus" (id 3): car AP is 0, the other classes stay 1.
    m = evaluate_detections(val, {iid: _gt(val, i, relabel={1: 3}) for i, iid in enumerate(val.image_ids)})
    assert m.per_class["car"] == 0.0
    assert all(v == pytest.approx(1.0) for k, v in m.per_class.items() if k != "car")
    assert m.map < 1.0


def test_no_detections_score_zero_and_max_images(val) -> None:
    m = evaluate(lambda frames: [Detections.empty() for _ in frames], val, max_images=5)
    assert m.num_images == 5 and m.map == 0.0
    with pytest.raises(ValueError, match="returned 0 results"):
        evaluate(lambda frames: [], val)
    with pytest.raises(ValueError, match="not in"):
        evaluate_detections(val, {12345: Detections.empty()})


def test_evaluate_model_restores_train_mode(val) -> None:
    import torch

    from perception.models import build_detector

    torch.manual_seed(0)
    model = build_detector("ssdlite320_mobilenet_v3_large", image_size=96).train()
    m = evaluate_model(model, val, max_images=2, batch_size=2)
    assert model.training and m.num_images == 2 and 0.0 <= m.map <= 1.0
