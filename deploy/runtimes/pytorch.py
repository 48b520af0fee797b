"""PyTorch eager runtime: the reference every exported graph is verified against."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from deploy.runtimes.base import DetectorRuntime, Prepared, RuntimeInfo, cpu_name

log = logging.getLogger(__name__)


class PyTorchRuntime(DetectorRuntime):
    """Runs the detector's own modules eagerly in the same split as the exported graph.

    ``form="core"`` runs backbone + heads then our post-processing (exactly what ONNX Runtime and
    TensorRT runtimes do after their graph); ``form="full"`` runs :class:`FullModule` (the module
    the full ONNX graph is traced from), one image at a time like that graph.
    """

    def __init__(self, model: nn.Module, *, device: str = "cpu", threads: int | None = None, form: str = "core"):
        from deploy.core_graph import CoreModule, FullModule, Postprocessor, Stage2Module, model_meta

        if form not in ("core", "full"):
            raise ValueError(f"form must be 'core' or 'full', got {form!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but torch sees no CUDA device; use device='cpu'")
        if threads is not None:
            torch.set_num_threads(int(threads))  # process-wide: torch has no per-module thread pools
        model.eval()
        meta = model_meta(model)
        super().__init__(meta, form, Postprocessor(model, meta))
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.core = CoreModule(model, meta).eval()
        self.full = FullModule(model, meta).eval() if form == "full" else None
        self.stage2 = Stage2Module(model).eval() if meta.family == "faster_rcnn" else None
        dev = (
            f"cuda: {torch.cuda.get_device_name(self.device)}"
            if self.device.type == "cuda"
            else f"cpu: {cpu_name()} ({torch.get_num_threads()} threads)"
        )
        self.info = RuntimeInfo(
            backend="pytorch", device=dev, precision=str(next(model.parameters()).dtype).replace("torch.float", "fp"),
            version=torch.__version__, extra={"form": form, "model": meta.name},
        )

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def run(self, prepared: Prepared) -> Any:
        x = prepared.batch.to(self.device, non_blocking=True)
        if self.full is not None:
            out = [dict(zip(("boxes", "scores", "labels"), self.full(x[i : i + 1]), strict=True)) for i in range(x.shape[0])]
        else:
            out = dict(zip(self.meta.core_output_names(), self.core(x), strict=True))
        self._sync()
        return out

    @torch.no_grad()
    def _stage2(self, box_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, deltas = self.stage2(box_features.to(self.device))
        return logits.cpu(), deltas.cpu()
