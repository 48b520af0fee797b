"""Run every benchmark in its quick (smoke) mode, one after another: ``make bench``.

    python -m benchmarks.run_all                      # all of them, one after another
    python -m benchmarks.run_all --only latency_model,engine
    python -m benchmarks.run_all --list

A smoke run checks that a benchmark still runs end to end; its numbers mean nothing. So every
benchmark here runs with ``AVPRUNE_BENCH_OUT=runs/bench-quick``: its RESULTS.md section and its
results/ files go to ``runs/bench-quick/`` and ``benchmarks/RESULTS.md`` keeps the real runs.
A real measurement is one benchmark at a time without ``--quick`` (``python -m benchmarks.NAME``;
each module's docstring says what it measures and how long it takes).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._results import OUT_ENV

ROOT = Path(__file__).resolve().parents[1]
QUICK_OUT = ROOT / "runs" / "bench-quick"

#: name -> arguments of its smoke run, in RESULTS.md's section order. gpu_check has no --quick:
#: without a CUDA device its --cpu-dry-run runs the PyTorch part on the CPU.
BENCHMARKS: dict[str, tuple[str, ...]] = {
    "train_default": ("--quick",),
    "pruner_overhead": ("--quick",),
    "latency_model": ("--quick",),
    "prune_job": ("--quick",),
    "engine": ("--quick",),
    "gpu_check": ("--cpu-dry-run", "--budget-s", "120"),
    "validate_overhead": ("--quick",),
    "validate_repro": ("--quick",),
    "compare": ("--quick",),
    "allocation": ("--quick",),
    "depth": ("--quick",),
    "oneshot_recovery": ("--quick",),
    "cut_path": ("--quick",),
    "stage_multiple": ("--quick",),
    "reliability": (),  # no quick mode: 23 bad inputs through the CLI, about a minute
}


def run(names: list[str], out: Path = QUICK_OUT) -> list[tuple[str, int, float]]:
    """Run the smoke run of each benchmark in ``names`` in its own process; (name, exit code, seconds)."""
    env = {**os.environ, OUT_ENV: str(out), "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    env.pop("OUT", None)  # gpu_check prefers $OUT (the device machine's folder) over AVPRUNE_BENCH_OUT
    rows = []
    for name in names:
        cmd = [sys.executable, "-m", f"benchmarks.{name}", *BENCHMARKS[name]]
        print(f"[run_all] {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode
        rows.append((name, rc, time.perf_counter() - t0))
        print(f"[run_all] {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {rows[-1][2]:.0f} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    ap.add_argument("--list", action="store_true", help="print the benchmarks and their smoke-run arguments")
    args = ap.parse_args(argv)
    if args.list:
        for name, a in BENCHMARKS.items():
            print(f"{name:18s} python -m benchmarks.{name} {' '.join(a)}")
        return 0
    names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; valid: {', '.join(BENCHMARKS)}")
    rows = run(names)
    failed = [n for n, rc, _ in rows if rc != 0]
    print(f"\n[run_all] {len(rows) - len(failed)}/{len(rows)} smoke runs passed; outputs in {QUICK_OUT}")
    for name, rc, sec in rows:
        print(f"  {name:18s} {'ok' if rc == 0 else f'exit {rc}':8s} {sec:6.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
