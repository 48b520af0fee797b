"""SSD decoding + NMS of the survivors equals torchvision's own ``postprocess_detections``.

Models: a random-weight SSDlite320 with live features (``spread_model``), as is (every anchor
passes 0.01: the worst case, top-k cuts every class) and with its classification head's background
bias raised so that, as in a trained detector, most anchors are confident background and a few
hundred (0.01) to a few thousand (0.001) scores survive. These are NOT trained detectors: their
boxes are random, which makes NMS keep many of them (a harder case than a trained model's
clusters). The parity on a trained checkpoint is measured by ``benchmarks.engine``.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

from deploy.core_graph import CoreModule, Postprocessor, model_meta
from deploy.runtimes.postprocess import SSDPost
from deploy.runtimes.preprocess import preprocess_frames
from tests.conftest import SSD, spread_model
from tests.conftest import export_frames as make_frames

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def raw():
    """Raw core outputs of a random SSDlite320 on 3 frames of 640x384, and its post-processing skeleton."""
    torch.set_flush_denormal(True)
    model = spread_model(SSD)
    meta = model_meta(model)
    batch, _ = preprocess_frames(make_frames(3, seed=5, hw=(384, 640)), meta)
    with torch.no_grad():
        reg, logits = CoreModule(model, meta).eval()(batch)
    return meta, reg, logits


def _cases(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    # background bias 7: ~200 scores per image pass 0.01 (a trained detector's regime)
    confident = logits * 3.0
    confident[..., 0] += 7.0
    return {"random": logits, "background_biased": confident}


def _sorted(det: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detections in a canonical order (score, then label, then box), so tie order cannot matter."""
    b, s, lab = det["boxes"].numpy(), det["scores"].numpy(), det["labels"].numpy()
    order = np.lexsort((b[:, 3], b[:, 2], b[:, 1], b[:, 0], lab, -s))
    return b[order], s[order], lab[order]


@pytest.mark.parametrize("case", ["random", "background_biased"])
@pytest.mark.parametrize("thresh", [0.01, 0.001])
def test_matches_torchvision(raw, case, thresh):
    meta, reg, logits = raw
    logits = _cases(logits)[case]
    post = Postprocessor.from_meta(meta)
    post.model.score_thresh = thresh
    ref = post.detect({"bbox_regression": reg, "cls_logits": logits}, [meta.image_size] * len(reg))
    ours = SSDPost.from_model(post.model, post.anchors(1)[0], meta.image_size).detect(reg, logits)
    survivors = int((torch.softmax(logits, -1)[..., 1:] > thresh).sum())
    assert survivors > 100 * len(reg)  # real work for the top-k and NMS, not an empty output
    for r, o in zip(ref, ours, strict=True):
        assert len(o["scores"]) == len(r["scores"]) > 0
        assert o["labels"].dtype == torch.int64 and o["boxes"].dtype == torch.float32
        rb, rs, rl = _sorted(r)
        ob, os_, ol = _sorted(o)
        np.testing.assert_array_equal(ol, rl)
        np.testing.assert_allclose(ob, rb, atol=1e-4, rtol=0)
        np.testing.assert_allclose(os_, rs, atol=1e-7, rtol=0)
        # torchvision's order (score descending) is kept
        assert (np.diff(o["scores"].numpy()) <= 0).all()
    ours_map, ref_map = _map(ours, ref), _map(ref, ref)
    assert ref_map > 0.3  # the ground truth below is findable: dmAP is not 0 - 0
    assert abs(ours_map - ref_map) <= 0.002


def test_caps_per_image_and_topk(raw):
    meta, reg, logits = raw
    post = Postprocessor.from_meta(meta)
    post.model.score_thresh, post.model.detections_per_img, post.model.topk_candidates = 0.001, 25, 40
    ref = post.detect({"bbox_regression": reg, "cls_logits": logits}, [meta.image_size] * len(reg))
    ours = SSDPost.from_model(post.model, post.anchors(1)[0], meta.image_size).detect(reg, logits)
    for r, o in zip(ref, ours, strict=True):
        assert len(o["scores"]) == len(r["scores"]) == 25
        np.testing.assert_allclose(_sorted(o)[0], _sorted(r)[0], atol=1e-4)


def test_nothing_survives_and_shape_errors(raw):
    meta, reg, logits = raw
    post = Postprocessor.from_meta(meta)
    post.model.score_thresh = 0.999999
    ssd = SSDPost.from_model(post.model, post.anchors(1)[0], meta.image_size)
    out = ssd.detect(reg, logits)
    assert len(out) == len(reg) and all(len(d["scores"]) == 0 and d["boxes"].shape == (0, 4) for d in out)
    with pytest.raises(ValueError, match="re-export"):
        ssd.detect(reg[:, :-1], logits)


def test_runtime_uses_it_and_matches_the_eager_model():
    """PyTorchRuntime end to end vs the torchvision model's own forward, at the deployed threshold."""
    from deploy.runtimes.pytorch import PyTorchRuntime
    from perception.models import set_score_threshold

    model = spread_model(SSD)
    with torch.no_grad():  # trained-like scores: background confident on most anchors
        for block in model.head.classification_head.module_list:
            block[-1].bias.view(-1, 8)[:, 0] += 6.0  # channels are (anchor, class)
    set_score_threshold(model, 0.01)
    frames = make_frames(2, seed=9, hw=(384, 640))
    with torch.no_grad():
        ref = model([torch.from_numpy(f).permute(2, 0, 1).float() / 255.0 for f in frames])
    with PyTorchRuntime(model, threads=1) as rt:
        ours = rt.infer(frames)
    for r, o in zip(ref, ours, strict=True):
        assert len(o) == len(r["scores"]) > 0
        # pre-processing agrees to float rounding (test_preprocess): scores to ~1e-7, boxes to ~1e-3 px in
        # frame pixels. Matched one to one (same label, box within 2e-2 px, score within 1e-6), not by
        # position: detections whose scores differ by 1e-8 may sort either way (on some CPUs they do).
        rb, rs, rl = (r[k].numpy() for k in ("boxes", "scores", "labels"))
        free = np.ones(len(rs), dtype=bool)
        for box, score, label in zip(o.boxes, o.scores, o.labels, strict=True):
            hit = free & (rl == label) & (np.abs(rb - box).max(1) <= 2e-2) & (np.abs(rs - score) <= 1e-6)
            assert hit.any(), (box, score, label)
            free[np.flatnonzero(hit)[0]] = False


def _map(dets: list[dict[str, torch.Tensor]], ref: list[dict[str, torch.Tensor]]) -> float:
    """COCO mAP of ``dets`` against ground truth made from ``ref``'s 8 best boxes per image, moved 2 px."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, results = [], [], []
    for i, (d, r) in enumerate(zip(dets, ref, strict=True)):
        images.append({"id": i + 1, "width": 320, "height": 320})
        for box, label in zip(r["boxes"][:8].tolist(), r["labels"][:8].tolist(), strict=True):
            x, y, w, h = box[0] + 2, box[1] + 2, box[2] - box[0], box[3] - box[1]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(label), "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
        for box, score, label in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist(), strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            results.append({"id": len(results) + 1, "image_id": i + 1, "category_id": int(label),
                            "bbox": [box[0], box[1], w, h], "score": score, "area": w * h, "iscrowd": 0})
    cats = [{"id": c, "name": str(c)} for c in range(1, 8)]
    with contextlib.redirect_stdout(io.StringIO()):
        gt, dt = COCO(), COCO()
        gt.dataset = {"images": images, "categories": cats, "annotations": anns}
        dt.dataset = {"images": images, "categories": cats, "annotations": results}
        gt.createIndex()
        dt.createIndex()
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def test_engine_benchmark_tells_other_processes_load_from_its_own():
    """benchmarks.engine's header: its own threads do not count as other work; another process's do."""
    import subprocess
    import sys
    import time

    from benchmarks.engine import _load_line, cpu_sample, other_share

    start = cpu_sample()
    end_by = time.monotonic() + 0.5
    while time.monotonic() < end_by:  # this process busy: not "other work"
        pass
    own = other_share(start, cpu_sample(), 1)
    start = cpu_sample()
    subprocess.run([sys.executable, "-c", "import time\nt=time.monotonic()\nwhile time.monotonic()-t<0.5: pass"],
                   check=True)
    other = other_share(start, cpu_sample(), 1)
    assert other > own + 0.3, (own, other)
    assert "otherwise idle" in _load_line({"other_share": 0.01})
    assert "inflated" in _load_line({"other_share": 0.4})
