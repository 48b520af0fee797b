"""Checks every command runs on its inputs before the expensive part (export, fine-tune, replay).

Each check raises the error a CLI user can act on (ValueError / OSError naming the value, the
file and the fix; exit code 2). They cost milliseconds to about a second: opening files, reading
a checkpoint's tensors, decoding one frame per stream. Nothing here writes anything.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from perception.names import CHECKPOINT_FORMAT

CHECKPOINT_SUFFIXES = (".pt", ".pth")


def check_checkpoint(path: str | Path) -> None:
    """A .pt/.pth that torch reads safely and that says which detector it is; no model is built.

    Text, random bytes, truncated archives, pickled objects and plain state_dicts fail before torch
    is imported (:func:`checkpoint_identity` with ``full=False``); damaged tensors at
    ``torch.load(weights_only=True)``.
    """
    checkpoint_identity(path)


def checkpoint_identity(path: str | Path, *, full: bool = True) -> dict[str, Any]:
    """The detector a checkpoint says it is (``name``, ``num_classes``), read safely (no code runs).

    First without torch (:func:`perception.io.peek_torch_file`, milliseconds): text, random bytes,
    pickled Python objects and a plain state_dict are refused there. ``full=True`` then reads every
    tensor with ``torch.load(weights_only=True)`` (seconds: the torch import); ``full=False`` stops
    after the peek when it could tell the identity, so callers can run their other cheap checks
    before paying for torch.

    A plain state_dict does not say which detector it is: refused with what to do from the CLI
    (``avprune train`` starts from one and writes a checkpoint that does).
    """
    from perception.io import peek_torch_file

    peeked = _identity(path, peek_torch_file(path))
    if peeked is not None and not full:
        return peeked
    from perception.models import read_checkpoint

    ckpt = read_checkpoint(path)  # torch.load(weights_only=True): pickled objects, damaged tensors
    identity = _identity(path, ckpt if ckpt["format"] == CHECKPOINT_FORMAT else ckpt["state_dict"])
    assert identity is not None  # read_checkpoint returns ours or a state_dict: _identity decides both
    return identity


def _identity(path: str | Path, obj: Any) -> dict[str, Any] | None:
    """``name`` and ``num_classes`` from what a checkpoint file holds (None: cannot tell from ``obj``).

    Mirrors :func:`perception.models.read_checkpoint`: an avprune checkpoint carries them; a dict of
    tensors, or torchvision's ``{"model": state_dict, ...}``, is a plain state_dict and is refused.
    """
    from perception.classes import DEFAULT_NUM_CLASSES
    from perception.io import PeekedTensor

    def tensors(d: Any) -> bool:
        return isinstance(d, dict) and all(isinstance(v, PeekedTensor) or _is_torch_tensor(v) for v in d.values())

    if not isinstance(obj, dict):
        return None
    if obj.get("format") == CHECKPOINT_FORMAT and "name" in (obj.get("model") or {}):
        meta = obj["model"]
        return {"name": str(meta["name"]), "num_classes": int(meta.get("num_classes", DEFAULT_NUM_CLASSES))}
    if obj.get("format") == CHECKPOINT_FORMAT or tensors(obj) or tensors(obj.get("model")):
        raise ValueError(
            f"{path} is a plain state_dict: it does not say which detector or how many classes it has. "
            "Turn it into an avprune checkpoint with `avprune train TRAIN.yaml` (model.checkpoint: this file, "
            "model.name and model.num_classes it was trained with) and use the model.pt it writes"
        )
    return None


def _is_torch_tensor(v: Any) -> bool:
    torch = sys.modules.get("torch")  # never imported here: a tensor can only exist once torch is
    return torch is not None and isinstance(v, torch.Tensor)


def check_models(models: list[str], *, full: bool = True) -> None:
    """Every model exists; checkpoints among them are readable (a reference model included).

    ``full=False`` only peeks into the files (no torch import): the cheap checks of every input run
    first, so a bad stream or path is reported in a second, not after torch has loaded.
    """
    for m in models:
        p = Path(m)
        if not p.exists():
            raise FileNotFoundError(f"model not found: {p}")
        if p.suffix.lower() in CHECKPOINT_SUFFIXES:
            checkpoint_identity(p, full=full)


def check_prune_job(config) -> None:
    """``avprune prune``: the dense checkpoint is the job's model and the data has images and boxes,
    before Ray starts or OUT is created (:mod:`avprune.prune_job.preflight`)."""
    from avprune.prune_job.preflight import check_job_inputs

    check_job_inputs(config)


def check_validate_args(args: argparse.Namespace) -> None:
    """``avprune validate``: models, every stream's first frame, and ``--video-out``, before replay."""
    from deploy.streams import preflight

    if args.max_frames is not None and args.max_frames < 1:
        raise ValueError(f"--max-frames must be >= 1; got {args.max_frames}")
    if args.fps is not None and not args.fps > 0:
        raise ValueError(f"--fps must be > 0; got {args.fps}")
    check_models(list(args.models), full=False)  # cheapest first: no torch import yet
    preflight(list(args.stream), fps=args.fps)
    if args.video_out:
        from deploy.report_video import check_video_out

        check_video_out(args.video_out)
    if args.report:
        from perception.io import check_writable_file

        check_writable_file(Path(args.report) / "report.json", what="--report")
    check_models(list(args.models))  # torch.load(weights_only=True) of every checkpoint


def check_build_engine_args(args: argparse.Namespace) -> None:
    """``avprune build-engine``: option combinations, inputs and output paths, before any export."""
    from perception.io import check_writable_file

    model = Path(args.model)
    if not model.exists():
        raise FileNotFoundError(f"model not found: {model}")
    is_checkpoint = model.suffix.lower() in CHECKPOINT_SUFFIXES
    if not is_checkpoint and model.suffix.lower() != ".onnx":
        raise ValueError(f"MODEL {model}: expected an exported .onnx or a .pt/.pth checkpoint")
    if is_checkpoint:
        check_models([str(model)], full=False)
    for name in ("workspace", "calib_frames"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    for name in ("verify_images", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {value}")
    if args.precision == "int8":
        if args.calib is None:
            raise ValueError("--precision int8 needs --calib DATA (a COCO root or a recorded stream) to "
                             "calibrate on; nothing was exported")
        _check_calib(args.calib)
        if not args.int8_max_map_drop >= 0:
            raise ValueError(f"--int8-max-map-drop must be >= 0; got {args.int8_max_map_drop}")
        int8_val = args.val or (args.calib if (Path(args.calib) / "annotations").is_dir() else None)
        if int8_val is None:
            raise ValueError("--precision int8 is verified by mAP against fp32 on a COCO set: pass --val COCO_ROOT "
                             "(--calib may stay a recorded stream); nothing was exported")
        _check_coco_root(int8_val, "--val")
    from deploy.engine.build import choose_backend

    backend, _ = choose_backend(args.backend)  # --backend tensorrt without TensorRT fails here, not after export
    if backend == "onnxruntime":
        from deploy.engine.ort_builder import check_ort_precision

        check_ort_precision(args.precision)
    if args.shapes:
        from deploy.engine.shapes import parse_shapes

        parse_shapes(args.shapes)
    out = Path(args.out)
    if out.resolve() == model.resolve():
        raise ValueError(f"--out {out} would overwrite the source model; pick another path")
    check_writable_file(out, what="--out")
    if args.timing_cache:
        check_writable_file(args.timing_cache, what="--timing-cache")
    if is_checkpoint:
        val = args.val or (args.calib if args.calib and (Path(args.calib) / "annotations").is_dir() else None)
        if val is None:
            raise ValueError(f"{model} is a checkpoint: its export is verified on a data set; pass --val COCO_ROOT "
                             "(e.g. the 'coco' folder of avprune data synth)")
        _check_coco_root(val, "--val")
        check_checkpoint(model)
    elif args.score_thresh is not None:
        raise ValueError(f"--score-thresh applies when MODEL is a .pt checkpoint; {model} is already exported "
                         "with its threshold: rebuild from the checkpoint")


def _check_coco_root(root: str | Path, option: str) -> None:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{option} {root}: COCO folder not found")
    if not (root / "annotations").is_dir():
        raise ValueError(f"{option} {root}: not a COCO folder (no annotations/ inside)")


def _check_calib(calib: str) -> None:
    """A COCO root, or a recorded stream whose first frame decodes."""
    path = Path(calib)
    if path.is_dir() and (path / "annotations").is_dir():
        return
    from deploy.streams import preflight

    preflight([calib])
