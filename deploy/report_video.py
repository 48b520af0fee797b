"""Frames with detections drawn: the report's sample images and the optional annotated MP4.

The annotated video replays a stream as the car would have seen it: every recorded frame, with the
detections of the most recent frame the model had *finished* by then (a dropped frame shows stale
boxes, which is the point), and a banner with the frame's fate (latency, LATE, DROPPED). With two
models the frames are laid side by side, candidate on the left. ``max_frames`` stops it where the
validation run stopped. :func:`check_video_out` checks the destination before any replay.
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

#: Containers the annotated video can be written to (mp4v through OpenCV's FFmpeg backend).
VIDEO_OUT_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv")
BANNER_HEIGHT = 18  # px: the status banner across the top of each tile

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
        cv2.putText(out, text, label_origin(x1, y1, y2, out.shape[1], out.shape[0]), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4, colour, 1, cv2.LINE_AA)
    return out


def label_origin(x1: int, y1: int, y2: int, width: int, height: int, *, text_height: int = 10,
                 top: int = BANNER_HEIGHT) -> tuple[int, int]:
    """Where a box's label baseline goes: above the box, or inside its top edge when the space
    above is under the status banner (or off the frame); always within the frame."""
    x = min(max(x1 + 2, 0), max(width - 1, 0))
    y = y1 - 4
    if y - text_height < top:  # no room above the box: write just inside it
        y = max(y1, top) + text_height + 2
    return x, min(y, max(min(y2, height) - 2, top + text_height))


def banner(image: np.ndarray, text: str, *, alarm: bool) -> np.ndarray:
    """Write a one-line status banner across the top of an RGB frame (in place) and return it."""
    import cv2

    cv2.rectangle(image, (0, 0), (image.shape[1], BANNER_HEIGHT), (180, 0, 0) if alarm else (0, 0, 0), -1)
    cv2.putText(image, text, (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (255, 255, 255), 1, cv2.LINE_AA)
    return image


def check_video_out(dest: str | Path) -> Path:
    """Fail before any replay when ``--video-out`` could not be written, naming the cause.

    The folder must be writable (or creatable), the suffix a container in
    :data:`VIDEO_OUT_SUFFIXES`, and OpenCV's FFmpeg backend must open an mp4v writer for that
    container (probed in a temporary folder: nothing is written beside ``dest``).
    """
    import cv2

    from deploy.streams.base import quiet_native_logs
    from perception.io import check_writable_file

    dest = check_writable_file(dest, what="--video-out")
    if dest.suffix.lower() not in VIDEO_OUT_SUFFIXES:
        raise ValueError(f"--video-out {dest}: unsupported extension {dest.suffix or '(none)'!r}; "
                         f"use one of {', '.join(VIDEO_OUT_SUFFIXES)}")
    probe_dir = Path(tempfile.mkdtemp(prefix=".avprune-video-probe."))
    probe = probe_dir / f"probe{dest.suffix.lower()}"
    try:
        with quiet_native_logs(str(probe)):
            writer = _video_writer(probe, 10.0, (64, 48))
            ok = writer.isOpened()
            writer.release()
    finally:
        probe.unlink(missing_ok=True)
        probe_dir.rmdir()
    if not ok:
        raise ValueError(f"--video-out {dest}: this OpenCV build cannot write mp4v video into {dest.suffix} "
                         f"(FFmpeg backend {cv2.__version__}); try .mp4 or .avi")
    return dest


def _video_writer(path: Path, fps: float, size: tuple[int, int]):
    import cv2

    return cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"mp4v"), fps, size)


def write_annotated_video(spec: str, runs: Sequence[StreamRun], labels: Sequence[str], dest: str | Path, *,
                          fps: float | None = None, budget_ns: int, max_frames: int | None = None) -> Path:
    """Replay stream ``spec`` with each run's detections drawn; write ``dest`` (MP4) atomically.

    ``max_frames`` stops after that many frames (validate's ``--max-frames``: the frames it played).
    """
    import cv2

    from deploy.streams import open_stream

    dest = Path(dest)
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    by_id = [{r.frame_id: r for r in run.records} for run in runs]
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tmp = tmp_dir / dest.name  # keep the suffix: OpenCV picks the container from it
    writer = None
    try:
        with open_stream(spec, fps=fps) as reader:
            shown: list[Detections | None] = [None] * len(runs)
            for frame in reader:
                if max_frames is not None and frame.frame_id >= max_frames:  # frame ids count read frames
                    break
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
                    writer = _video_writer(tmp, rate, (canvas.shape[1], canvas.shape[0]))
                    if not writer.isOpened():
                        raise OSError(f"OpenCV cannot write {dest} (mp4v into {dest.suffix}); "
                                      "check the path with deploy.report_video.check_video_out")
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
