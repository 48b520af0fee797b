"""Latency statistics over frame records: tails, deadline misses, drops, sustained frame rate.

Definitions (all over measured frames; warm-up excluded):

* percentiles are :func:`deploy.timing.percentile`, the project's one definition (numpy's
  ``linear`` method, Hyndman & Fan type 7): between two frames' latencies it interpolates, so a
  p99.9 of fewer than 1000 frames lies just under the maximum (``max`` is reported beside it);
* **jitter** is the mean absolute difference between the latencies of consecutive processed frames
  (RFC 3550's inter-arrival jitter without its smoothing);
* **late** frames were processed but finished more than the budget after they arrived;
  **dropped** frames were never processed (drop policy); both missed their deadline, so
  ``miss_ratio = (late + dropped) / offered`` and the longest run of consecutive misses walks the
  frames in recorded order counting both (runs never span two streams);
* frames that failed to decode are counted apart: they are a data fault, not a latency one;
* **sustained FPS** is processed frames / (last completion - first arrival), summed over streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from deploy.realtime import DECODE_FAILED, DROPPED, PROCESSED, FrameRecord
from deploy.timing import percentile

PERCENTILES: tuple[tuple[str, float], ...] = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99_9", 99.9))
STAGES: tuple[str, ...] = ("queue", "decode", "preprocess", "inference", "postprocess", "end_to_end")


@dataclass(frozen=True)
class LatencyStats:
    """Summary of one stream (or several pooled); latencies in milliseconds, None when no frame ran."""

    budget_ms: float
    offered: int  # measured frames the stream offered
    processed: int
    dropped: int
    decode_failures: int
    warmup_frames: int
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    p99_9_ms: float | None
    max_ms: float | None
    mean_ms: float | None
    stdev_ms: float | None
    jitter_ms: float | None
    late: int
    miss_ratio: float
    longest_miss_run: int
    sustained_fps: float | None

    def as_dict(self) -> dict:
        return asdict(self)

    def value(self, metric: str) -> float | None:
        """A latency figure by name: ``p50``, ``p90``, ``p99``, ``p99.9`` or ``max``."""
        key = {"p99.9": "p99_9_ms"}.get(metric, f"{metric}_ms")
        if key not in ("p50_ms", "p90_ms", "p99_ms", "p99_9_ms", "max_ms"):
            raise ValueError(f"unknown latency metric {metric!r}; valid: p50, p90, p99, p99.9, max")
        return getattr(self, key)


def longest_run(flags: Sequence[bool]) -> int:
    """Length of the longest run of True."""
    best = run = 0
    for flag in flags:
        run = run + 1 if flag else 0
        best = max(best, run)
    return best


def summarize(streams: Sequence[Sequence[FrameRecord]], budget_ns: int) -> LatencyStats:
    """Statistics over one or more streams' records (warm-up records are counted, not measured)."""
    warmup = sum(1 for recs in streams for r in recs if r.warmup)
    measured = [[r for r in recs if not r.warmup] for recs in streams]
    frames = [r for recs in measured for r in recs]
    processed = [r for r in frames if r.status == PROCESSED]
    dropped = sum(1 for r in frames if r.status == DROPPED)
    late = sum(1 for r in processed if r.missed(budget_ns))
    offered = len(frames)
    decode_failures = sum(1 for r in frames if r.status == DECODE_FAILED)
    misses_denominator = offered - decode_failures
    # Decode failures are neither a hit nor a miss: they are left out of the walk.
    run = max(
        (longest_run([_is_miss(r, budget_ns) for r in recs if r.status != DECODE_FAILED]) for recs in measured),
        default=0,
    )
    base = dict(
        budget_ms=budget_ns / 1e6, offered=offered, processed=len(processed), dropped=dropped,
        decode_failures=decode_failures, warmup_frames=warmup, late=late,
        miss_ratio=(late + dropped) / misses_denominator if misses_denominator else 0.0,
        longest_miss_run=run,
    )
    if not processed:
        return LatencyStats(**base, p50_ms=None, p90_ms=None, p99_ms=None, p99_9_ms=None, max_ms=None,
                            mean_ms=None, stdev_ms=None, jitter_ms=None, sustained_fps=None)
    lat_ms = np.array([r.latency_ns for r in processed], dtype=np.float64) / 1e6
    values = percentile(lat_ms, [q for _, q in PERCENTILES])
    pct = {name: float(v) for (name, _), v in zip(PERCENTILES, values, strict=True)}
    jitters = [np.abs(np.diff([r.latency_ns for r in recs if r.status == PROCESSED])) for recs in measured]
    diffs = np.concatenate([j for j in jitters if len(j)]) / 1e6 if any(len(j) for j in jitters) else None
    active_ns = sum(_active_ns(recs) for recs in measured)
    return LatencyStats(
        **base,
        p50_ms=pct["p50"], p90_ms=pct["p90"], p99_ms=pct["p99"], p99_9_ms=pct["p99_9"],
        max_ms=float(lat_ms.max()), mean_ms=float(lat_ms.mean()),
        stdev_ms=float(lat_ms.std(ddof=1)) if len(lat_ms) > 1 else 0.0,
        jitter_ms=float(diffs.mean()) if diffs is not None else 0.0,
        sustained_fps=len(processed) / (active_ns / 1e9) if active_ns > 0 else None,
    )


def stage_breakdown(streams: Sequence[Sequence[FrameRecord]]) -> dict[str, dict[str, float]]:
    """Per stage (queue, decode, preprocess, inference, postprocess, end_to_end): mean, p50, p99 in ms."""
    processed = [r for recs in streams for r in recs if not r.warmup and r.status == PROCESSED]
    out: dict[str, dict[str, float]] = {}
    if not processed:
        return out
    for stage in STAGES:
        values = np.array([stage_ns(r, stage) for r in processed], dtype=np.float64) / 1e6
        p50, p99 = percentile(values, [50.0, 99.0])
        out[stage] = {"mean_ms": float(values.mean()), "p50_ms": float(p50), "p99_ms": float(p99)}
    return out


def stage_ns(record: FrameRecord, stage: str) -> int:
    """One stage's duration of a record (``end_to_end`` is the latency)."""
    if stage == "queue":
        return record.queue_ns
    if stage == "end_to_end":
        return record.latency_ns or 0
    return getattr(record, f"{stage}_ns")


def _is_miss(record: FrameRecord, budget_ns: int) -> bool:
    return record.status == DROPPED or record.missed(budget_ns)


def _active_ns(records: Sequence[FrameRecord]) -> int:
    ends = [r.end_ns for r in records if r.status == PROCESSED and r.end_ns is not None]
    if not ends:
        return 0
    return max(ends) - min(r.arrival_ns for r in records)
