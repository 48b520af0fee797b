"""`make demo`: the main job end to end on the embedded default, as a user would run it.

    synthesise drives -> the trained detector (the SSDlite320 checkpoint shipped in
    ``avprune/assets``, or ``--train-minutes N`` to train one from scratch here) -> prune job (Ray,
    >= 1.5x faster graph at <= 1 mAP point drop against the dense checkpoint it starts from; aligned
    channel groups of 16, the allocation controller with uniform allocation, distillation from the
    dense model) -> build the engine (verified export; ONNX Runtime here) -> validate dense and
    pruned on the recorded drive in all three formats -> one summary table

A user comes with a trained detector; the demo does too. The shipped checkpoint is the output of
``python -m benchmarks.train_default`` (SSDlite320, 8 minutes on 2 cores, synthetic drives with
seed 0; val mAP 0.549). The demo synthesises its data with another seed, so no demo image was
seen in that training. Training from scratch within a demo's minutes gives no detector on a slow
2-core machine (3 minutes were 100 steps there, mAP 0.001).

Every stage goes through the ``avprune`` CLI (the same commands the README shows), and every
stage is skipped when its output already exists and is newer than its input, so a demo interrupted
half-way resumes and a stage re-run (or an input replaced) rebuilds what follows it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from avprune.cli import main as avprune_main
from perception.io import atomic_write_text

EXAMPLES = Path(__file__).parent / "config" / "examples"
MCAP_TOPIC = "/camera/front/image/compressed"
SHIPPED_CHECKPOINT = Path(__file__).parent / "assets" / "ssdlite320_synthdrive.pt"
DATA_SEED = 7  # the shipped checkpoint trained on seed 0's images: the demo's are other ones
# Images scored for the shipped checkpoint and for each export's mAP parity, as many as the prune
# job's val images: all 240 took a minute of the demo's ten
VAL_IMAGES = 48


def _stage(title: str, done: bool, fn: Callable[[], int], *, ok_codes: tuple[int, ...] = (0,)) -> float:
    """Run one demo stage through the CLI unless its output exists; returns its wall time."""
    bar = "=" * 8
    if done:
        print(f"\n{bar} {title}: already done, skipped {bar}", flush=True)
        return 0.0
    print(f"\n{bar} {title} {bar}", flush=True)
    t0 = time.perf_counter()
    code = fn()
    if code not in ok_codes:
        raise SystemExit(f"demo: stage '{title}' failed with exit code {code}")
    return time.perf_counter() - t0


def _fresh(outputs: list[Path], inputs: list[Path]) -> bool:
    """Whether a stage is done: every output exists and none is older than any input that exists
    (as make decides). Why: a re-run prune job left the engines built from its previous model in
    place, and the demo validated those."""
    if not all(o.exists() for o in outputs):
        return False
    newest_input = max((i.stat().st_mtime for i in inputs if i.exists()), default=0.0)
    return min(o.stat().st_mtime for o in outputs) >= newest_input


def _write_yaml(path: Path, doc: dict) -> Path:
    atomic_write_text(path, yaml.safe_dump(doc, sort_keys=False))
    return path


def _seconds_per_step(coco: Path, doc: dict) -> float:
    """This machine's seconds per training step of the demo's recipe (a few steps, weights thrown away)."""
    from perception.data import load_split
    from perception.models import build_detector
    from perception.train import TrainSettings, measure_seconds_per_step

    m, t = doc["model"], doc["train"]
    model = build_detector(m["name"], num_classes=m["num_classes"], image_size=tuple(m["image_size"]),
                           ssd_anchor_scales=tuple(m["ssd_anchor_scales"]))
    settings = TrainSettings(steps=4, batch_size=t["batch_size"], optimizer=t["optimizer"], lr=t["lr"], seed=t["seed"])
    return measure_seconds_per_step(model, load_split(coco, "train"), settings, steps=3)


def _use_shipped(train_dir: Path, coco: Path) -> int:
    """Copy the shipped checkpoint to where training would have written it, and score it on the demo's val set."""
    import shutil

    from perception.io import atomic_path

    if not SHIPPED_CHECKPOINT.is_file():
        raise SystemExit(f"demo: the shipped checkpoint {SHIPPED_CHECKPOINT} is missing (a partial clone?); "
                         "pass --train-minutes 8 to train one here instead")
    with atomic_path(train_dir / "model.pt") as tmp:
        shutil.copyfile(SHIPPED_CHECKPOINT, tmp)
    return avprune_main(["eval", str(train_dir / "model.pt"), "--data", str(coco), "--max-images", str(VAL_IMAGES)])


def _train_config(out: Path, minutes: float) -> Path:
    doc = yaml.safe_load((EXAMPLES / "train_default.yaml").read_text())
    doc["data"]["root"] = str(out / "data" / "coco")
    doc["out"] = str(out / "train")
    # The default recipe's shape (warm-up, cosine decay) over the steps this machine makes in the
    # demo's minutes, measured here: a fixed step count stopped by the time limit on a slower
    # machine left the rate high and the model untrained (mAP 0.003 after 145 of 257 steps).
    sps = _seconds_per_step(out / "data" / "coco", doc)
    steps = max(60, int(minutes * 60 / sps))
    print(f"demo: {sps:.2f} s per training step here -> {steps} steps in ~{minutes:g} min", flush=True)
    doc["train"].update(steps=steps, warmup_steps=max(10, steps // 10), checkpoint_every=max(20, steps // 6))
    doc["train"]["time_limit_minutes"] = minutes * 1.5  # a guard only: the steps already fit the minutes
    return _write_yaml(out / "configs" / "train.yaml", doc)


def _prune_config(out: Path) -> Path:
    doc = yaml.safe_load((EXAMPLES / "prune_default.yaml").read_text())
    doc["model"]["checkpoint"] = str(out / "train" / "model.pt")
    doc["data"] = {**{k: v for k, v in doc["data"].items() if k in ("val_images", "train_images", "seed")},
                   "source": "coco", "root": str(out / "data" / "coco")}
    doc["output_dir"] = str(out / "prune")
    # A converged checkpoint restarted at the from-scratch recipe's rate (1e-3) dips ~7 mAP points
    # before it recovers (the prune_job benchmark's dense shadow: 0.549 -> 0.481 at step 50 of 400),
    # more than a 120-step demo can win back; a fine-tuning rate a fifth of it keeps the start.
    doc["finetune"]["lr"] = 2e-4
    # Deployed at score 0.01, dense and pruned alike (mAP is measured at it too): on a converged
    # model decoding + NMS take 0.7 ms per frame instead of 2.0 for 0.03 mAP points (README, budget)
    doc["budget"]["score_thresh"] = 0.01
    return _write_yaml(out / "configs" / "prune.yaml", doc)


def _summary(out: Path, walls: dict[str, float]) -> str:
    from rich.console import Console
    from rich.table import Table

    report = json.loads((out / "prune" / "report.json").read_text())
    validation = json.loads((out / "validate" / "report.json").read_text())
    dense, pruned = report["dense"], report["pruned"]
    ft = report.get("frame_timing")
    table = Table(title=f"avprune demo: dense vs pruned ({report['runtime']}, {report['device']}, "
                        f"{report['threads']} threads)")
    if ft:  # graph, frame and stages of both models from one paired run of the prune job
        cols = ("model", "mAP", "AP50", "graph p50 ms", "graph p99 ms", "frame p50 ms", "frame p99 ms",
                "pre ms", "decode+NMS ms", "params (M)", "GMACs", "speed-up (graph)", "speed-up (frame)")
    else:  # a prune job folder from before issue #13: frames from avprune validate
        cols = ("model", "mAP", "AP50", "model p50 ms", "model p99 ms", "frame p50 ms", "frame p99 ms",
                "params (M)", "GMACs", "speed-up (model)", "speed-up (frame)")
    for col in cols:
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, row in (("dense", dense), ("pruned", pruned)):
        head = (name, f"{row['map']:.3f}", f"{row['map50']:.3f}")
        size = (f"{row['params'] / 1e6:.2f}", f"{row['gmacs']:.3f}")
        if ft:
            t, d = ft[name], ft["dense"]
            table.add_row(
                *head, f"{t['graph']['p50_ms']:.2f}", f"{t['graph']['p99_ms']:.2f}", f"{t['frame']['p50_ms']:.2f}",
                f"{t['frame']['p99_ms']:.2f}", f"{t['preprocess']['p50_ms']:.2f}", f"{t['decode_nms']['p50_ms']:.2f}",
                *size, f"{d['graph']['p50_ms'] / t['graph']['p50_ms']:.2f}x",
                f"{d['frame']['p50_ms'] / t['frame']['p50_ms']:.2f}x",
            )
            continue
        # overall[0] is the gated (pruned) model, overall[1] the dense reference
        e2e = {"pruned": validation["overall"][0]["stats"], "dense": validation["overall"][1]["stats"]}
        table.add_row(
            *head, f"{row['p50_ms']:.2f}", f"{row['p99_ms']:.2f}",
            f"{e2e[name]['p50_ms']:.2f}", f"{e2e[name]['p99_ms']:.2f}", *size, f"{dense['p50_ms'] / row['p50_ms']:.2f}x",
            f"{e2e['dense']['p50_ms'] / e2e[name]['p50_ms']:.2f}x",
        )
    console = Console(record=True, width=160)
    console.print(table)
    if not report.get("feasible", True):
        console.print(f"[bold red]budget NOT met[/]: {report['infeasible']['message']} "
                      "(the 'pruned' row is the best trade-off reached)")
    if ft:
        fs = ft["frame_speedup"]
        console.print(
            f"graph and frame (pre-processing + graph + decode/NMS, batch 1) from one paired run of the prune job "
            f"({ft['blocks']} blocks, models alternating frame by frame): frame speed-up {fs['ratio']:.2f}x "
            f"[{fs['low']:.2f}, {fs['high']:.2f}] (95% CI); the job's latency budget: "
            f"{report['latency_budget_ms']:.2f} ms, mAP floor {report['map_floor']:.3f}."
        )
        # Two paired timings of one model differ by the host's spread (measured: 1.34x in select,
        # 1.45x in this table, 1.37x / 1.40x side by side on a quiet host): say which one judged
        console.print(
            f"the budget's verdict is the select stage's re-timing of the graph: {pruned['p50_ms']:.2f} ms against "
            f"the baseline's dense {dense['p50_ms']:.2f} ms ({dense['p50_ms'] / pruned['p50_ms']:.2f}x); the table's "
            "graph columns are the later paired frame run's."
        )
    else:
        console.print(
            "model = the engine's graph as the prune job measured it (its latency budget: "
            f"{report['latency_budget_ms']:.2f} ms, mAP floor {report['map_floor']:.3f}); frame = end to end per "
            "frame on the recorded drive (decode + pre-processing + model + decoding/NMS), from avprune validate."
        )
    cm, al = report.get("channel_multiple") or {}, report.get("allocation") or {}
    console.print(
        "the mAP floor is judged against the dense checkpoint the job starts from (its measured mAP minus "
        "budget.max_map_drop), not against a dense model trained alongside for as long (issue #12 allows "
        f"this for the demo); channel multiple {cm.get('value')}, allocation {al.get('mode')} "
        f"({al.get('controller')} controller)."
    )
    verdicts = {m["label"]: o["verdict"]["passed"] for m, o in zip(validation["models"], validation["overall"], strict=True)}
    console.print(f"real-time validation on the recorded drive (MP4, MCAP, KITTI), frame budget "
                  f"{validation['config']['budget_ms']:.1f} ms: "
                  + ", ".join(f"{k}: {'PASS' if v else 'FAIL'}" for k, v in verdicts.items()))
    console.print("stage wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in walls.items())
                  + f"; total {sum(walls.values()) / 60:.1f} min")
    console.print(f"reports: {out / 'prune' / 'report.html'}  {out / 'validate' / 'report.html'}")
    return console.export_text()


def run_demo(out: Path, *, train_minutes: float, images: int, drive_seconds: float) -> int:
    out = out.resolve()
    data, train_dir, prune_dir = out / "data", out / "train", out / "prune"
    engine_dir, validate_dir = out / "engine", out / "validate"
    walls: dict[str, float] = {}
    walls["data"] = _stage(
        "1/5 synthesise the drive data set",
        _fresh([data / "manifest.json"], []),
        lambda: avprune_main(["data", "synth", "--out", str(data), "--images", str(images), "--drives", "1",
                              "--drive-seconds", str(drive_seconds), "--seed", str(DATA_SEED)]),
    )
    trained = _fresh([train_dir / "model.pt"], [data / "manifest.json"])
    if train_minutes > 0:
        walls["train"] = _stage(
            f"2/5 train SSDlite320 from scratch (~{train_minutes:g} min)", trained,
            lambda: avprune_main(["train", str(_train_config(out, train_minutes)), "--out", str(train_dir)]),
        )
    else:
        walls["train"] = _stage(f"2/5 the trained detector: {SHIPPED_CHECKPOINT.name} (shipped)", trained,
                                lambda: _use_shipped(train_dir, data / "coco"))
    prune_cfg = _prune_config(out)
    walls["prune"] = _stage(
        "3/5 prune job (Ray): >= 1.5x lower graph latency at <= 1 mAP point drop (vs the dense checkpoint)",
        _fresh([prune_dir / "report.json"], [train_dir / "model.pt"]),
        lambda: avprune_main(["prune", str(prune_cfg), "--out", str(prune_dir), "--resume"]),
        ok_codes=(0, 1),  # 1: budget infeasible (not met); the best trade-off is still written and shown below
    )
    pruned_ckpt = prune_dir / "pruned.pt"
    if not pruned_ckpt.exists():
        pruned_ckpt = prune_dir / "best_tradeoff.pt"
        print(f"demo: the budget was not met; continuing with the best trade-off reached ({pruned_ckpt.name})")
    # both engines at the job's deployed score threshold, so validate times what the job measured
    job_thresh = yaml.safe_load(prune_cfg.read_text())["budget"].get("score_thresh")
    thresh = ["--score-thresh", str(job_thresh)] if job_thresh is not None else []
    walls["build-engine"] = _stage(
        "4/5 build the engines (verified export; TensorRT where present, else ONNX Runtime)",
        _fresh([engine_dir / "pruned.onnx.json", engine_dir / "dense.onnx.json"], [pruned_ckpt, train_dir / "model.pt"]),
        lambda: max(
            avprune_main(["build-engine", str(ckpt), "--out", str(engine_dir / f"{name}.onnx"), "--val",
                          str(data / "coco"), "--verify-images", str(VAL_IMAGES), "--precision", "fp32",
                          "--threads", "2", *thresh])
            for name, ckpt in (("pruned", pruned_ckpt), ("dense", train_dir / "model.pt"))
        ),
    )
    drive = data / "drives" / "drive_000"
    walls["validate"] = _stage(
        "5/5 real-time validation on the recorded drive (MP4, MCAP, KITTI) at a 30 fps frame budget",
        _fresh([validate_dir / "report.json"], [engine_dir / "pruned.onnx", engine_dir / "dense.onnx"]),
        lambda: avprune_main([
            "validate", str(engine_dir / "pruned.onnx"), str(engine_dir / "dense.onnx"),
            "--stream", str(drive / "drive.mp4"), "--stream", f"{drive / 'drive.mcap'}:{MCAP_TOPIC}",
            "--stream", str(drive / "kitti"), "--budget-ms", "33.3", "--warmup", "10",
            "--threads", "2", "--report", str(validate_dir),
        ]),
        ok_codes=(0, 1),  # a budget violation is a finding to show, not a demo failure
    )
    text = _summary(out, walls)
    atomic_write_text(out / "summary.txt", text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avprune.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="demo folder (default runs/demo)")
    parser.add_argument("--train-minutes", type=float, default=0.0,
                        help="train the dense detector from scratch for this long instead of starting from the "
                             "shipped checkpoint (default 0: the shipped one; 8 minutes reach its mAP on 2 cores)")
    parser.add_argument("--images", type=int, default=1200, help="synthetic COCO images (default 1200)")
    parser.add_argument("--drive-seconds", type=float, default=5.0, help="recorded drive length (default 5)")
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return run_demo(args.out, train_minutes=args.train_minutes, images=args.images, drive_seconds=args.drive_seconds)


if __name__ == "__main__":
    sys.exit(main())
