"""INT8 post-training quantization: ONNX Runtime static QDQ, calibrated on real frames.

The output is an explicit Q/DQ graph with per-channel signed-int8 weights. For TensorRT
(``symmetric=True``) activations are symmetric signed int8, the only form TensorRT accepts (11.x
has no other INT8 path; 10.x deprecated calibrators in 10.1). For ONNX Runtime on x86 CPUs the
default is unsigned asymmetric activations (U8S8), which its kernels run faster than S8S8.

Calibration frames come from ``--calib DATA``: a COCO root (``annotations/instances_*.json``,
e.g. ``avprune data synth``'s ``coco`` folder), or any recorded stream ``deploy.streams`` reads
(video, MCAP, rosbag, KITTI folder, image folder).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def calibration_frames(data: str | Path, n: int = 32) -> list[np.ndarray]:
    """Up to ``n`` HxWx3 uint8 RGB frames from a COCO root or a recorded stream, spread evenly."""
    if n < 1:
        raise ValueError(f"need at least one calibration frame, got n={n}")
    path = Path(str(data).split(":")[0]) if not Path(data).exists() else Path(data)
    if not path.exists():
        raise FileNotFoundError(f"calibration data not found: {data}")
    if path.is_dir() and (path / "annotations").is_dir():
        from perception.data import load_split

        splits = sorted(p.stem.removeprefix("instances_") for p in (path / "annotations").glob("instances_*.json"))
        if not splits:
            raise ValueError(f"{path}/annotations holds no instances_*.json")
        split = "train" if "train" in splits else splits[0]  # calibrate on training frames, never on val
        ds = load_split(path, split, train=False)
        idx = np.linspace(0, len(ds) - 1, num=min(n, len(ds))).round().astype(int)
        return [ds.load_image(int(i)) for i in idx]
    from deploy.streams import open_stream

    frames: list[np.ndarray] = []
    with open_stream(str(data)) as reader:
        for fr in reader:
            frames.append(fr.frame)
            if len(frames) >= 4 * n:  # read a stretch of the drive, then subsample it
                break
    if not frames:
        raise ValueError(f"{data}: no frames decoded for calibration")
    idx = np.linspace(0, len(frames) - 1, num=min(n, len(frames))).round().astype(int)
    return [frames[i] for i in idx]


class _FrameReader:
    """onnxruntime.quantization.CalibrationDataReader over preprocessed canvases (batch 1)."""

    def __init__(self, batches: list[np.ndarray], input_name: str) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = iter([{input_name: b} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # pragma: no cover - only some calibrators call it
        pass


def quantize_qdq(
    onnx_path: str | Path, out_path: str | Path, frames: list[np.ndarray], *, input_name: str = "images",
    symmetric: bool = True,
) -> Path:
    """Write a static-QDQ INT8 copy of ``onnx_path`` calibrated on ``frames`` (MinMax).

    ``symmetric=True``: signed symmetric activations (TensorRT); False: uint8 asymmetric (ORT CPU).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from deploy.export import onnx_meta, read_onnx_meta
    from deploy.runtimes.preprocess import preprocess_frames

    if not frames:
        raise ValueError("INT8 calibration needs frames: pass --calib DATA (a COCO root or a recorded stream)")
    meta = onnx_meta(read_onnx_meta(onnx_path))
    batches = [preprocess_frames([f], meta)[0].numpy() for f in frames]
    out_path = Path(out_path)
    quantize_static(
        str(onnx_path), str(out_path), _FrameReader(batches, input_name),
        quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
    )
    log.info("quantized %s to INT8 QDQ (%s activations) on %d frames", Path(onnx_path).name,
             "symmetric int8" if symmetric else "uint8", len(frames))
    return out_path
