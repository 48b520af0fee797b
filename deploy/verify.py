"""Verify an exported ONNX against the PyTorch model it came from, on real frames.

Three checks, all run (so one report names every problem), then :class:`ExportMismatchError`
when any fails:

1. **raw outputs** (core form): every named output of ONNX Runtime vs the PyTorch core module on
   the same preprocessed batch, ``np.allclose(rtol, atol * scale)`` (1e-4 in fp32), where scale
   is ``max(1, rms(output))`` so large-magnitude outputs are judged relative to their size;
2. **detections**: after the shared post-processing, each PyTorch detection must have an ONNX
   detection of the same label with IoU >= 0.99 and the same score (order-free: NMS order among
   equal scores is not defined);
3. **mAP parity** on the data set with ``perception.evaluate.evaluate``: ``|ΔmAP| <= map_tolerance``.
   This is what catches an export that runs but whose outputs are wired by position (mAP ~ 0).

:func:`export_verified` is the one way the project writes an ONNX (``build-engine`` on a
checkpoint, the prune job's finalize stage): export, verify, and only then put the file in place.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from perception.detections import Detections

if TYPE_CHECKING:
    from deploy.export import Exporter, ExportResult, Form

log = logging.getLogger(__name__)


class ExportMismatchError(RuntimeError):
    """The exported graph does not compute what the PyTorch model computes (``.report`` says how)."""

    def __init__(self, message: str, report: VerifyReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class VerifyReport:
    onnx_path: str
    form: str
    frames: int
    max_abs_diff: dict[str, float]  # per raw output (core form)
    matched_fraction: float  # of PyTorch detections found in the ONNX Runtime output
    map_pytorch: float | None
    map_onnx: float | None
    map_delta: float | None
    passed: bool
    failures: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-9)


def _tied(scores: np.ndarray, tie_atol: float) -> np.ndarray:
    """Which of ``scores`` has another of ``scores`` within ``tie_atol``."""
    close = np.abs(scores[:, None] - scores[None, :]) <= tie_atol
    close[np.arange(len(scores)), np.arange(len(scores))] = False  # a detection does not tie itself
    return close.any(axis=1)


def match_counts(ref: Detections, got: Detections, *, score_atol: float = 1e-3, min_iou: float = 0.99,
                 tie_atol: float | None = None) -> tuple[int, int, int]:
    """(reproduced, excused, total): how many ``ref`` detections ``got`` reproduces (same label, IoU,
    score; order-free) and, with ``tie_atol``, how many of the rest are excused as exact ties.

    Float noise between runtimes (~1e-7) decides the order of scores that are equal to the last bits,
    so which of a tied set survives top-k and NMS is not the export's doing; a barely trained model
    gives hundreds of identical scores. A missing detection whose score ties another reference
    detection (within ``tie_atol``) is therefore excused, not failed. The partner must be in ``ref``:
    a ``got`` box with the same score could be a mis-decoded box, which must still fail.
    """
    if len(ref) == 0:
        return (0, 0, 0)
    used = np.zeros(len(got), bool)
    missed = []
    for i in np.argsort(-ref.scores):
        cand = np.flatnonzero((got.labels == ref.labels[i]) & ~used & (np.abs(got.scores - ref.scores[i]) <= score_atol))
        if cand.size:
            ious = _iou(ref.boxes[i], got.boxes[cand])
            best = int(np.argmax(ious))
            if ious[best] >= min_iou:
                used[cand[best]] = True
                continue
        missed.append(i)
    excused = 0
    if tie_atol is not None and missed:
        excused = int(_tied(ref.scores, tie_atol)[missed].sum())
    return (len(ref) - len(missed), excused, len(ref))


def match_fraction(ref: Detections, got: Detections, *, score_atol: float = 1e-3, min_iou: float = 0.99,
                   tie_atol: float | None = None) -> float:
    """Fraction of ``ref`` detections that ``got`` reproduces (same label, IoU, score), order-free;
    with ``tie_atol``, exact ties that float noise swapped are left out of the count (:func:`match_counts`)."""
    return _fraction(match_counts(ref, got, score_atol=score_atol, min_iou=min_iou, tie_atol=tie_atol), len(got))


def _fraction(counts: tuple[int, int, int], n_got: int) -> float:
    """:func:`match_counts` as a fraction; an empty reference matches only an empty result."""
    hits, excused, total = counts
    if total == 0:
        return 1.0 if n_got == 0 else 0.0
    return 1.0 if total == excused else hits / (total - excused)


def verify_export(
    model: nn.Module,
    onnx_path: str | Path,
    dataset: Any,
    *,
    frames: int = 8,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    map_tolerance: float = 0.002,
    max_images: int | None = None,
    min_matched: float = 0.98,
    tie_atol: float = 1e-5,
    threads: int | None = None,
) -> VerifyReport:
    """Compare ONNX Runtime on ``onnx_path`` with PyTorch ``model`` on ``dataset`` (a
    ``perception.data.CocoDetectionDataset``); raise :class:`ExportMismatchError` on any failure."""
    from deploy.export import read_onnx_meta
    from deploy.runtimes.ort import OrtRuntime
    from deploy.runtimes.pytorch import PyTorchRuntime
    from perception.evaluate import evaluate

    onnx_path = Path(onnx_path)
    doc = read_onnx_meta(onnx_path)
    form = doc["form"]
    n = min(frames, len(dataset))
    if n < 1:
        raise ValueError(f"verify_export needs at least one frame; the data set has {len(dataset)}")
    imgs = [dataset.load_image(i) for i in range(n)]
    failures: list[str] = []
    notes: list[str] = []
    diffs: dict[str, float] = {}
    was_training = model.training
    ref = PyTorchRuntime(model, form=form, threads=threads)
    with OrtRuntime(onnx_path, threads=threads) as got:
        prepared = ref.preprocess(imgs)
        raw_ref = ref.run(prepared)
        try:
            raw_got = got.run(prepared)
            if form == "core":
                for name, r in raw_ref.items():
                    r = r.numpy()
                    g = raw_got.get(name)
                    if g is None or g.shape != r.shape:
                        failures.append(f"output {name!r}: shape {None if g is None else g.shape} vs PyTorch {r.shape}")
                        continue
                    diffs[name] = float(np.max(np.abs(g.astype(np.float64) - r))) if r.size else 0.0
                    # atol is in units of the output's own scale: FPN features of magnitude ~50
                    # carry float32 accumulation-order noise ~1e-4 that says nothing about the export
                    scale = max(1.0, float(np.sqrt(np.mean(np.square(r, dtype=np.float64))))) if r.size else 1.0
                    if not np.allclose(g, r, rtol=rtol, atol=atol * scale):
                        failures.append(f"output {name!r}: max |diff| {diffs[name]:.3g} exceeds rtol={rtol}, atol={atol}")
            dets_got = got.postprocess(raw_got, prepared)
        except Exception as e:  # a mis-wired graph often breaks post-processing: report it, do not crash
            failures.append(f"ONNX Runtime output cannot be post-processed ({type(e).__name__}: {e})")
            dets_got = None
        dets_ref = ref.postprocess(raw_ref, prepared)
        matched = 0.0
        if dets_got is not None:
            counts = [match_counts(a, b, tie_atol=tie_atol) for a, b in zip(dets_ref, dets_got, strict=True)]
            matched = float(np.mean([_fraction(c, len(b)) for c, b in zip(counts, dets_got, strict=True)]))
            excused = sum(c[1] for c in counts)
            if excused:
                notes.append(f"{excused} detections tied in score (within {tie_atol:g}) with another were not "
                             "reproduced: float noise orders exact ties, so these are not counted")
            if matched < min_matched:
                failures.append(f"only {matched:.1%} of PyTorch detections reproduced by ONNX Runtime (need {min_matched:.0%})")
        map_ref = map_got = delta = None
        try:
            map_ref = evaluate(ref.infer, dataset, max_images=max_images).map
            map_got = evaluate(got.infer, dataset, max_images=max_images).map
            delta = map_got - map_ref
            if not abs(delta) <= map_tolerance:  # also false for NaN
                hint = ""
                if map_ref > 0.05 and map_got < 0.25 * map_ref:
                    hint = " - outputs are probably mapped by position, not by name"
                failures.append(f"mAP {map_got:.4f} (ONNX Runtime) vs {map_ref:.4f} (PyTorch): |Δ| > {map_tolerance}{hint}")
            if map_ref < 0.01:
                notes.append("PyTorch mAP is ~0 on this data set: mAP parity is vacuous; raw and detection checks still apply")
        except Exception as e:
            failures.append(f"mAP evaluation of the ONNX model failed ({type(e).__name__}: {e})")
    model.train(was_training)
    report = VerifyReport(
        onnx_path=str(onnx_path), form=form, frames=n, max_abs_diff=diffs, matched_fraction=matched,
        map_pytorch=map_ref, map_onnx=map_got, map_delta=delta, passed=not failures,
        failures=tuple(failures), notes=tuple(notes),
    )
    if failures:
        raise ExportMismatchError(
            f"{onnx_path} does not match the PyTorch model:\n  - " + "\n  - ".join(failures), report
        )
    log.info("verified %s: max diff %s, matched %.1f%%, mAP %.4f vs %.4f", onnx_path.name,
             {k: f"{v:.1e}" for k, v in diffs.items()}, 100 * matched, map_got, map_ref)
    return report


@dataclass(frozen=True)
class VerifiedExport:
    """An ONNX file (plus Faster R-CNN's stage-2 graph) that passed output and mAP parity."""

    export: ExportResult  # paths are the final ones
    report: VerifyReport  # raw-output diffs, matched detections, mAP PyTorch vs ONNX Runtime
    score_thresh: float  # the deployed score threshold the graph and the check ran with

    @property
    def path(self) -> Path:
        return self.export.path

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary for reports and sidecars (file names, exporter, parity numbers)."""
        r = self.report
        return {
            "onnx": self.export.path.name, "stage2": self.export.stage2_path.name if self.export.stage2_path else None,
            "form": self.export.form, "exporter": self.export.exporter_used, "score_thresh": self.score_thresh,
            "frames": r.frames, "max_abs_diff": r.max_abs_diff, "matched_fraction": r.matched_fraction,
            "map_pytorch": r.map_pytorch, "map_onnx": r.map_onnx, "map_delta": r.map_delta, "notes": list(r.notes),
        }


def _score_thresh_holder(model: nn.Module) -> Any:
    """The object holding the detector's final ``score_thresh`` (``roi_heads`` for two-stage ones)."""
    holder = model.roi_heads if hasattr(model, "roi_heads") else model
    if not hasattr(holder, "score_thresh"):
        raise TypeError(f"{type(model).__name__} has no score_thresh (not a torchvision detector?)")
    return holder


def export_verified(
    model: nn.Module | str | Path,
    out_onnx: str | Path,
    val: Any,
    *,
    form: Form = "core",
    exporter: Exporter = "auto",
    score_thresh: float | None = None,
    frames: int = 8,
    max_images: int | None = None,
    map_tolerance: float = 0.002,
    threads: int | None = None,
    opset: int = 17,
    dynamic_batch: bool = True,
) -> VerifiedExport:
    """Export ``model`` to ``out_onnx`` and keep the file only if ONNX Runtime reproduces it.

    Args:
        model: a factory detector (``perception.models.build_detector``/``load_detector``, dense or
            physically pruned; it carries its name, classes and input size in ``avprune_meta``), or
            the path of an avprune checkpoint.
        out_onnx: destination; Faster R-CNN's core form also writes ``<stem>.stage2.onnx`` beside it.
        val: the verification data: a ``perception.data.CocoDetectionDataset`` (e.g. the prune
            job's validation set), or a COCO root whose ``val`` split is loaded (``annotations/
            instances_val.json`` + ``val/``).
        form, exporter, opset, dynamic_batch: as in :func:`deploy.export.export_onnx`.
        score_thresh: the deployed score threshold, in (0, 1); ``None`` keeps the model's. It is
            exported into the graph's metadata and used on both sides of the check; ``model``
            keeps its own threshold afterwards.
        frames, max_images, map_tolerance, threads: as in :func:`verify_export` (``frames`` images
            for the raw-output and detection checks, ``max_images`` for mAP parity, all if None).

    The export goes to a temporary folder beside ``out_onnx`` and is moved into place only after
    :func:`verify_export` passed, so a file at ``out_onnx`` has always passed output and mAP
    parity. Raises :class:`ExportMismatchError` (with ``.report``) otherwise, leaving any earlier
    file at ``out_onnx`` untouched.
    """
    from deploy.export import export_onnx
    from perception.io import replace_into

    if not isinstance(model, nn.Module):
        from perception.models import load_detector

        model = load_detector(model)
    if isinstance(val, str | Path):
        from perception.data import load_split

        val = load_split(val, "val", train=False)
    out_onnx = Path(out_onnx)
    out_onnx.parent.mkdir(parents=True, exist_ok=True)
    holder = _score_thresh_holder(model)
    own_thresh = holder.score_thresh
    if score_thresh is not None and not 0.0 < float(score_thresh) < 1.0:
        raise ValueError(f"score_thresh {score_thresh!r} must be in (0, 1), e.g. 0.01 or 0.3 (None keeps the model's)")
    try:
        if score_thresh is not None:
            holder.score_thresh = float(score_thresh)
        with tempfile.TemporaryDirectory(prefix=f".{out_onnx.name}.", dir=out_onnx.parent) as tmp:
            res = export_onnx(model, Path(tmp) / out_onnx.name, form=form, opset=opset,
                              dynamic_batch=dynamic_batch, exporter=exporter)
            report = verify_export(model, res.path, val, frames=frames, max_images=max_images,
                                   map_tolerance=map_tolerance, threads=threads)
            stage2 = None
            if res.stage2_path is not None:  # the graph the main file names goes first
                stage2 = replace_into(res.stage2_path, out_onnx.with_name(res.stage2_path.name))
            replace_into(res.path, out_onnx)
        used = float(holder.score_thresh)
    finally:
        holder.score_thresh = own_thresh
    final = dataclasses.replace(res, path=out_onnx, stage2_path=stage2)
    report = dataclasses.replace(report, onnx_path=str(out_onnx))
    return VerifiedExport(export=final, report=report, score_thresh=used)
