"""Measurement for ``benchmarks/compare.py``: quick latency probes and the final side-by-side pass.

Every latency here is ONNX Runtime on CPU with 2 threads, end to end per frame (preprocessing,
the core graph, decoding + NMS), through ``deploy.runtimes``: the same path a user deploys. Quick
probes (bisection, trajectories, the budget controller's feedback) use a few iterations; the
final rows come from one pass over all final models, interleaved round-robin so that load from
other processes and thermal drift hit every method alike (FIELD_NOTES: figures move 30-50%
between runs on a shared 2-core machine; only side-by-side numbers compare).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.compare_methods import TrajectoryPoint, load_checkpoint_like_base

log = logging.getLogger(__name__)

THREADS = 2


def sample_frames(dataset: Any, n: int) -> list[np.ndarray]:
    """The first ``n`` images of a split as HxWx3 uint8 RGB frames (what a runtime receives)."""
    return [dataset.load_image(i) for i in range(min(n, len(dataset)))]


def int8_graph(onnx_path: Path, dest: Path, frames: Sequence[np.ndarray]) -> Path:
    """``onnx_path`` quantized to INT8 static QDQ at ``dest`` (kept while it is newer than its source):
    what ``avprune build-engine --backend onnxruntime --precision int8`` deploys (uint8 activations,
    per-channel int8 weights, MinMax calibration)."""
    from deploy.engine.quantize import quantize_qdq
    from perception.io import atomic_path

    if dest.is_file() and dest.stat().st_mtime >= onnx_path.stat().st_mtime:
        return dest
    if not frames:
        raise ValueError("an INT8 row needs calibration frames; pass calibration= to final_pass")
    with atomic_path(dest) as tmp:
        quantize_qdq(onnx_path, tmp, list(frames), symmetric=False)
    return dest


def export_core(model: nn.Module, dest: Path) -> Path:
    """Export the NMS-free core graph (decoding + NMS run in the shared post-processing).

    The legacy exporter: about 3x faster to export than dynamo here, and ORT mAP equals eager
    mAP with it (FIELD_NOTES); a fixed batch of 1 matches the per-frame measurement.
    """
    from deploy.export import export_onnx

    return export_onnx(model.eval(), dest, form="core", exporter="legacy", dynamic_batch=False).path


def open_ort(onnx_path: Path) -> Any:
    """An ONNX Runtime CPU runtime with the comparison's thread count."""
    from deploy.runtimes import open_runtime

    return open_runtime(onnx_path, backend="onnxruntime", device="cpu", threads=THREADS)


def time_frames(rt: Any, frames: Sequence[np.ndarray], n: int, start: int = 0) -> list[float]:
    """End-to-end milliseconds of ``n`` single-frame ``rt.infer`` calls (pre + core + post): the
    trajectory probes' quick figure (the final pass times models paired, :func:`final_pass`)."""
    out = []
    for k in range(n):
        frame = frames[(start + k) % len(frames)]
        t0 = time.perf_counter()
        rt.infer([frame])
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def quick_latency(frames: Sequence[np.ndarray], iters: int, *, graph: bool = False) -> Callable[[nn.Module], float]:
    """A callable giving a model's p50 latency (ms) on ONNX Runtime over ``iters`` frames: end to end
    per frame, or with ``graph`` the core graph alone (what pruning changes; decode + NMS also scale
    with how many boxes an untrained one-shot model scores over the threshold)."""

    def measure(model: nn.Module) -> float:
        with tempfile.TemporaryDirectory(prefix="compare-") as d:
            path = export_core(copy.deepcopy(model), Path(d) / "m.onnx")
            with open_ort(path) as rt:
                if graph:
                    from deploy.timing import measure_latency

                    return float(measure_latency(rt, list(frames), warmup=2, iters=iters, end_to_end=False).p50_ms)
                time_frames(rt, frames, 2)  # warm-up: first calls allocate
                return float(np.median(time_frames(rt, frames, iters)))

    return measure


def probe_map(model: nn.Module, dataset: Any) -> float:
    """COCO mAP@[.5:.95] of an eager model on a (small) split; NaN-free (0 when nothing matches)."""
    from perception.evaluate import evaluate_model

    value = evaluate_model(model, dataset, batch_size=8).map
    return 0.0 if math.isnan(value) else float(value)


def prober(latency: Callable[[nn.Module], float], dataset: Any) -> Callable[[nn.Module, int], TrajectoryPoint]:
    """A trajectory probe: latency on the target runtime and mAP on the probe subset."""

    def probe(model: nn.Module, step: int) -> TrajectoryPoint:
        return TrajectoryPoint(step=step, latency_ms=latency(model), map=probe_map(model, dataset))

    return probe


def model_stats(model: nn.Module) -> dict[str, float]:
    """Parameters, non-zero parameters and GMACs (Torch-Pruning's counter, one frame)."""
    import torch_pruning as tp

    h, w = (int(v) for v in model.avprune_meta["image_size"])
    model.eval()
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, [[torch.rand(3, h, w)]])
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    return {"params": int(params), "nonzero_params": nonzero, "gmacs": float(macs) / 1e9}


def _accuracy(
    path: Path, rt: Any, val_set: Any, max_images: int | None, cache: Path, deploy: str = "fp32"
) -> dict[str, Any]:
    """mAP of the deployed model (through its runtime), cached per checkpoint content and deployment."""
    from perception.evaluate import evaluate
    from perception.io import atomic_write_json, sha256_file

    key = f"{sha256_file(path)[:16]}-{max_images or 'all'}" + ("" if deploy == "fp32" else f"-{deploy}")
    cached = cache / f"{path.stem}.json"
    if cached.is_file():
        d = json.loads(cached.read_text())
        if d.get("key") == key:
            return d
    m = evaluate(rt.infer, val_set, batch_size=1, max_images=max_images)  # the export is batch 1, per frame
    d = {"key": key, "map": m.map, "map50": m.map50, "map_small": m.map_small, "num_images": m.num_images}
    atomic_write_json(cached, d)
    return d


def final_pass(
    paths: Sequence[Path],
    val_set: Any,
    *,
    rounds: int,
    iters: int,
    max_images: int | None,
    cache: Path,
    base: Path,
    reference: int = 0,
    progress: bool = True,
    graph: bool = False,
    deploys: Sequence[str] | None = None,
    calibration: Sequence[np.ndarray] = (),
) -> list[dict[str, Any]]:
    """Measure every final model side by side: accuracy, size, and paired end-to-end latency (with
    ``graph``: the core graphs alone).

    ``deploys`` (one per path, default all "fp32") says how each model runs: "int8" quantizes its
    exported graph (:func:`int8_graph`, calibrated on ``calibration``) and times and scores that.

    All runtimes are opened first, then timed with :func:`deploy.timing.time_runtimes` (the one
    helper every comparison uses): ``rounds`` blocks of ``iters`` frames, the models alternating
    with the order rotated each block. Each row gets p50/p99 over its samples and its speed-up over
    ``paths[reference]`` with a bootstrap 95% interval.
    """
    from tqdm import tqdm

    from deploy.timing import time_runtimes

    deploys = list(deploys) if deploys is not None else ["fp32"] * len(paths)
    if len(deploys) != len(paths):
        raise ValueError(f"final_pass: {len(deploys)} deploys for {len(paths)} models; give one per model")
    frames = sample_frames(val_set, 8)
    stats, acc, runtimes = [], [], {}
    with contextlib.ExitStack() as stack:
        for i, (p, deploy) in enumerate(tqdm(list(zip(paths, deploys, strict=True)), desc="final: export + accuracy",
                                             unit="model", disable=not progress)):
            model = load_checkpoint_like_base(p, base).eval()
            stats.append(model_stats(model))
            onnx_path = cache / f"{p.stem}.onnx"
            if not onnx_path.is_file() or onnx_path.stat().st_mtime < p.stat().st_mtime:
                export_core(model, onnx_path)
            if deploy == "int8":
                onnx_path = int8_graph(onnx_path, cache / f"{p.stem}.int8.onnx", calibration)
            elif deploy != "fp32":
                raise ValueError(f"final_pass: deploy {deploy!r} for {p.name}; use 'fp32' or 'int8'")
            rt = stack.enter_context(open_ort(onnx_path))
            acc.append(_accuracy(p, rt, val_set, max_images, cache, deploy))
            runtimes[f"{i}:{p.stem}"] = rt
        names = list(runtimes)
        timing = time_runtimes(runtimes, frames, end_to_end=not graph, reference=names[reference], blocks=max(2, rounds),
                               block_size=max(1, iters), warmup=1)
    out = []
    for name, s, a, deploy in zip(names, stats, acc, deploys, strict=True):
        summary, ratio = timing.summaries[name], timing.ratios.get(name)
        out.append({**s, **{k: a[k] for k in ("map", "map50", "map_small", "num_images")},
                    "p50_ms": summary.p50_ms, "p99_ms": summary.p99_ms, "latency_samples": summary.n,
                    "timing_reference": names[reference].split(":", 1)[1], "deploy": deploy,
                    "speedup": 1.0 if ratio is None else ratio.ratio,
                    "speedup_ci": None if ratio is None else [ratio.low, ratio.high]})
    return out
