"""Engine building: TensorRT 10/11 compat logic, 2:4 checker, ONNX Runtime engines (fp32 and
INT8 QDQ), the sidecar schema, and bad inputs (clear errors, no partial engine left)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from deploy.engine.compat import parse_version, plan_build
from deploy.engine.sidecar import REQUIRED_KEYS, read_sidecar, sidecar_path
from deploy.engine.sparsity_check import holds_2to4, sparsity_report, summarize
from tests.conftest import SSD, spread_model, write_pseudo_coco
from tests.conftest import export_frames as make_frames

# ----------------------------------------------------------------------------- compat (pure)


def test_parse_version():
    assert parse_version("10.8.0.43") == (10, 8, 0)
    assert parse_version("11.0") == (11, 0, 0)
    with pytest.raises(ValueError):
        parse_version("trt")


@pytest.mark.parametrize(
    ("version", "precision", "sparsity", "flags", "rewrite", "typed"),
    [
        ((10, 8, 0), "fp32", False, (), None, False),
        ((10, 8, 0), "fp16", True, ("FP16", "SPARSE_WEIGHTS"), None, False),
        ((10, 8, 0), "int8", False, ("INT8", "FP16"), "qdq", False),
        ((11, 0, 0), "fp32", True, ("SPARSE_WEIGHTS",), None, True),
        ((11, 0, 0), "fp16", False, (), "fp16", True),
        ((11, 2, 0), "int8", True, ("SPARSE_WEIGHTS",), "qdq", True),
    ],
)
def test_plan_build(version, precision, sparsity, flags, rewrite, typed):
    plan = plan_build(version, precision, sparsity)
    assert plan.builder_flags == flags and plan.onnx_rewrite == rewrite and plan.strongly_typed is typed
    if version[0] >= 11:  # the removed precision flags must never be asked for
        assert not {"FP16", "INT8", "BF16", "FP8"} & set(plan.builder_flags)


def test_plan_build_rejects():
    with pytest.raises(ValueError, match="too old"):
        plan_build((8, 6, 1), "fp16", False)
    with pytest.raises(ValueError, match="precision"):
        plan_build((10, 0, 0), "bf16", False)


# ----------------------------------------------------------------------------- 2:4 checker


def nm_mask_(weight: torch.Tensor) -> None:
    """Zero the 2 smallest of every 4 consecutive input channels, per output channel and kernel
    position (TensorRT's conv layout), in place."""
    w = weight.data
    wt = w.reshape(w.shape[0], w.shape[1], -1).permute(0, 2, 1)  # [O, k, I]
    g = wt.reshape(*wt.shape[:2], -1, 4).clone()
    drop = g.abs().argsort(dim=-1)[..., :2]
    g.scatter_(-1, drop, 0.0)
    w.copy_(g.reshape(wt.shape).permute(0, 2, 1).reshape(w.shape))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 256, 3, padding=1)  # in=3: not eligible
        self.big = nn.Conv2d(256, 256, 3, padding=1)  # eligible
        self.big2 = nn.Conv2d(256, 320, 3, padding=1)  # eligible
        self.point = nn.Conv2d(320, 256, 1)  # 1x1: not eligible
        self.dw = nn.Conv2d(256, 256, 3, padding=1, groups=256)  # depthwise: not eligible
        self.fc = nn.Linear(256, 64)

    def forward(self, x):
        x = self.dw(self.point(self.big2(self.big(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


def _export_net(net: nn.Module, path) -> None:
    torch.onnx.export(net.eval(), (torch.randn(1, 3, 8, 8),), str(path), dynamo=False, opset_version=17)


def test_holds_2to4_orientation():
    w = torch.randn(8, 16, 3, 3)
    nm_mask_(w)
    assert holds_2to4(w.numpy())
    assert not holds_2to4(torch.randn(8, 16, 3, 3).numpy())
    # a 2:4 pattern along *output* channels is not TensorRT's layout
    wt = torch.randn(16, 8, 3, 3)
    nm_mask_(wt)
    assert not holds_2to4(wt.transpose(0, 1).contiguous().numpy())


def test_sparsity_report_nm_pruned_vs_dense(tmp_path):
    torch.manual_seed(0)
    net = _Net()
    _export_net(net, tmp_path / "dense.onnx")
    dense = sparsity_report(tmp_path / "dense.onnx")
    assert not any(x.pattern_2to4 for x in dense)
    assert {x.weight for x in dense if x.trt_eligible} and sum(x.trt_eligible for x in dense) == 2
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d | nn.Linear) and getattr(m, "groups", 1) == 1 and m.weight.shape[1] % 4 == 0:
                nm_mask_(m.weight)
    _export_net(net, tmp_path / "nm.onnx")
    pruned = sparsity_report(tmp_path / "nm.onnx")
    eligible = [x for x in pruned if x.trt_eligible]
    assert len(eligible) == 2 and all(x.pattern_2to4 for x in eligible)
    assert all(x.pattern_2to4 for x in pruned if x.groups == 1 and x.in_channels % 4 == 0)
    assert summarize(pruned)["eligible_and_2to4"] == 2
    assert all(abs(x.zero_fraction - 0.5) < 0.02 for x in eligible)


# ----------------------------------------------------------------------------- ORT engines


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    from deploy.export import export_onnx

    root = tmp_path_factory.mktemp("engine")
    model = spread_model(SSD)
    ds = write_pseudo_coco(model, make_frames(4), root / "coco")
    core = export_onnx(model, root / "ssd.onnx", form="core", exporter="legacy")
    return root, model, ds, core


def test_ort_engine_fp32_and_sidecar(case):
    from deploy.engine.build import build_engine
    from deploy.runtimes import open_runtime

    root, _, ds, core = case
    res = build_engine(core.path, root / "ssd.engine", shapes="1x3x320x320/2x3x320x320/4x3x320x320")
    assert res.backend == "onnxruntime" and "ONNX Runtime" in res.reason
    doc = read_sidecar(res.engine_path)
    assert set(REQUIRED_KEYS) <= set(doc)
    assert doc["backend"] == "onnxruntime" and doc["device"]["kind"] == "cpu" and doc["device"]["name"]
    assert doc["precision"] == "fp32" and doc["sparsity"] == "disable"
    assert doc["input_shapes"]["images"] == {"min": [1, 3, 320, 320], "opt": [2, 3, 320, 320], "max": [4, 3, 320, 320]}
    from perception.io import sha256_file

    assert doc["source_onnx"]["sha256"] == sha256_file(core.path) and doc["engine_sha256"] == sha256_file(res.engine_path)
    assert doc["export"]["form"] == "core" and doc["model_meta"]["family"] == "ssd"
    layer = doc["layers"][0]
    assert {"name", "pattern_2to4", "trt_eligible", "kernel", "in_channels", "out_channels"} <= set(layer)
    json.dumps(doc)  # plain JSON
    frames = [ds.load_image(i) for i in range(2)]
    with open_runtime(res.engine_path) as eng, open_runtime(core.path) as src:
        assert eng.info.backend == "onnxruntime" and eng.info.precision == "fp32"
        for a, b in zip(eng.infer(frames), src.infer(frames), strict=True):
            np.testing.assert_allclose(np.sort(a.scores), np.sort(b.scores), atol=1e-4)


def test_ort_engine_int8_runs_and_reports_map_drop(case):
    from deploy.engine.build import build_engine
    from deploy.runtimes import open_runtime
    from perception.evaluate import evaluate

    root, _, ds, core = case
    res = build_engine(core.path, root / "ssd.int8.onnx", precision="int8", calib=ds.images_dir.parent, calib_frames=4)
    doc = read_sidecar(res.engine_path)
    assert doc["precision"] == "int8" and doc["qdq_onnx"]
    import onnx

    ops = {n.op_type for n in onnx.load(str(root / doc["qdq_onnx"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # the same QDQ graph TensorRT 11 takes
    with open_runtime(core.path) as fp32, open_runtime(res.engine_path) as int8:
        m32 = evaluate(fp32.infer, ds).map
        m8 = evaluate(int8.infer, ds).map
    assert math.isfinite(m8) and 0.0 <= m8 <= 1.0
    print(f"\nINT8 QDQ mAP {m8:.4f} vs fp32 {m32:.4f} (drop {m32 - m8:+.4f})")


def _no_leftovers(folder, stem: str) -> None:
    left = [p.name for p in folder.iterdir() if p.name.startswith(stem) or p.name.startswith(f".{stem}")]
    assert not left, f"partial files left behind: {left}"


def test_bad_inputs_leave_nothing(case, tmp_path):
    from deploy.engine.build import build_engine

    _, _, _, core = case
    out = tmp_path / "bad.engine"
    with pytest.raises(FileNotFoundError, match="not found"):
        build_engine(tmp_path / "missing.onnx", out)
    (tmp_path / "notes.onnx").write_text("{ this is json }")
    with pytest.raises(ValueError, match="not an ONNX file"):
        build_engine(tmp_path / "notes.onnx", out)
    (tmp_path / "garbage.onnx").write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(ValueError, match="not an ONNX model|ONNX"):
        build_engine(tmp_path / "garbage.onnx", out)
    with pytest.raises(ValueError, match="not available on the ONNX Runtime backend"):
        build_engine(core.path, out, precision="fp16")
    with pytest.raises(ValueError, match="does not fit"):
        build_engine(core.path, out, shapes="1x3x300x300/1x3x300x300/1x3x300x300")
    with pytest.raises(ValueError, match="MIN <= OPT <= MAX"):
        build_engine(core.path, out, shapes="4x3x320x320/1x3x320x320/8x3x320x320")
    with pytest.raises(ValueError, match="--calib"):
        build_engine(core.path, out, precision="int8")
    with pytest.raises(ValueError, match="tensorrt"):
        build_engine(core.path, out, backend="tensorrt")  # no TensorRT/CUDA on this machine
    _no_leftovers(tmp_path, "bad.engine")


def test_engine_for_another_device_is_refused(case, tmp_path):
    from deploy.engine.build import build_engine
    from deploy.runtimes import open_runtime

    _, _, _, core = case
    res = build_engine(core.path, tmp_path / "e.onnx")
    doc = json.loads(sidecar_path(res.engine_path).read_text())
    doc["device"] = {"kind": "cuda", "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    sidecar_path(res.engine_path).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="built for"):
        open_runtime(res.engine_path)
    doc["backend"] = "tensorrt"
    sidecar_path(res.engine_path).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="built for"):
        open_runtime(res.engine_path)


def test_cli_build_engine_states_backend(case, tmp_path, capsys):
    from avprune.cli import main

    _, _, _, core = case
    rc = main(["build-engine", str(core.path), "--out", str(tmp_path / "cli.engine"), "--sparsity", "enable"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "backend: onnxruntime" in out and "using ONNX Runtime (CPU)" in out
    assert "2:4 pattern:" in out and sidecar_path(tmp_path / "cli.engine").is_file()
    rc = main(["build-engine", str(tmp_path / "nope.onnx"), "--out", str(tmp_path / "x.engine")])
    assert rc == 2 and "not found" in capsys.readouterr().err


def test_cli_build_engine_score_threshold(case, tmp_path, capsys):
    """--score-thresh reaches the artifact's post-processing (and is refused for an exported ONNX)."""
    from avprune.cli import main
    from deploy.export import onnx_meta, read_onnx_meta
    from perception.models import save_checkpoint

    root, model, ds, core = case
    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, model)
    rc = main(["build-engine", str(ckpt), "--out", str(tmp_path / "t.onnx"), "--val", str(ds.images_dir.parent),
               "--score-thresh", "0.2", "--verify-images", "2"])
    assert rc == 0, capsys.readouterr().err
    meta = onnx_meta(read_onnx_meta(tmp_path / "t.onnx"))
    assert meta.post_params["score_thresh"] == pytest.approx(0.2)
    rc = main(["build-engine", str(core.path), "--out", str(tmp_path / "u.onnx"), "--score-thresh", "0.2"])
    assert rc == 2 and "--score-thresh applies when MODEL is a .pt" in capsys.readouterr().err
    assert not (tmp_path / "u.onnx").exists()
