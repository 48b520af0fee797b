"""Latency of a runtime on real frames: warm-up excluded, percentiles over single-batch calls.

Every runtime synchronises its device before ``run`` returns, so wall-clock ``perf_counter``
around a call measures the finished work (not just the launch).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LatencySummary:
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(samples_ms: Sequence[float]) -> LatencySummary:
    """Percentiles of latency samples in milliseconds."""
    if len(samples_ms) == 0:
        raise ValueError("no latency samples to summarise")
    a = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return LatencySummary(float(p50), float(p90), float(p99), float(a.mean()), int(a.size))


def measure_latency(
    runtime: Any,
    frames: Sequence[np.ndarray] | Sequence[Sequence[np.ndarray]],
    *,
    warmup: int = 5,
    iters: int = 50,
    end_to_end: bool = True,
) -> LatencySummary:
    """Time ``iters`` calls after ``warmup`` untimed ones, cycling through ``frames``.

    ``frames`` is a list of HxWx3 frames (one frame per call, batch 1) or a list of batches.
    ``end_to_end=True`` times ``runtime.infer`` (preprocess + run + postprocess); ``False`` times
    ``runtime.run`` only, on batches preprocessed beforehand.
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters must be >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    if len(frames) == 0:
        raise ValueError("measure_latency needs at least one frame")
    batches = [list(f) if isinstance(f, list | tuple) else [f] for f in frames]
    if end_to_end:
        calls = [(runtime.infer, b) for b in batches]
    else:
        calls = [(runtime.run, runtime.preprocess(b)) for b in batches]
    for i in range(warmup):
        fn, arg = calls[i % len(calls)]
        fn(arg)
    samples = []
    for i in range(iters):
        fn, arg = calls[i % len(calls)]
        t0 = time.perf_counter()
        fn(arg)
        samples.append((time.perf_counter() - t0) * 1e3)
    return summarize(samples)
