"""Benchmark: dense vs pruned vs pruned-INT8 on ONNX Runtime (CPU), latency and mAP side by side.

    python -m benchmarks.engine                    # trained checkpoint from train_default
    python -m benchmarks.engine --pruned PATH      # a channel-pruned (fine-tuned) checkpoint
    python -m benchmarks.engine --quick            # smoke run (~2 minutes on 2 busy cores)

Each model is exported (core form), verified against PyTorch, built into an ONNX Runtime engine
with ``deploy.engine.build.build_engine`` (INT8: static QDQ calibrated on training frames), then
timed with ``deploy.timing.measure_latency`` (intra-op threads fixed, batch 1, end to end and
graph only) and scored with ``perception.evaluate.evaluate`` on the val split, all in one run.
Without ``--pruned`` the pruned model is Torch-Pruning one-shot 50% (L2 magnitude, backbone only,
round_to 8) with NO fine-tuning: its mAP shows the damage pruning does before recovery.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path
from typing import Any

from benchmarks._results import ASSETS, machine_line, write_section
from perception.io import atomic_write_json

log = logging.getLogger("benchmarks.engine")
WORK = Path(__file__).with_name("_work")


def _first(*paths: Path) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def _data(args: argparse.Namespace) -> Path:
    if args.data:
        return Path(args.data) / "coco" if (Path(args.data) / "coco").is_dir() else Path(args.data)
    for d in (WORK / "synth" / "coco", WORK / "synth_quick" / "coco"):
        if (d / "annotations" / "instances_val.json").is_file():
            return d
    from perception.synthetic.generate import generate_dataset

    out = WORK / "synth_quick"
    generate_dataset(out, images=120, drives=0, seed=0)
    return out / "coco"


def one_shot_prune(model: Any, ratio: float = 0.5) -> Any:
    """Torch-Pruning MetaPruner, L2 magnitude, ``ratio`` of the backbone channels, heads kept."""
    import torch
    import torch_pruning as tp

    from deploy.core_graph import CoreModule, model_meta

    meta = model_meta(model)
    core = CoreModule(model, meta)
    ignored = [model.backbone.fpn, model.rpn.head] if meta.family == "faster_rcnn" else [model.head]
    pruner = tp.pruner.MetaPruner(
        core, torch.randn(1, 3, *meta.image_size), importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio, ignored_layers=ignored, round_to=8,
    )
    pruner.step()
    return model.eval()


def _measure(name: str, engine: Path, val: Any, args: argparse.Namespace) -> dict[str, Any]:
    from deploy.runtimes import open_runtime
    from deploy.timing import measure_latency
    from perception.evaluate import evaluate

    frames = [val.load_image(i) for i in range(min(8, len(val)))]
    with open_runtime(engine, threads=args.threads) as rt:
        e2e = measure_latency(rt, frames, warmup=3, iters=args.iters)
        graph = measure_latency(rt, frames, warmup=3, iters=args.iters, end_to_end=False)
        metrics = evaluate(rt.infer, val, max_images=args.max_images)
    return {"name": name, "engine": str(engine), "e2e": e2e.to_dict(), "graph": graph.to_dict(),
            "map": metrics.map, "map50": metrics.map50}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", type=Path, default=None, help="dense checkpoint (default: train_default's)")
    p.add_argument("--pruned", type=Path, default=None, help="channel-pruned checkpoint (default: one-shot 50%%)")
    p.add_argument("--data", default=None, help="COCO root (default: benchmarks/_work synthetic data)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: few images and iterations")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.iters = args.iters or (10 if args.quick else 100)
    args.max_images = args.max_images or (8 if args.quick else None)

    import torch

    from deploy.engine.build import build_engine
    from deploy.export import export_onnx
    from deploy.verify import verify_export
    from perception.data import load_split
    from perception.models import build_detector, count_parameters, load_detector, save_checkpoint

    torch.manual_seed(0)
    root = _data(args)
    val = load_split(root, "val", train=False)
    work = WORK / "engine"
    work.mkdir(parents=True, exist_ok=True)
    dense_ckpt = args.dense or _first(WORK / "train_default" / "model.pt", WORK / "train_default_quick" / "model.pt")
    notes = []
    if dense_ckpt is None:
        dense = build_detector("ssdlite320_mobilenet_v3_large").eval()
        notes.append("no trained checkpoint found (run benchmarks.train_default first): the dense model is UNTRAINED, mAP is meaningless")
    else:
        dense = load_detector(dense_ckpt).eval()
    if args.pruned:
        pruned = load_detector(args.pruned).eval()
        pruned_how = f"channel-pruned checkpoint {args.pruned}"
    else:
        pruned = one_shot_prune(load_detector(dense_ckpt) if dense_ckpt else build_detector("ssdlite320_mobilenet_v3_large"))
        save_checkpoint(work / "pruned_oneshot.pt", pruned)
        pruned_how = "Torch-Pruning one-shot 50% of backbone channels, NO fine-tuning"
    t0 = time.perf_counter()
    rows = []
    for name, model in (("dense", dense), ("pruned", pruned)):
        exp = export_onnx(model, work / f"{name}.onnx", form="core", exporter="legacy")
        rep = verify_export(model, exp.path, val, frames=4, max_images=args.max_images, threads=args.threads)
        eng = build_engine(exp.path, work / f"{name}.fp32.onnx", threads=args.threads)
        row = _measure(name, eng.engine_path, val, args)
        row.update(params=count_parameters(model), verify_map_delta=rep.map_delta)
        rows.append(row)
        if name == "pruned":
            q = build_engine(exp.path, work / "pruned.int8.onnx", precision="int8", calib=root,
                             calib_frames=16 if args.quick else 64, threads=args.threads)
            row8 = _measure("pruned INT8", q.engine_path, val, args)
            row8.update(params=row["params"], verify_map_delta=None)
            rows.append(row8)
    payload = {"rows": rows, "pruned_how": pruned_how, "dense_checkpoint": str(dense_ckpt), "notes": notes,
               "threads": args.threads, "quick": args.quick, "machine": machine_line(),
               "seconds": round(time.perf_counter() - t0, 1)}
    ASSETS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(ASSETS / "engine.json", payload)
    base = rows[0]

    def f(v: float | None, spec: str = ".3f") -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    lines = [
        f"## engine{' (--quick smoke run)' if args.quick else ''}",
        "",
        f"ONNX Runtime CPU, {args.threads} intra-op threads, batch 1, {args.iters} timed calls after warm-up; "
        f"mAP on {val.ann_file.parent.parent.name}/val ({args.max_images or len(val)} images). "
        f"Machine: {machine_line()}.",
        f"Dense: {dense_ckpt or 'untrained'}; pruned: {pruned_how}.",
        "",
        "| model | params (M) | e2e p50 ms | e2e p99 ms | graph p50 ms | speed-up (graph p50) | mAP | AP50 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.2f} | {f(r['e2e']['p50_ms'], '.1f')} | {f(r['e2e']['p99_ms'], '.1f')} | "
            f"{f(r['graph']['p50_ms'], '.1f')} | {base['graph']['p50_ms'] / r['graph']['p50_ms']:.2f}x | "
            f"{f(r['map'])} | {f(r['map50'])} |"
        )
    lines += ["", "e2e = preprocess + graph + post-processing (decode + NMS); graph = ONNX Runtime session only. "
              "Each export passed verify_export (outputs, detections, |ΔmAP| <= 0.002) before timing."]
    lines += [f"\n**Note:** {n}" for n in notes]
    write_section("engine", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
