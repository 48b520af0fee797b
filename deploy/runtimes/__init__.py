"""Runtimes that share one pre/post-processing: PyTorch, ONNX Runtime, TensorRT.

``open_runtime`` picks the backend from what it is given:

* an ``nn.Module`` or a ``.pt``/``.pth`` checkpoint -> PyTorch (eager);
* an exported ``.onnx`` (with avprune metadata) -> ONNX Runtime;
* an engine written by ``avprune build-engine`` (any suffix, with ``ENGINE.json`` beside it) ->
  the backend named in the sidecar, after checking it was built for this device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploy.runtimes.base import DetectorRuntime, Prepared, Runtime, RuntimeInfo

__all__ = ["DetectorRuntime", "Prepared", "Runtime", "RuntimeInfo", "open_runtime"]

BACKENDS = ("pytorch", "onnxruntime", "tensorrt")


def open_runtime(
    model_or_path: Any, *, backend: str | None = None, device: str = "cpu", threads: int | None = None,
    host_ops: str = "host",
) -> DetectorRuntime:
    """Open a runtime for a model, checkpoint, exported ONNX or built engine (see module doc).

    ``host_ops="graph"`` (ONNX Runtime, SSD core graphs) folds the normalisation, decoding and NMS
    into the graph (:mod:`deploy.runtimes.fused_ends`): the host only resizes in uint8.
    """
    from torch import nn

    from deploy.runtimes.base import HOST_OPS

    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} (or None for auto), got {backend!r}")
    if host_ops not in HOST_OPS:
        raise ValueError(f"host_ops must be one of {', '.join(HOST_OPS)}; got {host_ops!r}")
    if host_ops == "graph" and (isinstance(model_or_path, nn.Module) or Path(model_or_path).suffix in (".pt", ".pth")
                                or backend not in (None, "onnxruntime")):
        what = "the model" if isinstance(model_or_path, nn.Module) else str(model_or_path)
        raise ValueError(f"host_ops='graph' runs on ONNX Runtime: export {what} to ONNX first "
                         "(avprune build-engine), or use host_ops='host'")
    if isinstance(model_or_path, nn.Module):
        if backend not in (None, "pytorch"):
            raise ValueError(f"an nn.Module runs on the pytorch backend; export it first for {backend!r}")
        from deploy.runtimes.pytorch import PyTorchRuntime

        return PyTorchRuntime(model_or_path, device=device, threads=threads)
    path = Path(model_or_path)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    from deploy.engine.sidecar import sidecar_path

    if path.suffix in (".pt", ".pth"):
        from deploy.runtimes.pytorch import PyTorchRuntime
        from perception.models import load_detector

        if backend not in (None, "pytorch"):
            raise ValueError(f"{path} is a checkpoint; export it (avprune build-engine {path}) to run on {backend}")
        return PyTorchRuntime(load_detector(path), device=device, threads=threads)
    if sidecar_path(path).is_file():
        return _open_engine(path, backend=backend, device=device, threads=threads, host_ops=host_ops)
    if path.suffix == ".onnx":
        if backend not in (None, "onnxruntime"):
            raise ValueError(f"{path}: a plain ONNX file runs on onnxruntime; build a {backend} engine first")
        from deploy.runtimes.ort import OrtRuntime

        return OrtRuntime(path, device=device, threads=threads, host_ops=host_ops)
    raise ValueError(
        f"{path}: not a checkpoint (.pt), an ONNX file (.onnx) or an engine with its sidecar {sidecar_path(path).name}"
    )


def _open_engine(path: Path, *, backend: str | None, device: str, threads: int | None,
                 host_ops: str = "host") -> DetectorRuntime:
    from deploy.engine.sidecar import check_device, cpu_device, read_sidecar

    doc = read_sidecar(path)
    if backend is not None and backend != doc["backend"]:
        raise ValueError(f"{path} is a {doc['backend']} engine, not {backend}")
    if doc["backend"] == "tensorrt":
        if host_ops != "host":
            raise ValueError(f"{path} is a TensorRT engine: host_ops='graph' applies to ONNX Runtime only "
                             "(open the source ONNX with it, or use host_ops='host')")
        from deploy.engine.tensorrt_builder import tensorrt_available

        ok, why = tensorrt_available()
        if not ok:
            dev = doc["device"]
            raise ValueError(
                f"{path} is a TensorRT engine built for {dev.get('name')} (compute capability "
                f"{dev.get('compute_capability')}); it cannot run here: {why}. Open the source ONNX with "
                "ONNX Runtime, or rebuild the engine on this machine with avprune build-engine"
            )
        from deploy.runtimes.tensorrt import TensorRTRuntime

        return TensorRTRuntime(path, doc=doc)
    from deploy.runtimes.ort import OrtRuntime

    # the ORT engine was optimised for a provider: an engine built for CUDA is refused on CPU and back
    here = cpu_device() if device == "cpu" else {"kind": "cuda", "name": device, "compute_capability": None}
    if doc["device"]["kind"] != here["kind"]:
        check_device(doc, here, path)
    onnx_doc = {"meta": doc["model_meta"], "form": doc["export"]["form"], **({"stage2": doc["stage2"]} if doc.get("stage2") else {})}
    return OrtRuntime(path, device=device, threads=threads, doc=onnx_doc, precision=doc["precision"], host_ops=host_ops)
