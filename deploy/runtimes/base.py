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

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from perception.detections import Detections

#: where SSD's normalisation, decoding and NMS run: the shared numpy host path, or inside the ONNX
#: graph (:mod:`deploy.runtimes.fused_ends`, ONNX Runtime only)
HOST_OPS = ("host", "graph")


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
    # (height, width) each frame was resized to on the model's input canvas (top-left aligned)
    input_sizes: tuple[tuple[int, int], ...] = ()


@runtime_checkable
class Runtime(Protocol):
    info: RuntimeInfo

    def __enter__(self) -> Runtime: ...

    def __exit__(self, *exc: object) -> None: ...

    def preprocess(self, frames: Sequence[np.ndarray]) -> Prepared: ...

    def run(self, prepared: Prepared) -> Any: ...

    def postprocess(self, raw: Any, prepared: Prepared) -> list[Detections]: ...

    def infer(self, frames: Sequence[np.ndarray]) -> list[Detections]: ...


# ----------------------------------------------------------------------------- shared implementation


class DetectorRuntime:
    """Pre/post-processing every backend shares (from :mod:`deploy.core_graph`); backends add ``run``.

    ``run`` returns the raw graph outputs: for the core form a dict name -> array/tensor, for the
    full form a list of per-image dicts (boxes in canvas coordinates, scores, labels). Faster
    R-CNN's box head (stage 2) runs inside ``postprocess`` through ``_stage2``.
    """

    info: RuntimeInfo
    #: torch and OpenCV threads for pre/post-processing. These are small ops: more threads only add
    #: fork/join overhead and fight the backend's own thread pool (measured on 2 cores: post
    #: 4 ms with 1 thread, 10-300 ms with 2 threads next to a busy ONNX Runtime pool).
    host_threads: int = 1

    def __init__(self, meta: Any, form: str, post: Any) -> None:
        self.meta = meta  # deploy.core_graph.ModelMeta
        self.form = form
        self.post = post  # deploy.core_graph.Postprocessor
        self._resize = "float32"

    @property
    def resize(self) -> str:
        """How frames are resized: ``"float32"`` (default, matches torchvision) or ``"uint8"`` (cheaper,
        rounds each resized pixel; see :mod:`deploy.runtimes.preprocess`)."""
        return self._resize

    @resize.setter
    def resize(self, mode: str) -> None:
        from deploy.runtimes.preprocess import RESIZE_DTYPES

        if mode not in RESIZE_DTYPES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_DTYPES)}; got {mode!r}")
        self._switch_resize(mode)
        self._resize = mode

    def _switch_resize(self, mode: str) -> None:
        """A backend that cannot take ``mode`` raises ValueError here; one whose graph depends on it
        (``host_ops="graph"``) switches graphs. The default takes both as they are."""

    @contextlib.contextmanager
    def _host_threads(self) -> Iterator[None]:
        """torch's and OpenCV's thread counts set to ``host_threads`` for the block (both are
        process-wide settings; each switch costs < 1 us)."""
        import cv2
        import torch

        before, before_cv = torch.get_num_threads(), cv2.getNumThreads()
        if before != self.host_threads:
            torch.set_num_threads(self.host_threads)
        if before_cv != self.host_threads:
            cv2.setNumThreads(self.host_threads)
        try:
            yield
        finally:
            if before != self.host_threads:
                torch.set_num_threads(before)
            if before_cv != self.host_threads:
                cv2.setNumThreads(before_cv)

    def __enter__(self) -> DetectorRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release backend resources (sessions, engines, device memory)."""

    def preprocess(self, frames: Sequence[np.ndarray]) -> Prepared:
        from deploy.runtimes.preprocess import preprocess_frames

        with self._host_threads():
            batch, sizes = preprocess_frames(frames, self.meta, resize=self._resize)
        return Prepared(
            batch=batch, original_sizes=tuple((f.shape[0], f.shape[1]) for f in frames), input_sizes=sizes
        )

    def run(self, prepared: Prepared) -> Any:  # pragma: no cover - every backend overrides it
        raise NotImplementedError

    def _stage2(self, box_features: Any) -> tuple[Any, Any]:  # pragma: no cover - two-stage backends override
        raise NotImplementedError(f"{type(self).__name__} has no stage-2 runner")

    def postprocess(self, raw: Any, prepared: Prepared) -> list[Detections]:
        if self.form == "core" and self.meta.family == "ssd":  # numpy throughout: no torch dispatch per op
            return self._ssd_postprocess(raw, prepared)
        import torch

        from deploy.core_graph import to_frame_coords

        def tensor(v: Any) -> Any:
            return torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v.detach().cpu()

        with self._host_threads(), torch.no_grad():
            if self.form == "full":
                dets = [{k: tensor(v) for k, v in d.items()} for d in raw]
            else:
                dets = self.post.detect({k: tensor(v) for k, v in raw.items()}, prepared.input_sizes, self._stage2)
            return [
                to_frame_coords(d, rs, os_)
                for d, rs, os_ in zip(dets, prepared.input_sizes, prepared.original_sizes, strict=True)
            ]

    def _ssd_postprocess(self, raw: Any, prepared: Prepared) -> list[Detections]:
        """Decode + NMS of the survivors only, one NMS for the batch (:mod:`deploy.runtimes.postprocess`)."""
        from deploy.runtimes.postprocess import SSDPost

        def array(v: Any) -> np.ndarray:
            return v if isinstance(v, np.ndarray) else v.detach().cpu().numpy()

        # knobs read per call (a user may change the skeleton's score_thresh after opening); the
        # decoder with its anchor arrays is rebuilt only when they change
        knobs = SSDPost.knobs(self.post.model)
        cached = getattr(self, "_ssd_cache", None)
        if cached is None or cached[0] != knobs:
            cached = self._ssd_cache = (knobs, SSDPost.from_model(self.post.model, self.post.anchors(1)[0],
                                                                  self.meta.image_size))
        with self._host_threads():
            dets = cached[1].detect_arrays(array(raw["bbox_regression"]), array(raw["cls_logits"]))
        return [
            frame_detections(d, rs, os_)
            for d, rs, os_ in zip(dets, prepared.input_sizes, prepared.original_sizes, strict=True)
        ]

    def infer(self, frames: Sequence[np.ndarray]) -> list[Detections]:
        prepared = self.preprocess(frames)
        return self.postprocess(self.run(prepared), prepared)


def frame_detections(det: tuple[np.ndarray, np.ndarray, np.ndarray], resized: tuple[int, int],
                     original: tuple[int, int]) -> Detections:
    """Canvas (boxes, scores, labels) of one image -> its frame's pixels (``core_graph.to_frame_coords``
    in numpy: the same float32 multiply and clamp)."""
    boxes, scores, labels = det
    (rh, rw), (oh, ow) = resized, original
    scale = np.array([ow / rw, oh / rh, ow / rw, oh / rh], dtype=np.float32)
    hi = np.array([ow, oh, ow, oh], dtype=np.float32)
    out = np.multiply(boxes.reshape(-1, 4), scale, dtype=np.float32)
    np.clip(out, 0, hi, out=out)
    return Detections(boxes=out, scores=scores.astype(np.float32, copy=False), labels=labels.astype(np.int64, copy=False))


def cpu_name() -> str:
    """The CPU model name (for reports and sidecars)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
