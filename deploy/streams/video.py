"""Video files through OpenCV's FFmpeg backend.

Timestamps come from ``CAP_PROP_POS_MSEC`` read right after ``grab()`` (the presentation time of
the frame just grabbed). Some backends report 0 for every frame or jump backwards after a seek or
a damaged packet; from the first such frame on, the reader falls back to the last good timestamp
plus ``frame index / FPS`` and says so in ``notes``.

Decoding happens at read time: FFmpeg decodes sequentially, so a frame cannot be kept encoded
while later ones are read. A video therefore behaves like a camera driver that delivers decoded
frames; the ``decode`` stage of a video packet is the BGR->RGB conversion only.

A video that does not open (empty, garbage, or an MP4 whose ``moov`` index was never written
because the recorder died) raises StreamError at open; one that ends before the frame count its
container promises raises StreamError naming the frame where it broke off.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from deploy.streams.base import (
    DecodeError,
    Packet,
    StreamError,
    StreamReader,
    as_rgb_frame,
    check_file,
    quiet_native_logs,
)

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".h264", ".hevc")


class VideoReader(StreamReader):
    """Frames of one video file; ``fps`` is used only when the container does not give one."""

    kind = "video"

    def __init__(self, path: str | Path, *, fps: float | None = None) -> None:
        super().__init__(path)
        check_file(self.path, "video")
        import cv2

        with quiet_native_logs(str(self.path)):
            self._cap = cv2.VideoCapture(str(self.path), cv2.CAP_FFMPEG)
        if not self._cap.isOpened():
            size = self.path.stat().st_size
            raise StreamError(
                f"video {self.path} ({size} bytes) cannot be opened: not a video, an unsupported codec, "
                "or a truncated recording (an MP4 whose index was never written)"
            )
        container_fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = container_fps if container_fps > 0 and math.isfinite(container_fps) else fps
        count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.expected_frames = count if count > 0 else None
        self.fallback_frames = 0

    def _period_ns(self, frame_index: int) -> float:
        if not self.fps:
            raise StreamError(
                f"video {self.path}: frame {frame_index} has no usable timestamp and the container "
                "gives no FPS; pass --fps"
            )
        return 1e9 / self.fps

    def _packets(self) -> Iterator[Packet]:
        import cv2

        anchor_index, anchor_ns = 0, 0  # last frame with a trustworthy backend timestamp
        prev_ns: int | None = None
        index = 0
        while True:
            if not self._cap.grab():
                break
            pos_ms = float(self._cap.get(cv2.CAP_PROP_POS_MSEC))
            ts = round(pos_ms * 1e6) if math.isfinite(pos_ms) else -1
            if prev_ns is not None and ts <= prev_ns:
                # 0 or backwards: the backend's clock is unusable here, extrapolate from the anchor.
                if self.fallback_frames == 0:
                    msg = f"timestamps from frame {index} on are frame index / FPS (backend gave {pos_ms} ms)"
                    log.warning("video %s: %s", self.path, msg)
                    self.notes.append(msg)
                self.fallback_frames += 1
                ts = anchor_ns + round((index - anchor_index) * self._period_ns(index))
            else:
                anchor_index, anchor_ns = index, ts
            ok, bgr = self._cap.retrieve()
            yield Packet(ts, index, _converter(bgr if ok else None, f"video {self.path} frame {index}"))
            prev_ns = ts
            index += 1
        if self.expected_frames is not None and index < self.expected_frames:
            raise StreamError(
                f"video {self.path} broke off at frame {index} of the {self.expected_frames} its container "
                "promises (truncated or corrupt)"
            )
        if index == 0:
            raise StreamError(f"video {self.path} holds no decodable frame")

    def close(self) -> None:
        self._cap.release()


def _converter(bgr: np.ndarray | None, what: str):
    def decode() -> np.ndarray:
        import cv2

        if bgr is None:
            raise DecodeError(f"{what}: the backend returned no image")
        return as_rgb_frame(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), what=what)

    return decode
