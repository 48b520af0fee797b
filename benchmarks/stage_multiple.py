"""Benchmark: which channel multiple each stage of SSDlite320 should take on ONNX Runtime CPU (issue #12).

    python -m benchmarks.stage_multiple           # dense + 6 cuts, 20 paired blocks of 8 runs
    python -m benchmarks.stage_multiple --quick   # smoke run (3 blocks); no RESULTS.md

The uniform aligned cut (every channel group at 50%, kept counts multiples of 16) leaves the early
high-resolution stages wider than half: MobileNetV3's stem group has 16 channels, one block of
ORT's NCHWc16 layout (AVX-512), and cannot lose a group; 72 -> 48 and 40 -> 32 round up. A finer
multiple there (8) would cut 16 -> 8, 72 -> 40 and 40 -> 24, fewer MACs where the maps are largest.
Whether that buys time is a property of the runtime, so this benchmark times such cuts, by stage
and by multiple, side by side: the answer says whether an allocation should go finer than the
runtime's block at the early stages (issue #12's last untried allocation lever).

A cut is written ``STAGE@MULTIPLE[+STAGE@MULTIPLE...]`` with STAGE one of ``all``, ``early``,
``late``; a later part overrides an earlier one on its stage, and a stage no part names stays
dense (``all@16+early@8``: every group at 16, the early ones at 8; ``early@8``: only the early ones).
Stages come from the traced graph, not from layer names: a channel group is *early* when its root
layer's output map is at stride <= ``--early-stride`` (default 8) of the input (a squeeze-excitation
conv, whose map is 1x1, takes the stride of the layer before it).

Each cut: :class:`pruning.Pruner` with L2 magnitude (the job's default importance), the detector
default layer filter (class/box output convs kept), per-group kept counts from
:func:`pruning.granularity.kept_channels` at ``--ratio`` and the stage's multiple, finalized (channels
physically removed). Timing: deploy's ONNX Runtime runtime on the exported core (2 threads), every
model interleaved in paired blocks (:func:`deploy.timing.time_runtimes`), speed-up against dense
with its bootstrap 95% interval; MACs by ``torch.utils.flop_counter``. Weights are random with
calibrated BatchNorm (:func:`benchmarks.depth.build_model`): latency depends on shapes only.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from benchmarks._results import ASSETS, machine_line, publish

log = logging.getLogger("benchmarks.stage_multiple")
STAGES = ("all", "early", "late")
CUTS = "all@16,all@8,all@16+early@8,early@16,early@8,late@16"
THREADS = 2


def parse_cut(spec: str) -> tuple[tuple[str, int], ...]:
    """``"all@16+early@8"`` -> ``(("all", 16), ("early", 8))``; ValueError naming the fix otherwise."""
    parts = []
    for part in spec.split("+"):
        stage, sep, mult = part.strip().partition("@")
        if not sep or stage not in STAGES or not mult.isdigit() or int(mult) < 1:
            raise ValueError(f"cut {spec!r}: write STAGE@MULTIPLE[+STAGE@MULTIPLE...] with STAGE one of "
                             f"{', '.join(STAGES)} and a positive multiple, e.g. all@16+early@8")
        parts.append((stage, int(mult)))
    return tuple(parts)


def multiple_for(cut: tuple[tuple[str, int], ...], early: bool) -> int | None:
    """The multiple a group of that stage takes under ``cut`` (the last part naming it), None: not cut."""
    chosen = None
    for stage, mult in cut:
        if stage == "all" or (stage == "early") == early:
            chosen = mult
    return chosen


def root_strides(model: Any, roots: list[str], size: int) -> dict[str, int]:
    """Each root layer's output stride (input side / output map side), from one traced forward.

    A layer with a 1x1 output after larger maps (a squeeze-excitation conv on pooled features)
    takes the stride of the layer run before it: it belongs to the stage it gates, and costs
    nothing at its own 1x1 map.
    """
    import torch

    from pruning.filters import detector_core_forward

    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    order: list[tuple[str, int]] = []
    handles = [m.register_forward_hook(
        lambda _m, _i, out, n=n: order.append((n, int(out.shape[-1]) if out.dim() == 4 else 1))) for n, m in convs]
    try:
        with torch.no_grad():
            detector_core_forward(model.eval(), torch.zeros(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()
    side: dict[str, int] = {}
    last = size
    for name, s in order:
        side.setdefault(name, s if s > 1 else last)
        last = side[name]
    return {r: max(1, size // side[r]) for r in roots}


def cut_model(dense: Any, cut: tuple[tuple[str, int], ...], ratio: float, early_stride: int,
              size: int) -> tuple[Any, dict[str, tuple[int, int, int]]]:
    """``dense`` (copied) pruned per ``cut`` and finalized; per group (stride, dense, kept) channels."""
    import copy

    import torch

    from pruning import Pruner
    from pruning.controllers import FixedController
    from pruning.filters import detector_default_filter
    from pruning.granularity import kept_channels
    from pruning.groups import Coupling

    model = copy.deepcopy(dense).eval()
    example = torch.zeros(1, 3, size, size)
    # multiple 1 in the pruner: the counts below are already aligned, per stage
    probe = Pruner(model, importance="magnitude", granularity="channel", controller=FixedController(0.0),
                   example_inputs=example, layer_filter=detector_default_filter(model), channel_multiple=1)
    strides = root_strides(model, [g.root for g in probe.groups], size)
    counts: dict[str, tuple[int, int, int]] = {}
    for g in probe.groups:
        mult = multiple_for(cut, strides[g.root] <= early_stride)
        counts[g.root] = (strides[g.root], g.size, g.size if mult is None else kept_channels(g.size, ratio, mult))
    pruner = Pruner(model, importance="magnitude", granularity="channel",
                    controller=FixedController({r: 1 - k / n for r, (_, n, k) in counts.items()}),
                    example_inputs=example, layer_filter=detector_default_filter(model), channel_multiple=1,
                    coupling=Coupling(probe.groups, probe.skipped))
    pruner.update()
    return pruner.finalize().eval(), counts


def run(cuts: list[str], ratio: float, early_stride: int, blocks: int, work: Path) -> dict[str, Any]:
    import torch

    from benchmarks.depth import SIZE, build_model, macs
    from deploy.export import export_onnx
    from deploy.runtimes import open_runtime
    from deploy.timing import time_runtimes

    t0 = time.perf_counter()
    dense = build_model()
    models: dict[str, Any] = {"dense": dense}
    counts: dict[str, dict[str, tuple[int, int, int]]] = {}
    for spec in cuts:
        models[spec], counts[spec] = cut_model(dense, parse_cut(spec), ratio, early_stride, SIZE)
    with contextlib.ExitStack() as stack:  # every runtime opened is closed, whatever fails
        runtimes = {name: stack.enter_context(open_runtime(
            export_onnx(m, work / f"{i}.onnx", form="core", exporter="legacy").path, threads=THREADS))
            for i, (name, m) in enumerate(models.items())}
        frames = [(torch.rand(SIZE, SIZE, 3) * 255).to(torch.uint8).numpy() for _ in range(8)]
        torch.set_num_threads(THREADS)
        timing = time_runtimes(runtimes, frames, end_to_end=False, reference="dense", blocks=blocks, block_size=8)
    mac_count = {name: macs(m) for name, m in models.items()}  # counted once per model
    rows = []
    for name, m in models.items():
        r = timing.ratios.get(name)
        c = counts.get(name, {})
        rows.append({
            "cut": name, "macs_m": mac_count[name] / 1e6, "mac_ratio": mac_count["dense"] / mac_count[name],
            "params_m": sum(p.numel() for p in m.parameters()) / 1e6,
            "graph_p50_ms": timing.summaries[name].p50_ms,
            "speedup": 1.0 if r is None else r.ratio, "speedup_ci": None if r is None else [r.low, r.high],
            "early_channels": {k: [n, kept] for k, (s, n, kept) in c.items() if s <= early_stride},
            "groups_cut": sum(kept < n for _, n, kept in c.values()),
        })
    return {"machine": machine_line(), "ratio": ratio, "early_stride": early_stride, "blocks": blocks,
            "threads": THREADS, "input": SIZE, "rows": rows, "seconds": time.perf_counter() - t0}


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "## stage_multiple: which channel multiple each stage should take (SSDlite320 core, ORT CPU)",
        "",
        f"`python -m benchmarks.stage_multiple` on {res['machine']}. Every cut removes {res['ratio']:.0%} of "
        f"the named stages' channel groups (L2 magnitude, kept counts rounded up to the stage's multiple, "
        f"finalized); *early* = root layer's output at stride <= {res['early_stride']} (read from the graph). "
        f"ORT CPU, {res['threads']} threads, graph only, {res['input']}x{res['input']}; all models interleaved in "
        f"{res['blocks']} paired blocks of 8 runs, speed-up vs dense with its bootstrap 95% interval. Random "
        f"weights, calibrated BatchNorm (latency depends on shapes only). Wall time {res['seconds'] / 60:.1f} min.",
        "",
        "| cut | groups cut | MACs M | MAC ratio | params M | graph ms | graph speed-up [95% CI] |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        ci = "" if r["speedup_ci"] is None else f" [{r['speedup_ci'][0]:.2f}, {r['speedup_ci'][1]:.2f}]"
        lines.append(f"| {r['cut']} | {r['groups_cut']} | {r['macs_m']:.0f} | {r['mac_ratio']:.2f}x | "
                     f"{r['params_m']:.2f} | {r['graph_p50_ms']:.2f} | {r['speedup']:.2f}x{ci} |")
    early = {r["cut"]: r["early_channels"] for r in res["rows"] if r["early_channels"]}
    if early:
        lines += ["", "Early groups (dense -> kept channels) per cut:", ""]
        lines += [f"- `{cut}`: " + ", ".join(f"{k.replace('backbone.features.', '')} {n}->{kept}"
                                             for k, (n, kept) in sorted(ch.items())) for cut, ch in early.items()]
    lines += ["", "Raw numbers: `benchmarks/results/stage_multiple.json`."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (2 cuts, 3 blocks); writes no RESULTS.md")
    ap.add_argument("--cuts", default=CUTS, help=f"comma-separated STAGE@MULTIPLE[+...] cuts (default {CUTS})")
    ap.add_argument("--ratio", type=float, default=0.5, help="share of each named stage's channels removed (0, 0.9)")
    ap.add_argument("--early-stride", type=int, default=8, help="a group is early at output stride <= this (default 8)")
    ap.add_argument("--blocks", type=int, default=20, help="paired timing blocks of 8 runs each (default 20)")
    args = ap.parse_args(argv)
    try:
        cuts = [c.strip() for c in args.cuts.split(",") if c.strip()]
        for c in cuts:
            parse_cut(c)
    except ValueError as e:
        raise SystemExit(f"--cuts: {e}") from None
    if not cuts:
        raise SystemExit(f"--cuts {args.cuts!r}: give at least one cut, e.g. all@16,all@16+early@8")
    if not 0 < args.ratio < 0.9:
        raise SystemExit(f"--ratio {args.ratio}: give a share in (0, 0.9), e.g. 0.5")
    if args.early_stride < 1 or args.blocks < 2:
        raise SystemExit("--early-stride must be >= 1 and --blocks >= 2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("torch.onnx", "deploy.export"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.quick:
        cuts, args.blocks = cuts[:2], 3
    import tempfile

    with tempfile.TemporaryDirectory(prefix="stage-multiple-") as d:
        res = run(cuts, args.ratio, args.early_stride, args.blocks, Path(d))
    from perception.io import atomic_write_json

    ASSETS.mkdir(parents=True, exist_ok=True)
    name = "stage_multiple_quick" if args.quick else "stage_multiple"
    atomic_write_json(ASSETS / f"{name}.json", res)
    publish("stage_multiple", markdown(res), quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
