"""Pre-processing agrees with torchvision's own transform (the PyTorch model's view of a frame)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deploy.core_graph import model_meta, preprocess_frames
from perception.models import build_detector


@pytest.mark.parametrize(("name", "frame_hw"), [
    ("ssdlite320_mobilenet_v3_large", (384, 640)),
    ("ssdlite320_mobilenet_v3_large", (200, 150)),  # upsampling
    ("fasterrcnn_mobilenet_v3_large_320_fpn", (384, 640)),
])
def test_matches_torchvision_transform(name, frame_hw):
    model = build_detector(name, num_classes=8).eval()
    meta = model_meta(model)
    rng = np.random.default_rng(0)
    # smooth content plus noise: bilinear differences show at edges and in flat areas alike
    yy, xx = np.mgrid[: frame_hw[0], : frame_hw[1]]
    base = (127 + 100 * np.sin(xx / 7.0)[..., None] * np.cos(yy / 5.0)[..., None]).repeat(3, axis=2)
    frame = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)

    ours, sizes = preprocess_frames([frame], meta)
    ref_list, _ = model.transform([torch.from_numpy(frame).permute(2, 0, 1).float() / 255.0])
    ref = ref_list.tensors[0]
    rh, rw = sizes[0]
    assert (rh, rw) == tuple(ref_list.image_sizes[0])
    diff = (ours[0, :, :rh, :rw] - ref[:, :rh, :rw]).abs()
    assert diff.max().item() <= 1e-4, diff.max().item()  # float rounding, not a shifted grid or uint8 rounding
    assert ours.shape[-2:] == tuple(meta.image_size)
    assert torch.count_nonzero(ours[0, :, rh:, :]) == 0 and torch.count_nonzero(ours[0, :, :, rw:]) == 0


def test_rejects_bad_frames():
    meta = model_meta(build_detector("ssdlite320_mobilenet_v3_large", num_classes=8))
    with pytest.raises(TypeError, match="frame 0: expected an HxWx3 uint8"):
        preprocess_frames([np.zeros((10, 10, 3), np.float32)], meta)
    with pytest.raises(ValueError, match="at least one frame"):
        preprocess_frames([], meta)
