"""Recorded drives: a temporally coherent sequence of frames of one world.

The ego car drives forward at constant speed, so lane dashes, buildings and trees scroll past;
each actor keeps its own velocity and track id, entering and leaving the view on its own. The
environment (time of day, weather, blur) is fixed for the whole drive; only the sensor noise and
rain streaks are drawn fresh per frame. Frame i is stamped ``DRIVE_EPOCH_NS + round(i·10⁹/fps)``.
"""

from __future__ import annotations

import datetime as _dt
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
    index: int
    timestamp_ns: int
    image: np.ndarray
    boxes: list[ObjectBox]


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


def iter_drive(world: World, *, seed: int, drive_index: int, seconds: float, fps: float,
               rules: BoxRules | None = None) -> Iterator[DriveFrame]:
    """Render the frames of a drive in order."""
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    for i in range(n_frames(seconds, fps)):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 2, drive_index, i]))
        image, boxes = render_frame(world, i / fps, rng, rules=rules)
        yield DriveFrame(index=i, timestamp_ns=frame_timestamp_ns(i, fps), image=image, boxes=boxes)
