"""Export + ONNX Runtime parity for SSDlite320 and Faster R-CNN MobileNet 320, both graph forms.

mAP parity between two untrained models is vacuous (both ~0), so the fixtures build a tiny COCO
set whose ground truth is the PyTorch model's own confident detections: PyTorch scores mAP ~1
there, and any export that computes something else (e.g. outputs wired by position) drops.
The heads are re-initialised with a wider spread so scores are distinct (no NMS ties).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from deploy.export import ExportResult, export_onnx, read_onnx_meta
from deploy.verify import ExportMismatchError, export_verified, verify_export
from tests.conftest import SSD, spread_model, write_pseudo_coco
from tests.conftest import export_frames as make_frames

FRCNN = "fasterrcnn_mobilenet_v3_large_320_fpn"


# ----------------------------------------------------------------------------- helpers


def swap_outputs(src: Path, dest: Path, a: str, b: str) -> None:
    """Rename graph tensors ``a`` <-> ``b`` (what a position-based output mapping amounts to)."""
    import onnx

    proto = onnx.load(str(src))
    ren = {a: b, b: a}
    for node in proto.graph.node:
        node.output[:] = [ren.get(o, o) for o in node.output]
        node.input[:] = [ren.get(i, i) for i in node.input]
    for out in proto.graph.output:
        out.name = ren.get(out.name, out.name)
    onnx.save(proto, str(dest))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ssd_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssd")
    model = spread_model(SSD)
    frames = make_frames(4)
    ds = write_pseudo_coco(model, frames, root / "coco")
    core = export_onnx(model, root / "core.onnx", form="core", exporter="legacy")
    full = export_onnx(model, root / "full.onnx", form="full")
    return model, ds, core, full


@pytest.fixture(scope="module")
def frcnn_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("frcnn")
    model = spread_model(FRCNN, seed=1)
    frames = make_frames(4, seed=1)
    ds = write_pseudo_coco(model, frames, root / "coco")
    core = export_onnx(model, root / "core.onnx", form="core", exporter="legacy")
    full = export_onnx(model, root / "full.onnx", form="full")
    return model, ds, core, full


# ----------------------------------------------------------------------------- tests


def test_export_result_and_metadata(ssd_case, frcnn_case):
    _, _, core, full = ssd_case
    assert isinstance(core, ExportResult) and core.exporter_used == "legacy"
    assert core.output_names == ("bbox_regression", "cls_logits") and core.dynamic_batch
    assert full.output_names == ("boxes", "scores", "labels") and full.exporter_used == "legacy"
    doc = read_onnx_meta(core.path)
    assert doc["meta"]["family"] == "ssd" and doc["form"] == "core" and doc["meta"]["image_size"] == [320, 320]
    _, _, fcore, ffull = frcnn_case
    assert fcore.stage2_path is not None and fcore.stage2_path.is_file()
    assert fcore.output_names[:2] == ("rpn_objectness", "rpn_bbox_deltas")
    # Faster R-CNN's own output order is boxes, labels, scores: ours is by name, always the same
    assert ffull.output_names == ("boxes", "scores", "labels")


@pytest.mark.parametrize("form", ["core", "full"])
def test_ssd_export_verifies(ssd_case, form):
    model, ds, core, full = ssd_case
    rep = verify_export(model, (core if form == "core" else full).path, ds, frames=4)
    assert rep.passed and rep.matched_fraction >= 0.98
    assert rep.map_pytorch > 0.3, "pseudo ground truth should make the reference mAP high"
    assert abs(rep.map_delta) <= 0.002
    if form == "core":
        assert set(rep.max_abs_diff) == {"bbox_regression", "cls_logits"}


@pytest.mark.parametrize("form", ["core", "full"])
def test_frcnn_export_verifies(frcnn_case, form):
    model, ds, core, full = frcnn_case
    rep = verify_export(model, (core if form == "core" else full).path, ds, frames=2)
    assert rep.passed and rep.map_pytorch > 0.3 and abs(rep.map_delta) <= 0.002


def test_swapped_full_outputs_fail_loudly(ssd_case, tmp_path):
    """scores <-> labels (same shape [n]): the graph runs, detections look plausible, mAP is ~0."""
    model, ds, _, full = ssd_case
    bad = tmp_path / "swapped.onnx"
    swap_outputs(full.path, bad, "scores", "labels")
    with pytest.raises(ExportMismatchError, match="mapped by position") as err:
        verify_export(model, bad, ds, frames=2)
    assert err.value.report.map_onnx < 0.05 < err.value.report.map_pytorch


def test_swapped_core_features_fail(frcnn_case, tmp_path):
    """Two FPN levels of identical shape swapped: only the value checks can see it."""
    model, ds, core, _ = frcnn_case
    bad = tmp_path / "core_swapped.onnx"
    swap_outputs(core.path, bad, "features_0", "features_1")
    (tmp_path / core.stage2_path.name).write_bytes(core.stage2_path.read_bytes())
    with pytest.raises(ExportMismatchError, match="features_0"):
        verify_export(model, bad, ds, frames=2)


def test_export_verified_puts_only_a_verified_file_in_place(ssd_case, tmp_path):
    model, ds, _, _ = ssd_case
    own = model.score_thresh
    dest = tmp_path / "out" / "model.onnx"
    res = export_verified(model, dest, ds, exporter="legacy", score_thresh=0.01, frames=2)
    assert res.path == dest and res.export.path == dest and res.report.onnx_path == str(dest)
    assert res.report.passed and abs(res.report.map_delta) <= 0.002 and res.report.map_pytorch > 0.3
    assert read_onnx_meta(dest)["meta"]["post_params"]["score_thresh"] == pytest.approx(0.01)
    assert res.score_thresh == pytest.approx(0.01) and model.score_thresh == own  # the caller's model is unchanged
    assert res.to_dict()["onnx"] == "model.onnx" and res.to_dict()["map_onnx"] == res.report.map_onnx
    assert [p.name for p in dest.parent.iterdir()] == ["model.onnx"]  # no temporary folder left

    # an impossible tolerance fails the real check: the earlier file stays, nothing new appears
    before = dest.read_bytes()
    with pytest.raises(ExportMismatchError, match="mAP") as err:
        export_verified(model, dest, ds, exporter="legacy", frames=2, map_tolerance=-1.0)
    assert not err.value.report.passed
    assert dest.read_bytes() == before and [p.name for p in dest.parent.iterdir()] == ["model.onnx"]


def test_export_verified_moves_the_stage2_graph_with_it(frcnn_case, tmp_path):
    from deploy.runtimes import open_runtime

    model, ds, _, _ = frcnn_case
    res = export_verified(model, tmp_path / "frcnn.onnx", ds.images_dir.parent, exporter="legacy", frames=2)
    assert res.export.stage2_path == tmp_path / "frcnn.stage2.onnx" and res.export.stage2_path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frcnn.onnx", "frcnn.stage2.onnx"]
    with open_runtime(res.path) as rt:  # the moved pair still loads together
        assert len(rt.infer(make_frames(1, seed=3))) == 1


def test_pytorch_runtime_reproduces_torchvision(ssd_case, frcnn_case):
    """Our pre/post-processing equals torchvision's own forward on a frame of the input size (to
    float rounding: OpenCV's resize differs from torch's by ~2e-5 per pixel, ~2e-3 px in a box)."""
    from deploy.runtimes import open_runtime

    frame = make_frames(1, seed=5, hw=(320, 320))[0]
    for model in (ssd_case[0], frcnn_case[0]):
        with torch.no_grad():
            ref = model([torch.from_numpy(frame).permute(2, 0, 1).float() / 255])[0]
        with open_runtime(model) as rt:
            got = rt.infer([frame])[0]
        np.testing.assert_allclose(got.boxes, ref["boxes"].numpy(), atol=1e-2)
        np.testing.assert_allclose(got.scores, ref["scores"].numpy(), atol=1e-4)
        np.testing.assert_array_equal(got.labels, ref["labels"].numpy())


def test_dynamic_batch(ssd_case):
    from deploy.runtimes import open_runtime

    _, _, core, _ = ssd_case
    frames = make_frames(3, seed=7)
    with open_runtime(core.path) as rt:
        together = rt.infer(frames)
        alone = [rt.infer([f])[0] for f in frames]
    for a, b in zip(together, alone, strict=True):
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


def test_export_bad_inputs(tmp_path):
    plain = torch.nn.Conv2d(3, 3, 1)
    with pytest.raises(ValueError, match="avprune_meta"):
        export_onnx(plain, tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="form"):
        export_onnx(plain, tmp_path / "x.onnx", form="half")
    with pytest.raises(FileNotFoundError):
        export_onnx(tmp_path / "missing.pt", tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not an ONNX model"):
        read_onnx_meta(tmp_path / "junk.onnx")


def test_dynamo_failure_falls_back_to_legacy(ssd_case, tmp_path, monkeypatch):
    """``auto`` tries dynamo and falls back, saying why; ``dynamo`` alone fails loudly, writing nothing.

    (A real dynamo export of a core graph takes ~15 s on 2 cores; the CLI and benchmarks use
    ``auto`` and log which exporter ran.)"""
    import deploy.export as ex

    real = ex._export_once

    def fake(*args, exporter, **kw):
        if exporter == "dynamo":
            raise RuntimeError("Could not guard on data-dependent expression u0 > 0")
        return real(*args, exporter=exporter, **kw)

    monkeypatch.setattr(ex, "_export_once", fake)
    model = ssd_case[0]
    res = export_onnx(model, tmp_path / "auto.onnx", exporter="auto")
    assert res.exporter_used == "legacy" and "data-dependent" in res.fallback_reason
    assert read_onnx_meta(res.path)["exporter"] == "legacy"
    with pytest.raises(RuntimeError, match="use exporter='legacy'"):
        export_onnx(model, tmp_path / "dyn.onnx", exporter="dynamo")
    assert not (tmp_path / "dyn.onnx").exists() and not list(tmp_path.glob(".dyn.onnx*"))


def _dets(boxes: list[list[float]], scores: list[float], labels: list[int]):
    from deploy.runtimes.base import Detections

    return Detections(boxes=np.asarray(boxes, np.float32).reshape(-1, 4), scores=np.asarray(scores, np.float32),
                      labels=np.asarray(labels, np.int64))


def test_detections_tied_in_score_are_excused_but_mis_decoded_boxes_are_not():
    from deploy.verify import match_counts, match_fraction

    a, b, c = [0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]
    # ref kept a and b at exactly the same score; float noise made the other runtime keep c instead of b
    ref = _dets([a, b], [0.5, 0.5], [1, 1])
    swapped = _dets([a, c], [0.5, 0.5], [1, 1])
    assert match_fraction(ref, swapped) == 0.5
    assert match_counts(ref, swapped, tie_atol=1e-5) == (1, 1, 2)
    assert match_fraction(ref, swapped, tie_atol=1e-5) == 1.0
    # distinct scores: a different box at the same score is a mis-decoded box, not a tie
    ref = _dets([a, b], [0.9, 0.5], [1, 1])
    wrong_box = _dets([a, c], [0.9, 0.5], [1, 1])
    assert match_counts(ref, wrong_box, tie_atol=1e-5) == (1, 0, 2)
    assert match_fraction(ref, wrong_box, tie_atol=1e-5) == 0.5
    # every missing detection tied: nothing left to fail on
    assert match_fraction(_dets([a, b], [0.3, 0.3], [2, 2]), _dets([], [], []), tie_atol=1e-5) == 1.0
