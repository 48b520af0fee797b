"""Frames with detections drawn: the report's sample images and the optional annotated MP4.

The annotated video replays a stream as the car would have seen it: every recorded frame, with the
detections of the most recent frame the model had *finished* by then (a dropped frame shows stale
boxes, which is the point), and a banner with the frame's fate (latency, LATE, DROPPED). With two
models the frames are laid side by side, candidate on the left.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deploy.realtime import DECODE_FAILED, DROPPED, PROCESSED, StreamRun
from perception.classes import DRIVE_CLASSES
from perception.detections import Detections

log = logging.getLogger(__name__)

#: One colour per drive class (RGB), then grey for ids outside the default set.
CLASS_COLOURS = ((230, 25, 75), (245, 130, 48), (255, 225, 25), (60, 180, 75), (70, 240, 240),
                 (0, 130, 200), (145, 30, 180))


def class_name(label: int) -> str:
    return DRIVE_CLASSES[label - 1] if 1 <= label <= len(DRIVE_CLASSES) else f"class {label}"


def draw_detections(image: np.ndarray, dets: Detections, *, score_threshold: float = 0.3,
                    max_boxes: int = 30) -> np.ndarray:
    """A copy of an RGB frame with the ``max_boxes`` best detections above the threshold drawn."""
    import cv2

    out = np.ascontiguousarray(image.copy())
    keep = np.argsort(-dets.scores)[:max_boxes]
    for i in keep:
        if dets.scores[i] < score_threshold:
            break
        label = int(dets.labels[i])
        colour = CLASS_COLOURS[label - 1] if 1 <= label <= len(CLASS_COLOURS) else (160, 160, 160)
        x1, y1, x2, y2 = (int(round(v)) for v in dets.boxes[i])
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, 2)
        text = f"{class_name(label)} {dets.scores[i]:.2f}"
        cv2.putText(out, text, (x1 + 2, max(y1 - 4, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1, cv2.LINE_AA)
    return out


def banner(image: np.ndarray, text: str, *, alarm: bool) -> np.ndarray:
    """Write a one-line status banner across the top of an RGB frame (in place) and return it."""
    import cv2

    cv2.rectangle(image, (0, 0), (image.shape[1], 18), (180, 0, 0) if alarm else (0, 0, 0), -1)
    cv2.putText(image, text, (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (255, 255, 255), 1, cv2.LINE_AA)
    return image


def write_annotated_video(spec: str, runs: Sequence[StreamRun], labels: Sequence[str], dest: str | Path, *,
                          fps: float | None = None, budget_ns: int) -> Path:
    """Replay stream ``spec`` with each run's detections drawn; write ``dest`` (MP4) atomically."""
    import cv2

    from deploy.streams import open_stream

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    by_id = [{r.frame_id: r for r in run.records} for run in runs]
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tmp = tmp_dir / dest.name  # keep the suffix: OpenCV picks the container from it
    writer = None
    try:
        with open_stream(spec, fps=fps) as reader:
            shown: list[Detections | None] = [None] * len(runs)
            for frame in reader:
                tiles = []
                for m, run in enumerate(runs):
                    rec = by_id[m].get(frame.frame_id)
                    if rec is not None and rec.status == PROCESSED and frame.frame_id in run.detections:
                        shown[m] = run.detections[frame.frame_id]
                    tile = draw_detections(frame.frame, shown[m]) if shown[m] is not None else frame.frame.copy()
                    text, alarm = _status(rec, budget_ns)
                    tiles.append(banner(tile, f"{labels[m]} #{frame.frame_id} {text}", alarm=alarm))
                canvas = np.concatenate(tiles, axis=1)
                if writer is None:
                    rate = recorded_fps(runs[0]) or fps or 10.0
                    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), rate,
                                             (canvas.shape[1], canvas.shape[0]))
                    if not writer.isOpened():
                        raise RuntimeError(f"OpenCV cannot write {dest} (mp4v codec unavailable)")
                writer.write(cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
        if writer is None:
            raise ValueError(f"stream {spec}: no frame to write to {dest}")
        writer.release()
        writer = None
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        if writer is not None:
            writer.release()
        tmp.unlink(missing_ok=True)
        tmp_dir.rmdir()
    return dest


def _status(rec, budget_ns: int) -> tuple[str, bool]:
    if rec is None:
        return "not played", False
    if rec.status == DROPPED:
        return "DROPPED", True
    if rec.status == DECODE_FAILED:
        return "DECODE FAILED", True
    latency_ms = (rec.latency_ns or 0) / 1e6
    late = rec.missed(budget_ns)
    suffix = " warm-up" if rec.warmup else (" LATE" if late else "")
    return f"{latency_ms:.1f} ms{suffix}", late and not rec.warmup


def recorded_fps(run: StreamRun) -> float | None:
    """The stream's frame rate from its recorded timestamps (median period, robust to gaps)."""
    stamps = sorted(r.timestamp_ns for r in run.records)
    periods = np.diff(stamps)
    periods = periods[periods > 0]
    return float(1e9 / np.median(periods)) if len(periods) else None
