"""The pacing engine: plays a recorded stream into a runtime and records what each frame went through.

Model of the car (single perception worker, like a ROS 2 node with one callback thread):

* **realtime mode**: frame *i* *arrives* at ``t0 + (ts_i - ts_first)``: its recorded offset from the
  first measured frame, on the run clock (never earlier than the previous frame, so a recording
  whose stamps step backwards cannot make time run backwards). The worker handles one frame at a
  time. When it frees up:

  - ``drop`` policy (a depth-1 queue, the usual camera subscription): it takes the *newest* frame
    that has arrived; the older waiting ones are **dropped** (never decoded, counted);
  - ``queue`` policy (keep all): it takes the *oldest* waiting frame; latency includes the wait.

  A frame's **latency** is ``completion - arrival`` (waiting + decode + preprocess + inference +
  postprocess). A processed frame **misses its deadline** when latency > budget. With the budget
  equal to the frame period this is "not finished before the next frame arrives".
* **throughput mode**: frames are fed back to back, as fast as the runtime takes them; latency is
  the service time (``completion - start``) and nothing is dropped.

Warm-up frames (the first N frames, or the frames within the first S seconds of recorded time) run
through the runtime unpaced before pacing starts; they are recorded with ``warmup=True`` and kept
out of the statistics. Pacing then starts at the first measured frame, so a slow cold start cannot
leave a backlog that pollutes the measured frames.

The clock is injected (:class:`Clock`): :class:`MonotonicClock` for real runs and
:class:`SimulatedClock` for tests, where a fake runtime advances time by a known amount per frame
so that misses and drops are exact. The runtime contract (``deploy.runtimes.base``) is that
``run`` returns only after the device work is done, so reading the clock after it is valid for GPUs.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from deploy.runtimes.base import Runtime
from deploy.streams.base import Packet
from perception.detections import Detections

PROCESSED = "processed"
DROPPED = "dropped"
DECODE_FAILED = "decode_failed"

Mode = Literal["realtime", "throughput"]
DropPolicy = Literal["drop", "queue"]


class Clock(Protocol):
    def now_ns(self) -> int: ...

    def sleep_until(self, t_ns: int) -> None: ...


class MonotonicClock:
    """``time.perf_counter_ns``; sleeps coarsely, then spins the last ``spin_ns`` for precise arrivals."""

    def __init__(self, spin_ns: int = 300_000) -> None:
        self.spin_ns = spin_ns

    def now_ns(self) -> int:
        return time.perf_counter_ns()

    def sleep_until(self, t_ns: int) -> None:
        while (remaining := t_ns - time.perf_counter_ns()) > 0:
            if remaining > self.spin_ns:
                time.sleep((remaining - self.spin_ns) / 1e9)  # the OS may oversleep by ~0.1 ms


class SimulatedClock:
    """A clock that only moves when told to: ``sleep_until`` jumps, ``advance`` models work."""

    def __init__(self, start_ns: int = 0) -> None:
        self.t = start_ns

    def now_ns(self) -> int:
        return self.t

    def sleep_until(self, t_ns: int) -> None:
        self.t = max(self.t, t_ns)

    def advance(self, dt_ns: int) -> None:
        if dt_ns < 0:
            raise ValueError(f"a simulated clock cannot go back ({dt_ns} ns)")
        self.t += dt_ns


@dataclass(frozen=True)
class PacingConfig:
    budget_ns: int
    mode: Mode = "realtime"
    drop_policy: DropPolicy = "drop"
    warmup_frames: int = 0
    warmup_ns: int = 0
    max_frames: int | None = None  # packets taken from the stream, warm-up included
    keep_detections: bool = True

    def __post_init__(self) -> None:
        if self.budget_ns <= 0:
            raise ValueError(f"budget must be > 0 ns; got {self.budget_ns}")
        if self.mode not in ("realtime", "throughput"):
            raise ValueError(f"mode must be 'realtime' or 'throughput'; got {self.mode!r}")
        if self.drop_policy not in ("drop", "queue"):
            raise ValueError(f"drop policy must be 'drop' or 'queue'; got {self.drop_policy!r}")
        if self.warmup_frames < 0 or self.warmup_ns < 0:
            raise ValueError("warm-up must be >= 0")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1; got {self.max_frames}")


@dataclass(frozen=True)
class FrameRecord:
    """What happened to one frame. Times are ns on the run clock, relative to the first arrival."""

    frame_id: int
    timestamp_ns: int  # as recorded
    arrival_ns: int
    status: str  # PROCESSED, DROPPED or DECODE_FAILED
    start_ns: int | None = None
    end_ns: int | None = None
    decode_ns: int = 0
    preprocess_ns: int = 0
    inference_ns: int = 0
    postprocess_ns: int = 0
    warmup: bool = False

    @property
    def latency_ns(self) -> int | None:
        """Completion minus arrival for a processed frame; None otherwise."""
        if self.status != PROCESSED or self.end_ns is None:
            return None
        return self.end_ns - self.arrival_ns

    @property
    def queue_ns(self) -> int:
        return 0 if self.start_ns is None else self.start_ns - self.arrival_ns

    def missed(self, budget_ns: int) -> bool:
        """True for a processed frame whose latency exceeds the budget."""
        latency = self.latency_ns
        return latency is not None and latency > budget_ns


@dataclass(frozen=True)
class StreamRun:
    """All frames of one stream through one runtime, warm-up first, then in frame order."""

    records: tuple[FrameRecord, ...]
    config: PacingConfig
    detections: dict[int, Detections] = field(default_factory=dict)  # frame_id -> output
    read_ns: int = 0  # time spent reading packets (demux; video decode) inside the paced loop
    clamped_timestamps: int = 0  # recorded stamps that stepped backwards

    @property
    def measured(self) -> tuple[FrameRecord, ...]:
        return tuple(r for r in self.records if not r.warmup)

    @property
    def warmup(self) -> tuple[FrameRecord, ...]:
        return tuple(r for r in self.records if r.warmup)


class PacketSource(Protocol):
    """What the engine needs from a stream reader (``deploy.streams.base.StreamReader`` fits)."""

    def packets(self) -> Iterator[Packet]: ...

    def decode(self, packet: Packet) -> np.ndarray | None: ...


@dataclass(frozen=True)
class _Arrival:
    packet: Packet
    arrival_ns: int  # absolute, on the clock


class _Arrivals:
    """Packets with their arrival times, read one ahead so reading happens while the worker idles."""

    def __init__(self, packets: Iterator[Packet], clock: Clock, first: Packet) -> None:
        self._packets = packets
        self._clock = clock
        self._t0 = clock.now_ns()
        self._ts0 = first.timestamp_ns
        self._last_rel = 0
        self._buffer: deque[_Arrival] = deque([_Arrival(first, self._t0)])
        self.read_ns = 0
        self.clamped = 0
        self._exhausted = False

    @property
    def t0(self) -> int:
        return self._t0

    def _fetch(self) -> bool:
        if self._exhausted:
            return False
        t = self._clock.now_ns()
        packet = next(self._packets, None)
        self.read_ns += self._clock.now_ns() - t
        if packet is None:
            self._exhausted = True
            return False
        rel = packet.timestamp_ns - self._ts0
        if rel < self._last_rel:
            self.clamped += 1
            rel = self._last_rel
        self._last_rel = rel
        self._buffer.append(_Arrival(packet, self._t0 + rel))
        return True

    def peek(self) -> _Arrival | None:
        if not self._buffer and not self._fetch():
            return None
        return self._buffer[0]

    def pop(self) -> _Arrival:
        return self._buffer.popleft()

    def prefetch(self, depth: int = 2) -> None:
        while len(self._buffer) < depth and self._fetch():
            pass


class _Worker:
    """Runs one packet through decode + the runtime's three stages, reading the clock between them."""

    def __init__(self, source: PacketSource, runtime: Runtime, clock: Clock, config: PacingConfig) -> None:
        self.source, self.runtime, self.clock, self.config = source, runtime, clock, config
        self.detections: dict[int, Detections] = {}

    def process(self, packet: Packet, arrival_abs: int, t0: int, *, warmup: bool = False) -> FrameRecord:
        clock = self.clock
        start = clock.now_ns()
        if warmup:
            arrival_abs = start
        image = self.source.decode(packet)
        t_dec = clock.now_ns()
        common = dict(frame_id=packet.frame_id, timestamp_ns=packet.timestamp_ns,
                      arrival_ns=arrival_abs - t0, start_ns=start - t0, decode_ns=t_dec - start, warmup=warmup)
        if image is None:
            return FrameRecord(status=DECODE_FAILED, end_ns=t_dec - t0, **common)
        prepared = self.runtime.preprocess([image])
        t_pre = clock.now_ns()
        raw = self.runtime.run(prepared)
        t_run = clock.now_ns()
        dets = self.runtime.postprocess(raw, prepared)
        t_end = clock.now_ns()
        if self.config.keep_detections and not warmup:
            self.detections[packet.frame_id] = dets[0]
        return FrameRecord(status=PROCESSED, end_ns=t_end - t0, preprocess_ns=t_pre - t_dec,
                           inference_ns=t_run - t_pre, postprocess_ns=t_end - t_run, **common)


def run_stream(
    source: PacketSource,
    runtime: Runtime,
    config: PacingConfig,
    *,
    clock: Clock | None = None,
    on_record: Callable[[FrameRecord], None] | None = None,
) -> StreamRun:
    """Play ``source`` into ``runtime`` per ``config`` and return every frame's record."""
    clock = clock or MonotonicClock()
    packets: Iterator[Packet] = iter(source.packets())
    if config.max_frames is not None:
        packets = itertools.islice(packets, config.max_frames)
    worker = _Worker(source, runtime, clock, config)
    records: list[FrameRecord] = []
    emit = _emitter(records, on_record)

    first = next(packets, None)
    if first is not None:  # warm-up: unpaced, unmeasured
        ts_first = first.timestamp_ns
        index = 0
        while first is not None and (
            index < config.warmup_frames or first.timestamp_ns - ts_first < config.warmup_ns
        ):
            t = clock.now_ns()
            emit(worker.process(first, t, t, warmup=True))
            first = next(packets, None)
            index += 1
    if first is None:
        return StreamRun(tuple(records), config, worker.detections)

    arrivals = _Arrivals(packets, clock, first)
    if config.mode == "throughput":
        _run_throughput(arrivals, worker, emit)
    elif config.drop_policy == "drop":
        _run_realtime_drop(arrivals, worker, emit)
    else:
        _run_realtime_queue(arrivals, worker, emit)
    warm = [r for r in records if r.warmup]
    measured = sorted((r for r in records if not r.warmup), key=lambda r: r.frame_id)
    return StreamRun(tuple(warm + measured), config, worker.detections, arrivals.read_ns, arrivals.clamped)


def _emitter(records: list[FrameRecord], on_record: Callable[[FrameRecord], None] | None):
    def emit(record: FrameRecord) -> None:
        records.append(record)
        if on_record is not None:
            on_record(record)

    return emit


def _run_throughput(arrivals: _Arrivals, worker: _Worker, emit) -> None:
    # Back to back: each frame "arrives" when the worker starts it, so latency = service time.
    while (item := arrivals.peek()) is not None:
        arrivals.pop()
        t = worker.clock.now_ns()
        emit(worker.process(item.packet, t, arrivals.t0))


def _run_realtime_queue(arrivals: _Arrivals, worker: _Worker, emit) -> None:
    # In order; only the head of the queue is ever needed, so nothing is read ahead of it.
    clock = worker.clock
    while (item := arrivals.peek()) is not None:
        if item.arrival_ns > clock.now_ns():
            arrivals.prefetch()
            clock.sleep_until(item.arrival_ns)
        arrivals.pop()
        emit(worker.process(item.packet, item.arrival_ns, arrivals.t0))


def _run_realtime_drop(arrivals: _Arrivals, worker: _Worker, emit) -> None:
    clock = worker.clock
    while (head := arrivals.peek()) is not None:
        if head.arrival_ns > clock.now_ns():  # idle: read the one after next, then wait
            arrivals.prefetch()
            clock.sleep_until(head.arrival_ns)
        # Everything that has arrived by now is waiting; the newest wins, the rest are dropped.
        now = clock.now_ns()
        waiting = [arrivals.pop()]
        while (nxt := arrivals.peek()) is not None and nxt.arrival_ns <= now:
            waiting.append(arrivals.pop())
        for stale in waiting[:-1]:
            emit(FrameRecord(frame_id=stale.packet.frame_id, timestamp_ns=stale.packet.timestamp_ns,
                             arrival_ns=stale.arrival_ns - arrivals.t0, status=DROPPED))
        chosen = waiting[-1]
        emit(worker.process(chosen.packet, chosen.arrival_ns, arrivals.t0))
