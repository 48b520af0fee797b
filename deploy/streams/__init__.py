"""Recorded camera streams: one reader per format behind ``open_stream("PATH[:TOPIC]")``.

=========================================  ==================================================
path                                       reader
=========================================  ==================================================
``*.mp4 / *.avi / *.mkv / ...``            :class:`~deploy.streams.video.VideoReader` (OpenCV)
``*.mcap``                                 ROS 2 Image/CompressedImage via mcap-ros2-support
``folder/metadata.yaml`` (rosbag2),        rosbags ``AnyReader`` (sqlite3 or mcap storage)
``*.db3``, ``*.bag`` (ROS 1)
folder with ``timestamps.txt`` or          KITTI raw camera folder (``:image_03`` picks a camera)
``image_0X/timestamps.txt``
any other folder of images                 sorted images at ``fps`` frames per second
=========================================  ==================================================

Every reader yields :class:`Frame` records (``timestamp_ns``, ``frame`` HxWx3 uint8 RGB,
``frame_id``), counts frames that fail to decode, and raises :class:`StreamError` naming the file
and the frame or byte offset when a recording cannot be read on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from deploy.streams.base import (
    DecodeError,
    DecodeFailure,
    Frame,
    Packet,
    StreamError,
    StreamReader,
    TopicInfo,
)

__all__ = [
    "DecodeError",
    "DecodeFailure",
    "Frame",
    "Packet",
    "StreamError",
    "StreamReader",
    "TopicInfo",
    "StreamCheck",
    "list_topics",
    "open_stream",
    "parse_stream_spec",
    "preflight",
]


def parse_stream_spec(spec: str) -> tuple[Path, str | None]:
    """``"PATH[:TOPIC]"`` -> (path, topic). A path that exists as written is never split."""
    if not spec:
        raise ValueError("empty stream spec; expected PATH or PATH:TOPIC")
    if Path(spec).exists() or ":" not in spec:
        return Path(spec), None
    path, topic = spec.rsplit(":", 1)  # ROS topic names never contain ':'
    if not path or not topic:
        raise ValueError(f"stream spec {spec!r} is not PATH or PATH:TOPIC")
    return Path(path), topic


def _format_of(path: Path) -> str:
    from deploy.streams.video import VIDEO_SUFFIXES

    if path.is_dir():
        if (path / "metadata.yaml").is_file():
            return "rosbag"
        return "folder"
    suffix = path.suffix.lower()
    if suffix == ".mcap":
        return "mcap"
    if suffix in (".bag", ".db3"):
        return "rosbag"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    raise ValueError(
        f"stream {path}: unknown format {suffix or '(no suffix)'!r}; expected a video "
        f"({', '.join(VIDEO_SUFFIXES)}), .mcap, .bag, a rosbag2 folder or an image folder"
    )


def open_stream(spec: str, *, fps: float | None = None) -> StreamReader:
    """Open ``PATH[:TOPIC]`` with the reader for its format.

    ``fps`` plays a plain image folder (no timestamps.txt) at that rate, and is the fallback rate of
    a video whose container gives none. Raises FileNotFoundError for a missing path, StreamError
    (a ValueError) for an unreadable recording or unknown topic.
    """
    path, topic = parse_stream_spec(spec)
    if not path.exists():
        raise FileNotFoundError(f"stream {path} does not exist")
    fmt = _format_of(path)
    if fmt == "video":
        if topic is not None:
            raise ValueError(f"stream {spec!r}: a video file has no topics")
        from deploy.streams.video import VideoReader

        return VideoReader(path, fps=fps)
    if fmt == "mcap":
        from deploy.streams.mcap_stream import McapStreamReader

        return McapStreamReader(path, topic)
    if fmt == "rosbag":
        from deploy.streams.rosbag_stream import RosbagStreamReader

        return RosbagStreamReader(path, topic)
    from deploy.streams.image_folder import ImageFolderReader

    return ImageFolderReader(path, topic, fps=fps)


@dataclass(frozen=True)
class StreamCheck:
    """What :func:`preflight` found: the reader kind and the first frame's size."""

    spec: str
    kind: str
    height: int
    width: int


def preflight(specs: list[str] | tuple[str, ...], *, fps: float | None = None) -> list[StreamCheck]:
    """Open every stream and decode its first frame, before anything expensive runs.

    A missing file, an unknown format or topic, a recording that does not open, one with no
    frames, or a first frame that does not decode raises here (FileNotFoundError / StreamError
    naming the stream), so a bad second stream fails in milliseconds instead of after the first
    one has been replayed in real time. Costs one open and one decode per stream.
    """
    checks = []
    for spec in specs:
        with open_stream(spec, fps=fps) as reader:
            first = next(iter(reader.packets()), None)
            if first is None:
                raise StreamError(f"stream {spec} holds no frames")
            try:
                image = first.decode()
            except DecodeError as e:
                raise StreamError(f"stream {spec}: its first frame does not decode ({e})") from None
            checks.append(StreamCheck(spec, reader.kind, int(image.shape[0]), int(image.shape[1])))
    return checks


def list_topics(path: str | Path) -> list[TopicInfo]:
    """Topics of a recording (cameras of a KITTI drive folder; one pseudo-topic for a video)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"stream {path} does not exist")
    fmt = _format_of(path)
    if fmt == "mcap":
        from deploy.streams.mcap_stream import mcap_topics

        return mcap_topics(path)
    if fmt == "rosbag":
        from deploy.streams.rosbag_stream import rosbag_topics

        return rosbag_topics(path)
    if fmt == "video":
        return [TopicInfo("(video)", "video", None)]
    from deploy.streams.image_folder import kitti_cameras, list_images

    if (path / "timestamps.txt").is_file():
        return [TopicInfo(path.name, "kitti camera", len(list_images(_data_dir(path))))]
    cams = kitti_cameras(path)
    if cams:
        return [TopicInfo(c, "kitti camera", len(list_images(_data_dir(path / c)))) for c in cams]
    return [TopicInfo("(images)", "image folder", len(list_images(_data_dir(path))))]


def _data_dir(folder: Path) -> Path:
    return folder / "data" if (folder / "data").is_dir() else folder
