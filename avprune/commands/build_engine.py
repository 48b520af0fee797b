"""`avprune build-engine MODEL --out ENGINE`: verified ONNX -> TensorRT (or ONNX Runtime) engine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_EPILOG = """\
graph forms (MODEL.pt is exported with --form; an .onnx keeps the form it was exported with):
  core  backbone + heads only, raw box regressions and class logits (Faster R-CNN: backbone +
        FPN + RPN head, plus a small box-head graph). TensorRT prefers it: static shapes and
        no data-dependent loops, so every layer can be fused and tuned; decoding and one
        batched NMS per image run in avprune's post-processing (an in-vehicle stack can put
        TensorRT's EfficientNMS plugin there instead).
  full  torchvision's decoding and NMS traced into the graph (batch 1). Its per-class loops
        unroll into hundreds of small ops: SSDlite's 91-class full graph runs ~3x slower in
        ONNX Runtime than eager PyTorch, and its data-dependent output shapes are awkward
        for TensorRT.

backends: TensorRT when `tensorrt` imports and a CUDA device exists (TensorRT 10.x through
BuilderFlag FP16/INT8/SPARSE_WEIGHTS; 11.x, strongly typed, through an fp16 or Q/DQ ONNX),
ONNX Runtime everywhere else (graph-optimised model saved to disk; int8 = static QDQ calibrated
on --calib frames; no fp16 on CPU). The engine is written with ENGINE.json beside it: backend,
device, precision, sparsity, shapes, source sha256 and per-layer 2:4 pattern / TensorRT
eligibility.

examples:
  avprune build-engine runs/pruned/model.onnx --out runs/pruned/model.engine --precision fp16 \\
      --sparsity enable --shapes 1x3x320x320/4x3x320x320/8x3x320x320 --timing-cache runs/trt.cache
  avprune build-engine runs/pruned/model.pt --val data/coco --out runs/pruned/int8.onnx \\
      --precision int8 --calib data/coco
"""


def register(sub) -> None:
    p = sub.add_parser(
        "build-engine",
        help="verified ONNX -> TensorRT (or ONNX Runtime) engine with a sidecar",
        description=__doc__,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="exported MODEL.onnx, or a .pt checkpoint (exported and verified first)")
    p.add_argument("--out", required=True, metavar="ENGINE", help="engine file to write (ENGINE.json is written beside it)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32")
    p.add_argument("--sparsity", choices=("disable", "enable"), default="disable",
                   help="enable: let TensorRT use 2:4 sparse kernels where weights hold the pattern")
    p.add_argument("--shapes", default=None, metavar="MIN/OPT/MAX",
                   help="input shapes, e.g. 1x3x320x320/4x3x320x320/8x3x320x320 (default: batch 1/4/8)")
    p.add_argument("--timing-cache", default=None, metavar="FILE", help="TensorRT timing cache, created or reused")
    p.add_argument("--workspace", type=int, default=2048, metavar="MB", help="TensorRT workspace limit (MB)")
    p.add_argument("--calib", default=None, metavar="DATA",
                   help="int8 calibration frames: a COCO root or a recorded stream (video, MCAP, rosbag, folder)")
    p.add_argument("--calib-frames", type=int, default=32, metavar="N", help="calibration frames to use")
    p.add_argument("--int8-max-map-drop", type=float, default=0.01, metavar="D",
                   help="int8: the engine is kept only if its mAP on the --val images is at most D below the "
                        "fp32 model's (default 0.01); it is also timed against fp32 here, with a warning when slower")
    p.add_argument("--backend", choices=("auto", "tensorrt", "onnxruntime"), default="auto")
    p.add_argument("--form", choices=("core", "full"), default="core", help="graph form when MODEL is a .pt")
    p.add_argument("--val", default=None, metavar="COCO_ROOT",
                   help="data set that verifies the export of a .pt (split 'val'); default: --calib if it is a COCO root")
    p.add_argument("--verify-images", type=int, default=None, metavar="N", help="images for the mAP parity check")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--score-thresh", type=float, default=None, metavar="T",
                   help="deployed score threshold when MODEL is a .pt (default: the checkpoint's, 0.001 for "
                        "SSDlite, a COCO-benchmark setting). 0.01 cuts decoding + NMS ~3x; a converged model "
                        "keeps its mAP, an under-trained one (low scores) loses some: the verify line prints the mAP at it")
    p.set_defaults(func=run, error_exit_code=1)


def _export_checkpoint(args: argparse.Namespace, out: Path) -> Path:
    """Export a .pt to a verified ONNX beside the engine (deploy.verify.export_verified); returns its path."""
    from deploy.verify import export_verified

    val = args.val or (args.calib if args.calib and (Path(args.calib) / "annotations").is_dir() else None)
    if val is None:
        raise ValueError(
            f"{args.model} is a checkpoint: its export is verified on a data set; pass --val COCO_ROOT "
            "(e.g. the 'coco' folder of avprune data synth)"
        )
    res = export_verified(args.model, out.with_name(f"{out.stem}.source.onnx"), val, form=args.form,
                          score_thresh=args.score_thresh, max_images=args.verify_images, threads=args.threads)
    exp, rep = res.export, res.report
    print(f"exported {args.model} -> {res.path} ({exp.form} form, {exp.exporter_used} exporter"
          + (f"; dynamo failed: {exp.fallback_reason}" if exp.fallback_reason else "") + ")")
    print(f"verified: max |diff| {max(rep.max_abs_diff.values(), default=0.0):.2e}, "
          f"detections matched {rep.matched_fraction:.1%}, mAP {rep.map_onnx:.4f} vs PyTorch {rep.map_pytorch:.4f} "
          f"at score threshold {res.score_thresh:g}")
    for note in rep.notes:
        print(f"note: {note}")
    return res.path


def run(args: argparse.Namespace) -> int:
    from avprune.checks import check_build_engine_args
    from deploy.engine.build import build_engine

    check_build_engine_args(args)  # options, inputs and output paths before any export
    model, out = Path(args.model), Path(args.out)
    if not model.exists():
        raise FileNotFoundError(f"model not found: {model}")
    if model.suffix in (".pt", ".pth"):
        model = _export_checkpoint(args, out)
    elif args.score_thresh is not None:
        raise ValueError(f"--score-thresh applies when MODEL is a .pt checkpoint; {model} is already exported "
                         "with its threshold: rebuild from the checkpoint")
    res = build_engine(
        model, out, precision=args.precision, sparsity=args.sparsity == "enable", shapes=args.shapes,
        timing_cache=args.timing_cache, workspace_mb=args.workspace, calib=args.calib,
        calib_frames=args.calib_frames, backend=args.backend, threads=args.threads,
    )
    sc = res.sidecar
    counts = sc["sparsity_summary"]
    print(f"backend: {res.backend} - {res.reason}")
    print(f"engine: {res.engine_path} ({sc['precision']}, sparsity {sc['sparsity']}, "
          f"{sc['export']['form']} form, built in {sc['build_seconds']:.1f} s)")
    print(f"2:4 pattern: {counts['pattern_2to4']}/{counts['layers']} layers; TensorRT-eligible: "
          f"{counts['trt_eligible']} ({counts['eligible_and_2to4']} of them 2:4)")
    for note in sc.get("notes", []):
        print(f"note: {note}")
    if args.precision == "int8":
        _verify_int8(args, model, res)
    print(f"sidecar: {res.sidecar_path}")
    sys.stdout.flush()
    return 0


def _verify_int8(args: argparse.Namespace, fp32_model: Path, res) -> None:
    """mAP parity of the INT8 engine with its fp32 source and a paired speed check; the engine is
    removed when parity fails (exit 1), and a slower INT8 is a warning line."""
    from deploy.engine.int8_check import Int8ParityError, verify_int8
    from deploy.engine.sidecar import read_sidecar, write_sidecar
    from perception.data import load_split

    val = load_split(_coco_for_verify(args), "val", train=False)
    try:
        check = verify_int8(fp32_model, res.engine_path, val, max_map_drop=args.int8_max_map_drop,
                            max_images=args.verify_images, threads=args.threads)
    except Int8ParityError as e:
        doc = read_sidecar(res.engine_path)
        for name in (res.engine_path.name, doc.get("qdq_onnx"), (doc.get("stage2") or {}).get("file")):
            if name:
                (res.engine_path.parent / name).unlink(missing_ok=True)
        res.sidecar_path.unlink(missing_ok=True)
        raise Int8ParityError(f"{e}; engine not written (build fp32 here, or calibrate on more representative "
                              "frames: --calib, --calib-frames; the bound is --int8-max-map-drop)") from None
    doc = read_sidecar(res.engine_path)
    doc["int8_verification"] = check.to_dict()
    write_sidecar(res.engine_path, {k: v for k, v in doc.items() if k not in ("format", "version")})
    print(f"int8 verified: mAP {check.map_int8:.4f} vs fp32 {check.map_fp32:.4f} on {check.images} images "
          f"(drop {check.map_drop:+.4f} <= {check.max_map_drop:g})")
    for note in check.notes:
        print(f"note: {note}")
    if check.slower:
        print(f"warning: {check.speed_line()}: INT8 is slower than fp32 on this machine; --precision fp32 "
              "would run faster here")
    else:
        print(check.speed_line())


def _coco_for_verify(args: argparse.Namespace) -> str:
    """The COCO root the engine is verified on: --val, else --calib when it is a COCO root."""
    val = args.val or (args.calib if args.calib and (Path(args.calib) / "annotations").is_dir() else None)
    if val is None:
        raise ValueError("--precision int8 is verified by mAP against fp32 on a COCO set: pass --val COCO_ROOT")
    return str(val)
