"""ROS ``sensor_msgs`` image messages -> RGB pixels, shared by the MCAP and rosbag readers.

Both mcap-ros2-support and rosbags hand back objects with the ROS field names (``header.stamp``,
``format``/``data`` for CompressedImage; ``height``/``width``/``encoding``/``step``/``data`` for
Image), so one conversion serves both. The message definitions below are what a writer registers
to produce such a file (tests and the synthetic drive generator use them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from deploy.streams.base import DecodeError, Packet, as_rgb_frame, decode_encoded_image, failing_decode

log = logging.getLogger(__name__)

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE_TYPE = "sensor_msgs/msg/CompressedImage"
IMAGE_TYPES = (IMAGE_TYPE, COMPRESSED_IMAGE_TYPE)

#: Raw encodings decoded here (channels, channel order); other encodings are refused by name.
RAW_ENCODINGS: dict[str, tuple[int, str]] = {
    "rgb8": (3, "rgb"),
    "bgr8": (3, "bgr"),
    "rgba8": (4, "rgb"),
    "bgra8": (4, "bgr"),
    "mono8": (1, "mono"),
    "8UC1": (1, "mono"),
    "8UC3": (3, "bgr"),  # OpenCV's default channel order
}

def is_image_type(type_name: str) -> bool:
    """True for Image/CompressedImage in ROS 2 (``sensor_msgs/msg/X``) or ROS 1 (``sensor_msgs/X``) naming."""
    return type_name.replace("/msg/", "/") in ("sensor_msgs/Image", "sensor_msgs/CompressedImage")


def stamp_ns(msg: Any) -> int:
    """``header.stamp`` in nanoseconds (0 when the publisher never set it)."""
    stamp = msg.header.stamp
    sec = getattr(stamp, "sec", None)
    if sec is None:  # ROS 1 naming in some generators
        sec, nsec = stamp.secs, stamp.nsecs
    else:
        nsec = stamp.nanosec
    return int(sec) * 1_000_000_000 + int(nsec)


def message_to_rgb(msg: Any, type_name: str, *, what: str) -> np.ndarray:
    """Pixels of one Image or CompressedImage message; DecodeError when they do not decode."""
    if type_name.replace("/msg/", "/") == "sensor_msgs/CompressedImage":
        return decode_encoded_image(_as_bytes(msg.data), what=what)
    return raw_image_to_rgb(msg.height, msg.width, msg.encoding, msg.step, msg.data, what=what)


def raw_image_to_rgb(height: int, width: int, encoding: str, step: int, data: Any, *, what: str) -> np.ndarray:
    """Decode a raw ``sensor_msgs/Image`` payload, honouring row padding (``step``)."""
    if encoding not in RAW_ENCODINGS:
        # Not a per-frame accident: every frame of this topic would fail the same way.
        raise ValueError(
            f"{what}: image encoding {encoding!r} is not supported; supported: {', '.join(RAW_ENCODINGS)}"
        )
    channels, order = RAW_ENCODINGS[encoding]
    buf = np.frombuffer(_as_bytes(data), np.uint8)
    row = width * channels
    if height <= 0 or width <= 0 or step < row or buf.size < step * (height - 1) + row:
        raise DecodeError(
            f"{what}: {buf.size} bytes do not hold a {width}x{height} {encoding} image with step {step}"
        )
    if buf.size < step * height:  # the last row may legally omit its padding
        buf = np.concatenate([buf, np.zeros(step * height - buf.size, np.uint8)])
    image = buf[: step * height].reshape(height, step)[:, :row].reshape(height, width, channels)
    if order == "mono":
        return as_rgb_frame(image[:, :, 0], what=what)
    if channels == 4:
        image = image[:, :, :3]
    if order == "bgr":
        image = image[:, :, ::-1]
    return as_rgb_frame(image, what=what)


def _as_bytes(data: Any) -> bytes | np.ndarray:
    if isinstance(data, np.ndarray):
        return data.astype(np.uint8, copy=False).reshape(-1)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    return bytes(bytearray(data))  # list of ints from some decoders


class ZeroStampNotes:
    """``on_zero_stamp`` for :func:`image_packet`: counts zero stamps, noting the first in ``notes``."""

    def __init__(self, clock: str, notes: list[str]) -> None:
        self.note = f"some header stamps are zero: those frames use the {clock}"
        self.notes, self.count = notes, 0

    def __call__(self, what: str) -> None:
        if self.count == 0:
            log.warning("%s: %s", what, self.note)
            self.notes.append(self.note)
        self.count += 1


def image_packet(
    deserialize: Callable[[], Any], *, type_name: str, log_time: int, index: int, what: str,
    on_zero_stamp: Callable[[str], None],
) -> Packet:
    """One recorded image message as a :class:`Packet`, shared by the MCAP and rosbag readers.

    The timestamp is ``header.stamp`` (capture time); a zero stamp falls back to the recorder's
    ``log_time`` (``on_zero_stamp(what)`` is told). A message that does not deserialize becomes one
    failing frame rather than ending the stream; pixels decode lazily, when the frame is used.
    """
    try:
        msg = deserialize()
        ts = stamp_ns(msg)
    except Exception as e:  # a corrupt serialized payload: this frame only
        return Packet(log_time, index, failing_decode(f"{what}: message does not deserialize ({e})"))
    if ts == 0:
        on_zero_stamp(what)
        ts = log_time

    def decode() -> np.ndarray:
        return message_to_rgb(msg, type_name, what=what)

    return Packet(ts, index, decode)
