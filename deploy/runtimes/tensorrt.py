"""TensorRT runtime: a deserialized engine run with ``execute_async_v3`` on a CUDA stream.

Device memory comes from torch CUDA tensors (torch is installed wherever TensorRT is used here),
so there is no pycuda dependency. The runtime runs core-form engines (static output shapes);
the full graph's NMS has data-dependent output shapes that would need an output allocator.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from deploy.runtimes.base import DetectorRuntime, Prepared, RuntimeInfo

log = logging.getLogger(__name__)


class _Engine:
    """One engine + execution context with torch-allocated I/O."""

    def __init__(self, trt: Any, runtime: Any, path: Path) -> None:
        import torch

        self.trt = trt
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ValueError(f"{path}: TensorRT could not deserialize it (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: getattr(torch, _TORCH_DTYPES[str(self.engine.get_tensor_dtype(n))]) for n in names}

    def __call__(self, feeds: dict[str, Any], stream: Any) -> dict[str, Any]:
        import torch

        for name in self.inputs:
            t = feeds[name].to(self.dtypes[name]).contiguous()
            feeds[name] = t  # keep a reference alive until the stream is synchronised
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise ValueError(f"input {name} shape {tuple(t.shape)} is outside the engine's optimization profile")
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ValueError(f"output {name} has a data-dependent shape {shape}: run a core-form engine")
            outs[name] = torch.empty(shape, dtype=self.dtypes[name], device="cuda")
            self.context.set_tensor_address(name, outs[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        stream.synchronize()
        return outs


_TORCH_DTYPES = {
    "DataType.FLOAT": "float32", "DataType.HALF": "float16", "DataType.INT32": "int32",
    "DataType.INT64": "int64", "DataType.BOOL": "bool", "DataType.INT8": "int8", "DataType.BF16": "bfloat16",
}


class TensorRTRuntime(DetectorRuntime):
    """A built engine (plus its sidecar) with the shared pre/post-processing."""

    def __init__(self, path: str | Path, *, doc: dict) -> None:
        import tensorrt as trt
        import torch

        from deploy.core_graph import ModelMeta, Postprocessor
        from deploy.engine.compat import parse_version
        from deploy.engine.sidecar import check_device
        from deploy.engine.tensorrt_builder import cuda_device

        path = Path(path)
        if not torch.cuda.is_available():
            raise ValueError(f"{path} is a TensorRT engine but torch sees no CUDA device on this machine")
        check_device(doc, cuda_device(), path)
        if parse_version(doc["backend_version"])[:2] != parse_version(trt.__version__)[:2]:
            raise ValueError(
                f"{path} was built with TensorRT {doc['backend_version']}, this is {trt.__version__}: rebuild it"
            )
        if doc["export"]["form"] != "core":
            raise ValueError(f"{path}: the TensorRT runtime runs core-form engines; rebuild from a core export")
        meta = ModelMeta.from_json(json.dumps(doc["model_meta"]))
        super().__init__(meta, "core", Postprocessor.from_meta(meta))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.main = _Engine(trt, self._runtime, path)
        self.stage2 = None
        if doc.get("stage2"):
            self.stage2 = _Engine(trt, self._runtime, path.with_name(doc["stage2"]["file"]))
        self.stream = torch.cuda.Stream()
        self.info = RuntimeInfo(
            backend="tensorrt", device=f"cuda: {torch.cuda.get_device_name(0)}", precision=doc["precision"],
            version=trt.__version__, model_path=str(path), model_sha256=doc.get("engine_sha256"),
            extra={"sparsity": doc["sparsity"], "form": "core", "model": meta.name},
        )

    def run(self, prepared: Prepared) -> Any:
        x = prepared.batch.to("cuda", non_blocking=True)
        return self.main({"images": x}, self.stream)

    def _stage2(self, box_features: Any) -> tuple[Any, Any]:
        import torch

        if box_features.shape[0] == 0:
            n = self.meta.num_classes
            return torch.zeros(0, n), torch.zeros(0, 4 * n)
        out = self.stage2({"box_features": box_features.to("cuda")}, self.stream)
        return out["class_logits"].float().cpu(), out["box_regression"].float().cpu()

    def close(self) -> None:
        self.main = None
        self.stage2 = None
