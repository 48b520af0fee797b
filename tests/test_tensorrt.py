"""TensorRT engines (need tensorrt + a CUDA device; skipped with the reason elsewhere)."""

from __future__ import annotations

import numpy as np
import pytest

from deploy.engine.tensorrt_builder import tensorrt_available

_OK, _WHY = tensorrt_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _OK, reason=_WHY)]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    from deploy.export import export_onnx
    from tests.conftest import SSD, spread_model
    from tests.conftest import export_frames as make_frames

    root = tmp_path_factory.mktemp("trt")
    model = spread_model(SSD)
    core = export_onnx(model, root / "ssd.onnx", form="core", exporter="legacy")
    return root, core, make_frames(2)


@pytest.mark.parametrize(("precision", "atol"), [("fp32", 1e-3), ("fp16", 2e-2)])
def test_engine_matches_onnxruntime(case, precision, atol):
    from deploy.engine.build import build_engine
    from deploy.engine.sidecar import read_sidecar
    from deploy.runtimes import open_runtime

    root, core, frames = case
    cache = root / "timing.cache"
    res = build_engine(core.path, root / f"ssd.{precision}.engine", precision=precision, backend="tensorrt",
                       shapes="1x3x320x320/2x3x320x320/4x3x320x320", timing_cache=cache, workspace_mb=1024)
    assert res.backend == "tensorrt" and cache.is_file()
    doc = read_sidecar(res.engine_path)
    assert doc["device"]["kind"] == "cuda" and doc["device"]["compute_capability"]
    with open_runtime(res.engine_path) as trt_rt, open_runtime(core.path) as ort_rt:
        p = ort_rt.preprocess(frames)
        a, b = trt_rt.run(p), ort_rt.run(p)
        for name in b:
            np.testing.assert_allclose(a[name].float().cpu().numpy(), b[name], atol=atol, rtol=atol)
        assert len(trt_rt.infer(frames)) == 2


def test_sparse_engine_builds(case):
    from deploy.engine.build import build_engine

    root, core, _ = case
    res = build_engine(core.path, root / "ssd.sparse.engine", precision="fp16", sparsity=True, backend="tensorrt",
                       timing_cache=root / "timing.cache")
    assert "SPARSE_WEIGHTS" in res.sidecar["builder_flags"]
