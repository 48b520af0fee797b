"""ONNX Runtime runtime (CPU, or the CUDA execution provider when present).

Named ``ort`` so it never shadows the ``onnxruntime`` package.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from deploy.runtimes.base import DetectorRuntime, Prepared, RuntimeInfo, cpu_name
from deploy.runtimes.ort_session import make_session

log = logging.getLogger(__name__)


class OrtRuntime(DetectorRuntime):
    """An exported ONNX (or an ORT engine from build-engine) with the shared pre/post-processing."""

    def __init__(
        self, path: str | Path, *, device: str = "cpu", threads: int | None = None, doc: dict | None = None,
        precision: str = "fp32",
    ) -> None:
        from deploy.core_graph import Postprocessor
        from deploy.export import onnx_meta, read_onnx_meta

        path = Path(path)
        doc = doc if doc is not None else read_onnx_meta(path)
        meta = onnx_meta(doc)
        super().__init__(meta, doc["form"], Postprocessor.from_meta(meta))
        self.path = path
        self.session = make_session(path, device=device, threads=threads)
        self.output_names = [o.name for o in self.session.get_outputs()]
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
            extra={"form": self.form, "model": meta.name, "providers": self.session.get_providers()},
        )

    def run(self, prepared: Prepared) -> Any:
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
        self.stage2_session = None
