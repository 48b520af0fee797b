"""SSD's pre/post-processing inside the ONNX graph (``host_ops="graph"``) equals torchvision's.

The fused graph is checked on the very canvas it normalises itself: the test adds the core's raw
outputs to the fused graph's outputs, so one ORT run yields both the in-graph detections and the
logits/deltas torchvision's ``postprocess_detections`` then decodes. Two regimes, as in
``test_postprocess``: a random SSDlite320 (every anchor passes, the top-k cuts every class, the
per-image cap binds) and the same with its background bias raised (a trained detector's few
hundred survivors).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deploy.core_graph import Postprocessor, model_meta
from deploy.export import export_onnx
from deploy.runtimes.fused_ends import fuse_ssd_ends, knob_feeds, split_detections
from deploy.runtimes.ort import OrtRuntime
from deploy.runtimes.ort_session import make_session
from deploy.runtimes.preprocess import resize_uint8
from tests.conftest import SSD, spread_model
from tests.conftest import export_frames as make_frames

pytestmark = pytest.mark.timeout(180)


def _biased(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # trained-like scores: background confident on most anchors
        for block in model.head.classification_head.module_list:
            block[-1].bias.view(-1, 8)[:, 0] += 6.0  # channels are (anchor, class)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.set_flush_denormal(True)
    out = {}
    for case in ("random", "background_biased"):
        model = spread_model(SSD)
        if case == "background_biased":
            _biased(model)
        path = tmp_path_factory.mktemp(case) / "core.onnx"
        export_onnx(model, path, exporter="legacy")
        out[case] = (model, path)
    return out


def _fused_with_raw(model: torch.nn.Module, path) -> tuple:
    """A session of the fused graph that also returns the core's raw outputs, and its post skeleton."""
    import onnx
    from onnx import TensorProto, helper

    meta = model_meta(model)
    post = Postprocessor.from_meta(meta)
    coder = post.model.box_coder
    fused = fuse_ssd_ends(onnx.load(str(path)), mean=meta.mean, std=meta.std, anchors=post.anchors(1)[0].numpy(),
                          canvas=meta.image_size, weights=tuple(coder.weights), bbox_xform_clip=coder.bbox_xform_clip)
    a = int(post.anchors(1)[0].shape[0])
    fused.graph.output.extend([
        helper.make_tensor_value_info("bbox_regression", TensorProto.FLOAT, ["n", a, 4]),
        helper.make_tensor_value_info("cls_logits", TensorProto.FLOAT, ["n", a, meta.num_classes]),
    ])
    return make_session(fused.SerializeToString(), threads=1), meta, post, a


def _match(ours: tuple[np.ndarray, np.ndarray, np.ndarray], ref: dict[str, torch.Tensor], *, box_tol: float,
           score_tol: float) -> None:
    """One to one: every detection has a twin with the same label, box within ``box_tol`` px and score
    within ``score_tol`` (detections whose scores differ in the last bit may sort either way)."""
    boxes, scores, labels = ours
    rb, rs, rl = (ref[k].numpy() for k in ("boxes", "scores", "labels"))
    assert len(scores) == len(rs)
    free = np.ones(len(rs), dtype=bool)
    for box, score, label in zip(boxes, scores, labels, strict=True):
        hit = free & (rl == label) & (np.abs(rb - box).max(1) <= box_tol) & (np.abs(rs - score) <= score_tol)
        assert hit.any(), (box, score, label)
        free[np.flatnonzero(hit)[0]] = False


@pytest.mark.parametrize("case", ["random", "background_biased"])
@pytest.mark.parametrize("thresh", [0.01, 0.001])
def test_fused_graph_matches_torchvision_on_its_own_canvas(exported, case, thresh):
    model, path = exported[case]
    sess, meta, post, a = _fused_with_raw(model, path)
    post.model.score_thresh = thresh
    frames = make_frames(2, seed=5, hw=(384, 640))
    feeds = knob_feeds(thresh, post.model.nms_thresh, post.model.topk_candidates, post.model.detections_per_img, a)
    feeds["frames_u8"] = resize_uint8(frames, meta)
    index, score, box, reg, logits = sess.run(None, feeds)
    ours = split_detections(index, score, box, len(frames), post.model.detections_per_img)
    ref = post.detect({"bbox_regression": torch.from_numpy(reg), "cls_logits": torch.from_numpy(logits)},
                      [meta.image_size] * len(frames))
    survivors = int((torch.softmax(torch.from_numpy(logits), -1)[..., 1:] > thresh).sum())
    assert survivors > 100 * len(frames)  # real work for the top-k and NMS
    for o, r in zip(ours, ref, strict=True):
        assert len(o[1]) > 0
        assert (np.diff(o[1]) <= 0).all()  # best first, as torchvision returns them
        assert o[2].dtype == np.int64 and o[2].min() >= 1  # 1-based labels: 0 is the background
        _match(o, r, box_tol=1e-4, score_tol=1e-6)


def test_fused_graph_caps_and_topk_follow_the_knobs(exported):
    model, path = exported["random"]
    sess, meta, post, a = _fused_with_raw(model, path)
    frames = make_frames(1, seed=3, hw=(384, 640))
    feeds = knob_feeds(0.001, post.model.nms_thresh, 40, 25, a)
    feeds["frames_u8"] = resize_uint8(frames, meta)
    index, score, box, reg, logits = sess.run(None, feeds)
    post.model.score_thresh, post.model.topk_candidates, post.model.detections_per_img = 0.001, 40, 25
    ref = post.detect({"bbox_regression": torch.from_numpy(reg), "cls_logits": torch.from_numpy(logits)},
                      [meta.image_size])
    ours = split_detections(index, score, box, 1, 25)
    assert len(ours[0][1]) == len(ref[0]["scores"]) == 25
    _match(ours[0], ref[0], box_tol=1e-4, score_tol=1e-6)
    # at most 40 candidates per class reach NMS, so at most 40 kept per class
    assert np.bincount(index[:, 1]).max() <= 40


@pytest.mark.parametrize(("resize", "hw", "dtype", "shape", "box_tol"), [
    # the same canvas as the host path (OpenCV's float32 blob): only the graph's own float order differs
    ("float32", (384, 640), "float32", (2, 3, 320, 320), 1e-4),
    # the graph normalises in another float order than the host: canvases differ by ~1 ulp
    ("uint8", (384, 640), "uint8", (2, 320, 320, 3), 2e-2),
])
def test_runtime_graph_mode_matches_the_host_path(exported, resize, hw, dtype, shape, box_tol):
    """``OrtRuntime(host_ops="graph")`` end to end against the host path with the same resize,
    batch of 2 (per-image split), and the score threshold changed after opening."""
    model, path = exported["background_biased"]
    frames = make_frames(2, seed=11, hw=hw)
    with OrtRuntime(path, threads=1, host_ops="graph") as fused, OrtRuntime(path, threads=1) as host:
        assert fused.resize == "uint8" and fused.info.extra["host_ops"] == "graph"  # the faster one by default
        fused.resize = host.resize = resize
        prepared = fused.preprocess(frames)
        assert str(prepared.batch.dtype).removeprefix("torch.") == dtype and tuple(prepared.batch.shape) == shape
        counts, thresh = [], 0.01
        for _ in range(2):  # 0.01, then the median score kept at 0.01: about half of those must go
            for rt in (fused, host):
                rt.post.model.score_thresh = thresh
            got, want = fused.infer(frames), host.infer(frames)
            counts.append(sum(len(g) for g in got))
            for g, w in zip(got, want, strict=True):
                assert (g.scores > thresh).all()
                _match((g.boxes, g.scores, g.labels), {"boxes": torch.from_numpy(w.boxes),
                       "scores": torch.from_numpy(w.scores), "labels": torch.from_numpy(w.labels)},
                       box_tol=box_tol, score_tol=1e-5)
            # half way between the two middle distinct scores: a threshold on a kept score itself would
            # keep or drop it by the last bit of the two paths' different float orders
            s = np.unique(np.concatenate([g.scores for g in got]))
            thresh = float(0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2]))
        assert counts[0] > counts[1] > 0  # the threshold set after opening reaches the graph
        with pytest.raises(ValueError, match="resize must be one of"):
            fused.resize = "float16"


def test_graph_mode_switches_graphs_with_the_resize_mode(exported):
    """One runtime serves both resize modes, each with its own fused graph; switching back gives the
    first answer again."""
    _, path = exported["background_biased"]
    frames = make_frames(1, seed=3, hw=(384, 640))
    with OrtRuntime(path, threads=1, host_ops="graph") as fused:
        inputs = {fused.resize: [i.name for i in fused.session.get_inputs()][0]}
        first = fused.infer(frames)[0]
        fused.resize = "float32"
        inputs[fused.resize] = [i.name for i in fused.session.get_inputs()][0]
        fused.infer(frames)
        fused.resize = "uint8"
        again = fused.infer(frames)[0]
    assert inputs == {"float32": "images", "uint8": "frames_u8"}
    assert np.array_equal(first.boxes, again.boxes) and np.array_equal(first.scores, again.scores)


def test_graph_mode_refuses_what_it_cannot_fold(tmp_path, exported):
    _, path = exported["random"]
    with pytest.raises(ValueError, match="host_ops must be one of"):
        OrtRuntime(path, threads=1, host_ops="gpu")
    frcnn = tmp_path / "frcnn.onnx"
    export_onnx(spread_model("fasterrcnn_mobilenet_v3_large_320_fpn"), frcnn, exporter="legacy")
    with pytest.raises(ValueError, match="faster_rcnn model .*host_ops='host'"):
        OrtRuntime(frcnn, threads=1, host_ops="graph")
    import onnx

    with pytest.raises(ValueError, match="expected an SSD core graph"):
        fuse_ssd_ends(onnx.load(str(frcnn)), mean=(0.5,) * 3, std=(0.5,) * 3, anchors=np.zeros((4, 4), np.float32),
                      canvas=(320, 320), weights=(10.0, 10.0, 5.0, 5.0), bbox_xform_clip=4.0)
