"""Stage 2, latency table: pruning's per-layer lookup table measured on the budget's runtime.

Per-layer entries depend on the architecture, input size, batch, runtime, device and threads,
not on the weights, so they are cached in ``cache_dir/latency/`` under a key naming all of them
(and the CPU model) and reused by later jobs. The constant overhead (pre/post-processing,
dispatch) is calibrated per job against the baseline's measured latency.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from avprune.config.prune import PruneJobConfig
from avprune.prune_job.context import StageContext
from avprune.prune_job.records import BaselineRecord, LatencyTableRecord
from perception.io import atomic_write_json

if TYPE_CHECKING:
    from torch import nn

#: ``measure_fn(module, input_shape) -> ms``: how the latency table times one layer.
MeasureFn = Callable[["nn.Module", tuple[int, ...]], float]

log = logging.getLogger(__name__)

#: Channel fractions measured per layer. Three points keep the ORT table to about a minute for
#: SSDlite on 2 cores; the model interpolates between them.
FRACTIONS = (0.25, 0.5, 1.0)


def ort_layer_measure_fn(threads: int, device: str = "cpu", repeats: int = 15, warmup: int = 3) -> MeasureFn:
    """``measure_fn(module, input_shape) -> ms`` that times one layer in ONNX Runtime, in a session
    from the project's one factory (threads explicit, spinning off), as the deployed graph runs."""
    from deploy.runtimes.ort_session import layer_measure_fn

    return layer_measure_fn(threads=threads, device=device, repeats=repeats, warmup=warmup)


def measure_fn_for(config: PruneJobConfig) -> MeasureFn:
    """The per-layer measuring callable for the budget's runtime."""
    b = config.budget
    if b.runtime == "onnxruntime":
        from deploy.runtimes.ort_session import layer_measure_fn

        return layer_measure_fn(threads=b.threads, device=b.device)
    if b.runtime == "pytorch":
        import torch

        from pruning.latency_model import torch_measure_fn

        torch.set_num_threads(b.threads)
        return torch_measure_fn()
    raise ValueError(
        f"budget.runtime {b.runtime!r}: no per-layer latency measurement for it here (TensorRT needs a CUDA "
        "device and the tensorrt package); set budget.runtime to onnxruntime or pytorch"
    )


def cache_path(config: PruneJobConfig) -> Path:
    """Cache file for this runtime, device (with CPU model), architecture, input, batch and threads."""
    from deploy.runtimes.base import cpu_name

    b = config.budget
    key = "|".join(map(str, (b.runtime, b.device, cpu_name(), config.model.name, config.model.num_classes,
                             tuple(b.input_size), b.batch, b.threads, FRACTIONS)))
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return config.cache_dir / "latency" / f"{b.runtime}-{b.device}-{config.model.name}-{digest}.json"


def run(ctx: StageContext) -> LatencyTableRecord:
    """Load or measure the table, calibrate it to the dense model, save a copy in the output dir."""
    from pruning.latency_model import LatencyTable

    cfg, b = ctx.config, ctx.config.budget
    cached = cache_path(cfg)
    if cached.is_file():
        table = LatencyTable.load(cached, runtime=b.runtime, device=b.device)
        source = "cache"
    else:
        ctx.progress.stage_start("latency_table", note=f"measuring layers on {b.runtime}")
        model = ctx.env.load_dense().eval()
        t0 = time.perf_counter()
        table = LatencyTable.measure(model, ctx.env.example_input(b.batch), measure_fn_for(cfg),
                                     runtime=b.runtime, device=b.device, fractions=FRACTIONS)
        table.meta.update({"model": cfg.model.name, "input_size": list(b.input_size), "batch": b.batch,
                           "threads": b.threads, "measure_s": round(time.perf_counter() - t0, 1)})
        atomic_write_json(cached, table.to_dict())
        source = "measured"
    overhead = table.calibrate(ctx.record(BaselineRecord).dense.p50_ms)
    path = ctx.out_dir / "work" / "latency_table.json"
    atomic_write_json(path, table.to_dict())
    return LatencyTableRecord(path=str(path), cache=str(cached), source=source, entries=len(table.entries),
                              overhead_ms=overhead)
