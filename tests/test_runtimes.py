"""open_runtime dispatch, the shared Runtime interface, and measure_latency."""

from __future__ import annotations

import numpy as np
import pytest

from deploy.runtimes import Runtime, open_runtime
from deploy.timing import LatencySummary, measure_latency, summarize
from perception.detections import Detections
from tests.conftest import SSD, spread_model
from tests.conftest import export_frames as make_frames


@pytest.fixture(scope="module")
def ssd(tmp_path_factory):
    from deploy.export import export_onnx
    from perception.models import save_checkpoint

    root = tmp_path_factory.mktemp("rt")
    model = spread_model(SSD)
    save_checkpoint(root / "ssd.pt", model)
    onnx = export_onnx(model, root / "ssd.onnx", form="core", exporter="legacy")
    return root, model, onnx


def test_dispatch_and_interface(ssd):
    root, model, onnx = ssd
    frames = make_frames(2, seed=3, hw=(384, 640))  # wider than the 320x320 input
    results = {}
    for src in (model, root / "ssd.pt", onnx.path):
        with open_runtime(src, threads=1) as rt:
            assert isinstance(rt, Runtime)
            prepared = rt.preprocess(frames)
            assert tuple(prepared.batch.shape) == (2, 3, 320, 320)
            assert prepared.original_sizes == ((384, 640), (384, 640))
            dets = rt.postprocess(rt.run(prepared), prepared)
            assert len(dets) == 2 and all(isinstance(d, Detections) for d in dets)
            for d in dets:  # boxes come back in the frame's own pixels
                assert d.boxes[:, 2].max() <= 640 and d.boxes[:, 3].max() <= 384 and d.boxes.min() >= 0
                assert d.labels.dtype == np.int64 and (d.labels >= 1).all()
            results[rt.info.backend + str(type(src).__name__)] = dets
            assert rt.info.backend in ("pytorch", "onnxruntime")
    a, b = results["pytorchSSD"], results["onnxruntimePosixPath"]
    np.testing.assert_allclose(np.sort(a[0].scores), np.sort(b[0].scores), atol=1e-4)
    # SSD stretches to the input size: a box spanning the canvas maps to the whole frame
    assert a[0].boxes[:, 2].max() > 320


def test_open_runtime_errors(ssd, tmp_path):
    root, model, onnx = ssd
    with pytest.raises(FileNotFoundError):
        open_runtime(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="backend must be"):
        open_runtime(onnx.path, backend="tvm")
    with pytest.raises(ValueError, match="export it first"):
        open_runtime(model, backend="onnxruntime")
    (tmp_path / "x.bin").write_bytes(b"123")
    with pytest.raises(ValueError, match="not a checkpoint"):
        open_runtime(tmp_path / "x.bin")
    with pytest.raises(ValueError, match="CUDA"):
        open_runtime(onnx.path, device="cuda")  # no CUDA EP in the CPU build
    with open_runtime(onnx.path) as rt, pytest.raises(TypeError, match="uint8"):
        rt.infer([np.zeros((10, 10, 3), np.float32)])


def test_measure_latency(ssd):
    _, _, onnx = ssd
    frames = make_frames(2, seed=4)
    with open_runtime(onnx.path, threads=1) as rt:
        s = measure_latency(rt, frames, warmup=1, iters=4)
        assert isinstance(s, LatencySummary) and s.n == 4
        assert 0 < s.p50_ms <= s.p90_ms <= s.p99_ms
        core = measure_latency(rt, [frames], warmup=0, iters=2, end_to_end=False)  # one batch of 2
        assert core.n == 2 and core.mean_ms > 0
    with pytest.raises(ValueError):
        measure_latency(rt, frames, iters=0)


def test_summarize():
    s = summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s.p50_ms == 3.0 and s.n == 5 and s.p99_ms > s.p90_ms > s.p50_ms
    with pytest.raises(ValueError):
        summarize([])


def test_ort_session_factory_settings_and_errors(ssd) -> None:
    """Every ORT session comes from one factory: threads as given, spinning off, level named."""
    import onnxruntime as ort
    import torch

    from deploy.runtimes.ort import OrtRuntime
    from deploy.runtimes.ort_session import layer_measure_fn, make_session, module_session

    _, _, onnx = ssd
    with OrtRuntime(onnx.path, threads=1) as rt:
        opts = rt.session.get_session_options()
        assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (1, 1)
        for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
            assert opts.get_session_config_entry(key) == "0"
        assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess, feed = module_session(torch.nn.Conv2d(8, 16, 3), (1, 8, 12, 12), threads=1)
    assert sess.run(None, feed)[0].shape == (1, 16, 10, 10)
    assert layer_measure_fn(threads=1, repeats=2, warmup=1)(torch.nn.Conv2d(8, 8, 1), (1, 8, 4, 4)) > 0
    with pytest.raises(ValueError, match="in-memory ONNX .*cannot load"):
        make_session(b"not an onnx graph", threads=1)
    with pytest.raises(ValueError, match="threads must be an int >= 1"):
        make_session(onnx.path, threads=0)
    with pytest.raises(ValueError, match="optimization 'max'"):
        make_session(onnx.path, threads=1, optimization="max")
