"""The one place an ONNX Runtime ``InferenceSession`` is configured.

Every session in the project (runtimes, engine builders, verification, benchmarks, the prune
job's latency table) comes from :func:`make_session`, so they all time the same thing:

* **threads explicit**: ``threads`` intra-op threads (``None`` = ORT's default, one per physical
  core) and ``inter_threads`` inter-op threads (1: our graphs run sequentially);
* **thread spinning off** (``session.intra_op.allow_spinning`` and ``session.inter_op.allow_spinning``
  = 0): ORT's pool threads otherwise spin after each run, burning the cores that our torch
  post-processing, or the next session timed round robin, runs on right after;
* **graph optimisation level** named (``all`` is ORT's default; the engine builder saves the
  ``extended`` result, whose layout is portable across CPUs);
* **execution providers** from a device string: ``cpu``, or ``cuda[:N]`` = CUDA EP with CPU fallback.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

OptLevel = Literal["disable", "basic", "extended", "all"]
_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}


def providers_for(device: str) -> list[str]:
    """Execution providers for ``device``: "cuda[:N]" = CUDA EP + CPU fallback, anything else the CPU.

    Raises ValueError when CUDA is asked for and this ORT build lacks it.
    """
    import onnxruntime as ort

    if not device.startswith("cuda"):
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise ValueError(
            f"device {device!r}: this onnxruntime build has no CUDAExecutionProvider (available: "
            f"{', '.join(available)}); use device='cpu' or install onnxruntime-gpu"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def session_options(
    *, threads: int | None, inter_threads: int = 1, optimization: OptLevel = "all",
    optimized_model_path: str | os.PathLike | None = None, log_severity: int = 3,
) -> Any:
    """``onnxruntime.SessionOptions`` with the project's settings (see the module docstring)."""
    import onnxruntime as ort

    if optimization not in _LEVELS:
        raise ValueError(f"optimization {optimization!r}: expected one of {', '.join(_LEVELS)}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an int >= 1 or None (ORT's default); got {threads!r}")
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = int(inter_threads)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[optimization])
    if optimized_model_path is not None:
        opts.optimized_model_filepath = str(optimized_model_path)
    opts.log_severity_level = log_severity  # 3: errors only (the legacy exporter's graphs draw harmless warnings)
    return opts


def make_session(
    model: str | os.PathLike | bytes, *, threads: int | None, device: str = "cpu", inter_threads: int = 1,
    optimization: OptLevel = "all", optimized_model_path: str | os.PathLike | None = None, log_severity: int = 3,
) -> Any:
    """An ``onnxruntime.InferenceSession`` on ``model`` (a path or serialized ONNX bytes).

    ``threads`` must be given (``None`` means ORT's default); a model ORT cannot load raises
    ValueError naming it.
    """
    import onnxruntime as ort

    opts = session_options(threads=threads, inter_threads=inter_threads, optimization=optimization,
                           optimized_model_path=optimized_model_path, log_severity=log_severity)
    providers = providers_for(device)
    src = model if isinstance(model, bytes) else str(Path(model))
    try:
        return ort.InferenceSession(src, sess_options=opts, providers=providers)
    except Exception as e:  # ORT raises its own exception types (InvalidGraph, Fail, NoSuchFile, ...)
        name = f"in-memory ONNX ({len(model)} bytes)" if isinstance(model, bytes) else str(model)
        raise ValueError(f"{name}: ONNX Runtime cannot load it ({type(e).__name__}: {e})") from e


def module_session(
    module: Any, input_shape: tuple[int, ...], *, threads: int | None, device: str = "cpu"
) -> tuple[Any, dict[str, Any]]:
    """A session on ``module`` exported in memory (legacy exporter, opset 17: fast for small graphs)
    and a random feed ``{"x": ...}`` of ``input_shape``, for timing."""
    import io

    import torch

    x = torch.randn(input_shape)
    buf = io.BytesIO()
    torch.onnx.export(module.eval(), (x,), buf, dynamo=False, opset_version=17, input_names=["x"])
    return make_session(buf.getvalue(), threads=threads, device=device), {"x": x.numpy()}


def layer_measure_fn(
    *, threads: int | None, device: str = "cpu", repeats: int = 15, warmup: int = 3
) -> Callable[[Any, tuple[int, ...]], float]:
    """``measure_fn(module, input_shape) -> ms`` for ``pruning.LatencyTable.measure``: the median of
    ``repeats`` runs (after ``warmup``) of the module alone in ONNX Runtime, with the same session
    settings as the deployed graph, so the table sees the same kernels."""
    import statistics
    import time

    def measure(module: Any, input_shape: tuple[int, ...]) -> float:
        sess, feed = module_session(module, input_shape, threads=threads, device=device)
        times = []
        for i in range(warmup + repeats):
            t = time.perf_counter()
            sess.run(None, feed)
            if i >= warmup:
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    return measure
