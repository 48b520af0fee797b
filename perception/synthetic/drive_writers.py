"""Writers for one recorded drive: MP4 (OpenCV), MCAP (ROS 2 CompressedImage), KITTI raw, ground truth.

Layout under ``drive_dir``::

    drive.mp4                              mp4v at the recorded FPS
    drive.mcap                             sensor_msgs/msg/CompressedImage (JPEG) on TOPIC
    kitti/image_02/data/0000000000.png     one lossless PNG per frame
    kitti/image_02/timestamps.txt          one UTC ``YYYY-MM-DD HH:MM:SS.nnnnnnnnn`` line per frame
    ground_truth.json                      COCO; image id = frame index, plus ``timestamp_ns``

The MP4 and MCAP are written to temporary files and moved into place only when the drive is
complete; a failure removes them, so a half-written drive never has a finished-looking video.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from perception.io import atomic_path, atomic_write_bytes, atomic_write_text
from perception.ros_msgdefs import COMPRESSED_IMAGE, COMPRESSED_IMAGE_MSGDEF
from perception.synthetic.coco_writer import (
    annotation_records,
    coco_document,
    encode_jpeg,
    encode_png,
    image_record,
    write_coco_json,
)
from perception.synthetic.drive import DriveFrame, kitti_timestamp

TOPIC = "/camera/front/image/compressed"
FRAME_ID = "camera_front"


class DriveRecorder:
    """Context manager that receives frames in order and writes every format of one drive."""

    def __init__(self, drive_dir: str | os.PathLike, *, fps: float, size: tuple[int, int],
                 name: str = "drive") -> None:
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.dir = Path(drive_dir)
        self.fps = fps
        self.size = size  # (width, height)
        self.name = name
        self._stack = contextlib.ExitStack()
        self._images: list[dict[str, Any]] = []
        self._anns: list[dict[str, Any]] = []
        self._stamps: list[str] = []

    def __enter__(self) -> DriveRecorder:
        import cv2
        from mcap_ros2.writer import Writer

        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "kitti" / "image_02" / "data").mkdir(parents=True, exist_ok=True)
        try:
            mp4_tmp = self._stack.enter_context(atomic_path(self.dir / "drive.mp4"))
            # OpenCV picks the container from the extension, so the temporary file needs ".mp4".
            self._mp4_path = mp4_tmp.with_name(mp4_tmp.name + ".mp4")
            self._stack.callback(self._mp4_path.unlink, missing_ok=True)
            self._video = cv2.VideoWriter(str(self._mp4_path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, self.size)
            if not self._video.isOpened():
                raise RuntimeError(f"OpenCV could not open an mp4v VideoWriter at {self._mp4_path}")
            self._mp4_tmp = mp4_tmp
            mcap_tmp = self._stack.enter_context(atomic_path(self.dir / "drive.mcap"))
            self._mcap_file = self._stack.enter_context(open(mcap_tmp, "wb"))
            self._mcap = Writer(self._mcap_file)
            self._schema = self._mcap.register_msgdef(COMPRESSED_IMAGE, COMPRESSED_IMAGE_MSGDEF)
        except BaseException:
            self._stack.close()
            raise
        return self

    def write(self, frame: DriveFrame) -> None:
        """Append one frame (frames must arrive in index order, starting at 0)."""
        if frame.index != len(self._images):
            raise ValueError(f"drive frames must arrive in order: expected {len(self._images)}, got {frame.index}")
        h, w = frame.image.shape[:2]
        if (w, h) != self.size:
            raise ValueError(f"frame {frame.index} is {w}x{h}, the drive is {self.size[0]}x{self.size[1]}")
        self._video.write(frame.image)
        sec, nsec = divmod(frame.timestamp_ns, 1_000_000_000)
        msg = {"header": {"stamp": {"sec": sec, "nanosec": nsec}, "frame_id": FRAME_ID},
               "format": "jpeg", "data": frame.jpeg or encode_jpeg(frame.image)}
        self._mcap.write_message(TOPIC, self._schema, msg, log_time=frame.timestamp_ns,
                                 publish_time=frame.timestamp_ns, sequence=frame.index)
        rel = f"kitti/image_02/data/{frame.index:010d}.png"
        atomic_write_bytes(self.dir / rel, frame.png or encode_png(frame.image))
        self._stamps.append(kitti_timestamp(frame.timestamp_ns))
        self._images.append(image_record(frame.index, rel, w, h, timestamp_ns=frame.timestamp_ns))
        self._anns.extend(annotation_records(frame.boxes, frame.index, len(self._anns) + 1))

    @property
    def frames(self) -> int:
        return len(self._images)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            with contextlib.suppress(Exception):
                self._video.release()
            self._stack.__exit__(exc_type, exc, tb)
            return
        try:
            self._video.release()
            os.replace(self._mp4_path, self._mp4_tmp)
            self._mcap.finish()
            atomic_write_text(self.dir / "kitti" / "image_02" / "timestamps.txt", "\n".join(self._stamps) + "\n")
            doc = coco_document(self._images, self._anns, description=f"synthetic recorded drive {self.name}",
                                extra_info={"fps": self.fps})
            write_coco_json(self.dir / "ground_truth.json", doc)
        except BaseException as e:
            self._stack.__exit__(type(e), e, e.__traceback__)
            raise
        self._stack.__exit__(None, None, None)
