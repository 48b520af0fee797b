"""Real-time validation: play recorded streams into one or two models and build the report data.

The first model is the **candidate**: its verdict decides pass/fail. An optional second model is a
**reference** (typically the dense model next to the pruned candidate) shown side by side, its
verdict reported but not gating. A model passes when every ``--fail-on`` rule holds on every
stream *and* on all streams pooled (a short failing stream cannot hide inside a long passing one).

The report is one JSON-serialisable dict (schema ``avprune.validate.report`` version 1): the
configuration, the environment (CPU, libraries, each runtime's backend/device/precision/version,
model sha256), per stream and per model statistics and stage breakdowns, every frame's record in
columns, and the verdict. ``deploy.report_html`` turns it (plus the sample frames) into the page.

With a reference model, both models are also timed **paired** (:func:`deploy.timing.time_runtimes`:
interleaved blocks on the same decoded frames, order rotated), and the report's ``paired`` section
holds the speed-up (reference p50 / candidate p50) with its bootstrap interval. That, not the two
replays (run one after the other, so a drift of the machine lands in their ratio), is the number
to compare models by. Each model keeps its own pre-processing: models with different input sizes
or class counts are still compared, whole frame against whole frame, and the report says so.
Both models are opened before anything is played, so a model that cannot be loaded is an error
before any replay.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import platform
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from deploy import realtime
from deploy.latency_stats import LatencyStats, stage_breakdown, summarize
from deploy.realtime import (
    PROCESSED,
    Clock,
    DropPolicy,
    FrameRecord,
    Mode,
    PacingConfig,
    StreamRun,
    run_stream,
)
from deploy.runtimes.base import Runtime
from perception.detections import Detections
from perception.io import sha256_file

log = logging.getLogger(__name__)

SCHEMA = "avprune.validate.report"
SCHEMA_VERSION = 1
LATENCY_METRICS = ("p50", "p90", "p99", "p99.9", "max")
LIBRARIES = ("avprune", "numpy", "torch", "torchvision", "onnxruntime", "onnxruntime-gpu", "tensorrt",
             "opencv-python-headless", "opencv-python", "mcap", "mcap-ros2-support", "rosbags")


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class FailRule:
    """``p99`` (latency metric > budget fails), ``miss-rate:0.01`` (miss ratio > 0.01 fails) or
    ``decode-errors:N`` (more than N measured frames that did not decode fail)."""

    metric: str  # one of LATENCY_METRICS, "miss-rate" or "decode-errors"
    threshold: float | None = None  # miss-rate ratio, decode-errors count

    def __str__(self) -> str:
        return self.metric if self.threshold is None else f"{self.metric}:{self.threshold:g}"

    def violation(self, stats: LatencyStats) -> str | None:
        """Why ``stats`` break this rule, or None when they hold."""
        if self.metric == "decode-errors":  # a data fault, gated apart from latency
            limit = int(self.threshold or 0)
            if stats.decode_failures > limit:
                return f"{stats.decode_failures} frames failed to decode > {limit} allowed"
            return None
        if self.metric == "miss-rate":
            limit = self.threshold or 0.0
            if stats.miss_ratio > limit:
                return f"miss rate {stats.miss_ratio:.2%} > {limit:.2%}"
            return None
        value = stats.value(self.metric)
        if value is None:
            return f"{self.metric}: no frame was processed"
        if value > stats.budget_ms:
            return f"{self.metric} {value:.2f} ms > budget {stats.budget_ms:g} ms"
        return None


def parse_fail_on(specs: str | Sequence[str]) -> tuple[FailRule, ...]:
    """``"p99,miss-rate:0.01"`` (or a list of such strings) -> rules."""
    items = [s.strip() for spec in ([specs] if isinstance(specs, str) else specs) for s in spec.split(",")]
    rules = []
    for item in filter(None, items):
        if item in LATENCY_METRICS:
            rules.append(FailRule(item))
            continue
        if (d := re.fullmatch(r"decode-errors:([0-9]+)", item)) is not None:
            rules.append(FailRule("decode-errors", float(d.group(1))))
            continue
        m = re.fullmatch(r"miss-rate:([0-9.]+)(%?)", item)
        if m is None:
            raise ValueError(f"--fail-on {item!r}: expected one of {', '.join(LATENCY_METRICS)}, miss-rate:RATIO "
                             "or decode-errors:N")
        ratio = float(m.group(1)) / (100.0 if m.group(2) else 1.0)
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"--fail-on {item!r}: the miss-rate ratio must be within 0..1 (or 0..100%)")
        rules.append(FailRule("miss-rate", ratio))
    if not rules:
        raise ValueError("--fail-on needs at least one rule")
    return tuple(rules)


def parse_warmup(text: str | int) -> tuple[int, int]:
    """``"2s"``/``"500ms"`` -> (0 frames, ns of recorded time); ``"30"``/``"30f"`` -> (30 frames, 0)."""
    s = str(text).strip().lower()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(s|ms|f|frames?)?", s)
    if m is None:
        raise ValueError(f"--warmup {text!r}: expected frames (e.g. 30) or a duration (e.g. 2s, 500ms)")
    value, unit = float(m.group(1)), m.group(2) or "f"
    if unit in ("s", "ms"):
        return 0, round(value * (1e9 if unit == "s" else 1e6))
    if value != int(value):
        raise ValueError(f"--warmup {text!r}: a frame count must be whole")
    return int(value), 0


@dataclass(frozen=True)
class ValidationConfig:
    budget_ms: float
    mode: Mode = "realtime"
    drop_policy: DropPolicy = "drop"
    warmup: str = "10"
    fail_on: tuple[FailRule, ...] = (FailRule("p99"),)
    max_frames: int | None = None
    fps: float | None = None  # plain image folders (and videos without a rate)
    device: str = "cpu"
    threads: int | None = None
    samples: int = 3  # frames per stream drawn with detections in the report
    paired_frames: int = 16  # decoded frames (from all streams) the paired comparison times
    paired_rounds: int = 12  # passes over the paired frames; on each frame the models alternate (ABBA...)
    host_ops: str = "host"  # "graph": SSD's normalisation, decoding and NMS inside the ONNX graph

    def __post_init__(self) -> None:
        if not self.budget_ms > 0:
            raise ValueError(f"budget_ms must be > 0; got {self.budget_ms}")
        if self.paired_frames < 1 or self.paired_rounds < 1 or self.paired_frames * self.paired_rounds < 2:
            raise ValueError(f"paired timing needs paired_frames >= 1, paired_rounds >= 1 and two timed calls per "
                             f"model; got {self.paired_frames}, {self.paired_rounds}")
        parse_warmup(self.warmup)
        from deploy.runtimes.base import HOST_OPS

        if self.host_ops not in HOST_OPS:
            raise ValueError(f"host_ops must be one of {', '.join(HOST_OPS)}; got {self.host_ops!r}")

    def pacing(self) -> PacingConfig:
        frames, ns = parse_warmup(self.warmup)
        return PacingConfig(budget_ns=round(self.budget_ms * 1e6), mode=self.mode, drop_policy=self.drop_policy,
                            warmup_frames=frames, warmup_ns=ns, max_frames=self.max_frames)

    def as_dict(self) -> dict[str, Any]:
        frames, ns = parse_warmup(self.warmup)
        return {"budget_ms": self.budget_ms, "mode": self.mode, "drop_policy": self.drop_policy,
                "warmup_frames": frames, "warmup_s": ns / 1e9, "fail_on": [str(r) for r in self.fail_on],
                "max_frames": self.max_frames, "fps": self.fps, "device": self.device, "threads": self.threads,
                "paired_frames": self.paired_frames, "paired_rounds": self.paired_rounds, "host_ops": self.host_ops}


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class SampleFrame:
    """A frame drawn in the report, with each model's detections (untimed pass)."""

    stream: int
    frame_id: int
    image: np.ndarray
    detections: tuple[Detections, ...]


@dataclass(frozen=True)
class Outcome:
    """Everything a run produced: the JSON report, sample frames, and the raw runs per model/stream."""

    report: dict[str, Any]
    samples: list[SampleFrame] = field(default_factory=list)
    runs: list[list[StreamRun]] = field(default_factory=list)  # [model][stream]

    @property
    def passed(self) -> bool:
        return bool(self.report["verdict"]["passed"])


RuntimeOpener = Callable[[str], Runtime]


def run_validation(
    models: Sequence[str | Path],
    streams: Sequence[str],
    config: ValidationConfig,
    *,
    open_runtime: RuntimeOpener | None = None,
    clock: Clock | None = None,
    on_stream_done: Callable[[int, int, LatencyStats], None] | None = None,
) -> Outcome:
    """Validate ``models`` (candidate first, optional reference second) on every stream."""
    if not 1 <= len(models) <= 2:
        raise ValueError(f"give one model, or a candidate and a reference; got {len(models)}")
    if not streams:
        raise ValueError("give at least one --stream")
    opener = open_runtime or _default_opener(config)
    pacing = config.pacing()
    runs: list[list[StreamRun]] = []
    stream_docs: list[dict[str, Any]] = []
    model_docs: list[dict[str, Any]] = []
    sample_ids: dict[int, list[int]] = {}
    images: dict[tuple[int, int], np.ndarray] = {}
    sample_dets: dict[tuple[int, int], list[Detections]] = {}
    with contextlib.ExitStack() as stack:
        runtimes = [stack.enter_context(_open(opener, model, mi, len(models))) for mi, model in enumerate(models)]
        for mi, (model, runtime) in enumerate(zip(models, runtimes, strict=True)):
            model_docs.append(_model_doc(model, runtime, mi, models))
            model_runs: list[StreamRun] = []
            for si, spec in enumerate(streams):
                run, doc = _play(spec, runtime, pacing, config, clock)
                model_runs.append(run)
                if mi == 0:
                    stream_docs.append(doc)
                    sample_ids[si] = _pick_samples(run, config.samples)
                if on_stream_done is not None:
                    on_stream_done(mi, si, summarize([run.records], pacing.budget_ns))
                _sample_pass(spec, si, sample_ids[si], runtime, config, images, sample_dets)
            runs.append(model_runs)
        paired = _paired(runtimes, model_docs, streams, config, clock) if len(runtimes) == 2 else None
    report = build_report(models, streams, config, runs, model_docs, stream_docs, sample_ids, paired=paired)
    samples = [SampleFrame(si, fid, images[(si, fid)], tuple(sample_dets[(si, fid)]))
               for si, ids in sample_ids.items() for fid in ids if (si, fid) in images]
    return Outcome(report, samples, runs)


def _open(opener: RuntimeOpener, model: str | Path, index: int, count: int) -> Runtime:
    """Open one model, or raise ValueError naming its role (checked before anything is played)."""
    role = "candidate" if index == 0 else "reference"
    role = f"{role} model" if count > 1 else "model"
    try:
        return opener(str(model))
    except Exception as e:  # any loader failure (ORT, torch, TensorRT, a missing file) is the same user error
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{role} {model} cannot be loaded: {why}") from e


def _paired(runtimes: Sequence[Runtime], model_docs: list[dict[str, Any]], streams: Sequence[str],
            config: ValidationConfig, clock: Clock | None) -> dict[str, Any]:
    """Candidate and reference timed interleaved on the same decoded frames (see module doc)."""
    from deploy.timing import time_runtimes

    frames = _paired_frames(streams, config)
    cand, ref = (d["label"] for d in model_docs)
    clock = clock or realtime.MonotonicClock()  # looked up at call time: the replays' clock
    # one frame per block: the two models alternate call by call (order rotated every frame), so a
    # load spike on a shared machine lands on both; the bootstrap resamples these pairs
    timing = time_runtimes({cand: runtimes[0], ref: runtimes[1]}, frames, reference=ref,
                           blocks=config.paired_rounds * len(frames), block_size=1, warmup=1, clock_ns=clock.now_ns)
    ratio = timing.ratios[cand]
    return {
        "candidate": cand, "reference": ref, "frames": len(frames), "rounds": config.paired_rounds,
        "blocks": timing.blocks,
        "speedup": ratio.ratio, "speedup_low": ratio.low, "speedup_high": ratio.high,
        "confidence": ratio.confidence, "resamples": ratio.resamples, "seed": 0,
        "summaries": {k: v.to_dict() for k, v in timing.summaries.items()},
        "stages": {m: {s: v.to_dict() for s, v in st.items()} for m, st in timing.stages.items()},
        "block_p50_ms": {k: list(v) for k, v in timing.block_p50_ms.items()},
        "notes": _comparison_notes(runtimes, (cand, ref)),
    }


def _paired_frames(streams: Sequence[str], config: ValidationConfig) -> list[np.ndarray]:
    """Up to ``paired_frames`` decoded frames, the first ones of each stream in equal shares (the
    paired run has its own warm-up, and decoding is not timed)."""
    from deploy.streams import open_stream

    per_stream = -(-config.paired_frames // len(streams))
    frames: list[np.ndarray] = []
    for spec in streams:
        taken = 0
        with open_stream(spec, fps=config.fps) as reader:
            for packet in reader.packets():
                if taken >= per_stream or len(frames) >= config.paired_frames:
                    break
                image = reader.decode(packet)
                if image is not None:
                    frames.append(image)
                    taken += 1
    if not frames:
        raise ValueError(f"no frame of {', '.join(streams)} decodes: nothing to time the two models on")
    return frames


def _comparison_notes(runtimes: Sequence[Runtime], labels: Sequence[str]) -> list[str]:
    """What differs between the two models' inputs and outputs (each runs its own pre-processing)."""
    metas = [getattr(rt, "meta", None) for rt in runtimes]
    if any(m is None for m in metas):
        return []
    a, b = metas
    notes = []
    if tuple(a.image_size) != tuple(b.image_size):
        notes.append(
            f"The models take different input sizes ({labels[0]}: {a.image_size[0]}x{a.image_size[1]}, "
            f"{labels[1]}: {b.image_size[0]}x{b.image_size[1]}): each frame is resized for each model by its "
            "own pre-processing, so the speed-up compares whole frames, not equal amounts of work.")
    if a.num_classes != b.num_classes:
        notes.append(
            f"The models predict different class counts ({labels[0]}: {a.num_classes}, {labels[1]}: "
            f"{b.num_classes}, background included): their detections are not comparable class by class.")
    if a.name != b.name:
        notes.append(f"The models are different architectures ({labels[0]}: {a.name}, {labels[1]}: {b.name}).")
    return notes


def _default_opener(config: ValidationConfig) -> RuntimeOpener:
    def opener(path: str) -> Runtime:
        from deploy.runtimes import open_runtime

        return open_runtime(path, device=config.device, threads=config.threads, host_ops=config.host_ops)

    return opener


def _play(spec: str, runtime: Runtime, pacing: PacingConfig, config: ValidationConfig,
          clock: Clock | None) -> tuple[StreamRun, dict[str, Any]]:
    from deploy.streams import open_stream

    with open_stream(spec, fps=config.fps) as reader:
        run = run_stream(reader, runtime, pacing, clock=clock)
        doc = {"spec": spec, **reader.describe(), "read_ms": run.read_ns / 1e6,
               "clamped_timestamps": run.clamped_timestamps}
    measured = run.measured
    if not measured:
        raise ValueError(
            f"stream {spec}: no frame left after warm-up ({len(run.records)} frames read); lower --warmup"
        )
    if not any(r.status == PROCESSED for r in measured):
        raise ValueError(f"stream {spec}: none of its {len(measured)} measured frames decoded")
    return run, doc


def _pick_samples(run: StreamRun, count: int) -> list[int]:
    """First, middle and slowest processed frames (then evenly spaced ones up to ``count``)."""
    done = [r for r in run.measured if r.status == PROCESSED]
    if count <= 0 or not done:
        return []
    picks = [done[0].frame_id, done[len(done) // 2].frame_id, max(done, key=lambda r: r.latency_ns or 0).frame_id]
    picks += [done[int(i)].frame_id for i in np.linspace(0, len(done) - 1, count)]
    return sorted(list(dict.fromkeys(picks))[:count])


def _sample_pass(spec: str, si: int, ids: list[int], runtime: Runtime, config: ValidationConfig,
                 images: dict[tuple[int, int], np.ndarray], dets: dict[tuple[int, int], list[Detections]]) -> None:
    """Decode the sample frames (once, cached across models) and run the model on them, untimed."""
    if not ids:
        return
    wanted = set(ids)
    if any((si, fid) not in images for fid in ids):
        from deploy.streams import open_stream

        with open_stream(spec, fps=config.fps) as reader:
            for packet in reader.packets():
                if packet.frame_id in wanted:
                    image = reader.decode(packet)
                    if image is not None:
                        images[(si, packet.frame_id)] = image
                if packet.frame_id >= max(wanted):
                    break
    for fid in ids:
        if (si, fid) in images:
            dets.setdefault((si, fid), []).append(runtime.infer([images[(si, fid)]])[0])


# ----------------------------------------------------------------------------- report data


def verdict(stats: LatencyStats, rules: Sequence[FailRule]) -> dict[str, Any]:
    reasons = [v for rule in rules if (v := rule.violation(stats)) is not None]
    return {"passed": not reasons, "reasons": reasons}


def build_report(models: Sequence[str | Path], streams: Sequence[str], config: ValidationConfig,
                 runs: list[list[StreamRun]], model_docs: list[dict], stream_docs: list[dict],
                 sample_ids: dict[int, list[int]], *, paired: dict[str, Any] | None = None) -> dict[str, Any]:
    budget_ns = round(config.budget_ms * 1e6)
    results, overall = [], []
    for mi, model_runs in enumerate(runs):
        stream_verdicts = []
        for si, run in enumerate(model_runs):
            stats = summarize([run.records], budget_ns)
            v = verdict(stats, config.fail_on)
            stream_verdicts.append(v)
            results.append({"model": mi, "stream": si, "stats": stats.as_dict(), "stages": stage_breakdown([run.records]),
                            "verdict": v, "frames": frame_columns(run.records)})
        pooled = summarize([run.records for run in model_runs], budget_ns)
        v = verdict(pooled, config.fail_on)
        for si, sv in enumerate(stream_verdicts):
            v["reasons"] += [f"stream {si}: {r}" for r in sv["reasons"]]
        v["passed"] = not v["reasons"]
        overall.append({"model": mi, "stats": pooled.as_dict(),
                        "stages": stage_breakdown([run.records for run in model_runs]), "verdict": v})
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config.as_dict(),
        "environment": environment(),
        "models": model_docs,
        "streams": stream_docs,
        "results": results,
        "overall": overall,
        "paired": paired,
        "samples": [{"stream": si, "frame_id": fid} for si, ids in sample_ids.items() for fid in ids],
        "verdict": {"passed": overall[0]["verdict"]["passed"], "gated_model": 0,
                    "fail_on": [str(r) for r in config.fail_on], "reasons": overall[0]["verdict"]["reasons"]},
    }


def frame_columns(records: Sequence[FrameRecord]) -> dict[str, list]:
    """Every frame's record as columns (ms rounded to 0.1 us) for compact, diff-able JSON."""

    def ms(ns: int | None) -> float | None:
        return None if ns is None else round(ns / 1e6, 4)

    return {
        "frame_id": [r.frame_id for r in records],
        "timestamp_ns": [r.timestamp_ns for r in records],
        "warmup": [r.warmup for r in records],
        "status": [r.status for r in records],
        "arrival_ms": [ms(r.arrival_ns) for r in records],
        "start_ms": [ms(r.start_ns) for r in records],
        "end_ms": [ms(r.end_ns) for r in records],
        "latency_ms": [ms(r.latency_ns) for r in records],
        "decode_ms": [ms(r.decode_ns) for r in records],
        "preprocess_ms": [ms(r.preprocess_ns) for r in records],
        "inference_ms": [ms(r.inference_ns) for r in records],
        "postprocess_ms": [ms(r.postprocess_ns) for r in records],
    }


def _model_doc(model: str | Path, runtime: Runtime, index: int, models: Sequence[str | Path]) -> dict[str, Any]:
    path = Path(model)
    info = runtime.info
    sha = info.model_sha256 or (sha256_file(path) if path.is_file() else None)
    names = [Path(m).name for m in models]
    label = path.name if names.count(path.name) == 1 else f"{path.name} #{index + 1}"
    return {"label": label, "path": str(path), "sha256": sha, "role": "candidate" if index == 0 else "reference",
            "runtime": _jsonable(asdict(info))}


def environment() -> dict[str, Any]:
    """Where the numbers came from (the runtime's own device line is in each model entry)."""
    from deploy.runtimes.base import cpu_name

    libs = {}
    for name in LIBRARIES:
        try:
            libs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "libraries": libs,
    }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
