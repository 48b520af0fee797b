"""Job-level pieces every stage shares: data, the dense model, mAP, measured latency, size.

Latency is always measured the way the model will be deployed: the core graph exported to
ONNX (``deploy.export``), opened through deploy's runtime interface and timed end to end per
frame batch (``deploy.timing``): pre-processing, the graph, decoding and NMS.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from avprune.config.prune import PruneJobConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Latency:
    """Measured latency per batch of ``batch`` frames, end to end, in ms."""

    p50_ms: float
    p99_ms: float
    mean_ms: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def set_worker_threads(config: PruneJobConfig) -> None:
    """Cap torch threads inside a Ray worker (two trials on two cores must not fight)."""
    import torch

    n = int(os.environ.get("AVPRUNE_TORCH_THREADS", config.resources.torch_threads))
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- data


def prepare_data(config: PruneJobConfig) -> Path:
    """The COCO root of the job's data; a synthetic set is generated into its cache when missing.

    Generation writes to a temporary sibling folder renamed into place at the end, so a killed
    job never leaves a half-written cache that looks complete.
    """
    root = config.data.coco_root()
    if config.data.source == "coco" or (root / "annotations" / "instances_val.json").is_file():
        return root
    from perception.synthetic import generate_dataset

    final = config.data.synthetic_dir()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        log.info("generating %d synthetic images into %s", config.data.images, final)
        generate_dataset(tmp, images=config.data.images, drives=0, seed=config.data.seed)
        if final.exists():  # a stale partial folder from an older layout: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def datasets(config: PruneJobConfig) -> tuple[Any, Any]:
    """(train, val) datasets; val is the fixed subset every mAP in the job is measured on."""
    from perception.data import load_split, subset

    root = config.data.coco_root()
    train = load_split(root, "train")
    if config.data.train_images is not None:
        train = subset(train, config.data.train_images, seed=config.data.seed)
    val = subset(load_split(root, "val"), config.data.val_images, seed=config.data.seed)
    return train, val


def frames_for_timing(val: Any, config: PruneJobConfig) -> list[Any]:
    """``batch`` real frames (HxWx3 uint8) for latency measurement."""
    return [val.load_image(i % len(val)) for i in range(config.budget.batch)]


# ----------------------------------------------------------------------------- model


def load_dense(config: PruneJobConfig) -> Any:
    """The dense detector at the budget's input size."""
    from perception.models import load_detector

    return deployed(load_detector(config.model.checkpoint, image_size=tuple(config.budget.input_size)), config)


def build_architecture(config: PruneJobConfig) -> Any:
    """An untrained dense detector of the job's architecture (weights come from a state dict)."""
    from perception.models import build_detector

    return build_detector(config.model.name, num_classes=config.model.num_classes,
                          image_size=tuple(config.budget.input_size))


def load_model(path: str | Path, config: PruneJobConfig) -> Any:
    """A (possibly channel-pruned) detector checkpoint at the budget's input size."""
    from perception.models import load_detector

    return deployed(load_detector(path, image_size=tuple(config.budget.input_size)), config)


def deployed(model: Any, config: PruneJobConfig) -> Any:
    """Apply the budget's deployment post-processing settings (score threshold) to a detector.

    Dense and pruned models get the same setting, and deploy's export copies it into the ONNX
    metadata, so mAP and latency are both measured as the model will run.
    """
    from perception.models import set_score_threshold

    thresh = config.budget.score_thresh
    return model if thresh is None else set_score_threshold(model, thresh)


def layer_filter(model: Any, importance: str, config: PruneJobConfig) -> Any:
    """Which layers a candidate prunes: the detector default (never the class/box output convs);
    for ``bn_scale`` only layers a BatchNorm follows (its score is that BatchNorm's |gamma|, so
    SSDlite's squeeze-excitation convs, which have none, stay out)."""
    import torch

    from pruning.filters import detector_core_forward, detector_default_filter
    from pruning.groups import find_following_bn

    default = detector_default_filter(model)
    if importance != "bn_scale":
        return default
    h, w = config.budget.input_size
    layers = [n for n, m in model.named_modules() if default(n, m)]
    with_bn = set(find_following_bn(model, layers, torch.zeros(1, 3, h, w), detector_core_forward))
    return lambda name, module: default(name, module) and name in with_bn


def evaluate_map(model: Any, val: Any, *, max_images: int | None = None) -> dict[str, float]:
    """Eager COCO mAP on the job's val subset (the model's train/eval mode is restored)."""
    from perception.evaluate import evaluate_model

    m = evaluate_model(model, val, batch_size=4, max_images=max_images)
    return {"map": _finite(m.map), "map50": _finite(m.map50)}


def _finite(v: float) -> float:
    return 0.0 if v != v else float(v)  # NaN: no ground truth in a bucket counts as nothing found


def size_of(model: Any, config: PruneJobConfig) -> dict[str, float]:
    """Parameters of the whole detector and GMACs of its core graph (backbone + heads) per frame."""
    import torch
    import torch_pruning as tp

    from deploy.core_graph import CoreModule, model_meta

    core = CoreModule(model, model_meta(model)).eval()
    h, w = config.budget.input_size
    with torch.no_grad():
        macs, _ = tp.utils.count_ops_and_params(core, torch.zeros(1, 3, h, w))
    return {"params": int(sum(p.numel() for p in model.parameters())), "gmacs": float(macs) / 1e9}


# ----------------------------------------------------------------------------- latency


def measure_latency(model: Any, config: PruneJobConfig, frames: list[Any], work_dir: Path) -> Latency:
    """End-to-end latency of ``model`` on the budget's runtime, device and thread count."""
    from deploy.runtimes import open_runtime

    b = config.budget
    model = model.eval()
    if b.runtime == "pytorch":
        target: Any = model
    else:
        target = export_core(model, work_dir / "latency_probe.onnx")
    import torch

    # Pre/post-processing run in torch: give them the budget's threads too, as deployed.
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(b.threads)
    try:
        with open_runtime(target, backend=b.runtime, device=b.device, threads=b.threads) as rt:
            try:
                from deploy.timing import measure_latency as measure
            except ImportError:  # deploy.timing not available yet: time the runtime the same way
                measure = _time_runtime
            s = measure(rt, frames, warmup=3, iters=b.measure_iters, end_to_end=b.end_to_end)
    finally:
        torch.set_num_threads(torch_threads)
    return Latency(p50_ms=float(s.p50_ms), p99_ms=float(s.p99_ms), mean_ms=float(s.mean_ms), n=int(s.n))


def _time_runtime(rt: Any, frames: list[Any], *, warmup: int, iters: int, end_to_end: bool = True) -> Latency:
    """Wall time per call of ``rt.infer`` (or of ``rt.run`` alone on a prepared batch when not
    ``end_to_end``), warm-up excluded, nearest-rank percentiles."""
    import time

    import numpy as np

    prepared = rt.preprocess(frames)
    call = (lambda: rt.infer(frames)) if end_to_end else (lambda: rt.run(prepared))
    for _ in range(warmup):
        call()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    ts = np.sort(np.asarray(times))

    def rank(q: float) -> float:
        return float(ts[max(0, int(np.ceil(q / 100 * len(ts))) - 1)])

    return Latency(p50_ms=rank(50), p99_ms=rank(99), mean_ms=float(ts.mean()), n=len(ts))


def export_core(model: Any, path: Path) -> Path:
    """The NMS-free core graph as ONNX (legacy exporter: fast, and known to work for every family)."""
    from deploy.export import export_onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(export_onnx(model, path, form="core", exporter="legacy").path)
