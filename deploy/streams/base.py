"""The record every stream reader yields, and the reader base class with decode-failure accounting.

A reader walks a recording in two steps so that real-time validation can behave like a camera
node with a one-deep queue: ``packets()`` yields cheap :class:`Packet` records (timestamp, frame
id, and a ``decode`` callable holding the still-encoded payload), and ``decode(packet)`` turns one
into pixels. A frame the pacing engine drops is then never decoded, and the decode of a frame that
is processed is timed as a stage of its latency. Iterating a reader directly yields decoded
:class:`Frame` records.

Two kinds of failure are kept apart on purpose:

* a single frame whose payload does not decode (a corrupt JPEG in an otherwise good recording) is
  recorded in ``reader.decode_failures`` and reported, never silently skipped;
* a recording that cannot be read on (empty, truncated, garbage, bad index, bad timestamps file)
  raises :class:`StreamError`, a ``ValueError`` whose message names the file and the frame or byte
  offset where reading stopped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class StreamError(ValueError):
    """A recording that cannot be read on; the message names the file and the frame or offset."""


class DecodeError(Exception):
    """One frame's payload did not decode; the reader counts it and moves on."""


@dataclass(frozen=True)
class Frame:
    """One decoded camera frame.

    timestamp_ns: the recorded time (absolute for MCAP/rosbag/KITTI, from the start for videos and
    plain image folders); frame: HxWx3 uint8 RGB, C-contiguous; frame_id: 0-based position of the
    frame in the stream (frames that failed to decode keep their id, so gaps stay visible).
    """

    timestamp_ns: int
    frame: np.ndarray
    frame_id: int


@dataclass(frozen=True)
class Packet:
    """A frame before decoding: ``decode()`` returns HxWx3 uint8 RGB or raises DecodeError."""

    timestamp_ns: int
    frame_id: int
    decode: Callable[[], np.ndarray]


@dataclass(frozen=True)
class TopicInfo:
    """One topic (or camera folder) of a recording, as ``--list-topics`` prints it."""

    topic: str
    msgtype: str
    count: int | None


def select_image_topic(path: Path, topic: str | None, topics: list[TopicInfo], is_image) -> TopicInfo:
    """The topic to read: the one asked for, else the only image topic; errors list what exists."""
    listing = ", ".join(f"{t.topic} ({t.msgtype})" for t in topics) or "none"
    if topic is not None:
        for t in topics:
            if t.topic == topic:
                if not is_image(t.msgtype):
                    raise StreamError(f"{path}: topic {topic} carries {t.msgtype}, not an image; topics: {listing}")
                return t
        raise StreamError(f"{path} has no topic {topic!r}; topics: {listing}")
    images = [t for t in topics if is_image(t.msgtype)]
    if len(images) == 1:
        return images[0]
    if not images:
        raise StreamError(f"{path} has no sensor_msgs Image/CompressedImage topic; topics: {listing}")
    names = ", ".join(t.topic for t in images)
    raise StreamError(f"{path} has several image topics ({names}); pick one with {path}:TOPIC")


@dataclass(frozen=True)
class DecodeFailure:
    frame_id: int
    timestamp_ns: int
    reason: str


def as_rgb_frame(image: np.ndarray, *, what: str) -> np.ndarray:
    """Check and normalise a decoded image to HxWx3 uint8 C-contiguous RGB (grey is expanded)."""
    if image.dtype != np.uint8:
        raise DecodeError(f"{what}: expected 8-bit pixels, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise DecodeError(f"{what}: expected an HxWx3 image, got shape {image.shape}")
    return np.ascontiguousarray(image)


def decode_encoded_image(data: bytes | np.ndarray, *, what: str) -> np.ndarray:
    """Decode JPEG/PNG/... bytes with OpenCV into RGB; raise DecodeError when they do not decode."""
    import cv2

    buf = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if buf.size == 0:
        raise DecodeError(f"{what}: empty image payload")
    bgr = cv2.imdecode(buf.reshape(-1), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DecodeError(f"{what}: {buf.size} bytes do not decode as an image")
    return as_rgb_frame(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), what=what)


def failing_decode(reason: str) -> Callable[[], np.ndarray]:
    """A packet decoder for a frame already known to be broken (e.g. its message did not parse)."""

    def decode() -> np.ndarray:
        raise DecodeError(reason)

    return decode


def check_file(path: Path, kind: str) -> None:
    """Fail early, naming the file, for a missing or empty recording."""
    if not path.exists():
        raise FileNotFoundError(f"{kind} stream {path} does not exist")
    if path.is_file() and path.stat().st_size == 0:
        raise StreamError(f"{kind} stream {path} is empty (0 bytes)")


class StreamReader(ABC):
    """Base of every reader: a context manager and an iterator of :class:`Frame`.

    Subclasses implement ``_packets()`` (and ``close()`` when they hold a handle) and set
    ``kind``. Reading is single-pass: call ``packets()`` or iterate once per reader.
    """

    kind: str = "stream"

    def __init__(self, path: str | Path, topic: str | None = None) -> None:
        self.path = Path(path)
        self.topic = topic
        self.decode_failures: list[DecodeFailure] = []
        self.packets_read = 0
        self.notes: list[str] = []  # facts worth a line in the report (e.g. timestamp fallbacks)
        self._started = False

    # -- subclass hooks -----------------------------------------------------------------
    @abstractmethod
    def _packets(self) -> Iterator[Packet]:
        """Yield packets in recorded order; raise StreamError when the recording breaks off."""

    def close(self) -> None:
        """Release file handles (subclasses holding one override this)."""
        return None

    # -- public API ---------------------------------------------------------------------
    @property
    def name(self) -> str:
        return f"{self.path}:{self.topic}" if self.topic else str(self.path)

    def packets(self) -> Iterator[Packet]:
        """Yield the stream's packets once, counting them."""
        if self._started:
            raise RuntimeError(f"stream {self.name} was already read; open it again to re-read")
        self._started = True
        for packet in self._packets():
            self.packets_read += 1
            yield packet

    def decode(self, packet: Packet) -> np.ndarray | None:
        """Pixels of one packet, or None after recording a DecodeFailure for it."""
        try:
            return packet.decode()
        except DecodeError as e:
            log.warning("%s: frame %d did not decode: %s", self.name, packet.frame_id, e)
            self.decode_failures.append(DecodeFailure(packet.frame_id, packet.timestamp_ns, str(e)))
            return None

    def __iter__(self) -> Iterator[Frame]:
        for packet in self.packets():
            image = self.decode(packet)
            if image is not None:
                yield Frame(packet.timestamp_ns, image, packet.frame_id)

    def describe(self) -> dict[str, Any]:
        """What a report says about this stream after it was read."""
        return {
            "kind": self.kind,
            "path": str(self.path),
            "topic": self.topic,
            "frames_read": self.packets_read,
            "decode_failures": [
                {"frame_id": f.frame_id, "timestamp_ns": f.timestamp_ns, "reason": f.reason}
                for f in self.decode_failures
            ],
            "notes": list(self.notes),
        }

    def __enter__(self) -> StreamReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def quiet_native_logs(what: str) -> Iterator[None]:
    """Silence FFmpeg's and OpenCV's own log lines while a recording is opened, then restore them.

    FFmpeg prints "moov atom not found" and OpenCV "backend ... can't be used to capture by name"
    straight to file descriptor 2, above the one clean error avprune raises. OpenCV's level is set
    to silent (``cv2.utils.logging``) and ``OPENCV_FFMPEG_LOGLEVEL`` to quiet (-8) for the call; what still reaches fd 2
    (FFmpeg reads its level only once per process) is captured and logged at DEBUG (``-vv``).
    """
    import cv2

    old_env = {k: os.environ.get(k) for k in ("OPENCV_LOG_LEVEL", "OPENCV_FFMPEG_LOGLEVEL")}
    os.environ.update({"OPENCV_LOG_LEVEL": "SILENT", "OPENCV_FFMPEG_LOGLEVEL": "-8"})
    cv_log = cv2.utils.logging
    old_level = cv_log.setLogLevel(cv_log.LOG_LEVEL_SILENT)  # returns the previous level
    sys.stderr.flush()
    saved_fd = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            cv_log.setLogLevel(old_level)
            for k, v in old_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace").strip()
            if text:
                log.debug("native log lines while opening %s:\n%s", what, text)
