"""Camera topics of rosbag2 recordings (sqlite3 or mcap storage) and ROS 1 bags, via rosbags.

``rosbags.highlevel.AnyReader`` opens a rosbag2 directory (with ``metadata.yaml``) or a ROS 1
``.bag`` file; message types come from the bag itself, with ROS 2 Humble's type store as the
fallback for bags that carry no definitions. The frame timestamp is ``header.stamp``, falling back
to the bag's receive time when a publisher left it at zero.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deploy.streams.base import (
    Packet,
    StreamError,
    StreamReader,
    TopicInfo,
    check_file,
    select_image_topic,
)
from deploy.streams.ros_image import ZeroStampNotes, image_packet, is_image_type

log = logging.getLogger(__name__)


def _any_reader(path: Path) -> Any:
    """An opened AnyReader; StreamError naming the bag when it cannot be opened."""
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_typestore

    check_file(path, "rosbag")
    bag = path.parent if path.suffix == ".db3" else path  # a .db3 file is read through its bag folder
    try:
        reader = AnyReader([bag], default_typestore=get_typestore(Stores.ROS2_HUMBLE))
        reader.open()
    except FileNotFoundError:
        raise
    except Exception as e:  # rosbags raises its own error types and sqlite3/struct errors on garbage
        raise StreamError(f"rosbag {bag} cannot be opened: {type(e).__name__}: {e}") from None
    return reader


def rosbag_topics(path: str | Path) -> list[TopicInfo]:
    """Every topic of a rosbag2 folder or ROS 1 bag with its message type and count."""
    reader = _any_reader(Path(path))
    try:
        return [TopicInfo(name, info.msgtype or "?", info.msgcount) for name, info in sorted(reader.topics.items())]
    finally:
        reader.close()


class RosbagStreamReader(StreamReader):
    """Frames of one image topic of a rosbag2 folder or a ROS 1 ``.bag``."""

    kind = "rosbag"

    def __init__(self, path: str | Path, topic: str | None = None) -> None:
        super().__init__(path, topic)
        self._reader = _any_reader(self.path)
        try:
            topics = [TopicInfo(n, i.msgtype or "?", i.msgcount) for n, i in sorted(self._reader.topics.items())]
            chosen = select_image_topic(self.path, topic, topics, is_image_type)
        except BaseException:
            self._reader.close()
            raise
        self.topic, self.msgtype, self.expected_frames = chosen.topic, chosen.msgtype, chosen.count
        self.kind = "rosbag2" if self._reader.is2 else "rosbag1"
        self._zero_stamps = ZeroStampNotes("bag's receive time", self.notes)

    def _packets(self) -> Iterator[Packet]:
        connections = [c for c in self._reader.connections if c.topic == self.topic]
        messages = self._reader.messages(connections=connections)
        index = 0
        while True:
            try:
                item = next(messages, None)
            except Exception as e:  # a broken storage file: nothing after this can be trusted
                raise StreamError(
                    f"rosbag {self.path} topic {self.topic}: unreadable after frame {index} ({type(e).__name__}: {e})"
                ) from None
            if item is None:
                break
            connection, log_time, raw = item
            yield self._packet(connection, log_time, raw, index)
            index += 1
        if index == 0:
            raise StreamError(f"rosbag {self.path} topic {self.topic} holds no message")

    def _packet(self, connection: Any, log_time: int, raw: bytes, index: int) -> Packet:
        return image_packet(lambda: self._reader.deserialize(raw, connection.msgtype), type_name=connection.msgtype,
                            log_time=log_time, index=index, what=f"rosbag {self.path} topic {self.topic} frame {index}",
                            on_zero_stamp=self._zero_stamps)

    def close(self) -> None:
        if self._reader.stack is not None:
            self._reader.close()
