"""Pacing engine and latency statistics on a simulated clock: exact misses, drops and percentiles.

The fake runtime advances the simulated clock by a known time per frame (read from the frame's
pixels, which hold its frame id), so every expected number below is worked out by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest

from deploy.latency_stats import longest_run, stage_breakdown, summarize
from deploy.realtime import (
    DECODE_FAILED,
    DROPPED,
    PROCESSED,
    MonotonicClock,
    PacingConfig,
    SimulatedClock,
    run_stream,
)
from deploy.streams.base import DecodeError, Packet, StreamReader
from deploy.timing import percentile
from tests.conftest import MS, FakeRuntime


class FakeStream(StreamReader):
    """Frames whose pixels hold their id; ``bad`` ids fail to decode."""

    kind = "fake"

    def __init__(self, stamps_ms: list[float], bad: tuple[int, ...] = ()) -> None:
        super().__init__("fake")
        self.stamps = [round(t * MS) for t in stamps_ms]
        self.bad = bad
        self.decoded: list[int] = []

    def _packets(self) -> Iterator[Packet]:
        for i, ts in enumerate(self.stamps):
            yield Packet(ts, i, self._decoder(i))

    def _decoder(self, i: int):
        def decode() -> np.ndarray:
            self.decoded.append(i)
            if i in self.bad:
                raise DecodeError(f"frame {i} is corrupt")
            return np.full((4, 4, 3), i, np.uint8)

        return decode


def every_third(slow_ms: float, fast_ms: float = 50.0) -> Callable[[int], float]:
    return lambda i: slow_ms if i % 3 == 0 else fast_ms


def play(stamps_ms, model_ms, **config):
    clock = SimulatedClock(start_ns=1_000 * MS)  # not zero: records must be relative to the first arrival
    stream = FakeStream(stamps_ms, bad=config.pop("bad", ()))
    runtime = FakeRuntime(clock, model_ms)
    cfg = PacingConfig(budget_ns=config.pop("budget_ns", 100 * MS), **config)
    run = run_stream(stream, runtime, cfg, clock=clock)
    return run, stream, runtime


def by_status(run, status):
    return [r.frame_id for r in run.measured if r.status == status]


TEN_FPS = [i * 100.0 for i in range(9)]


def test_drop_policy_takes_newest_and_counts_drops_exactly():
    # 10 fps, 250 ms on frames 0, 3, 6, else 50 ms. Worker timeline (ms):
    # f0 0-250 (late 250) | f1, f2 waiting: drop f1, f2 250-300 (100 = budget: on time)
    # f3 300-550 (late) | drop f4, f5 550-600 | f6 600-850 (late) | drop f7, f8 850-900
    run, stream, runtime = play(TEN_FPS, every_third(250), drop_policy="drop")
    assert by_status(run, PROCESSED) == [0, 2, 3, 5, 6, 8]
    assert by_status(run, DROPPED) == [1, 4, 7]
    assert stream.decoded == [0, 2, 3, 5, 6, 8]  # dropped frames are never decoded
    assert [r.latency_ns // MS for r in run.measured if r.status == PROCESSED] == [250, 100, 250, 100, 250, 100]
    assert [r.queue_ns // MS for r in run.measured if r.status == PROCESSED] == [0, 50, 0, 50, 0, 50]
    stats = summarize([run.records], 100 * MS)
    assert (stats.offered, stats.processed, stats.dropped, stats.late) == (9, 6, 3, 3)
    assert stats.miss_ratio == pytest.approx(6 / 9)
    assert stats.longest_miss_run == 2  # f0 late + f1 dropped, and so on
    # three 100s and three 250s: type-7 p50 interpolates between the 3rd and 4th (100 and 250)
    assert (stats.p50_ms, stats.p99_ms, stats.max_ms, stats.mean_ms) == (175.0, 250.0, 250.0, 175.0)
    assert stats.jitter_ms == 150.0
    assert stats.sustained_fps == pytest.approx(6 / 0.9)


def test_queue_policy_processes_all_in_order_with_queueing_in_latency():
    # Same stream and model, keep-all queue: the backlog grows and every frame is late.
    # Ends: 250 300 350 600 650 700 950 1000 1050 minus arrivals 0..800.
    run, stream, _ = play(TEN_FPS, every_third(250), drop_policy="queue")
    assert by_status(run, PROCESSED) == list(range(9))
    assert by_status(run, DROPPED) == []
    lat = [r.latency_ns // MS for r in run.measured]
    assert lat == [250, 200, 150, 300, 250, 200, 350, 300, 250]
    stats = summarize([run.records], 100 * MS)
    assert (stats.dropped, stats.late, stats.longest_miss_run) == (0, 9, 9)
    assert (stats.p50_ms, stats.max_ms) == (250.0, 350.0)
    assert stats.sustained_fps == pytest.approx(9 / 1.05)


@pytest.mark.parametrize("policy", ["drop", "queue"])
def test_slow_every_third_frame_without_backlog(policy):
    # 150 ms on frames 0, 3, 6: the next frame waits 50 ms and finishes exactly on budget; no drops.
    run, _, _ = play(TEN_FPS, every_third(150), drop_policy=policy)
    stats = summarize([run.records], 100 * MS)
    assert (stats.processed, stats.dropped, stats.late, stats.longest_miss_run) == (9, 0, 3, 1)
    assert [r.latency_ns // MS for r in run.measured] == [150, 100, 50] * 3


def test_budget_boundary_is_strictly_greater():
    run, _, _ = play(TEN_FPS, every_third(150), drop_policy="drop", budget_ns=100 * MS - 1)
    assert summarize([run.records], 100 * MS - 1).late == 6  # the 100 ms frames now miss too


def test_warmup_frames_run_unpaced_and_are_excluded():
    # Frames 0, 1 warm up (250 + 50 ms, unpaced); pacing restarts at frame 2 (arrival 0):
    # f2 0-50 | f3 100-350 late | drop f4, f5 350-400 | f6 400-650 late | drop f7, f8 650-700
    for kwargs in ({"warmup_frames": 2}, {"warmup_ns": 150 * MS}):
        run, _, runtime = play(TEN_FPS, every_third(250), drop_policy="drop", **kwargs)
        assert [r.frame_id for r in run.warmup] == [0, 1]
        assert runtime.calls[:2] == [0, 1]
        assert by_status(run, PROCESSED) == [2, 3, 5, 6, 8]
        assert by_status(run, DROPPED) == [4, 7]
        stats = summarize([run.records], 100 * MS)
        assert (stats.warmup_frames, stats.offered, stats.late, stats.dropped) == (2, 7, 2, 2)
        assert 0 not in run.detections and 2 in run.detections


def test_throughput_mode_back_to_back():
    run, _, _ = play(TEN_FPS, every_third(250), mode="throughput")
    stats = summarize([run.records], 100 * MS)
    assert (stats.processed, stats.dropped, stats.late) == (9, 0, 3)
    assert [r.latency_ns // MS for r in run.measured] == [250, 50, 50] * 3
    assert stats.sustained_fps == pytest.approx(9 / 1.05)
    breakdown = stage_breakdown([run.records])
    assert breakdown["inference"]["p50_ms"] == 50.0 and breakdown["decode"]["mean_ms"] == 0.0


def test_decode_failures_are_recorded_not_skipped():
    run, stream, _ = play(TEN_FPS, lambda i: 10.0, drop_policy="drop", bad=(4,))
    assert by_status(run, DECODE_FAILED) == [4]
    assert [f.frame_id for f in stream.decode_failures] == [4]
    stats = summarize([run.records], 100 * MS)
    assert (stats.decode_failures, stats.processed, stats.late, stats.miss_ratio) == (1, 8, 0, 0.0)


def test_max_frames_and_backwards_stamps():
    run, _, _ = play([0, 100, 50, 300, 400], lambda i: 10.0, max_frames=4)
    assert [r.frame_id for r in run.records] == [0, 1, 2, 3]
    assert run.clamped_timestamps == 1
    assert [r.arrival_ns // MS for r in run.records] == [0, 100, 100, 300]


def test_overall_stats_pool_streams_but_not_miss_runs():
    a, _, _ = play(TEN_FPS, every_third(250), drop_policy="drop")
    b, _, _ = play(TEN_FPS, every_third(150), drop_policy="drop")
    stats = summarize([a.records, b.records], 100 * MS)
    assert (stats.offered, stats.processed, stats.dropped, stats.late, stats.longest_miss_run) == (18, 15, 3, 6, 2)


def test_percentile_and_runs_helpers():
    # Hyndman & Fan type 7: position (n - 1) q, linear between the two order statistics around it
    values = np.arange(1, 1001, dtype=float)
    assert percentile(values, 50) == pytest.approx(500.5)
    assert percentile(values, 99.9) == pytest.approx(999.001)
    assert percentile(values[:10], 99.9) == pytest.approx(9.991)
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # order of the samples does not matter
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    assert longest_run([True, True, False, True, True, True, False]) == 3
    with pytest.raises(ValueError):
        PacingConfig(budget_ns=0)
    with pytest.raises(ValueError, match="drop policy"):
        PacingConfig(budget_ns=1, drop_policy="lifo")


def test_wall_clock_smoke():
    # The one real-clock run: only counts are asserted, never times.
    stream = FakeStream([i * 5.0 for i in range(6)])
    run = run_stream(stream, FakeRuntime(None, lambda i: 1.0), PacingConfig(budget_ns=10**9), clock=MonotonicClock())
    assert len(run.measured) == 6 and all(r.end_ns >= r.start_ns >= r.arrival_ns for r in run.measured if r.status == PROCESSED)
