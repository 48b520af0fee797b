"""Recorded drives: a temporally coherent sequence of frames of one world.

The ego car drives forward at constant speed, so lane dashes, buildings and trees scroll past;
each actor keeps its own velocity and track id, entering and leaving the view on its own. The
environment (time of day, weather, blur) is fixed for the whole drive; only the sensor noise and
rain streaks are drawn fresh per frame. Frame i is stamped ``DRIVE_EPOCH_NS + round(i·10⁹/fps)``.
"""

from __future__ import annotations

import datetime as _dt
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from perception.synthetic.camera import Camera
from perception.synthetic.render import BoxRules, ObjectBox, render_frame
from perception.synthetic.world import World, sample_world

#: All drives start at 2026-01-01T00:00:00Z (nanoseconds since the Unix epoch).
DRIVE_EPOCH_NS = int(_dt.datetime(2026, 1, 1, tzinfo=_dt.timezone.utc).timestamp()) * 1_000_000_000


@dataclass(frozen=True)
class DriveFrame:
    """One rendered frame; ``png`` / ``jpeg`` hold pre-encoded bytes when a worker made them."""

    index: int
    timestamp_ns: int
    image: np.ndarray
    boxes: list[ObjectBox]
    png: bytes = b""
    jpeg: bytes = b""


def frame_timestamp_ns(index: int, fps: float) -> int:
    """Nanosecond stamp of frame ``index`` at ``fps`` frames per second."""
    return DRIVE_EPOCH_NS + round(index * 1_000_000_000 / fps)


def kitti_timestamp(ns: int) -> str:
    """KITTI raw ``timestamps.txt`` line for a stamp: ``YYYY-MM-DD HH:MM:SS.nnnnnnnnn`` (UTC)."""
    sec, nsec = divmod(ns, 1_000_000_000)
    day = _dt.datetime.fromtimestamp(sec, tz=_dt.timezone.utc)
    return f"{day:%Y-%m-%d %H:%M:%S}.{nsec:09d}"


def drive_world(seed: int, drive_index: int, camera: Camera, seconds: float) -> World:
    """The world of drive ``drive_index``, fixed by (seed, drive_index)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1, drive_index]))
    return sample_world(rng, camera, duration=seconds)


def n_frames(seconds: float, fps: float) -> int:
    """Frames in a drive of ``seconds`` at ``fps`` (at least one)."""
    return max(1, int(round(seconds * fps)))


@functools.lru_cache(maxsize=2)
def _cached_world(seed: int, drive_index: int, size: tuple[int, int], seconds: float) -> World:
    return drive_world(seed, drive_index, Camera.default(*size), seconds)


def render_drive_frame(seed: int, drive_index: int, size: tuple[int, int], seconds: float, fps: float,
                       rules: BoxRules | None, index: int, *, encode: bool = False) -> DriveFrame:
    """Frame ``index`` of drive ``drive_index``: a pure function of its arguments (pool friendly).

    With ``encode`` the PNG (KITTI) and JPEG (MCAP) bytes are made here too, so that worker
    processes share the encoding work.
    """
    from perception.synthetic.coco_writer import encode_jpeg, encode_png

    world = _cached_world(seed, drive_index, size, seconds)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2, drive_index, index]))
    image, boxes = render_frame(world, index / fps, rng, rules=rules)
    png = encode_png(image) if encode else b""
    jpeg = encode_jpeg(image) if encode else b""
    return DriveFrame(index=index, timestamp_ns=frame_timestamp_ns(index, fps), image=image, boxes=boxes,
                      png=png, jpeg=jpeg)


def iter_drive(world: World, *, seed: int, drive_index: int, seconds: float, fps: float,
               rules: BoxRules | None = None) -> Iterator[DriveFrame]:
    """Render the frames of a drive in order."""
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    for i in range(n_frames(seconds, fps)):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 2, drive_index, i]))
        image, boxes = render_frame(world, i / fps, rng, rules=rules)
        yield DriveFrame(index=i, timestamp_ns=frame_timestamp_ns(i, fps), image=image, boxes=boxes)
