"""Benchmark: HALP-style latency table vs measured ONNX Runtime latency of pruned SSDlite320 cores.

    python -m benchmarks.latency_model            # full grid, 10 random channel configurations
    python -m benchmarks.latency_model --quick    # a smoke run (coarse grid, 3 configurations)

The model is SSDlite320's NMS-free core (backbone + heads, 1x3x320x320), the part pruning
changes and the part deployed engines run. Per-layer entries are measured by exporting each
Conv2d *alone* (legacy exporter, opset 17) and timing it in ONNX Runtime on the CPU (2 intra-op
threads, median of repeated runs), on a grid of in/out channel fractions; the table interpolates
between grid points. Per layer rather than per block because layers are what channel pruning
resizes independently (a block's inner width and its output width move separately), and because
a one-layer graph is what ORT fuses anyway (Conv+BN are folded at export; activations fuse into
the Conv node when ORT supports it). What a single conv does not capture (residual adds, SE
multiplies, hardswish, concat/reshape of head outputs, session overhead) is one constant,
calibrated (scale and overhead) on the dense core and one half-width core. Ground truth: each configuration is applied
with the Pruner (random per-group sparsity in [0, 0.75], magnitude importance), physically pruned
with ``finalize()``, exported whole, and timed in ORT; all sessions are timed round robin so load
drift hits every configuration alike.
"""

from __future__ import annotations

import argparse
import copy
import io
import logging
import random
import statistics
import time
from typing import Any

import torch
from torch import nn

from benchmarks._results import ASSETS, machine_line, write_section

log = logging.getLogger("benchmarks.latency_model")
SIZE = 320
TARGET_MAE_PCT = 10.0


def time_round_robin(sessions: list[tuple[Any, dict[str, Any]]], rounds: int, warmup: int = 3) -> list[float]:
    """Median ms per session, running every session once per round (drift hits all alike)."""
    times: list[list[float]] = [[] for _ in sessions]
    for r in range(warmup + rounds):
        for i, (sess, feed) in enumerate(sessions):
            t = time.perf_counter()
            sess.run(None, feed)
            if r >= warmup:
                times[i].append((time.perf_counter() - t) * 1e3)
    return [statistics.median(t) for t in times]


def run(n_configs: int, fractions: tuple[float, ...], layer_repeats: int, model_rounds: int, threads: int,
        seed: int = 0) -> dict[str, Any]:
    from deploy.runtimes.ort_session import layer_measure_fn, module_session
    from perception.models import build_detector
    from pruning import LatencyTable, Pruner
    from pruning.controllers import FixedController
    from pruning.filters import DetectorCore
    from pruning.groups import Coupling

    torch.manual_seed(seed)
    det = build_detector("ssdlite320_mobilenet_v3_large").eval()
    with torch.no_grad():  # non-degenerate BN so magnitude/BN folding look like a trained model
        for m in det.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
    shape = (1, 3, SIZE, SIZE)
    x = torch.randn(shape)
    t0 = time.perf_counter()
    table = LatencyTable.measure(DetectorCore(det), x, layer_measure_fn(threads=threads, repeats=layer_repeats), runtime="onnxruntime-cpu",
                                 device=machine_line(), fractions=fractions)
    table_s = time.perf_counter() - t0
    log.info("table: %d layers, %d entries, %.0f s", len(table.layers), len(table.entries), table_s)

    probe = Pruner(copy.deepcopy(det), granularity="channel", example_inputs=x, controller=FixedController(0.0))
    coupling = Coupling(groups=probe.groups, skipped=probe.skipped)
    rng = random.Random(seed)
    # Calibration reference: every unit thinned by half. It is not one of the random test
    # configurations, so the error below is out of sample.
    ref = copy.deepcopy(det)
    ref_pruner = Pruner(ref, granularity="channel", example_inputs=x, controller=FixedController(0.5), coupling=coupling)
    ref_pruner.update()
    ref_config = ref_pruner.channel_config()
    configs, channel_configs = [], []
    sessions = [module_session(DetectorCore(m), shape, threads=threads) for m in (det, ref_pruner.finalize())]
    for i in range(n_configs):
        model = copy.deepcopy(det)
        ctrl = FixedController({u: rng.uniform(0.0, 0.75) for u in probe.units})
        pruner = Pruner(model, granularity="channel", example_inputs=x, controller=ctrl, coupling=coupling)
        pruner.update()
        # DetectorCore(det) keeps the detector's module names (backbone.*, head.*), so configs line up.
        channel_configs.append(pruner.channel_config())
        plain = pruner.finalize()
        sessions.append(module_session(DetectorCore(plain), shape, threads=threads))
        params = sum(p.numel() for p in DetectorCore(plain).parameters())
        configs.append({"config": i, "masked_fraction": pruner.masked_fraction(), "params_m": params / 1e6})
    # Dense, reference and test cores are timed in the same round robin; dense + reference fit the
    # table's scale and constant overhead, so calibration and ground truth share one load window.
    measured = time_round_robin(sessions, model_rounds)
    dense_ms, ref_ms = measured[0], measured[1]
    table.calibrate_points([({}, dense_ms), (ref_config, ref_ms)])
    log.info("calibration: scale %.3f, overhead %.2f ms (dense %.2f ms, half-width %.2f ms)",
             table.scale, table.overhead_ms, dense_ms, ref_ms)
    for c, cfg, m in zip(configs, channel_configs, measured[2:], strict=True):
        c["predicted_ms"] = table.predict(cfg)
        c["measured_ms"] = m
        c["error_pct"] = 100.0 * (c["predicted_ms"] - m) / m
    mae = statistics.fmean(abs(c["error_pct"]) for c in configs)
    return {"dense_ms": dense_ms, "ref_ms": ref_ms, "scale": table.scale, "overhead_ms": table.overhead_ms, "table_s": table_s, "entries": len(table.entries),
            "layers": len(table.layers), "configs": configs, "mae_pct": mae, "table": table}


def _scatter(res: dict[str, Any], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from perception.io import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    meas = [c["measured_ms"] for c in res["configs"]]
    pred = [c["predicted_ms"] for c in res["configs"]]
    ax.scatter(meas, pred, s=18)
    lo, hi = min(meas + pred) * 0.9, max(meas + pred) * 1.1
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], alpha=0.12, label="±10%")
    ax.set_xlabel("measured ORT latency (ms)")
    ax.set_ylabel("predicted (ms)")
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def markdown(res: dict[str, Any], quick: bool, threads: int) -> str:
    lines = [
        "## Latency model (per-layer table vs ONNX Runtime, SSDlite320 core)",
        "",
        f"{'**Smoke run (--quick)**: ' if quick else ''}onnxruntime CPU, {threads} intra-op threads, input 1x3x320x320. "
        f"Table: {res['layers']} layers, {res['entries']} measured entries ({res['table_s']:.0f} s); "
        f"dense core {res['dense_ms']:.2f} ms; calibrated on the dense core and one half-width core "
        f"({res['ref_ms']:.2f} ms): latency = {res['scale']:.3f} x sum(layers) + {res['overhead_ms']:.2f} ms. "
        "The 10 test configurations below are out of sample.",
        f"Machine: {machine_line()}.",
        "",
        "| config | masked fraction | params (M) | predicted (ms) | measured (ms) | error |",
        "|---|---|---|---|---|---|",
    ]
    for c in res["configs"]:
        lines.append(f"| {c['config']} | {c['masked_fraction']:.2f} | {c['params_m']:.2f} | {c['predicted_ms']:.2f} | "
                     f"{c['measured_ms']:.2f} | {c['error_pct']:+.1f}% |")
    ok = res["mae_pct"] <= TARGET_MAE_PCT
    lines += ["", f"Mean absolute error: **{res['mae_pct']:.1f}%** (target <= {TARGET_MAE_PCT:.0f}%: "
              f"**{'met' if ok else 'NOT met'}**).", "", "![predicted vs measured](results/latency_model.png)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: coarse grid, 3 configurations")
    ap.add_argument("--configs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    if args.quick:
        res = run(3, (0.5, 1.0), layer_repeats=5, model_rounds=10, threads=args.threads)
    else:
        res = run(args.configs, (0.25, 0.5, 0.75, 1.0), layer_repeats=30, model_rounds=50, threads=args.threads)
    ASSETS.mkdir(parents=True, exist_ok=True)
    from perception.io import atomic_write_json

    atomic_write_json(ASSETS / "latency_table_ssdlite320_ort_cpu.json", res["table"].to_dict())
    _scatter(res, ASSETS / "latency_model.png")
    atomic_write_json(ASSETS / "latency_model.json", {k: v for k, v in res.items() if k != "table"})
    path = write_section("latency_model", markdown(res, args.quick, args.threads))
    log.info("wrote %s (MAE %.1f%%)", path, res["mae_pct"])


if __name__ == "__main__":
    main()
