"""ONNX Runtime runtime (CPU, or the CUDA execution provider when present).

Named ``ort`` so it never shadows the ``onnxruntime`` package.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deploy.runtimes.base import HOST_OPS, DetectorRuntime, Prepared, RuntimeInfo, cpu_name
from deploy.runtimes.ort_session import make_session
from perception.detections import Detections

log = logging.getLogger(__name__)


class OrtRuntime(DetectorRuntime):
    """An exported ONNX (or an ORT engine from build-engine) with the shared pre/post-processing."""

    def __init__(
        self, path: str | Path, *, device: str = "cpu", threads: int | None = None, doc: dict | None = None,
        precision: str = "fp32", host_ops: str = "host",
    ) -> None:
        from deploy.core_graph import Postprocessor
        from deploy.export import onnx_meta, read_onnx_meta

        path = Path(path)
        doc = doc if doc is not None else read_onnx_meta(path)
        meta = onnx_meta(doc)
        super().__init__(meta, doc["form"], Postprocessor.from_meta(meta))
        self.path = path
        if host_ops not in HOST_OPS:
            raise ValueError(f"host_ops must be one of {', '.join(HOST_OPS)}; got {host_ops!r}")
        self.host_ops = host_ops
        if host_ops == "graph":
            anchors = self.post.anchors(1)[0]
            self._anchor_count = int(anchors.shape[0])  # clamps the top-k fed per call
            # one fused graph per resize mode, built when first used: "uint8" (the default) takes the
            # frame resized in uint8 and normalises it inside; "float32" takes the host's normalised
            # canvas (torchvision's pixels). RESULTS.md engine measures both: uint8's frame is the faster.
            self._fused: dict[str, Any] = {}
            self._fused_from = (path, anchors.numpy(), device, threads)
            self.session = self._fused_session("uint8")
            self._resize = "uint8"
        else:
            self.session = make_session(path, device=device, threads=threads)
        self.output_names = [o.name for o in self.session.get_outputs()]
        if host_ops == "host":
            expected = meta.core_output_names() if self.form == "core" else ("boxes", "scores", "labels")
            missing = sorted(set(expected) - set(self.output_names))
            if missing:
                raise ValueError(f"{path}: graph lacks outputs {missing} (has {self.output_names}); re-export it")
        self.stage2_session = None
        if "stage2" in doc:
            s2 = path.with_name(doc["stage2"]["file"])
            if not s2.is_file():
                raise FileNotFoundError(f"{path}: its stage-2 graph {s2} is missing (keep both files together)")
            self.stage2_session = make_session(s2, device=device, threads=threads)
        import onnxruntime as ort

        provider = self.session.get_providers()[0]
        dev = f"cuda: {provider}" if provider == "CUDAExecutionProvider" else f"cpu: {cpu_name()}"
        if threads:
            dev += f" ({threads} threads)"
        self.info = RuntimeInfo(
            backend="onnxruntime", device=dev, precision=precision, version=ort.__version__, model_path=str(path),
            extra={"form": self.form, "model": meta.name, "providers": self.session.get_providers(),
                   "host_ops": host_ops},
        )

    def _fused_session(self, mode: str) -> Any:
        """The session of the fused graph for resize ``mode`` (built once)."""
        if mode not in self._fused:
            path, anchors, device, threads = self._fused_from
            self._fused[mode] = make_session(self._fused_bytes(path, anchors, normalise=mode == "uint8"),
                                             device=device, threads=threads)
        return self._fused[mode]

    def _fused_bytes(self, path: Path, anchors: np.ndarray, *, normalise: bool = True) -> bytes:
        """The core graph with decoding and NMS inside (:mod:`deploy.runtimes.fused_ends`), and with
        ``normalise`` the normalisation of a uint8 frame too."""
        import onnx

        from deploy.runtimes.fused_ends import fuse_ssd_ends

        if self.form != "core" or self.meta.family != "ssd":
            raise ValueError(
                f"{path}: host_ops='graph' folds SSD's pre/post-processing into the graph; this is a "
                f"{self.meta.family} model in the {self.form} form. Use host_ops='host'"
            )
        m = self.post.model
        fused = fuse_ssd_ends(
            onnx.load(str(path)), mean=tuple(self.meta.mean), std=tuple(self.meta.std),
            anchors=anchors, canvas=tuple(self.meta.image_size),
            weights=tuple(float(w) for w in m.box_coder.weights), bbox_xform_clip=float(m.box_coder.bbox_xform_clip),
            normalise=normalise,
        )
        return fused.SerializeToString()

    def _switch_resize(self, mode: str) -> None:
        if self.host_ops == "graph":
            self.session = self._fused_session(mode)

    def preprocess(self, frames: Sequence[np.ndarray]) -> Prepared:
        if self.host_ops == "host" or self._resize == "float32":
            return super().preprocess(frames)
        from deploy.runtimes.preprocess import resize_uint8

        with self._host_threads():
            batch = resize_uint8(frames, self.meta)
        sizes = tuple(self.meta.image_size for _ in frames)
        return Prepared(batch=batch, original_sizes=tuple((f.shape[0], f.shape[1]) for f in frames), input_sizes=sizes)

    def postprocess(self, raw: Any, prepared: Prepared) -> list[Detections]:
        if self.host_ops == "host":
            return super().postprocess(raw, prepared)
        from deploy.runtimes.base import frame_detections
        from deploy.runtimes.fused_ends import split_detections

        per_img = int(self.post.model.detections_per_img)
        with self._host_threads():
            dets = split_detections(raw["det_index"], raw["det_score"], raw["det_box"], len(prepared.original_sizes),
                                    per_img)
        return [frame_detections(d, rs, os_)
                for d, rs, os_ in zip(dets, prepared.input_sizes, prepared.original_sizes, strict=True)]

    def run(self, prepared: Prepared) -> Any:
        if self.host_ops == "graph":
            from deploy.runtimes.fused_ends import knob_feeds

            m = self.post.model
            feeds = knob_feeds(float(m.score_thresh), float(m.nms_thresh), int(m.topk_candidates),
                               int(m.detections_per_img), self._anchor_count)
            if self._resize == "uint8":
                feeds["frames_u8"] = prepared.batch
            else:
                feeds["images"] = np.ascontiguousarray(prepared.batch.numpy(), dtype=np.float32)
            return dict(zip(self.output_names, self.session.run(None, feeds), strict=True))
        x = np.ascontiguousarray(prepared.batch.numpy(), dtype=np.float32)
        if self.form == "full":  # batch-1 graph: one call per image
            outs = []
            for i in range(x.shape[0]):
                vals = self.session.run(None, {"images": x[i : i + 1]})
                outs.append(dict(zip(self.output_names, vals, strict=True)))
            return outs
        return dict(zip(self.output_names, self.session.run(None, {"images": x}), strict=True))

    def _stage2(self, box_features: Any) -> tuple[Any, Any]:
        import torch

        feats = np.ascontiguousarray(box_features.numpy(), dtype=np.float32)
        if feats.shape[0] == 0:  # no proposals: nothing to classify
            return torch.zeros(0, self.meta.num_classes), torch.zeros(0, 4 * self.meta.num_classes)
        logits, deltas = self.stage2_session.run(["class_logits", "box_regression"], {"box_features": feats})
        return torch.from_numpy(logits), torch.from_numpy(deltas)

    def close(self) -> None:
        self.session = None
        self._fused = {}
        self.stage2_session = None
