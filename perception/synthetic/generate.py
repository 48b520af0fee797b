"""``generate_dataset``: the whole default data set (COCO splits + recorded drives + manifest).

Every image is rendered from its own ``numpy.random.Generator`` seeded by (seed, index), so the
output is byte-identical for a seed whatever the number of worker processes. Every file is written
atomically, and ``manifest.json`` is removed first and written last: a run that is interrupted
never leaves a manifest claiming a complete data set.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from perception.io import atomic_write_json
from perception.synthetic.camera import Camera
from perception.synthetic.coco_writer import (
    annotation_records,
    coco_document,
    image_record,
    write_coco_json,
    write_png,
)
from perception.synthetic.drive import DriveFrame, drive_world, n_frames, render_drive_frame
from perception.synthetic.drive_writers import TOPIC, DriveRecorder
from perception.synthetic.render import BoxRules, ObjectBox, render_frame
from perception.synthetic.world import sample_world

log = logging.getLogger(__name__)

GENERATOR_VERSION = "1.0"
#: Below this many images a process pool costs more (interpreter start-up) than it saves.
POOL_MIN_JOBS = 32
#: progress(stage, done, total) with stage "train", "val" or "drive_XXX".
ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Manifest:
    """What a finished ``generate_dataset`` run wrote (also saved as ``manifest.json``)."""

    root: str
    seed: int
    size: tuple[int, int]
    splits: dict[str, dict[str, Any]]
    drives: list[dict[str, Any]]
    generator_version: str = GENERATOR_VERSION
    box_rules: dict[str, Any] = field(default_factory=dict)
    complete: bool = True

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size)
        return d


def _check_args(images: int, drives: int, val_fraction: float, size: tuple[int, int], drive_seconds: float,
                fps: float, workers: int) -> None:
    if not isinstance(images, int) or images < 1:
        raise ValueError(f"images must be an integer >= 1, got {images!r}")
    if not isinstance(drives, int) or drives < 0:
        raise ValueError(f"drives must be an integer >= 0, got {drives!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction > 0 and round(images * val_fraction) < 1:
        raise ValueError(f"val_fraction={val_fraction} of {images} images leaves an empty val split; "
                         "raise --images or --val-fraction")
    w, h = size
    if w < 64 or h < 64 or w % 2 or h % 2:
        raise ValueError(f"size must be even and at least 64x64 (W x H), got {w}x{h}")
    if drives and (drive_seconds <= 0 or fps <= 0):
        raise ValueError(f"drive_seconds and fps must be > 0, got {drive_seconds} s at {fps} fps")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")


def render_coco_image(seed: int, index: int, size: tuple[int, int], rules: BoxRules
                      ) -> tuple[np.ndarray, list[ObjectBox]]:
    """Image ``index`` of the COCO part of the data set for ``seed`` (a still world at t = 0)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0, index]))
    camera = Camera.default(*size)
    return render_frame(sample_world(rng, camera), 0.0, rng, rules=rules)


def _render_and_write(job: tuple[int, int, tuple[int, int], BoxRules, str]) -> list[ObjectBox]:
    seed, index, size, rules, path = job
    image, boxes = render_coco_image(seed, index, size, rules)
    write_png(path, image)
    return boxes


def _check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create output folder {root}: {e.strerror}; choose a writable --out") from e
    if not root.is_dir() or not os.access(root, os.W_OK | os.X_OK):
        raise PermissionError(f"output folder {root} is not a writable directory; choose a writable --out")


def _coco_split(root: Path, split: str, indices: range, *, seed: int, size: tuple[int, int], rules: BoxRules,
                pool, progress: ProgressFn | None) -> dict[str, Any]:
    img_dir = root / "coco" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(seed, i, size, rules, str(img_dir / f"{i:06d}.png")) for i in indices]
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    results = pool.map(_render_and_write, jobs, chunksize=8) if pool else map(_render_and_write, jobs)
    for image_id, (job, boxes) in enumerate(zip(jobs, results, strict=True), start=1):
        images.append(image_record(image_id, Path(job[4]).name, size[0], size[1]))
        anns.extend(annotation_records(boxes, image_id, len(anns) + 1))
        if progress:
            progress(split, image_id, len(jobs))
    ann_file = root / "coco" / "annotations" / f"instances_{split}.json"
    doc = coco_document(images, anns, description=f"avprune synthetic drive scenes ({split})",
                        extra_info={"seed": seed, "generator_version": GENERATOR_VERSION})
    write_coco_json(ann_file, doc)
    return {"images": len(images), "annotations": len(anns), "image_dir": f"coco/{split}",
            "annotation_file": f"coco/annotations/instances_{split}.json"}


def _drive_frame_job(job: tuple) -> DriveFrame:
    return render_drive_frame(*job, encode=True)


def _drive(root: Path, d: int, *, seed: int, size: tuple[int, int], seconds: float, fps: float, rules: BoxRules,
           pool, progress: ProgressFn | None) -> dict[str, Any]:
    name = f"drive_{d:03d}"
    world = drive_world(seed, d, Camera.default(*size), seconds)
    total = n_frames(seconds, fps)
    jobs = [(seed, d, size, seconds, fps, rules, i) for i in range(total)]
    # Workers render and encode frames; this process writes them in order (MP4 needs one writer).
    frames = pool.map(_drive_frame_job, jobs, chunksize=4) if pool else map(_drive_frame_job, jobs)
    n_boxes = 0
    with DriveRecorder(root / "drives" / name, fps=fps, size=size, name=name) as rec:
        for frame in frames:
            rec.write(frame)
            n_boxes += len(frame.boxes)
            if progress:
                progress(name, frame.index + 1, total)
    return {"name": name, "path": f"drives/{name}", "frames": total, "fps": fps, "seconds": total / fps,
            "annotations": n_boxes, "topic": TOPIC, "time_of_day": world.env.time_of_day,
            "weather": world.env.weather, "ego_speed_mps": round(world.ego_speed, 3),
            "files": ["drive.mp4", "drive.mcap", "kitti/image_02/data", "kitti/image_02/timestamps.txt",
                      "ground_truth.json"]}


@contextlib.contextmanager
def _maybe_pool(workers: int, jobs: int) -> Iterator[Any]:
    """A spawn-context process pool when it pays off, else None (render in this process)."""
    if workers <= 1 or jobs <= POOL_MIN_JOBS:
        yield None
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")  # never fork a parent that may hold threads
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        yield pool


def generate_dataset(out_dir: str | os.PathLike, *, images: int, drives: int, seed: int,
                     val_fraction: float = 0.2, size: tuple[int, int] = (640, 384), drive_seconds: float = 10.0,
                     fps: float = 30.0, progress: ProgressFn | None = None, workers: int = 1,
                     rules: BoxRules | None = None) -> Manifest:
    """Write the synthetic data set under ``out_dir`` and return its manifest.

    ``images`` COCO frames are split into train (first ``images - round(images·val_fraction)``) and
    val; ``drives`` recorded drives of ``drive_seconds`` at ``fps`` follow. ``size`` is (W, H).
    ``progress(stage, done, total)`` is called after every frame. ``workers`` > 1 renders COCO
    images in a process pool; the output is identical for any number of workers.
    """
    size = (int(size[0]), int(size[1]))
    _check_args(images, drives, val_fraction, size, drive_seconds, fps, workers)
    rules = rules or BoxRules()
    root = Path(out_dir)
    _check_writable(root)
    manifest_path = root / "manifest.json"
    manifest_path.unlink(missing_ok=True)  # the old manifest must not vouch for a new, partial run
    n_val = round(images * val_fraction)
    n_train = images - n_val
    log.info("synthesising %d train + %d val images and %d drives under %s", n_train, n_val, drives, root)
    splits = {}
    total_jobs = images + (drives * n_frames(drive_seconds, fps) if drives else 0)
    with _maybe_pool(workers, total_jobs) as pool:
        for split, idx in (("train", range(0, n_train)), ("val", range(n_train, images))):
            splits[split] = _coco_split(root, split, idx, seed=seed, size=size, rules=rules, pool=pool,
                                        progress=progress)
        drive_info = [_drive(root, d, seed=seed, size=size, seconds=drive_seconds, fps=fps, rules=rules,
                             pool=pool, progress=progress) for d in range(drives)]
    manifest = Manifest(root=str(root), seed=seed, size=size, splits=splits, drives=drive_info,
                        box_rules=asdict(rules))
    atomic_write_json(manifest_path, {k: v for k, v in manifest.to_json().items() if k != "root"})
    return manifest
