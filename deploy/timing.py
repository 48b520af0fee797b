"""Latency of runtimes on real frames, and the one way to compare models: paired, interleaved timing.

Every runtime synchronises its device before ``run`` returns, so wall-clock ``perf_counter``
around a call measures the finished work (not just the launch).

**Percentiles.** Every latency percentile in avprune is :func:`percentile`: numpy's default
``method="linear"``, Hyndman & Fan (1996) definition 7 (the sample quantile of R and of
spreadsheets: linear interpolation between the order statistics at ``(n - 1) q``). One definition
everywhere means a p50 in a report, a benchmark and a prune job's budget are the same statistic.
Hyndman, R. J. and Fan, Y. (1996), "Sample quantiles in statistical packages", The American
Statistician 50(4), 361-365.

**Paired timing** (:func:`time_paired`, :func:`time_runtimes`). Timing one model, then the other,
puts every drift of a shared machine (other jobs, thermal state, frequency) into the ratio: on
2 busy cores a dense-vs-pruned speed-up moved from 0.89x to 1.14x between two runs. Here the
models run in alternating blocks on the same frames, the order rotated every block, so a drift
hits all of them alike; the ratio reference p50 / candidate p50 comes with a bootstrap interval
that resamples whole blocks (Efron & Tibshirani 1993, ch. 8: resample the independent unit,
which here is a block holding every model's samples of the same moment), seeded, numpy only.
The shorter the blocks, the closer in time the paired samples: on a loaded machine use
``block_size=1`` (the models alternate input by input, ABBA...) with ``blocks = rounds x inputs``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: Stage names a runtime call reports (see :func:`runtime_call`).
STAGES: tuple[str, ...] = ("preprocess", "graph", "postprocess")


def percentile(values: Sequence[float] | np.ndarray, q: float | Sequence[float], axis: int | None = None) -> Any:
    """The project's percentile: numpy's ``linear`` method (Hyndman & Fan type 7), q in 0..100."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        raise ValueError("percentile of no values")
    return np.percentile(a, q, axis=axis, method="linear")


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
    """Percentiles (:func:`percentile`) of latency samples in milliseconds."""
    if len(samples_ms) == 0:
        raise ValueError("no latency samples to summarise")
    a = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = percentile(a, [50, 90, 99])
    return LatencySummary(float(p50), float(p90), float(p99), float(a.mean()), int(a.size))


def measure_latency(
    runtime: Any,
    frames: Sequence[np.ndarray] | Sequence[Sequence[np.ndarray]],
    *,
    warmup: int = 5,
    iters: int = 50,
    end_to_end: bool = True,
) -> LatencySummary:
    """Time ``iters`` calls of ONE runtime after ``warmup`` untimed ones, cycling through ``frames``.

    For comparing models use :func:`time_runtimes` instead (paired). ``frames`` is a list of
    HxWx3 frames (one frame per call, batch 1) or a list of batches. ``end_to_end=True`` times
    ``runtime.infer`` (preprocess + run + postprocess); ``False`` times ``runtime.run`` only, on
    batches preprocessed beforehand.
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


# ----------------------------------------------------------------------------- paired timing


@dataclass(frozen=True)
class RatioInterval:
    """``ratio`` = reference p50 / candidate p50 (> 1: the candidate is faster), with its interval."""

    reference: str
    candidate: str
    ratio: float
    low: float
    high: float
    confidence: float
    resamples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PairedTiming:
    """Per-model summaries from one interleaved run, and every candidate's ratio to the reference."""

    reference: str
    summaries: dict[str, LatencySummary]
    ratios: dict[str, RatioInterval]  # candidate name -> ratio vs the reference
    blocks: int
    block_size: int
    # per model, the p50 of each block: its spread is the run-to-run spread of a single measurement
    block_p50_ms: dict[str, tuple[float, ...]]
    # per model and stage (when the timed calls report stages): summaries of the same calls
    stages: dict[str, dict[str, LatencySummary]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference, "blocks": self.blocks, "block_size": self.block_size,
            "percentile": "numpy linear (Hyndman & Fan type 7)",
            "summaries": {k: v.to_dict() for k, v in self.summaries.items()},
            "ratios": {k: v.to_dict() for k, v in self.ratios.items()},
            "block_p50_ms": {k: list(v) for k, v in self.block_p50_ms.items()},
            "stages": {m: {s: v.to_dict() for s, v in st.items()} for m, st in self.stages.items()},
        }


def time_paired(
    calls: Mapping[str, Callable[[Any], Any]],
    inputs: Sequence[Any],
    *,
    reference: str | None = None,
    blocks: int = 10,
    block_size: int | None = None,
    warmup: int = 2,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
    clock_ns: Callable[[], int] = time.perf_counter_ns,
) -> PairedTiming:
    """Time two or more callables interleaved on the same inputs (one alone: its blocks' spread, no ratio).

    Block ``b`` feeds every callable the same ``block_size`` inputs (continuing cyclically through
    ``inputs``), one callable after the other, the order rotated by one each block. ``warmup``
    untimed rounds of every callable come first. A callable may return a mapping ``stage -> ms``
    (see :func:`runtime_call`); those are summarised per stage. ``reference`` (default: the first
    name) is the numerator of every ratio: ratio = reference p50 / candidate p50 (> 1: faster).
    """
    names = list(calls)
    if not names:
        raise ValueError("paired timing needs at least one model")
    reference = names[0] if reference is None else reference
    if reference not in calls:
        raise ValueError(f"reference {reference!r} is not one of the timed models {names}")
    if len(inputs) == 0:
        raise ValueError("paired timing needs at least one input")
    size = len(inputs) if block_size is None else int(block_size)
    if blocks < 2 or size < 1 or warmup < 0:
        raise ValueError(f"need blocks >= 2, block_size >= 1 and warmup >= 0; got {blocks}, {size}, {warmup}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be within (0, 1); got {confidence}")
    for _ in range(warmup):
        for name in names:
            for x in inputs[: min(size, len(inputs))]:
                calls[name](x)
    samples = {name: np.empty((blocks, size)) for name in names}
    stage_samples: dict[str, dict[str, np.ndarray]] = {}
    for b in range(blocks):
        batch = [inputs[(b * size + i) % len(inputs)] for i in range(size)]
        for name in names[b % len(names):] + names[: b % len(names)]:
            fn = calls[name]
            for i, x in enumerate(batch):
                t0 = clock_ns()
                out = fn(x)
                samples[name][b, i] = (clock_ns() - t0) / 1e6
                if isinstance(out, Mapping):
                    per = stage_samples.setdefault(name, {})
                    for stage, ms in out.items():
                        per.setdefault(stage, np.empty((blocks, size)))[b, i] = ms
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, blocks, size=(resamples, blocks))  # the same resampled blocks for every model
    ratios = {
        name: _ratio(samples[reference], samples[name], picks, reference, name, confidence)
        for name in names if name != reference
    }
    return PairedTiming(
        reference=reference,
        summaries={name: summarize(s.ravel()) for name, s in samples.items()},
        ratios=ratios, blocks=blocks, block_size=size,
        block_p50_ms={name: tuple(float(v) for v in percentile(s, 50, axis=1)) for name, s in samples.items()},
        stages={name: {st: summarize(v.ravel()) for st, v in per.items()} for name, per in stage_samples.items()},
    )


def _ratio(ref: np.ndarray, cand: np.ndarray, picks: np.ndarray, ref_name: str, cand_name: str,
           confidence: float) -> RatioInterval:
    """Reference p50 / candidate p50 and its percentile-bootstrap interval over resampled blocks."""
    point = float(percentile(ref, 50) / percentile(cand, 50))
    r = picks.shape[0]
    boot = percentile(ref[picks].reshape(r, -1), 50, axis=1) / percentile(cand[picks].reshape(r, -1), 50, axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = percentile(boot, [100 * alpha, 100 * (1 - alpha)])
    return RatioInterval(ref_name, cand_name, point, float(low), float(high), confidence, r)


def runtime_call(runtime: Any, *, end_to_end: bool = True,
                 clock_ns: Callable[[], int] = time.perf_counter_ns) -> Callable[[Any], dict[str, float]]:
    """A timed call of ``runtime`` on one frame that reports its stages (ms).

    ``end_to_end=True``: preprocess + graph + postprocess of an HxWx3 frame. ``False``: the graph
    alone, on an input that is already a :class:`~deploy.runtimes.base.Prepared` batch.
    """
    if not end_to_end:
        def graph_only(prepared: Any) -> dict[str, float]:
            t0 = clock_ns()
            runtime.run(prepared)
            return {"graph": (clock_ns() - t0) / 1e6}

        return graph_only

    def call(frame: np.ndarray) -> dict[str, float]:
        t0 = clock_ns()
        prepared = runtime.preprocess([frame])
        t1 = clock_ns()
        raw = runtime.run(prepared)
        t2 = clock_ns()
        runtime.postprocess(raw, prepared)
        t3 = clock_ns()
        return {"preprocess": (t1 - t0) / 1e6, "graph": (t2 - t1) / 1e6, "postprocess": (t3 - t2) / 1e6}

    return call


def time_runtimes(
    runtimes: Mapping[str, Any],
    frames: Sequence[np.ndarray],
    *,
    end_to_end: bool = True,
    reference: str | None = None,
    **kwargs: Any,
) -> PairedTiming:
    """:func:`time_paired` for opened runtimes on HxWx3 frames (batch 1), each with its OWN
    pre-processing: models with different input sizes or class counts compare whole frames.

    ``end_to_end=False`` times the graphs alone, each on its own pre-processed copy of the frames.
    ``kwargs`` go to :func:`time_paired` (blocks, block_size, warmup, seed, clock_ns, ...).
    """
    if len(frames) == 0:
        raise ValueError("time_runtimes needs at least one frame")
    clock = kwargs.get("clock_ns", time.perf_counter_ns)
    if end_to_end:
        calls = {name: runtime_call(rt, clock_ns=clock) for name, rt in runtimes.items()}
        return time_paired(calls, list(frames), reference=reference, **kwargs)
    prepared = {name: [rt.preprocess([f]) for f in frames] for name, rt in runtimes.items()}
    graph = {name: runtime_call(rt, end_to_end=False, clock_ns=clock) for name, rt in runtimes.items()}
    calls = {name: (lambda i, g=graph[name], p=prepared[name]: g(p[i])) for name in runtimes}
    return time_paired(calls, list(range(len(frames))), reference=reference, **kwargs)
