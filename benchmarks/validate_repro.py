"""Reproducibility of ``avprune validate``'s paired speed-up (issue #13: three back-to-back runs within
+/- 5% of their median).

    python -m benchmarks.validate_repro [--runs 3] [--candidate runs/demo/engine/pruned.onnx]
                                        [--reference runs/demo/engine/dense.onnx]
                                        [--stream runs/demo/data/drives/drive_000/drive.mp4] [--quick]

Runs the CLI as a user would (a fresh process each time, the demo's models and drive by default:
``make demo`` makes them), reads each run's ``report.json`` (``paired.speedup`` and its interval)
and writes the spread to RESULTS.md and ``benchmarks/results/validate_repro.json``. ``--quick``
(the smoke run): an untrained SSDlite320 exported twice and a 2-second clip, two runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._results import ASSETS, machine_line, write_section
from perception.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "runs" / "demo"
TARGET = 0.05  # every run's ratio within +/- 5% of the median


def _load() -> list[float]:
    return [float(x) for x in os.getloadavg()]


def run(candidate: Path, reference: Path, stream: Path, runs: int, budget_ms: float) -> dict:
    for p in (candidate, reference, stream):
        if not p.exists():
            raise SystemExit(f"{p} does not exist: run `make demo` first, or pass --candidate/--reference/--stream")
    rows = []
    with tempfile.TemporaryDirectory(prefix="validate_repro") as tmp:
        for i in range(runs):
            report = Path(tmp) / f"run{i}"
            cmd = [sys.executable, "-m", "avprune", "validate", str(candidate), str(reference), "--stream", str(stream),
                   "--budget-ms", str(budget_ms), "--report", str(report)]
            load = _load()
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode not in (0, 1):  # 1: the budget was violated, the run still reports
                raise SystemExit(f"avprune validate failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
            paired = json.loads((report / "report.json").read_text())["paired"]
            rows.append({"run": i, "speedup": paired["speedup"], "low": paired["speedup_low"],
                         "high": paired["speedup_high"], "blocks": paired["blocks"], "wall_s": wall,
                         "load_avg_before": load, "exit_code": proc.returncode})
    ratios = sorted(r["speedup"] for r in rows)
    median = ratios[len(ratios) // 2] if len(ratios) % 2 else 0.5 * (ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2])
    worst = max(abs(r / median - 1.0) for r in ratios)
    return {"candidate": str(candidate), "reference": str(reference), "stream": str(stream), "runs": rows,
            "median": median, "max_rel_dev": worst, "target": TARGET, "met": worst <= TARGET,
            "machine": machine_line()}


def _markdown(rec: dict) -> str:
    lines = [
        "## validate_repro: three back-to-back `avprune validate` runs, paired speed-up",
        "",
        rec["machine"],
        "",
        f"`avprune validate {Path(rec['candidate']).name} {Path(rec['reference']).name} --stream "
        f"{Path(rec['stream']).name}` (the demo's models and drive), each a fresh process; the speed-up is "
        "the paired one the report gives (models interleaved on the same frames, bootstrap 95% interval).",
        "",
        "| run | speed-up | 95% CI | paired blocks | wall s | load avg before |",
        "|---:|---:|---|---:|---:|---|",
    ]
    for r in rec["runs"]:
        lines.append(f"| {r['run'] + 1} | {r['speedup']:.3f}x | [{r['low']:.3f}, {r['high']:.3f}] | {r['blocks']} | "
                     f"{r['wall_s']:.0f} | {', '.join(f'{v:.2f}' for v in r['load_avg_before'])} |")
    lines += ["", f"Median {rec['median']:.3f}x; the farthest run is **{100 * rec['max_rel_dev']:.1f}%** from it "
              f"(target <= {100 * rec['target']:.0f}%): **{'met' if rec['met'] else 'NOT met'}**."]
    return "\n".join(lines) + "\n"


def _quick_assets(folder: Path) -> tuple[Path, Path, Path]:
    """Two exports of one untrained SSDlite320 and a 2 s 640x384 clip (smoke run: no demo needed)."""
    import cv2
    import numpy as np
    import torch

    from deploy.export import export_onnx
    from perception.models import build_detector

    torch.manual_seed(0)
    model = build_detector("ssdlite320_mobilenet_v3_large", num_classes=8).eval()
    a = Path(export_onnx(model, folder / "pruned.onnx", form="core", exporter="legacy").path)
    b = Path(export_onnx(model, folder / "dense.onnx", form="core", exporter="legacy").path)
    clip = folder / "clip.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (640, 384))
    rng = np.random.default_rng(0)
    for _ in range(20):
        writer.write(rng.integers(0, 255, (384, 640, 3), dtype=np.uint8))
    writer.release()
    return a, b, clip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--candidate", type=Path, default=DEMO / "engine" / "pruned.onnx")
    ap.add_argument("--reference", type=Path, default=DEMO / "engine" / "dense.onnx")
    ap.add_argument("--stream", type=Path, default=DEMO / "data" / "drives" / "drive_000" / "drive.mp4")
    ap.add_argument("--budget-ms", type=float, default=33.3)
    ap.add_argument("--quick", action="store_true", help="smoke run on an untrained model and a 2 s clip, 2 runs")
    a = ap.parse_args(argv)
    if a.runs < 2:
        raise SystemExit(f"--runs must be >= 2 to measure a spread; got {a.runs}")
    if a.quick:
        with tempfile.TemporaryDirectory(prefix="validate_repro_quick") as tmp:
            rec = run(*_quick_assets(Path(tmp)), runs=2, budget_ms=a.budget_ms)
    else:
        rec = run(a.candidate, a.reference, a.stream, a.runs, a.budget_ms)
    atomic_write_json(ASSETS / "validate_repro.json", rec)
    write_section("validate_repro", _markdown(rec))
    print(_markdown(rec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
