"""The one small runtime interface (after Polygraphy's runners: a context manager with ``infer``).

A runtime owns a deployed model (PyTorch module, ONNX Runtime session, TensorRT engine) and
splits inference into three timed stages so validation can report a per-stage breakdown:

    with open_runtime(path) as rt:
        prepared = rt.preprocess(frames)   # list of HxWx3 uint8 RGB -> input batch
        raw = rt.run(prepared)             # device work, synchronised before returning
        dets = rt.postprocess(raw, prepared)  # -> list[Detections] in frame pixel coords
        # or simply: dets = rt.infer(frames)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from perception.detections import Detections


@dataclass(frozen=True)
class RuntimeInfo:
    """What a report needs to say about where the numbers came from."""

    backend: str  # "pytorch", "onnxruntime", "tensorrt"
    device: str  # e.g. "cpu: AMD EPYC 7B13 (2 threads)" or "cuda: NVIDIA H100 (sm_90)"
    precision: str  # "fp32", "fp16", "int8"
    version: str  # backend library version
    model_path: str | None = None
    model_sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Prepared:
    """A preprocessed batch plus what postprocessing needs to map boxes back to each frame."""

    batch: Any  # np.ndarray or torch.Tensor, NCHW
    original_sizes: tuple[tuple[int, int], ...]  # (height, width) of each input frame


@runtime_checkable
class Runtime(Protocol):
    info: RuntimeInfo

    def __enter__(self) -> Runtime: ...

    def __exit__(self, *exc: object) -> None: ...

    def preprocess(self, frames: Sequence[np.ndarray]) -> Prepared: ...

    def run(self, prepared: Prepared) -> Any: ...

    def postprocess(self, raw: Any, prepared: Prepared) -> list[Detections]: ...

    def infer(self, frames: Sequence[np.ndarray]) -> list[Detections]: ...
