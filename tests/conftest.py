"""Helpers shared by several test modules (import them from here: ``from tests.conftest import ...``).

Sections: detectors and frames for export/runtime/engine tests; a tiny COCO split for the
perception tests; a small conv net for the pruning tests; recorded streams (KITTI folder, MCAP);
fake runtimes on a simulated clock for the real-time tests; tiny prune jobs (their assets, the
``assets`` fixture, job files, a Ray cluster's ports and stop) for the prune-job, reliability and
two-node tests. No test module imports another.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from deploy.realtime import SimulatedClock
from deploy.runtimes.base import Prepared, RuntimeInfo
from perception.classes import DRIVE_CLASSES
from perception.detections import Detections
from perception.models import build_detector
from perception.ros_msgdefs import COMPRESSED_IMAGE_MSGDEF, IMAGE_MSGDEF

# ----------------------------------------------------------------------------- detectors and frames (export, runtimes, engines)


SSD = "ssdlite320_mobilenet_v3_large"


def export_frames(n: int, *, seed: int = 0, hw: tuple[int, int] = (240, 320)) -> list[np.ndarray]:
    """Smooth random RGB frames with a few flat rectangles (structure for the backbone)."""
    import cv2

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        low = rng.integers(0, 256, size=(6, 8, 3)).astype(np.uint8)
        img = cv2.resize(low, (hw[1], hw[0]), interpolation=cv2.INTER_CUBIC)
        for _ in range(3):
            y, x = rng.integers(0, hw[0] - 40), rng.integers(0, hw[1] - 40)
            img[y : y + rng.integers(20, 40), x : x + rng.integers(20, 40)] = rng.integers(0, 256, 3)
        frames.append(img)
    return frames


def spread_model(name: str, *, seed: int = 0) -> torch.nn.Module:
    """An untrained detector with live features and spread-out heads, so its scores differ.

    Untrained BatchNorm statistics (mean 0, var 1) leave SSDlite's deep features ~0 and every
    score tied; one cumulative pass over random frames in train mode sets usable statistics.
    """
    torch.manual_seed(seed)
    model = build_detector(name)
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.momentum = None  # cumulative average: one pass gives the batch's statistics
    model.backbone.train()
    with torch.no_grad():
        model.backbone(torch.randn(4, 3, *model.avprune_meta["image_size"]))
    for m in bns:
        m.momentum = 0.1
    model.eval()
    heads = model.roi_heads.box_predictor if hasattr(model, "roi_heads") else model.head
    with torch.no_grad():
        for m in heads.modules():
            if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
                m.weight.normal_(0, 0.05)
                if m.bias is not None:
                    m.bias.normal_(0, 0.5)
    return model


def write_pseudo_coco(model: torch.nn.Module, frames: list[np.ndarray], root: Path, *, top: int = 4,
                      runtime: object | None = None):
    """A COCO split whose ground truth is ``model``'s top detections (on ``runtime`` when given: an
    exported model's own runtime scores its GT exactly, where a random model's near-tied scores may
    order differently between PyTorch and ONNX Runtime on some CPUs); returns the data set."""
    import cv2

    from deploy.runtimes.pytorch import PyTorchRuntime
    from perception.classes import DRIVE_CLASSES
    from perception.data import CocoDetectionDataset

    (root / "val").mkdir(parents=True, exist_ok=True)
    dets = (runtime or PyTorchRuntime(model)).infer(frames)
    # One score cut over all images (the top * len(frames) best), not the top per image: then every
    # detection ranked above a false positive of its class is ground truth, and the model scores
    # exactly 1 against it. Per image, another image's higher-scored detection of the same class
    # was a false positive ranked first (mAP 0.75 on an Intel CPU, where a random model's scores
    # fell that way).
    scores = np.sort(np.concatenate([d.scores for d in dets]))[::-1]
    cut = scores[min(top * len(frames), len(scores)) - 1] if len(scores) else np.inf
    images, anns = [], []
    for i, (f, d) in enumerate(zip(frames, dets, strict=True)):
        cv2.imwrite(str(root / "val" / f"{i:04d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        images.append({"id": i + 1, "file_name": f"{i:04d}.png", "height": f.shape[0], "width": f.shape[1]})
        for j in np.flatnonzero(d.scores >= cut):
            x1, y1, x2, y2 = (float(v) for v in d.boxes[j])
            if x2 - x1 < 2 or y2 - y1 < 2:
                continue
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(d.labels[j]),
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    cats = [{"id": k + 1, "name": n} for k, n in enumerate(DRIVE_CLASSES)]
    ann_file = root / "annotations" / "instances_val.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return CocoDetectionDataset(root / "val", ann_file)

# ----------------------------------------------------------------------------- a tiny COCO split (perception)


def write_tiny_coco(root: Path, split: str = "train", *, n: int = 6, size=(96, 128), seed: int = 0) -> Path:
    """A small COCO split of flat coloured rectangles (class = colour), written as PNGs.

    Shared by the perception tests: big, high-contrast boxes a detector can learn in a few
    steps, plus one image with no boxes (negative images must load).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    colours = {1: (230, 40, 40), 4: (40, 200, 60), 6: (40, 80, 230)}
    (root / split).mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        img = np.full((h, w, 3), 90, np.uint8)
        k = 0 if i == n - 1 else int(rng.integers(1, 3))
        for _ in range(k):
            cat = int(rng.choice(list(colours)))
            bw, bh = int(rng.integers(w // 5, w // 2)), int(rng.integers(h // 5, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            img[y : y + bh, x : x + bw] = colours[cat]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat, "bbox": [x, y, bw, bh],
                         "area": bw * bh, "iscrowd": 0})
        name = f"{i:06d}.png"
        Image.fromarray(img).save(root / split / name)
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
    cats = [{"id": j + 1, "name": c} for j, c in enumerate(DRIVE_CLASSES)]
    ann_file = root / "annotations" / f"instances_{split}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return ann_file

# ----------------------------------------------------------------------------- a small conv net (pruning)


class SE(nn.Module):
    """Squeeze-excitation as in MobileNetV3 (hardsigmoid gate)."""

    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(s))))


def cbr(cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act())


class SmallNet(nn.Module):
    """Residual add, depthwise conv, SE block, BatchNorm and a linear head: every coupling kind."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 32, s=2)
        self.expand = cbr(32, 64, k=1)
        self.dw = cbr(64, 64, groups=64, act=nn.Hardswish)
        self.se = SE(64)
        self.project = nn.Sequential(nn.Conv2d(64, 32, 1, bias=False), nn.BatchNorm2d(32))
        self.tail = cbr(32, 48)
        self.fc = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.project(self.se(self.dw(self.expand(x))))  # residual: stem and project coupled
        x = self.tail(x)
        return self.fc(x.mean((2, 3)))


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = SmallNet()
    with torch.no_grad():  # non-trivial BN statistics so eval-mode equality is a real check
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.2, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return net.eval()


X = torch.randn(2, 3, 32, 32)

# ----------------------------------------------------------------------------- recorded streams (KITTI folder, MCAP)


STREAM_N, STREAM_H, STREAM_W = 6, 48, 64


BASE_NS = 1_317_046_945_123_456_789  # 2011-09-26 14:22:25.123456789 UTC, KITTI-like


PERIOD_NS = 100_000_000  # 10 fps


TOPIC = "/camera/front/image/compressed"


RAW_TOPIC = "/camera/front/image_raw"


def stream_frames(n: int = STREAM_N) -> list[np.ndarray]:
    """Smooth RGB frames (codec-friendly) that differ per frame and per channel."""
    yy, xx = np.mgrid[0:STREAM_H, 0:STREAM_W]
    return [
        np.stack([(xx * 3 + 20 * i) % 256, (yy * 4 + 10 * i) % 256, np.full_like(xx, 40 * i % 256)], -1).astype(np.uint8)
        for i in range(n)
    ]


def stamps(n: int = STREAM_N) -> list[int]:
    return [BASE_NS + i * PERIOD_NS for i in range(n)]


def kitti_line(ns: int) -> str:
    import time

    sec, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(sec)) + f".{frac:09d}"


def write_kitti(root: Path, frames: list[np.ndarray], ts: list[int], camera: str = "image_02") -> Path:
    import cv2

    data = root / camera / "data"
    data.mkdir(parents=True)
    for i, f in enumerate(frames):
        cv2.imwrite(str(data / f"{i:010d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    (root / camera / "timestamps.txt").write_text("".join(kitti_line(t) + "\n" for t in ts))
    return root


def _header(t: int) -> dict:
    return {"stamp": {"sec": t // 10**9, "nanosec": t % 10**9}, "frame_id": "camera_front"}


def write_mcap(path: Path, frames: list[np.ndarray], ts: list[int], *, corrupt: tuple[int, ...] = ()) -> Path:
    """CompressedImage JPEG on TOPIC and raw rgb8/bgr8 Image on RAW_TOPIC, with mcap-ros2-support."""
    import cv2
    from mcap_ros2.writer import Writer

    with open(path, "wb") as f:
        writer = Writer(f)
        compressed = writer.register_msgdef("sensor_msgs/msg/CompressedImage", COMPRESSED_IMAGE_MSGDEF)
        raw = writer.register_msgdef("sensor_msgs/msg/Image", IMAGE_MSGDEF)
        for i, (frame, t) in enumerate(zip(frames, ts, strict=True)):
            ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
            data = b"\xff\xd8 not a jpeg" if i in corrupt else jpg.tobytes()
            # log time lags the capture stamp, as on a real car: readers must use the stamp
            writer.write_message(TOPIC, compressed, {"header": _header(t), "format": "jpeg", "data": data},
                                 log_time=t + 7_000_000)
            enc, pixels = ("bgr8", frame[:, :, ::-1]) if i % 2 else ("rgb8", frame)
            writer.write_message(RAW_TOPIC, raw, {"header": _header(t), "height": STREAM_H, "width": STREAM_W, "encoding": enc,
                                                  "is_bigendian": 0, "step": STREAM_W * 3,
                                                  "data": np.ascontiguousarray(pixels).tobytes()},
                                 log_time=t + 7_000_000)
        writer.finish()
    return path

# ----------------------------------------------------------------------------- fake runtimes on a simulated clock (real-time validation)


MS = 1_000_000


class FakeRuntime:
    """A model that 'takes' ``model_ms(frame_id)`` on the simulated clock (or sleeps on a real one)."""

    def __init__(self, clock: SimulatedClock | None, model_ms: Callable[[int], float]) -> None:
        self.clock, self.model_ms = clock, model_ms
        self.info = RuntimeInfo(backend="fake", device="cpu: test", precision="fp32", version="0")
        self.calls: list[int] = []

    def __enter__(self) -> FakeRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def preprocess(self, frames):
        return Prepared(batch=frames[0], original_sizes=((frames[0].shape[0], frames[0].shape[1]),))

    def run(self, prepared: Prepared):
        frame_id = int(prepared.batch[0, 0, 0])
        self.calls.append(frame_id)
        dt = round(self.model_ms(frame_id) * MS)
        if self.clock is not None:
            self.clock.advance(dt)
        else:
            import time

            time.sleep(dt / 1e9)
        return frame_id

    def postprocess(self, raw, prepared):
        return [Detections(np.array([[0, 0, 2, 2]], np.float32), np.array([0.9], np.float32), np.array([raw % 7 + 1]))]

    def infer(self, frames):
        prepared = self.preprocess(frames)
        return self.postprocess(self.run(prepared), prepared)


class IdRuntime(FakeRuntime):
    """FakeRuntime for real frames: the frame id is the call count (pixels are not ids here)."""

    def run(self, prepared):
        self.calls.append(len(self.calls))
        self.clock.advance(round(self.model_ms(len(self.calls) - 1) * MS))
        return len(self.calls) - 1


# ----------------------------------------------------------------------------- videos and a FLOPs 'runtime'


def write_mp4(path: Path, frames: list[np.ndarray], fps: float = 10.0, fourcc: str = "mp4v") -> Path:
    import cv2

    h, wd = frames[0].shape[:2]
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (wd, h))
    assert w.isOpened()
    for f in frames:
        w.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    w.release()
    return path


def flops_ms(module: nn.Module, input_shape: tuple[int, ...]) -> float:
    """A deterministic 'runtime': latency proportional to MACs (bilinear in in/out channels)."""
    if isinstance(module, nn.Linear):
        return 1e-5 * input_shape[0] * module.in_features * module.out_features + 1e-4
    with torch.no_grad():
        h, w = module(torch.zeros(input_shape)).shape[-2:]
    k = module.kernel_size[0] * module.kernel_size[1]
    return 1e-5 * input_shape[0] * (module.in_channels // module.groups) * module.out_channels * k * h * w + 1e-4


# ----------------------------------------------------------------------------- tiny prune jobs (Ray, CLI, reliability)


ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _write_coco(root: Path, n_train: int = 16, n_val: int = 8, seed: int = 0) -> Path:
    """A tiny COCO folder: coloured boxes on noise, 96x96 PNGs, categories 1..7."""
    from PIL import Image

    from perception.classes import DRIVE_CLASSES

    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(DRIVE_CLASSES)]
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split).mkdir(exist_ok=True)
        images, anns = [], []
        for i in range(n):
            img = rng.integers(0, 60, size=(96, 96, 3), dtype=np.uint8)
            for _ in range(int(rng.integers(1, 3))):
                x, y = rng.integers(0, 56, size=2)
                w, h = rng.integers(16, 40, size=2)
                c = int(rng.integers(1, 8))
                img[y : y + h, x : x + w] = np.array([c * 30 % 255, 200, 255 - c * 30], np.uint8)
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c, "bbox": [int(x), int(y), int(w), int(h)],
                             "area": int(w * h), "iscrowd": 0})
            Image.fromarray(img).save(root / split / f"{i:04d}.png")
            images.append({"id": i + 1, "file_name": f"{i:04d}.png", "width": 96, "height": 96})
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats})
        )
    return root


def tiny_job(assets: dict[str, Path], out: Path, **changes) -> dict:
    """The tiny example job pointed at the module's assets, with dotted-key changes."""
    data = yaml.safe_load((ROOT / "avprune/config/examples/prune_tiny.yaml").read_text())
    data["model"]["checkpoint"] = str(assets["ckpt"])
    data["data"] = {"source": "coco", "root": str(assets["coco"]), "val_images": 6}
    data["output_dir"] = str(out)
    data["cache_dir"] = str(assets["base"] / "cache")
    # A loose budget and the cubic ramp: every candidate prunes and is feasible whatever the
    # (noisy, shared-machine) latency; the infeasible test below drives the budget controller.
    data["budget"].update({"speedup": None, "latency_ms": 1000.0})
    data["pruning"]["controller"] = "cubic"
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    return data


def _quiet_head(model) -> None:
    """Bias SSD's class logits towards background: an untrained head then emits few boxes,
    which keeps NMS (and so every evaluation and latency measurement) cheap in these tests."""
    for conv in model.head.classification_head.module_list:
        last = [m for m in conv.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        with torch.no_grad():
            last.bias.view(-1, 8)[:, 0] = 8.0


def make_job_assets(base: Path) -> dict[str, Path]:
    """The tiny job's inputs: a COCO folder (16 train, 8 val) and a quiet-headed SSDlite-128 checkpoint."""
    from perception.models import save_checkpoint

    base.mkdir(parents=True, exist_ok=True)
    coco = _write_coco(base / "coco")
    torch.manual_seed(0)
    model = build_detector("ssdlite320_mobilenet_v3_large", image_size=128)
    _quiet_head(model)
    save_checkpoint(base / "dense.pt", model)
    return {"coco": coco, "ckpt": base / "dense.pt", "base": base}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """:func:`make_job_assets` once per test module (any module may ask for it)."""
    return make_job_assets(tmp_path_factory.mktemp("assets"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_cluster(ray_tmpdir: str) -> None:
    """Terminate (then kill) the processes of the cluster that uses ``ray_tmpdir``."""
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            mine = ray_tmpdir in " ".join(p.info["cmdline"] or []) or (p.info["environ"] or {}).get("RAY_TMPDIR") == ray_tmpdir
        except (psutil.Error, TypeError):
            continue
        if mine and p.pid != os.getpid():
            procs.append(p)
    # The raylet's agents retitle themselves (ray::DashboardAgent) and do not inherit RAY_TMPDIR;
    # as its children they are found before anything is stopped (else they outlive it, orphaned).
    for p in list(procs):
        with contextlib.suppress(psutil.Error):
            procs.extend(c for c in p.children(recursive=True) if c not in procs)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        p.kill()
