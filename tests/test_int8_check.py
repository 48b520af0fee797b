"""INT8 engines are verified like fp32 exports (issue 15, case 11): mAP parity with the fp32
source within a stated bound, and a paired speed comparison that warns when INT8 is slower.

The data set's ground truth is the fp32 model's own top detections (``write_pseudo_coco``), so
fp32 scores ~1 and any accuracy INT8 loses shows up as a drop.
"""

from __future__ import annotations

import json
import math

import pytest

from avprune.cli import main
from deploy.engine.sidecar import read_sidecar, sidecar_path
from tests.conftest import SSD, spread_model, write_mp4, write_pseudo_coco
from tests.conftest import export_frames as make_frames

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    from deploy.engine.build import build_engine
    from deploy.export import export_onnx
    from deploy.runtimes import open_runtime

    root = tmp_path_factory.mktemp("int8")
    model = spread_model(SSD)
    core = export_onnx(model, root / "ssd.onnx", form="core", exporter="legacy")
    # the GT is the fp32 ONNX model's own best detections, so fp32 scores 1 whatever the CPU's rounding
    with open_runtime(core.path) as fp32_rt:
        ds = write_pseudo_coco(model, make_frames(4), root / "coco", runtime=fp32_rt)
    engine = build_engine(core.path, root / "ssd.int8.onnx", precision="int8", calib=root / "coco", calib_frames=4)
    return root, ds, core.path, engine.engine_path


def test_int8_engine_map_parity_and_speed_are_measured(case):
    from deploy.engine.int8_check import verify_int8

    _, ds, fp32, int8 = case
    check = verify_int8(fp32, int8, ds, max_map_drop=1.0, blocks=3, timing_frames=2)
    assert check.passed and check.images == len(ds)
    assert check.map_fp32 > 0.5  # the ground truth is its own top detections
    assert math.isclose(check.map_drop, check.map_fp32 - check.map_int8)
    assert check.fp32_p50_ms > 0 and check.int8_p50_ms > 0
    assert check.speedup_low <= check.speedup <= check.speedup_high
    assert check.slower == (check.speedup_high < 1.0)
    json.dumps(check.to_dict())


def test_int8_engine_of_another_model_fails_parity(case, tmp_path):
    """The bound catches an engine that does not compute what the fp32 model computes."""
    from deploy.engine.build import build_engine
    from deploy.engine.int8_check import Int8ParityError, verify_int8
    from deploy.export import export_onnx

    root, ds, fp32, _ = case
    other = export_onnx(spread_model(SSD, seed=1), tmp_path / "other.onnx", form="core", exporter="legacy")
    wrong = build_engine(other.path, tmp_path / "other.int8.onnx", precision="int8", calib=root / "coco",
                         calib_frames=2)
    with pytest.raises(Int8ParityError, match=r"drop 0\.\d+ exceeds the bound 0\.01"):
        verify_int8(fp32, wrong.engine_path, ds, blocks=2, timing_frames=1)


def test_build_engine_int8_verifies_and_removes_an_engine_over_the_bound(case, tmp_path, capsys):
    from deploy.engine.int8_check import verify_int8

    root, ds, fp32, int8 = case
    drop = verify_int8(fp32, int8, ds, max_map_drop=1.0, blocks=2, timing_frames=1).map_drop
    assert drop > 0, "this fixture's INT8 engine is expected to lose some mAP against its own detections"
    out = tmp_path / "e" / "ssd.int8.onnx"
    base = ["build-engine", str(fp32), "--out", str(out), "--precision", "int8", "--calib", str(root / "coco"),
            "--calib-frames", "4", "--val", str(root / "coco")]
    assert main([*base, "--int8-max-map-drop", "1.0"]) == 0
    stdout = capsys.readouterr().out
    doc = read_sidecar(out)["int8_verification"]
    assert math.isclose(doc["map_drop"], drop, abs_tol=1e-9) and doc["max_map_drop"] == 1.0  # same engine, same mAP
    assert f"int8 verified: mAP {doc['map_int8']:.4f} vs fp32 {doc['map_fp32']:.4f}" in stdout
    # the slower-than-fp32 warning is printed exactly when the paired timing says so
    assert ("warning: INT8 graph p50" in stdout) == doc["slower"]
    assert "INT8 graph p50" in stdout

    rc = main([*base, "--int8-max-map-drop", f"{drop / 2:.6f}"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.count("\n") == 0 and f"exceeds the bound {drop / 2:g}" in err, err
    assert "engine not written" in err and not out.exists() and not sidecar_path(out).exists()
    assert not (out.parent / f"{out.name}.qdq.onnx").exists()

    rc = main([*base, "--int8-max-map-drop", "-1"])
    assert rc == 2 and "--int8-max-map-drop must be >= 0" in capsys.readouterr().err
    video = write_mp4(tmp_path / "calib.mp4", make_frames(3))  # calibration frames without labels
    rc = main(["build-engine", str(fp32), "--out", str(tmp_path / "x.onnx"), "--precision", "int8",
               "--calib", str(video)])
    err = capsys.readouterr().err
    assert rc == 2 and "verified by mAP against fp32 on a COCO set: pass --val COCO_ROOT" in err, err
    assert not (tmp_path / "x.onnx").exists()
