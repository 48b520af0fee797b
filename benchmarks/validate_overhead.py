"""What the ``avprune validate`` harness adds on top of the model (issue #6: ≤ 2% at p50).

    python -m benchmarks.validate_overhead [--quick] [--threads 2] [--rounds N] [--frames N]
                                           [--backend onnxruntime|pytorch] [--device cpu|cuda]

One SSDlite320 (untrained: latency does not depend on the weights' values) on ONNX Runtime by
default, one set of decoded 640×384 frames held in memory, two ways of running them:

* **harness**: ``deploy.realtime.run_stream`` in throughput mode (packet handling, clock reads
  between the five stages, frame records, detections kept), latency as the harness reports it;
* **bare**: a plain loop ``preprocess -> run -> postprocess`` timed with ``perf_counter_ns``.

Blocks of frames alternate A B B A ... so drift (thermal, other processes) hits both alike. The
figure of merit is the median over rounds of (harness block p50 / bare block p50) - 1, each ratio
taken within one round so slow drift cancels; pooled percentiles and block throughput are reported
too, and the harness's own bookkeeping is measured alone with a runtime that does nothing.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from benchmarks._results import ASSETS, machine_line, write_section
from deploy.realtime import PROCESSED, MonotonicClock, PacingConfig, run_stream
from deploy.runtimes.base import Prepared, RuntimeInfo
from deploy.streams.base import Packet
from perception.detections import Detections
from perception.io import atomic_write_json

log = logging.getLogger("benchmarks.validate_overhead")

FRAME_HW = (384, 640)
TARGET = 0.02  # the bound on the p50 overhead


class MemorySource:
    """Pre-decoded frames as packets: decode returns the same array the bare loop uses."""

    def __init__(self, frames: list[np.ndarray], period_ns: int = 33_333_333) -> None:
        self.frames, self.period_ns = frames, period_ns

    def packets(self) -> Iterator[Packet]:
        for i, f in enumerate(self.frames):
            yield Packet(i * self.period_ns, i, lambda f=f: f)

    def decode(self, packet: Packet) -> np.ndarray:
        return packet.decode()


class NullRuntime:
    """Does nothing: what is left is the harness's own per-frame cost."""

    info = RuntimeInfo(backend="null", device="cpu", precision="-", version="-")

    def preprocess(self, frames):
        return Prepared(batch=None, original_sizes=((1, 1),))

    def run(self, prepared):
        return None

    def postprocess(self, raw, prepared):
        return [Detections.empty()]


def make_frames(n: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth random frames (decoded once; contents do not change a detector's latency)."""
    import cv2

    rng = np.random.default_rng(seed)
    h, w = FRAME_HW
    return [cv2.resize(rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8), (w, h)) for _ in range(n)]


def harness_block(runtime, frames: list[np.ndarray]) -> tuple[list[int], int]:
    config = PacingConfig(budget_ns=10**12, mode="throughput", keep_detections=True)
    t0 = time.perf_counter_ns()
    run = run_stream(MemorySource(frames), runtime, config, clock=MonotonicClock())
    wall = time.perf_counter_ns() - t0
    return [r.latency_ns for r in run.measured if r.status == PROCESSED], wall


def bare_block(runtime, frames: list[np.ndarray]) -> tuple[list[int], int]:
    lat = []
    t0 = time.perf_counter_ns()
    for f in frames:
        t = time.perf_counter_ns()
        prepared = runtime.preprocess([f])
        runtime.postprocess(runtime.run(prepared), prepared)
        lat.append(time.perf_counter_ns() - t)
    return lat, time.perf_counter_ns() - t0


def open_model(work: Path, threads: int, backend: str, device: str):
    from deploy.runtimes import open_runtime
    from perception.models import build_detector

    model = build_detector("ssdlite320_mobilenet_v3_large")
    if backend == "pytorch":  # e.g. on a GPU machine, where the model is fast and overhead shows most
        return open_runtime(model, device=device, threads=threads)
    from deploy.export import export_onnx

    onnx_path = work / "ssdlite320.onnx"
    export_onnx(model, onnx_path)
    return open_runtime(onnx_path, device=device, threads=threads)


def measure(rounds: int, frames_per_block: int, threads: int, backend: str = "onnxruntime",
            device: str = "cpu") -> dict:
    frames = make_frames(frames_per_block)
    with tempfile.TemporaryDirectory() as tmp, open_model(Path(tmp), threads, backend, device) as runtime:
        bare_block(runtime, frames[: min(10, len(frames))])  # warm-up: allocations, thread pools
        lat: dict[str, list[int]] = {"harness": [], "bare": []}
        walls: dict[str, list[int]] = {"harness": [], "bare": []}
        paired: list[float] = []  # per round: harness block p50 / bare block p50 (same minute, same drift)
        for r in range(rounds):
            order = ("harness", "bare") if r % 2 == 0 else ("bare", "harness")  # A B, B A, ...
            medians = {}
            for name in order:
                block_lat, wall = (harness_block if name == "harness" else bare_block)(runtime, frames)
                lat[name] += block_lat
                walls[name].append(wall)
                medians[name] = float(np.median(block_lat))
            paired.append(medians["harness"] / medians["bare"])
        info = runtime.info
    null_frames = make_frames(1) * 2000
    _, null_wall = harness_block(NullRuntime(), null_frames)
    p = {k: {q: float(np.percentile(np.array(v) / 1e6, q)) for q in (50, 90, 99)} for k, v in lat.items()}
    fps = {k: len(frames) * len(v) / (sum(v) / 1e9) for k, v in walls.items()}
    return {
        "rounds": rounds, "frames_per_block": frames_per_block, "threads": threads,
        "runtime": {"backend": info.backend, "device": info.device, "version": info.version},
        "backend": backend,
        "latency_ms": p,
        "p50_overhead": float(np.median(paired)) - 1,  # median over rounds of the paired p50 ratio
        "pooled_p50_overhead": p["harness"][50] / p["bare"][50] - 1,
        "paired_p50_ratios": paired,
        "p99_overhead": p["harness"][99] / p["bare"][99] - 1,
        "throughput_fps": fps,
        "throughput_overhead": fps["bare"] / fps["harness"] - 1,
        "bookkeeping_us_per_frame": null_wall / len(null_frames) / 1e3,
        "machine": machine_line(),
    }


def markdown(res: dict) -> str:
    p, fps = res["latency_ms"], res["throughput_fps"]
    ok = "within" if res["p50_overhead"] <= TARGET else "**over**"
    return "\n".join([
        "## validate_overhead: harness vs bare loop",
        "",
        f"SSDlite320 on {res['runtime']['backend']} {res['runtime']['version']} ({res['runtime']['device']}), "
        f"{res['rounds']} alternating rounds × {res['frames_per_block']} frames of 640×384 per side; "
        f"{res['machine']}.",
        "",
        "| loop | p50 ms | p90 ms | p99 ms | throughput fps |",
        "|---|---:|---:|---:|---:|",
        f"| bare `preprocess→run→postprocess` | {p['bare'][50]:.2f} | {p['bare'][90]:.2f} | {p['bare'][99]:.2f} "
        f"| {fps['bare']:.1f} |",
        f"| `avprune validate` harness (throughput mode) | {p['harness'][50]:.2f} | {p['harness'][90]:.2f} "
        f"| {p['harness'][99]:.2f} | {fps['harness']:.1f} |",
        "",
        f"p50 overhead **{100 * res['p50_overhead']:+.2f}%** ({ok} the 2% bound; median over rounds of the paired "
        f"block p50 ratio, pooled {100 * res['pooled_p50_overhead']:+.2f}%); p99 {100 * res['p99_overhead']:+.2f}%; "
        f"throughput {100 * res['throughput_overhead']:+.2f}%. The harness's own bookkeeping, measured with a runtime "
        f"that does nothing: {res['bookkeeping_us_per_frame']:.1f} µs per frame.",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run (4 rounds × 8 frames); not for RESULTS.md")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--frames", type=int, default=40, help="frames per block")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", choices=("onnxruntime", "pytorch"), default="onnxruntime")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (pytorch backend, or onnxruntime-gpu)")
    ap.add_argument("--json-out", type=Path, help="also write the raw numbers here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rounds, frames = (4, 8) if args.quick else (args.rounds, args.frames)
    res = measure(rounds, frames, args.threads, args.backend, args.device)
    if args.json_out:
        atomic_write_json(args.json_out, res)
    md = markdown(res)
    print(md)
    if not args.quick:
        atomic_write_json(ASSETS / "validate_overhead.json", res)
        write_section("validate_overhead", md + "\n\nRaw numbers: `benchmarks/results/validate_overhead.json`.")
    else:
        log.info("--quick: RESULTS.md left alone")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
