"""Pre-processing agrees with torchvision's own transform (the PyTorch model's view of a frame)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deploy.core_graph import model_meta
from deploy.runtimes.preprocess import preprocess_frames
from perception.models import build_detector


def _frame(frame_hw: tuple[int, int]) -> np.ndarray:
    rng = np.random.default_rng(0)
    # smooth content plus noise: bilinear differences show at edges and in flat areas alike
    yy, xx = np.mgrid[: frame_hw[0], : frame_hw[1]]
    base = (127 + 100 * np.sin(xx / 7.0)[..., None] * np.cos(yy / 5.0)[..., None]).repeat(3, axis=2)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("name", "frame_hw"), [
    ("ssdlite320_mobilenet_v3_large", (384, 640)),
    ("ssdlite320_mobilenet_v3_large", (200, 150)),  # upsampling
    ("fasterrcnn_mobilenet_v3_large_320_fpn", (384, 640)),
])
def test_matches_torchvision_transform(name, frame_hw):
    model = build_detector(name, num_classes=8).eval()
    meta = model_meta(model)
    frame = _frame(frame_hw)

    ours, sizes = preprocess_frames([frame], meta)
    ref_list, _ = model.transform([torch.from_numpy(frame).permute(2, 0, 1).float() / 255.0])
    ref = ref_list.tensors[0]
    rh, rw = sizes[0]
    assert (rh, rw) == tuple(ref_list.image_sizes[0])
    diff = (ours[0, :, :rh, :rw] - ref[:, :rh, :rw]).abs()
    assert diff.max().item() <= 1e-4, diff.max().item()  # float rounding, not a shifted grid or uint8 rounding
    assert ours.shape[-2:] == tuple(meta.image_size)
    assert torch.count_nonzero(ours[0, :, rh:, :]) == 0 and torch.count_nonzero(ours[0, :, :, rw:]) == 0


@pytest.mark.parametrize(("name", "frame_hw"), [
    ("ssdlite320_mobilenet_v3_large", (384, 640)),
    ("fasterrcnn_mobilenet_v3_large_320_fpn", (384, 640)),
])
def test_uint8_resize_rounds_pixels_only(name, frame_hw):
    """The uint8 option: same sizes and canvas; each resized pixel within one 8-bit step of the
    float32 path (in 0..255 units), and truly rounded (it is not the float path in disguise)."""
    meta = model_meta(build_detector(name, num_classes=8))
    frame = _frame(frame_hw)
    exact, sizes = preprocess_frames([frame], meta)
    rounded, sizes8 = preprocess_frames([frame], meta, resize="uint8")
    assert sizes8 == sizes and rounded.shape == exact.shape and rounded.dtype == torch.float32
    rh, rw = sizes[0]
    std = torch.tensor(meta.std).view(3, 1, 1)
    step = ((rounded[0] - exact[0]) * std * 255.0)[:, :rh, :rw].abs()  # back to 0..255 pixel units
    assert step.max().item() <= 1.0 + 1e-3  # fixed-point weights, then rounding: within one 8-bit step
    assert step.mean().item() > 0.05  # rounding really happened
    assert torch.count_nonzero(rounded[0, :, rh:, :]) == 0 and torch.count_nonzero(rounded[0, :, :, rw:]) == 0
    # a runtime takes the option as a flag (default float32) and feeds it to its pre-processing
    from deploy.runtimes.pytorch import PyTorchRuntime

    rt = PyTorchRuntime(build_detector(name, num_classes=8), threads=1)
    assert rt.resize == "float32"
    torch.testing.assert_close(rt.preprocess([frame]).batch, exact, rtol=0, atol=0)
    rt.resize = "uint8"
    torch.testing.assert_close(rt.preprocess([frame]).batch, rounded, rtol=0, atol=0)
    with pytest.raises(ValueError, match="resize must be one of"):
        rt.resize = "float16"


def test_rejects_bad_frames():
    meta = model_meta(build_detector("ssdlite320_mobilenet_v3_large", num_classes=8))
    with pytest.raises(TypeError, match="frame 0: expected an HxWx3 uint8"):
        preprocess_frames([np.zeros((10, 10, 3), np.float32)], meta)
    with pytest.raises(ValueError, match="at least one frame"):
        preprocess_frames([], meta)
    with pytest.raises(ValueError, match="resize must be one of"):
        preprocess_frames([np.zeros((10, 10, 3), np.uint8)], meta, resize="int8")
