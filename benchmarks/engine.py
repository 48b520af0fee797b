"""Benchmark: the whole frame on ONNX Runtime (CPU), paired. Pre-processing, decode + NMS, and what a
faster graph buys per frame.

    python -m benchmarks.engine                    # trained checkpoint from train_default
    python -m benchmarks.engine --dense PATH --data COCO_ROOT
    python -m benchmarks.engine --quick            # smoke run

Every comparison is timed with ``deploy.timing.time_paired`` (interleaved blocks on the same
frames, order rotated; ratio with a bootstrap 95% interval), so the ratios hold on a loaded
machine even where the milliseconds do not.

1. **Host stages** of SSDlite320 on the val frames (640x384 for the synthetic data), at score
   threshold 0.01 (deployed) and 0.001 (torchvision's default): *before* = the float32 resize and
   torchvision's own ``postprocess_detections`` (decode every anchor, a Python loop per class and
   image, one NMS per image), *after* = ``deploy.runtimes`` (threshold first, per-class top-k,
   decode the survivors, one NMS for the batch), and *after, uint8 resize*. The graph runs once per
   frame beforehand and is not timed here; stream decoding is not part of any stage.
2. **NMS alternatives** on the same candidate sets: ``torchvision.ops.batched_nms``, one
   ``torchvision.ops.nms`` over coordinate-shifted groups (ours) and ``cv2.dnn.NMSBoxesBatched``.
3. **Parity**: after vs before detections (count, labels, boxes) and COCO mAP of both.
4. **Dense vs a graph ~2x faster** (Torch-Pruning one-shot ``--probe-ratio`` of the backbone
   channels, round_to=16, heads kept, then ``--probe-steps`` of the dense recipe so that it scores
   like a detector: decode + NMS work on what passes the threshold): ``graph_speedup`` (ORT session
   alone) and ``frame_speedup`` (preprocess + graph + decode/NMS), each paired, with the frame
   speed-up the old post-processing would give beside it.
5. **Graph path** (``host_ops="graph"``, :mod:`deploy.runtimes.fused_ends`): scoring, decoding and
   NMS folded into the ONNX graph, which normalises the uint8-resized frame too (the default) or,
   with ``resize="float32"``, takes the host's float32 canvas. Its host cost joins the table
   of 1.; the graph alone and the whole frame of both against the host path, paired, show what the
   folded ops cost the graph and the pre/post cost all in; dense vs the probe in graph mode; mAP of
   each graph path against the host path with the same resize, on the val images.
6. dense / pruned / pruned INT8 (static QDQ) latency and mAP (``--int8``), as before.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._results import ASSETS, machine_line, write_section
from perception.io import atomic_write_json

log = logging.getLogger("benchmarks.engine")
WORK = Path(__file__).with_name("_work")
THRESHOLDS = (0.01, 0.001)


def cpu_sample() -> tuple[float, float, float]:
    """(wall s, CPU-busy seconds of the whole machine, CPU seconds of this process, all its threads)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    t = os.times()
    return time.monotonic(), (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK"), t.user + t.system


def other_share(start: tuple[float, float, float], end: tuple[float, float, float], cpus: int) -> float:
    """Share of the machine's CPU time that other processes used between two :func:`cpu_sample` calls
    (the load average cannot tell: it counts this benchmark's own threads, and its probe fine-tune
    before the timing keeps it high for minutes)."""
    wall = max(end[0] - start[0], 1e-9)
    return max(0.0, ((end[1] - start[1]) - (end[2] - start[2])) / (wall * cpus))


def _load_line(load: dict) -> str:
    """Whether other work shared the cores while the timing ran."""
    share = load.get("other_share")
    if share is None:
        return "Other processes' CPU use was not recorded."
    if share >= 0.05:
        return (f"Other processes used {100 * share:.0f}% of the machine's CPU time while the timing ran: the "
                "milliseconds are inflated, the paired ratios are not.")
    return f"The machine was otherwise idle while the timing ran (other processes {100 * share:.1f}% of its CPU time)."


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


def one_shot_prune(model: Any, ratio: float = 0.5, round_to: int = 16) -> Any:
    """Torch-Pruning MetaPruner, L2 magnitude, ``ratio`` of the backbone channels, heads kept."""
    import torch
    import torch_pruning as tp

    from deploy.core_graph import CoreModule, model_meta

    meta = model_meta(model)
    core = CoreModule(model, meta)
    ignored = [model.backbone.fpn, model.rpn.head] if meta.family == "faster_rcnn" else [model.head]
    pruner = tp.pruner.MetaPruner(
        core, torch.randn(1, 3, *meta.image_size), importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio, ignored_layers=ignored, round_to=round_to,
    )
    pruner.step()
    return model.eval()


def trained_probe(dense_ckpt: Path, root: Path, out: Path, *, ratio: float, steps: int) -> Any:
    """:func:`one_shot_prune` of the dense checkpoint, then ``steps`` of the dense recipe's fine-tune,
    cached by its recipe.

    Untrained, a pruned graph scores noise: at threshold 0.01 it left 3x the dense model's
    candidates for decode + NMS (3.78 vs 1.78 ms measured), so the frame it timed was not the one
    a deployed pruned model runs. A short fine-tune brings its score distribution back to a
    detector's; its mAP is still not the point (the prune job's benchmarks measure that)."""
    from perception.data import load_split
    from perception.models import load_detector, save_checkpoint
    from perception.train import TrainSettings, train

    recipe = {"checkpoint": str(dense_ckpt), "ratio": ratio, "round_to": 16, "steps": steps, "lr": 1e-3}
    marker, path = out / "recipe.json", out / "model.pt"
    if path.is_file() and marker.is_file() and json.loads(marker.read_text()) == recipe:
        return load_detector(path).eval()
    model = one_shot_prune(load_detector(dense_ckpt), ratio=ratio)
    if steps > 0:
        settings = TrainSettings(steps=steps, lr=1e-3, warmup_steps=min(20, steps), checkpoint_every=steps,
                                 seed=0, num_threads=2)
        train(model, load_split(root, "train"), settings, out_dir=out / "train", progress=True)
    save_checkpoint(path, model)
    atomic_write_json(marker, recipe)
    return model.eval()


def _alternate(args: argparse.Namespace, n: int) -> dict[str, int]:
    """``args.blocks`` rounds over ``n`` inputs, the models alternating input by input (one input per block)."""
    return {"blocks": max(2, args.blocks * n), "block_size": 1, "warmup": 1}


# ----------------------------------------------------------------------------- the path before this change


def _before_call(rt: Any, raw: dict[str, np.ndarray] | None = None):
    """One frame through the previous host path: float32 resize and
    torchvision's ``postprocess_detections`` (via ``Postprocessor.detect``), boxes to frame pixels.
    With ``raw=None`` the graph runs too (timed as ``graph``)."""
    import torch

    from deploy.core_graph import to_frame_coords
    from deploy.runtimes.base import Prepared
    from deploy.runtimes.preprocess import preprocess_frames  # the float32 resize, unchanged

    def call(frame: np.ndarray) -> dict[str, float]:
        with rt._host_threads():
            t0 = time.perf_counter_ns()
            batch, sizes = preprocess_frames([frame], rt.meta)
            t1 = time.perf_counter_ns()
        out = raw if raw is not None else rt.run(Prepared(batch, (frame.shape[:2],), sizes))
        t2 = time.perf_counter_ns()
        with rt._host_threads(), torch.no_grad():
            dets = rt.post.detect({k: torch.from_numpy(v) for k, v in out.items()}, sizes)
            [to_frame_coords(d, sizes[0], frame.shape[:2]) for d in dets]
            t3 = time.perf_counter_ns()
        stages = {"preprocess": (t1 - t0) / 1e6, "postprocess": (t3 - t2) / 1e6}
        return stages if raw is not None else {**stages, "graph": (t2 - t1) / 1e6}

    return call


def _after_call(rt: Any, raw: dict[str, np.ndarray], resize: str):
    """One frame through the runtime's own host path (``DetectorRuntime.preprocess``/``postprocess``)."""
    def call(frame: np.ndarray) -> dict[str, float]:
        before, rt.resize = rt.resize, resize
        t0 = time.perf_counter_ns()
        prepared = rt.preprocess([frame])
        t1 = time.perf_counter_ns()
        rt.postprocess(raw, prepared)
        t2 = time.perf_counter_ns()
        rt.resize = before
        return {"preprocess": (t1 - t0) / 1e6, "postprocess": (t2 - t1) / 1e6}

    return call


def host_stages(rt: Any, frames: list[np.ndarray], args: argparse.Namespace, fused: Any = None) -> dict[str, Any]:
    """Before / after / after-uint8 (/ graph path: ``fused``, a ``host_ops="graph"`` runtime of the same
    model) host cost per frame, paired, at each threshold."""
    from deploy.timing import time_paired

    raws = [rt.run(rt.preprocess([f])) for f in frames]
    out: dict[str, Any] = {}
    for thr in THRESHOLDS:
        rt.post.model.score_thresh = thr
        # each input is a frame index: every path gets that frame and its graph outputs
        calls = {
            "before": lambda i: _before_call(rt, raws[i])(frames[i]),
            "after": lambda i: _after_call(rt, raws[i], "float32")(frames[i]),
            "after_uint8": lambda i: _after_call(rt, raws[i], "uint8")(frames[i]),
        }
        if fused is not None:  # its graph's outputs depend on the threshold: one run per frame at this one
            fused.post.model.score_thresh = thr
            for key, mode in (("graph_ops", "uint8"), ("graph_ops_float32", "float32")):
                fused.resize = mode
                fused_raws = [fused.run(fused.preprocess([f])) for f in frames]
                calls[key] = lambda i, fr=fused_raws, m=mode: _after_call(fused, fr[i], m)(frames[i])
            fused.resize = "uint8"
        timing = time_paired(calls, list(range(len(frames))), reference="before", **_alternate(args, len(frames)))
        survivors = _survivors(rt, raws, thr)
        out[str(thr)] = {**timing.to_dict(), "survivors_per_frame_p50": survivors}
    rt.post.model.score_thresh = 0.01
    if fused is not None:
        fused.post.model.score_thresh = 0.01
    return out


def _survivors(rt: Any, raws: list[dict[str, np.ndarray]], thr: float) -> float:
    import torch

    counts = [int((torch.softmax(torch.from_numpy(r["cls_logits"]), -1)[..., 1:] > thr).sum()) for r in raws]
    return float(np.median(counts))


def _onnx_nms(num_classes: int, iou: float) -> Any:
    """An ORT session holding one ONNX ``NonMaxSuppression`` (what an in-graph NMS would run per frame)."""
    import onnx
    from onnx import TensorProto, helper

    from deploy.runtimes.ort_session import make_session

    consts = [helper.make_tensor("max_out", TensorProto.INT64, [1], [1 << 20]),
              helper.make_tensor("iou", TensorProto.FLOAT, [1], [iou]),
              helper.make_tensor("thr", TensorProto.FLOAT, [1], [0.0])]
    graph = helper.make_graph(
        [helper.make_node("NonMaxSuppression", ["boxes", "scores", "max_out", "iou", "thr"], ["selected"])],
        "nms", [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, "n", 4]),
                helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, num_classes, "n"])],
        [helper.make_tensor_value_info("selected", TensorProto.INT64, ["k", 3])], initializer=consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = WORK / "engine" / "nms_only.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return make_session(path, device="cpu", threads=1)


def nms_alternatives(rt: Any, frames: list[np.ndarray], args: argparse.Namespace) -> dict[str, Any]:
    """The candidates of each frame at 0.01 through four batched-NMS implementations, paired."""
    import cv2
    import torch
    from torchvision.ops import batched_nms

    from deploy.runtimes.postprocess import SSDPost, nms_grouped
    from deploy.timing import time_paired

    rt.post.model.score_thresh = 0.01
    ssd = SSDPost.from_model(rt.post.model, rt.post.anchors(1)[0], rt.meta.image_size)
    c = rt.meta.num_classes - 1
    sets = []
    for f in frames:
        raw = rt.run(rt.preprocess([f]))
        _, anchor, cls, score = ssd._candidates(raw["cls_logits"])
        b = ssd._decode(raw["bbox_regression"][0, anchor], anchor)
        rects = np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1).astype(np.float32)
        per_class = np.zeros((1, c, len(score)), np.float32)  # ONNX NMS: one score row per class
        per_class[0, cls, np.arange(len(score))] = score
        sets.append({"boxes": b, "score": score, "cls": cls, "t_boxes": torch.from_numpy(b),
                     "t_score": torch.from_numpy(score), "t_cls": torch.from_numpy(cls), "rects": rects,
                     "cls32": cls.astype(np.int32), "onnx_boxes": b[None], "onnx_scores": per_class})
    iou = ssd.nms_thresh
    session = _onnx_nms(c, iou)

    def onnx_nms(s: dict) -> np.ndarray:
        sel = session.run(None, {"boxes": s["onnx_boxes"], "scores": s["onnx_scores"]})[0]
        sel = sel[s["cls"][sel[:, 2]] == sel[:, 1]]  # a box only counts in its own class's row
        return sel[:, 2]

    calls = {
        "torchvision.ops.batched_nms": lambda s: batched_nms(s["t_boxes"], s["t_score"], s["t_cls"], iou),
        "one nms, shifted groups (ours)": lambda s: nms_grouped(s["boxes"], s["score"], s["cls"], iou),
        "cv2.dnn.NMSBoxesBatched": lambda s: np.asarray(
            cv2.dnn.NMSBoxesBatched(s["rects"], s["score"], s["cls32"], 0.0, iou)).reshape(-1),
        "ONNX NonMaxSuppression (ORT)": onnx_nms,
    }

    def kept(name: str, s: dict) -> set[int]:
        out = calls[name](s)
        return set((out.numpy() if isinstance(out, torch.Tensor) else np.asarray(out)).tolist())

    with rt._host_threads():
        timing = time_paired(calls, sets, reference="torchvision.ops.batched_nms", **_alternate(args, len(sets)))
        exact = {name: all(kept(name, s) == kept("torchvision.ops.batched_nms", s) for s in sets) for name in calls}
    return {**timing.to_dict(), "exact": exact,
            "candidates_per_frame_p50": float(np.median([len(s["score"]) for s in sets]))}


def parity(rt: Any, val: Any, args: argparse.Namespace) -> dict[str, Any]:
    """After vs before on the val frames: detections (count, labels, boxes) and COCO mAP."""
    from deploy.core_graph import to_frame_coords
    from perception.evaluate import evaluate

    def before(frames: list[np.ndarray]):
        import torch

        prepared = rt.preprocess(frames)
        raw = {k: torch.from_numpy(v) for k, v in rt.run(prepared).items()}
        with torch.no_grad():
            dets = rt.post.detect(raw, prepared.input_sizes)
        return [to_frame_coords(d, s, f.shape[:2]) for d, s, f in zip(dets, prepared.input_sizes, frames, strict=True)]

    out = {}
    n = min(args.max_images or len(val), len(val))
    for thr in THRESHOLDS:
        rt.post.model.score_thresh = thr
        same, matched, total = True, 0, 0
        for i in range(min(16, n)):
            frame = val.load_image(i)
            a, b = rt.infer([frame])[0], before([frame])[0]
            # the same (label, score) pairs; a box counts as reproduced when the other side has one
            # with that label and score within 1e-4 px (exactly tied scores may pick other anchors)
            pairs_a = sorted(zip(a.labels.tolist(), a.scores.tolist(), strict=True))
            same &= pairs_a == sorted(zip(b.labels.tolist(), b.scores.tolist(), strict=True))
            for box, label, score in zip(a.boxes, a.labels, a.scores, strict=True):
                twin = (b.labels == label) & (b.scores == score)
                matched += bool(twin.any() and (np.abs(b.boxes[twin] - box).max(axis=1) <= 1e-4).any())
            total += len(a)
        m_after = evaluate(rt.infer, val, max_images=n)
        m_before = evaluate(before, val, max_images=n)
        out[str(thr)] = {"frames_compared": min(16, n), "same_labels_and_scores": same,
                         "boxes_within_1e-4": matched / total if total else 1.0, "detections": total,
                         "map_after": m_after.map, "map_before": m_before.map, "map_delta": m_after.map - m_before.map,
                         "images": n}
    rt.post.model.score_thresh = 0.01
    return out


def frame_vs_graph(dense: Any, pruned: Any, frames: list[np.ndarray], args: argparse.Namespace) -> dict[str, Any]:
    """graph_speedup and frame_speedup of the pruned graph, each paired; frame_speedup with the old host path too."""
    from deploy.timing import time_paired, time_runtimes

    rts = {"dense": dense, "pruned": pruned}
    graph = time_runtimes(rts, frames, end_to_end=False, reference="dense", **_alternate(args, len(frames)))
    frame = time_runtimes(rts, frames, reference="dense", **_alternate(args, len(frames)))

    frame_old = time_paired({"dense": _before_call(dense), "pruned": _before_call(pruned)}, frames, reference="dense",
                            **_alternate(args, len(frames)))
    # decode + NMS scale with the candidates over the threshold: the pair must score alike for the
    # frame ratio to be the one a deployed pruned model gets
    survivors = {name: _survivors(rt, [rt.run(rt.preprocess([f])) for f in frames], 0.01) for name, rt in rts.items()}
    return {"graph": graph.to_dict(), "frame": frame.to_dict(), "frame_before": frame_old.to_dict(),
            "survivors_p50": survivors,
            "graph_speedup": graph.ratios["pruned"].to_dict(), "frame_speedup": frame.ratios["pruned"].to_dict(),
            "frame_speedup_before": frame_old.ratios["pruned"].to_dict()}


def graph_path(host: Any, fused: Any, fused_f32: Any, fused_pruned: Any, val: Any, frames: list[np.ndarray],
               args: argparse.Namespace) -> dict[str, Any]:
    """The pre/post-processing folded into the graph (``host_ops="graph"``: the host resizes in uint8,
    the graph normalises, decodes and runs NMS; ``fused_f32`` takes the host's float32 canvas instead)
    against the host path (float32 resize), paired: graph alone (what the folded ops add to it), the
    whole frame, the dense-vs-pruned frame speed-up in graph mode, and mAP on the val images at each
    threshold, each graph path against the host path with its resize."""
    from deploy.timing import time_paired, time_runtimes
    from perception.evaluate import evaluate

    before = host.resize
    if fused.resize != "uint8" or fused_f32.resize != "float32":
        raise ValueError("graph_path: fused must resize in uint8 and fused_f32 in float32")
    try:
        rts = {"host path": host, "graph path": fused, "graph path, float32": fused_f32}
        graph = time_runtimes(rts, frames, end_to_end=False, reference="host path", **_alternate(args, len(frames)))
        frame = time_runtimes(rts, frames, reference="host path", **_alternate(args, len(frames)))
        # Pre/post all in, from ONE paired run: the core graph alone (on the host's canvas, prepared
        # beforehand) alternating with each path's whole frame, so that "frame - core graph" is not a
        # difference of two runs (two runs of this table moved it 0.51 -> 0.97 ms; their ratios held).
        canvases = [host.preprocess([f]) for f in frames]

        def timed(fn: Any) -> Any:  # time_paired reads a returned mapping as per-stage times: return nothing
            return lambda i: (fn(i), None)[1]

        all_in = time_paired({"core graph": timed(lambda i: host.run(canvases[i])),
                              "host path": timed(lambda i: host.infer([frames[i]])),
                              "graph path": timed(lambda i: fused.infer([frames[i]])),
                              "graph path, float32": timed(lambda i: fused_f32.infer([frames[i]]))},
                             list(range(len(frames))), reference="core graph", **_alternate(args, len(frames)))
        pair = time_runtimes({"dense": fused, "pruned": fused_pruned}, frames, reference="dense",
                             **_alternate(args, len(frames)))
        pair_graph = time_runtimes({"dense": fused, "pruned": fused_pruned}, frames, end_to_end=False,
                                   reference="dense", **_alternate(args, len(frames)))
        n = min(args.max_images or len(val), len(val))
        maps = {}
        for thr in THRESHOLDS:
            for rt in (host, fused, fused_f32):
                rt.post.model.score_thresh = thr
            host.resize = "uint8"
            m = {"graph_path": evaluate(fused.infer, val, max_images=n).map,
                 "host_path_uint8": evaluate(host.infer, val, max_images=n).map, "images": n}
            host.resize = "float32"
            m.update(graph_path_float32=evaluate(fused_f32.infer, val, max_images=n).map,
                     host_path=evaluate(host.infer, val, max_images=n).map)
            maps[str(thr)] = m
    finally:
        host.resize = before
        for rt in (host, fused, fused_f32):
            rt.post.model.score_thresh = 0.01
    return {"graph": graph.to_dict(), "frame": frame.to_dict(), "all_in": all_in.to_dict(),
            "dense_vs_pruned_frame": pair.to_dict(),
            "dense_vs_pruned_graph": pair_graph.to_dict(), "frame_speedup": frame.ratios["graph path"].to_dict(),
            "frame_speedup_float32": frame.ratios["graph path, float32"].to_dict(),
            "graph_cost": graph.ratios["graph path"].to_dict(),
            "graph_cost_float32": graph.ratios["graph path, float32"].to_dict(),
            "pruned_frame_speedup": pair.ratios["pruned"].to_dict(),
            "pruned_graph_speedup": pair_graph.ratios["pruned"].to_dict(), "map": maps}


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
    p.add_argument("--checkpoint", "--dense", dest="checkpoint", type=Path, default=None,
                   help=f"trained dense checkpoint (default: {WORK / 'train_default' / 'model.pt'} when present)")
    p.add_argument("--data", default=None, help="COCO root (default: benchmarks/_work synthetic data)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--blocks", type=int, default=None,
                   help="rounds over the frames per paired comparison (models alternate frame by frame)")
    p.add_argument("--frames", type=int, default=None, help="val frames each paired block runs")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--int8", action="store_true", help="also the dense/pruned/pruned-INT8 latency + mAP table")
    p.add_argument("--probe-ratio", type=float, default=0.6,
                   help="fraction of backbone channels the ~2x speed probe removes (default 0.6: 1.96x graph on "
                        "the 2-core Intel Xeon of RESULTS.md)")
    p.add_argument("--probe-steps", type=int, default=None,
                   help="fine-tune steps of the speed probe, so it scores like a detector (default 400; quick 4; "
                        "150 left it 3.5x the dense model's candidates over 0.01)")
    p.add_argument("--quick", action="store_true", help="smoke run: few frames, blocks and images")
    args = p.parse_args(argv)
    if not 0.0 < args.probe_ratio < 1.0:
        p.error(f"--probe-ratio must be in (0, 1); got {args.probe_ratio}")
    if args.probe_steps is not None and args.probe_steps < 0:
        p.error(f"--probe-steps must be >= 0 (0: no fine-tune); got {args.probe_steps}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.blocks = args.blocks or (3 if args.quick else 12)
    args.frames = args.frames or (4 if args.quick else 16)
    args.iters = args.iters or (10 if args.quick else 100)
    args.max_images = args.max_images or (8 if args.quick else None)

    import torch

    from deploy.engine.build import build_engine
    from deploy.export import export_onnx
    from deploy.runtimes import open_runtime
    from deploy.verify import ExportMismatchError, verify_export
    from perception.data import load_split
    from perception.models import build_detector, count_parameters, load_detector, set_score_threshold

    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    root = _data(args)
    val = load_split(root, "val", train=False)
    work = WORK / "engine"
    work.mkdir(parents=True, exist_ok=True)
    dense_ckpt = args.checkpoint or _first(WORK / "train_default" / "model.pt", WORK / "train_default_quick" / "model.pt")
    notes = []
    if dense_ckpt is None:
        dense = build_detector("ssdlite320_mobilenet_v3_large").eval()
        notes.append("no trained checkpoint found (run benchmarks.train_default first): the dense model is "
                     "UNTRAINED, its mAP and its score distribution (hence decode/NMS cost) are not a trained one's")
    else:
        dense = load_detector(dense_ckpt).eval()
    if dense_ckpt is None:
        pruned = one_shot_prune(build_detector("ssdlite320_mobilenet_v3_large"), ratio=args.probe_ratio)
        probe_steps = 0
    else:
        probe_steps = args.probe_steps if args.probe_steps is not None else (4 if args.quick else 400)
        pruned = trained_probe(dense_ckpt, root, work / f"probe_{args.probe_ratio:g}_{probe_steps}",
                               ratio=args.probe_ratio, steps=probe_steps)
    pruned_how = (f"Torch-Pruning one-shot {100 * args.probe_ratio:g}% of backbone channels, round_to=16, heads "
                  f"kept, then {probe_steps} fine-tune steps" + (" (NO fine-tuning)" if probe_steps == 0 else ""))
    t0 = time.perf_counter()
    engines, rows = {}, []
    for name, model in (("dense", dense), ("pruned", pruned)):
        set_score_threshold(model, 0.01)
        exp = export_onnx(model, work / f"{name}.onnx", form="core", exporter="legacy")
        try:
            delta = verify_export(model, exp.path, val, frames=4, max_images=args.max_images,
                                  threads=args.threads).map_delta
        except ExportMismatchError as e:  # near-tied scores of an (almost) untrained model: timing is still valid
            delta = e.report.map_delta
            notes.append(f"verify_export of the {name} export: {str(e).splitlines()[-1].strip(' -')}")
        engines[name] = build_engine(exp.path, work / f"{name}.fp32.onnx", threads=args.threads).engine_path
        rows.append({"name": name, "params": count_parameters(model), "verify_map_delta": delta})
    frames = [val.load_image(i) for i in range(min(args.frames, len(val)))]
    load_before, cpu_before = os.getloadavg(), cpu_sample()
    with open_runtime(engines["dense"], threads=args.threads) as d, open_runtime(engines["pruned"], threads=args.threads) as q, \
            open_runtime(work / "dense.onnx", threads=args.threads) as dp, \
            open_runtime(work / "dense.onnx", threads=args.threads, host_ops="graph") as df, \
            open_runtime(work / "dense.onnx", threads=args.threads, host_ops="graph") as dff, \
            open_runtime(work / "pruned.onnx", threads=args.threads, host_ops="graph") as qf:
        dff.resize = "float32"
        host = host_stages(d, frames, args, fused=df)
        nms = nms_alternatives(d, frames, args)
        par = parity(d, val, args)
        fvg = frame_vs_graph(d, q, frames, args)
        gp = graph_path(dp, df, dff, qf, val, frames, args)
    table = []
    if args.int8:
        for row in rows:
            row.update(_measure(row["name"], engines[row["name"]], val, args))
        q8 = build_engine(work / "pruned.onnx", work / "pruned.int8.onnx", precision="int8", calib=root,
                          calib_frames=16 if args.quick else 64, threads=args.threads)
        table = [*rows, {**_measure("pruned INT8", q8.engine_path, val, args), "params": rows[1]["params"],
                         "verify_map_delta": None}]
    payload = {"host_stages": host, "nms_alternatives": nms, "parity": par, "frame_vs_graph": fvg, "graph_path": gp,
               "rows": table,
               "params": {r["name"]: r["params"] for r in rows}, "pruned_how": pruned_how,
               "dense_checkpoint": str(dense_ckpt), "notes": notes, "threads": args.threads, "blocks": args.blocks,
               "frames": len(frames), "frame_size": list(frames[0].shape[:2]), "quick": args.quick,
               "machine": machine_line(), "seconds": round(time.perf_counter() - t0, 1),
               "load_average": {"other_share": round(other_share(cpu_before, cpu_sample(), os.cpu_count() or 1), 4),
                                "start": [round(x, 2) for x in load_before],
                                "end": [round(x, 2) for x in os.getloadavg()]}}
    ASSETS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(ASSETS / "engine.json", payload)
    text = _markdown(payload, args, val, dense_ckpt)
    write_section("engine", text)
    print(text)
    return 0


def _markdown(r: dict[str, Any], args: argparse.Namespace, val: Any, dense_ckpt: Path | None) -> str:
    def f(v: float | None, spec: str = ".2f") -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    def ci(x: dict[str, Any]) -> str:
        return f"**{x['ratio']:.2f}x** [{x['low']:.2f}, {x['high']:.2f}]"

    h, w = r["frame_size"]
    lines = [
        f"## engine{' (--quick smoke run)' if args.quick else ''}",
        "",
        f"SSDlite320 on ONNX Runtime CPU ({args.threads} intra-op threads; pre/post-processing on 1 torch thread, as "
        f"deployed), batch 1, {r['frames']} val frames of {w}x{h}, every comparison paired: {args.blocks} rounds, the "
        f"models alternating frame by frame, order rotated; ratios with a bootstrap 95% interval. Machine: {r['machine']}. "
        f"Dense: {dense_ckpt or 'untrained'}. {_load_line(r.get('load_average', {}))}",
        "",
        "Host cost per frame (pre-processing + decode + NMS; the graph and stream decoding excluded), p50 ms:",
        "",
        "| score threshold | survivors/frame | before | after | after, uint8 resize | before/after | target |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for thr, target in zip(THRESHOLDS, ("<= 0.8", "<= 1.2"), strict=True):
        x = r["host_stages"][str(thr)]
        s = x["summaries"]
        lines.append(f"| {thr} | {x['survivors_per_frame_p50']:.0f} | {f(s['before']['p50_ms'])} | "
                     f"{f(s['after']['p50_ms'])} | {f(s['after_uint8']['p50_ms'])} | {ci(x['ratios']['after'])} | "
                     f"{target} |")
    x = r["host_stages"]["0.01"]["stages"]
    lines += ["", "Split at 0.01, p50 ms: pre-processing "
              f"float32 {f(x['before']['preprocess']['p50_ms'])} (before) / {f(x['after']['preprocess']['p50_ms'])} "
              f"(after) / uint8 {f(x['after_uint8']['preprocess']['p50_ms'])}; decode + NMS "
              f"{f(x['before']['postprocess']['p50_ms'])} (torchvision) / {f(x['after']['postprocess']['p50_ms'])} (ours).",
              "", "NMS alternatives on the same candidates (0.01, "
              f"{r['nms_alternatives']['candidates_per_frame_p50']:.0f} per frame), p50 ms and exactness vs torchvision:", "",
              "| implementation | p50 ms | speed-up vs batched_nms | same kept boxes |", "|---|---:|---:|---|"]
    n = r["nms_alternatives"]
    for name, s in n["summaries"].items():
        ratio = ci(n["ratios"][name]) if name in n["ratios"] else "1x"
        lines.append(f"| {name} | {f(s['p50_ms'], '.3f')} | {ratio} | {'yes' if n['exact'][name] else 'NO'} |")
    lines += ["", "Parity, after vs before (torchvision's `postprocess_detections` at the same threshold and top-k):", "",
              "| score threshold | frames | detections | same labels + scores | boxes within 1e-4 px | mAP after | "
              "mAP before | ΔmAP |", "|---|---:|---:|---|---:|---:|---:|---:|"]
    for thr in THRESHOLDS:
        x = r["parity"][str(thr)]
        lines.append(f"| {thr} | {x['frames_compared']} | {x['detections']} | "
                     f"{'yes' if x['same_labels_and_scores'] else 'NO'} | {100 * x['boxes_within_1e-4']:.1f}% | "
                     f"{f(x['map_after'], '.4f')} | {f(x['map_before'], '.4f')} | "
                     f"{x['map_delta']:+.4f} |")
    g = r["frame_vs_graph"]
    sd, sp = g["frame"]["summaries"]["dense"], g["frame"]["summaries"]["pruned"]
    lines += ["", f"Dense vs pruned ({r['pruned_how']}; params {r['params']['dense'] / 1e6:.2f} M -> "
              f"{r['params']['pruned'] / 1e6:.2f} M):", "",
              "| | dense p50 ms | pruned p50 ms | speed-up [95% CI] |", "|---|---:|---:|---:|",
              f"| graph (ORT session) | {f(g['graph']['summaries']['dense']['p50_ms'])} | "
              f"{f(g['graph']['summaries']['pruned']['p50_ms'])} | graph_speedup {ci(g['graph_speedup'])} |",
              f"| frame, after | {f(sd['p50_ms'])} | {f(sp['p50_ms'])} | frame_speedup {ci(g['frame_speedup'])} |",
              f"| frame, before | {f(g['frame_before']['summaries']['dense']['p50_ms'])} | "
              f"{f(g['frame_before']['summaries']['pruned']['p50_ms'])} | {ci(g['frame_speedup_before'])} |"]
    st = g["frame"]["stages"]
    lines += ["", "Per-stage split of the paired frame run, p50 ms (dense / pruned): " + ", ".join(
        f"{name} {f(st['dense'][key]['p50_ms'])} / {f(st['pruned'][key]['p50_ms'])}"
        for key, name in (("preprocess", "preprocess"), ("graph", "graph"), ("postprocess", "decode + NMS")))
        + f". Load average (1, 5, 15 min) at start {r['load_average']['start']}, at end {r['load_average']['end']}."]
    if g.get("survivors_p50"):
        sv = g["survivors_p50"]
        lines += ["", f"Candidates over the 0.01 threshold per frame (p50), what decode + NMS work on: dense "
                      f"{sv['dense']:.0f}, pruned {sv['pruned']:.0f}."]
    if r.get("graph_path"):
        lines += _graph_path_lines(r, f, ci)
    if r["rows"]:
        base = r["rows"][0]
        lines += ["", "| model | params (M) | e2e p50 ms | e2e p99 ms | graph p50 ms | speed-up (graph p50) | mAP | AP50 |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in r["rows"]:
            lines.append(
                f"| {row['name']} | {row['params'] / 1e6:.2f} | {f(row['e2e']['p50_ms'], '.1f')} | "
                f"{f(row['e2e']['p99_ms'], '.1f')} | {f(row['graph']['p50_ms'], '.1f')} | "
                f"{base['graph']['p50_ms'] / row['graph']['p50_ms']:.2f}x | {f(row['map'], '.3f')} | {f(row['map50'], '.3f')} |")
        lines.append("(unpaired: one model after the other, `measure_latency`)")
    lines += [f"\n**Note:** {n}" for n in r["notes"]]
    return "\n".join(lines)


def _graph_path_lines(r: dict[str, Any], f: Any, ci: Any) -> list[str]:
    gp, hs = r["graph_path"], r["host_stages"]
    lines = ["", "**Graph path** (`host_ops=\"graph\"`, `deploy.runtimes.fused_ends`): softmax, per-class top-k, box "
             "decoding and one `NonMaxSuppression` folded into the ONNX graph; the host keeps each image's best "
             "detections. By default (`resize=\"uint8\"`) the host only resizes in uint8 and the graph normalises; "
             "with `resize=\"float32\"` the graph takes the host's normalised canvas (OpenCV's one-call float32 "
             "resize, torchvision's pixels). Host cost per frame, p50 ms, paired with the rows above:",
             "", "| score threshold | host path, float32 resize | host path, uint8 resize | graph path | "
             "graph path, float32 | target |", "|---|---:|---:|---:|---:|---:|"]
    for thr, target in zip(THRESHOLDS, ("<= 0.8", "<= 1.2"), strict=True):
        s = hs[str(thr)]["summaries"]
        if "graph_ops_float32" in s:
            lines.append(f"| {thr} | {f(s['after']['p50_ms'])} | {f(s['after_uint8']['p50_ms'])} | "
                         f"**{f(s['graph_ops']['p50_ms'])}** | {f(s['graph_ops_float32']['p50_ms'])} | {target} |")
    g, fr = gp["graph"]["summaries"], gp["frame"]["summaries"]
    core = g["host path"]["p50_ms"]
    lines += ["", "What the folded ops cost the graph, and the whole frame (dense, 0.01, paired; the host path "
              "resizes in float32):", "",
              "| | host path p50 ms | graph path p50 ms | graph path, float32 p50 ms |", "|---|---:|---:|---:|",
              f"| graph (ORT session) | {f(core)} | {f(g['graph path']['p50_ms'])} | "
              f"{f(g['graph path, float32']['p50_ms'])} |",
              f"| its graph vs the core graph [95% CI] (below 1: what the folded ops add) | 1x | "
              f"{ci(gp['graph_cost'])} | {ci(gp['graph_cost_float32'])} |",
              f"| frame (preprocess + graph + post) | {f(fr['host path']['p50_ms'])} | {f(fr['graph path']['p50_ms'])} | "
              f"{f(fr['graph path, float32']['p50_ms'])} |",
              f"| frame speed-up over the host path [95% CI] | 1x | {ci(gp['frame_speedup'])} | "
              f"{ci(gp['frame_speedup_float32'])} |",
              f"| frame - the core graph of the rows above (two paired runs) | {f(fr['host path']['p50_ms'] - core)} | "
              f"{f(fr['graph path']['p50_ms'] - core)} | {f(fr['graph path, float32']['p50_ms'] - core)} |"]
    if "all_in" in gp:
        a = gp["all_in"]["summaries"]
        c = a["core graph"]["p50_ms"]
        lines.append(f"| **pre/post all in**: frame - the core graph ({f(c)} ms) in one paired run; target <= 0.8 "
                     f"at 0.01 | {f(a['host path']['p50_ms'] - c)} | **{f(a['graph path']['p50_ms'] - c)}** | "
                     f"{f(a['graph path, float32']['p50_ms'] - c)} |")
    pf, pg = gp["dense_vs_pruned_frame"]["summaries"], gp["dense_vs_pruned_graph"]["summaries"]
    lines += ["", "Dense vs the same pruned probe, both in graph mode (paired): graph "
              f"{f(pg['dense']['p50_ms'])} -> {f(pg['pruned']['p50_ms'])} ms, speed-up {ci(gp['pruned_graph_speedup'])}; "
              f"frame {f(pf['dense']['p50_ms'])} -> {f(pf['pruned']['p50_ms'])} ms, speed-up "
              f"{ci(gp['pruned_frame_speedup'])}.", "",
              "| score threshold | val images | mAP, graph path | mAP, host path, uint8 | Δ | mAP, graph path, float32 | "
              "mAP, host path, float32 | Δ |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for thr in THRESHOLDS:
        m = gp["map"][str(thr)]
        lines.append(f"| {thr} | {m['images']} | {m['graph_path']:.4f} | {m['host_path_uint8']:.4f} | "
                     f"{m['graph_path'] - m['host_path_uint8']:+.4f} | {m['graph_path_float32']:.4f} | "
                     f"{m['host_path']:.4f} | {m['graph_path_float32'] - m['host_path']:+.4f} |")
    return lines

if __name__ == "__main__":
    raise SystemExit(main())
