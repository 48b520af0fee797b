"""ROS 2 camera topics in MCAP files (``sensor_msgs/msg/Image`` and ``CompressedImage``).

Reads with ``mcap.reader.make_reader`` and decodes CDR with mcap-ros2-support's decoder, one
message at a time: a message whose CDR or pixels do not decode becomes one counted decode failure,
while a file that breaks off (truncated, no footer, corrupt chunk) raises StreamError naming the
byte offset. Frames are yielded in log-time order; the frame timestamp is ``header.stamp`` (the
capture time), falling back to the record's log time when a publisher left the stamp at zero.
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


def _open_reader(path: Path, f: Any) -> tuple[Any, Any]:
    """(reader, summary or None); StreamError for a file that is not a complete MCAP."""
    from mcap.exceptions import McapError
    from mcap.reader import make_reader

    size = path.stat().st_size
    try:
        reader = make_reader(f)
    except McapError as e:
        raise StreamError(f"MCAP {path} ({size} bytes) is not an MCAP file: {e}") from None
    try:
        summary = reader.get_summary()
    except Exception as e:  # the parsers raise assorted types on garbage; name the place instead
        raise StreamError(
            f"MCAP {path} ({size} bytes) has no valid footer at byte offset {max(size - 37, 0)}: "
            f"truncated or still being written ({type(e).__name__}: {e}); `mcap recover` can salvage it"
        ) from None
    return reader, summary


def _scan_topics(path: Path, f: Any) -> list[TopicInfo]:
    """Topics of an MCAP without a summary section, by reading it through."""
    from mcap.reader import NonSeekingReader

    f.seek(0)
    found: dict[str, list[Any]] = {}
    try:
        for schema, channel, _ in NonSeekingReader(f).iter_messages():
            entry = found.setdefault(channel.topic, [schema.name if schema else "?", 0])
            entry[1] += 1
    except Exception as e:
        raise StreamError(f"MCAP {path} is corrupt near byte offset {f.tell()}: {type(e).__name__}: {e}") from None
    return [TopicInfo(t, name, n) for t, (name, n) in sorted(found.items())]


def mcap_topics(path: str | Path) -> list[TopicInfo]:
    """Every topic of an MCAP file with its message type and count."""
    path = Path(path)
    check_file(path, "MCAP")
    with open(path, "rb") as f:
        _, summary = _open_reader(path, f)
        if summary is None:
            return _scan_topics(path, f)
        counts = summary.statistics.channel_message_counts if summary.statistics else {}
        topics = []
        for ch in summary.channels.values():
            schema = summary.schemas.get(ch.schema_id)
            topics.append(TopicInfo(ch.topic, schema.name if schema else "?", counts.get(ch.id)))
        return sorted(topics, key=lambda t: t.topic)


class McapStreamReader(StreamReader):
    """Frames of one image topic of an MCAP file."""

    kind = "mcap"

    def __init__(self, path: str | Path, topic: str | None = None) -> None:
        super().__init__(path, topic)
        self.topics = mcap_topics(self.path)
        chosen = select_image_topic(self.path, topic, self.topics, is_image_type)
        self.topic, self.msgtype = chosen.topic, chosen.msgtype
        self.expected_frames = chosen.count
        self._file = open(self.path, "rb")  # noqa: SIM115 - held for the reader's lifetime, closed in close()
        self._zero_stamps = ZeroStampNotes("MCAP log time", self.notes)

    def _packets(self) -> Iterator[Packet]:
        from mcap_ros2.decoder import DecoderFactory

        reader, _ = _open_reader(self.path, self._file)
        factory = DecoderFactory()
        decoders: dict[int, Any] = {}
        index = 0
        messages = reader.iter_messages(topics=[self.topic])
        while True:
            try:
                item = next(messages, None)
            except Exception as e:  # corrupt chunk or record: the file cannot be read on
                raise StreamError(
                    f"MCAP {self.path} topic {self.topic}: unreadable after frame {index} near byte offset "
                    f"{self._file.tell()} ({type(e).__name__}: {e})"
                ) from None
            if item is None:
                break
            schema, channel, message = item
            if channel.id not in decoders:
                decoders[channel.id] = factory.decoder_for(channel.message_encoding, schema)
                if decoders[channel.id] is None:
                    raise StreamError(
                        f"MCAP {self.path} topic {self.topic}: message encoding {channel.message_encoding!r} "
                        "is not ROS 2 CDR; only ROS 2 image messages are supported"
                    )
            yield self._packet(decoders[channel.id], message, index)
            index += 1
        if index == 0:
            raise StreamError(f"MCAP {self.path} topic {self.topic} holds no message")

    def _packet(self, decoder: Any, message: Any, index: int) -> Packet:
        return image_packet(lambda: decoder(message.data), type_name=self.msgtype, log_time=message.log_time,
                            index=index, what=f"MCAP {self.path} topic {self.topic} frame {index}",
                            on_zero_stamp=self._zero_stamps)

    def close(self) -> None:
        self._file.close()
