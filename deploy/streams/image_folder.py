"""Image folders: KITTI raw camera folders with ``timestamps.txt``, or plain sorted images at an FPS.

KITTI raw layout (one camera per folder, e.g. ``image_02``)::

    image_02/data/0000000000.png ...
    image_02/timestamps.txt          # one "YYYY-MM-DD HH:MM:SS.nnnnnnnnn" line per image

The path may name the camera folder itself, or a drive folder holding ``image_0X`` folders (the
topic picks the camera, default ``image_02``). Timestamps keep all nine fractional digits: they are
parsed by hand because ``datetime`` stops at microseconds. They are read as UTC.

A folder of images without ``timestamps.txt`` is played at the given FPS in sorted file-name order.
"""

from __future__ import annotations

import calendar
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from deploy.streams.base import DecodeError, Packet, StreamError, StreamReader, as_rgb_frame

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff")
DEFAULT_KITTI_CAMERA = "image_02"

_KITTI_LINE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?$")


def parse_kitti_timestamp(line: str) -> int:
    """``2011-09-26 13:02:25.964389445`` -> nanoseconds since the Unix epoch (UTC)."""
    m = _KITTI_LINE.match(line.strip())
    if m is None:
        raise ValueError(f"not a 'YYYY-MM-DD HH:MM:SS.nnnnnnnnn' timestamp: {line.strip()!r}")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 61):
        raise ValueError(f"timestamp out of range: {line.strip()!r}")
    seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    frac = (m.group(7) or "").ljust(9, "0")
    return seconds * 1_000_000_000 + int(frac)


def read_kitti_timestamps(path: Path) -> list[int]:
    """All timestamps of a KITTI ``timestamps.txt``; a bad line raises StreamError naming it."""
    stamps: list[int] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                stamps.append(parse_kitti_timestamp(line))
            except ValueError as e:
                raise StreamError(f"{path} line {lineno} (frame {len(stamps)}): {e}") from None
    return stamps


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def kitti_cameras(folder: Path) -> list[str]:
    """Names of the KITTI camera folders inside ``folder``: ``image_0X`` with timestamps.txt or a
    ``data/`` folder (a copy that lost its timestamps.txt is still a camera, played with --fps)."""
    return sorted(p.name for p in folder.glob("image_*") if (p / "timestamps.txt").is_file() or (p / "data").is_dir())


def resolve_camera_folder(folder: Path, topic: str | None) -> Path:
    """The folder holding ``timestamps.txt`` (+ ``data/``) or the plain images to play."""
    if topic is not None:
        cam = folder / topic
        if not cam.is_dir():
            raise StreamError(
                f"image folder {folder} has no camera {topic!r}; cameras: {', '.join(kitti_cameras(folder)) or 'none'}"
            )
        return cam
    if (folder / "timestamps.txt").is_file():
        return folder
    cams = kitti_cameras(folder)
    if DEFAULT_KITTI_CAMERA in cams:
        return folder / DEFAULT_KITTI_CAMERA
    if len(cams) == 1:
        return folder / cams[0]
    if len(cams) > 1:
        raise StreamError(f"image folder {folder} holds several cameras ({', '.join(cams)}); pick one with {folder}:CAMERA")
    return folder


class ImageFolderReader(StreamReader):
    """KITTI camera folder (timestamps.txt) or plain sorted images played at ``fps``."""

    kind = "image_folder"

    def __init__(self, path: str | Path, topic: str | None = None, *, fps: float | None = None) -> None:
        super().__init__(path, topic)
        if not self.path.is_dir():
            raise NotADirectoryError(f"image folder stream {self.path} is not a directory")
        cam = resolve_camera_folder(self.path, topic)
        stamps_file = cam / "timestamps.txt"
        image_dir = cam / "data" if (cam / "data").is_dir() else cam
        self.images = list_images(image_dir)
        if not self.images:
            raise StreamError(f"image folder {image_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        if stamps_file.is_file():
            self.kind = "kitti"
            self.stamps = read_kitti_timestamps(stamps_file)
            if len(self.stamps) != len(self.images):
                raise StreamError(
                    f"{stamps_file} has {len(self.stamps)} timestamps for {len(self.images)} images in {image_dir}"
                )
        else:
            if fps is None:
                raise StreamError(
                    f"image folder {image_dir} holds {len(self.images)} images but no timestamps.txt "
                    f"(looked for {stamps_file}): pass --fps F to play them as an image sequence at F frames per second"
                )
            if not fps > 0:
                raise StreamError(f"--fps must be > 0 to play the image folder {image_dir}; got {fps}")
            self.stamps = [round(i * 1e9 / fps) for i in range(len(self.images))]
            self.notes.append(f"timestamps are frame index / {fps:g} FPS (no timestamps.txt)")

    def _packets(self) -> Iterator[Packet]:
        for index, (image, ts) in enumerate(zip(self.images, self.stamps, strict=True)):
            yield Packet(ts, index, _loader(image, index))


def _loader(path: Path, index: int):
    def decode() -> np.ndarray:
        import cv2

        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise DecodeError(f"frame {index} ({path}) does not decode as an image")
        return as_rgb_frame(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), what=str(path))

    return decode
