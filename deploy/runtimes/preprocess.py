"""Frames -> the model's input canvas, as torchvision's ``GeneralizedRCNNTransform`` would see them.

SSD resizes to exactly the input size; the other families keep the aspect ratio with
torchvision's min_size/max_size rule (shrunk further if the result would overflow the canvas).
Each frame is pasted top-left on a fixed canvas of the model input size, so the graph always sees
``[N, 3, H, W]`` (static shapes).

Two resize modes:

* ``"float32"`` (default): convert, then resize. OpenCV's bilinear samples like torchvision's
  (half-pixel centres, no antialias), so the pixels agree with the PyTorch model's own transform
  to float rounding (~2e-5), at a quarter of the cost of torch's interpolate here.
* ``"uint8"``: resize the 8-bit frame, then convert. OpenCV's fixed-point uint8 path is cheaper
  and never touches a full-size float copy of the frame, but rounds every resized pixel to an
  integer (up to 0.5/255 before normalisation, ~0.01 after): accept it where the deployed model
  was validated that way (compare mAP with ``avprune eval``/``verify`` before switching).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

    from deploy.core_graph import ModelMeta

ResizeDtype = Literal["float32", "uint8"]
RESIZE_DTYPES: tuple[str, ...] = ("float32", "uint8")


def resized_size(frame_hw: tuple[int, int], meta: ModelMeta) -> tuple[int, int]:
    """(height, width) a frame is resized to before it is pasted on the canvas."""
    h, w = frame_hw
    H, W = meta.image_size
    if meta.family == "ssd":
        return H, W
    # torchvision's eager arithmetic (python floats) for the output size
    scale = min(meta.min_size / min(h, w), meta.max_size / max(h, w))
    if int(h * scale) > H or int(w * scale) > W:
        scale = min(H / h, W / w)
    return int(h * scale), int(w * scale)


def preprocess_frames(
    frames: Sequence[np.ndarray], meta: ModelMeta, *, resize: ResizeDtype = "float32"
) -> tuple[Tensor, tuple[tuple[int, int], ...]]:
    """HxWx3 uint8 RGB frames -> (normalised canvas batch [N,3,H,W] float32, resized (h, w) per frame)."""
    import torch

    if resize not in RESIZE_DTYPES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_DTYPES)}; got {resize!r}")
    _check_frames(frames, "preprocess_frames")
    H, W = meta.image_size
    sizes = tuple(resized_size(f.shape[:2], meta) for f in frames)
    if resize == "float32" and all(s == (H, W) for s in sizes):  # SSD: every frame fills the canvas
        return torch.from_numpy(_blob(frames, meta)), sizes
    pasted = tuple((min(oh, H), min(ow, W)) for oh, ow in sizes)
    return torch.from_numpy(_pasted(frames, sizes, meta, resize)), pasted


def _check_frames(frames: Sequence[np.ndarray], caller: str) -> None:
    """At least one frame, each an HxWx3 uint8 RGB array (TypeError naming the first that is not)."""
    if len(frames) == 0:
        raise ValueError(f"{caller} needs at least one frame")
    for i, f in enumerate(frames):
        if not (isinstance(f, np.ndarray) and f.ndim == 3 and f.shape[2] == 3 and f.dtype == np.uint8):
            got = f"{type(f).__name__} {getattr(f, 'shape', '')} {getattr(f, 'dtype', '')}"
            raise TypeError(f"frame {i}: expected an HxWx3 uint8 RGB array, got {got}")


def resize_uint8(frames: Sequence[np.ndarray], meta: ModelMeta) -> np.ndarray:
    """HxWx3 uint8 RGB frames -> [N, H, W, 3] uint8 at the canvas size, for a graph that normalises its
    own input (``host_ops="graph"``, SSD only: every frame fills the canvas). One OpenCV resize per
    frame is all the host does; the pixels equal the ``"uint8"`` mode's before its normalisation."""
    import cv2

    if meta.family != "ssd":
        raise ValueError(f"resize_uint8: {meta.name} keeps the aspect ratio; only SSD models fill the canvas")
    _check_frames(frames, "resize_uint8")
    H, W = meta.image_size
    # OpenCV's own output buffer: resizing into a slice of a preallocated batch took 250 us
    # against 165 per 640x384 frame here (measured on one thread)
    resized = [f if f.shape[:2] == (H, W) else cv2.resize(f, (W, H), interpolation=cv2.INTER_LINEAR) for f in frames]
    if len(resized) == 1:
        return np.ascontiguousarray(resized[0])[None]
    return np.stack(resized)


def _blob(frames: Sequence[np.ndarray], meta: ModelMeta) -> np.ndarray:
    """Frames that fill the canvas, float32 resize: resize, normalise and lay out as NCHW in one OpenCV call.

    ``cv2.dnn.blobFromImagesWithParams`` resizes at the input's depth, then computes
    ``(x - 255 mean) / (255 std)`` per channel while it transposes to planes: one pass over the
    canvas instead of numpy's three strided ones (0.53 vs 0.71 ms per 640x384 frame here).
    """
    import cv2

    params = _blob_params(tuple(meta.mean), tuple(meta.std), tuple(meta.image_size))
    return cv2.dnn.blobFromImagesWithParams([f.astype(np.float32) for f in frames], params)


def _normalise_planes(img: np.ndarray, meta: ModelMeta, out: np.ndarray) -> None:
    """An HxWx3 uint8 image -> ``out`` [3, H, W] float32 planes, ``(x / 255 - mean) / std``.

    ``cv2.split`` then one ``cv2.addWeighted`` per plane writing straight into ``out``: 0.11 ms for a
    320x320 canvas here, against 0.18 ms for numpy's strided multiply-add per plane and 0.24 ms for
    ``blobFromImage`` without a resize (thread CPU time, same machine)."""
    import cv2

    scale, shift = _plane_affine(tuple(meta.mean), tuple(meta.std))
    for c, plane in enumerate(cv2.split(img)):
        cv2.addWeighted(plane, scale[c], plane, 0.0, shift[c], dst=out[c], dtype=cv2.CV_32F)


@functools.lru_cache(maxsize=8)
def _plane_affine(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per channel ``(scale, shift)`` with ``(x / 255 - mean) / std == x * scale + shift``."""
    return (tuple(1.0 / (255.0 * s) for s in std), tuple(-m / s for m, s in zip(mean, std, strict=True)))


@functools.lru_cache(maxsize=8)
def _blob_params(mean: tuple[float, ...], std: tuple[float, ...], size: tuple[int, int]) -> Any:
    import cv2

    scale = tuple(float(1.0 / (255.0 * s)) for s in std) + (1.0,)
    shift = tuple(float(255.0 * m) for m in mean) + (0.0,)
    # blobFromImage resizes with INTER_LINEAR (half-pixel centres), as cv2.resize does
    return cv2.dnn.Image2BlobParams(scale, (size[1], size[0]), shift, False, cv2.CV_32F)


def _pasted(
    frames: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]], meta: ModelMeta, resize: ResizeDtype
) -> np.ndarray:
    """Aspect-kept resize (or the canvas size), each frame pasted top-left on a zero canvas."""
    import cv2

    H, W = meta.image_size
    # (x / 255 - mean) / std as one multiply-add per pixel
    scale, shift = _plane_affine(tuple(meta.mean), tuple(meta.std))
    px_scale, px_shift = np.asarray(scale, dtype=np.float32), np.asarray(shift, dtype=np.float32)
    batch = np.zeros((len(frames), 3, H, W), dtype=np.float32)
    for i, (f, (oh, ow)) in enumerate(zip(frames, sizes, strict=True)):
        img = f if resize == "uint8" else f.astype(np.float32)
        out = cv2.resize(img, (ow, oh), interpolation=cv2.INTER_LINEAR) if (oh, ow) != f.shape[:2] else img
        rh, rw = min(oh, H), min(ow, W)
        if resize == "uint8":
            _normalise_planes(np.ascontiguousarray(out[:rh, :rw]), meta, batch[i, :, :rh, :rw])
            continue
        planes = out[:rh, :rw].transpose(2, 0, 1)
        for c in range(3):  # plane by plane: numpy's broadcast over a (3,1,1) axis is ~6x slower here
            # (a uint8 plane is converted inside the multiply: no float copy of the frame)
            np.multiply(planes[c], px_scale[c], out=batch[i, c, :rh, :rw], dtype=np.float32)
            batch[i, c, :rh, :rw] += px_shift[c]
    return batch
