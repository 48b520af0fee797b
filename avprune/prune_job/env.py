"""The job environment every stage and Ray worker shares, built once per process from the config.

``JobEnv.from_config(cfg)`` returns one instance per job config in a process (the driver, a scan
worker running several layers, a trial), so the val/train sets are read once there. It answers
the questions all stages ask: the data, the dense model, a model's mAP, its size, and its latency.

Latency is always measured the way the model will be deployed: the core graph exported to
ONNX (``deploy.export``), opened through deploy's runtime interface and timed per frame batch
by ``deploy.timing`` (end to end, or the graph alone when ``budget.end_to_end`` is false).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from avprune.config.prune import PruneJobConfig

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from deploy.timing import LatencySummary, PairedTiming
    from deploy.verify import VerifiedExport
    from perception.data import CocoDetectionDataset
    from perception.train import TrainSettings

log = logging.getLogger(__name__)

LayerFilter = Callable[[str, "nn.Module"], bool]
#: Timed blocks behind the baseline latency (the budget): their median p50, and their spread
BASELINE_BLOCKS = 5


@dataclass(frozen=True)
class MapScore:
    """COCO mAP@[.5:.95] and AP50 on the job's val subset."""

    map: float
    map50: float


@dataclass(frozen=True)
class ModelSize:
    """Parameters of the whole detector and GMACs of its core graph (backbone + heads) per frame."""

    params: int
    gmacs: float


class JobEnv:
    """Data, models and measurements of one prune job config, in one process."""

    _instances: ClassVar[dict[str, JobEnv]] = {}

    def __init__(self, config: PruneJobConfig) -> None:
        self.config = config
        self._bn_batches: dict[int, list[torch.Tensor]] = {}  # calibration batches by image count

    @classmethod
    def from_config(cls, config: PruneJobConfig) -> JobEnv:
        """The process's environment for ``config`` (one per job fingerprint and output folder)."""
        key = f"{config.fingerprint()}|{config.output_dir}"
        env = cls._instances.get(key)
        if env is None:
            env = cls._instances[key] = cls(config)
        return env

    # ------------------------------------------------------------------ process set-up
    def set_worker_threads(self) -> None:
        """Cap torch threads inside a Ray worker (two trials on two cores must not fight)."""
        import torch

        torch.set_num_threads(int(os.environ.get("AVPRUNE_TORCH_THREADS", self.config.resources.torch_threads)))

    # ------------------------------------------------------------------ data
    def prepare_data(self) -> Path:
        """The COCO root of the job's data; a synthetic set is generated into its cache when missing.

        Generation writes to a temporary sibling folder renamed into place at the end, so a killed
        job never leaves a half-written cache that looks complete.
        """
        data = self.config.data
        root = data.coco_root()
        if data.source == "coco" or (root / "annotations" / "instances_val.json").is_file():
            return root
        from perception.synthetic import generate_dataset

        final = data.synthetic_dir()
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            log.info("generating %d synthetic images into %s", data.images, final)
            generate_dataset(tmp, images=data.images, drives=0, seed=data.seed)
            if final.exists():  # a stale partial folder from an older layout: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return root

    @cached_property
    def _splits(self) -> tuple[CocoDetectionDataset, CocoDetectionDataset]:
        from perception.data import load_split, subset

        data = self.config.data
        root = data.coco_root()
        train = load_split(root, "train")
        if data.train_images is not None:
            train = subset(train, data.train_images, seed=data.seed)
        return train, subset(load_split(root, "val"), data.val_images, seed=data.seed)

    @property
    def train_set(self) -> CocoDetectionDataset:
        return self._splits[0]

    @property
    def val_set(self) -> CocoDetectionDataset:
        """The fixed subset every mAP in the job is measured on."""
        return self._splits[1]

    def val_subset(self, n: int) -> CocoDetectionDataset:
        """``n`` images of the val subset (the same ones in every process)."""
        from perception.data import subset

        return subset(self.val_set, n, seed=self.config.seed)

    def finetune_settings(self, *, seed: int, threads: int | None) -> TrainSettings:
        """The fine-tune recipe every trial trains with, candidates and the dense shadow alike."""
        from perception.train import TrainSettings

        ft = self.config.finetune
        return TrainSettings(steps=ft.steps, batch_size=ft.batch_size, optimizer=ft.optimizer, lr=ft.lr,
                             warmup_steps=ft.warmup(), checkpoint_every=ft.measure_every, seed=seed,
                             augment=ft.augmentation(), num_threads=threads)

    def recalibrate_bn(self, model: nn.Module, images: int | None = None) -> int:
        """Re-estimate ``model``'s BatchNorm statistics on ``images`` training images (default
        ``finetune.bn_recalibration_images``; :func:`pruning.bn_recalibration.recalibrate_batchnorm`),
        before a measurement. Returns the BatchNorms re-estimated (0 when off)."""
        n = self.config.finetune.recalibration_images() if images is None else int(images)
        if n == 0:
            return 0
        from pruning.bn_recalibration import recalibrate_batchnorm
        from pruning.filters import DetectorCore

        if n not in self._bn_batches:  # the same images, through the same transform, for every model of the job
            self._bn_batches[n] = self.calibration_batches(model, n, batch=16)
        return recalibrate_batchnorm(DetectorCore(model), self._bn_batches[n])

    def calibration_batches(self, model: nn.Module, images: int = 64, batch: int = 16) -> list[torch.Tensor]:
        """The first ``images`` training images as ``model``'s normalised core inputs ([B, 3, H, W]
        batches of ``batch``): what :func:`pruning.reconstruct.reconstruct` fits layers on, the gate
        fold averages over and BatchNorm statistics are re-estimated on. Without augmentation: the
        same pixels every call, and no draw from the random stream that orders a trial's training."""
        from perception.models import core_input_batches

        return core_input_batches(model, self.train_set.augmented(False), images, batch)

    @cached_property
    def timing_frames(self) -> list[np.ndarray]:
        """``budget.batch`` real frames (HxWx3 uint8): the batch every latency is measured on."""
        val = self.val_set
        return [val.load_image(i % len(val)) for i in range(self.config.budget.batch)]

    # ------------------------------------------------------------------ models
    def _deployed(self, model: nn.Module) -> nn.Module:
        """Apply the budget's deployment post-processing settings (score threshold) to a detector.

        Dense and pruned models get the same setting, and deploy's export copies it into the ONNX
        metadata, so mAP and latency are both measured as the model will run.
        """
        from perception.models import set_score_threshold

        thresh = self.config.budget.score_thresh
        return model if thresh is None else set_score_threshold(model, thresh)

    def load_model(self, path: str | Path) -> nn.Module:
        """A (possibly channel-pruned) detector checkpoint at the budget's input size."""
        from perception.models import load_detector

        return self._deployed(load_detector(path, image_size=tuple(self.config.budget.input_size)))

    def load_dense(self) -> nn.Module:
        """The dense detector at the budget's input size."""
        return self.load_model(self.config.model.checkpoint)

    def build_architecture(self) -> nn.Module:
        """An untrained detector of the dense checkpoint's architecture at the budget's input size
        (weights come from a state dict): the checkpoint's anchors and removed blocks included, which
        the registry's defaults would not give (a snapshot built on default anchors scored 0.017 mAP
        where its model scored 0.648 in the trial)."""
        from perception.models import checkpoint_architecture

        return checkpoint_architecture(self.dense_meta, self.config.model.checkpoint,
                                       image_size=tuple(self.config.budget.input_size))

    @cached_property
    def dense_meta(self) -> dict[str, Any]:
        """The dense checkpoint's architecture metadata, read once: :meth:`build_architecture` runs at
        every measurement of every trial, and the checkpoint file holds the weights too."""
        from perception.models import read_checkpoint

        return dict(read_checkpoint(self.config.model.checkpoint)["model"])

    # The model pruning starts from: the dense checkpoint, or with ``pruning.fold_gates`` the gate_fold
    # stage's folded copy of it. Dense figures (baseline, shadow, teacher) always use the dense one.
    @property
    def folded_checkpoint(self) -> Path:
        """Where the gate_fold stage writes the folded model (``pruning.fold_gates`` > 0)."""
        return self.config.output_dir / "work" / "gate_fold" / "folded.pt"

    def load_start(self) -> nn.Module:
        """The model the job prunes: the folded checkpoint when ``pruning.fold_gates`` is on, else dense."""
        if not self.config.pruning.fold_gates:
            return self.load_dense()
        path = self.folded_checkpoint
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the gate_fold stage's folded model is missing (pruning.fold_gates is "
                                    f"{self.config.pruning.fold_gates}); delete {path.parents[2] / 'stages'}"
                                    "/gate_fold.json and rerun with --resume to fold again")
        return self.load_model(path)

    def build_start_architecture(self) -> nn.Module:
        """An untrained :meth:`load_start` architecture: dense, less the folded gates (now ``nn.Identity``)."""
        from perception.models import drop_blocks

        model = self.build_architecture()
        drop_blocks(model, self.folded_gates)
        return model

    @cached_property
    def folded_gates(self) -> list[str]:
        """The gates the start model lacks (empty when ``pruning.fold_gates`` is off)."""
        if not self.config.pruning.fold_gates:
            return []
        from perception.models import read_checkpoint

        return [str(n) for n in read_checkpoint(self.folded_checkpoint)["model"].get("removed_blocks", ())]

    def layer_filter(self, model: nn.Module, importance: str) -> LayerFilter:
        """Which layers a candidate prunes: the detector default (never the class/box output convs);
        for ``bn_scale`` only layers a BatchNorm follows (its score is that BatchNorm's |gamma|, so
        SSDlite's squeeze-excitation convs, which have none, stay out)."""

        from pruning.filters import detector_core_forward, detector_default_filter
        from pruning.groups import find_following_bn

        default = detector_default_filter(model)
        if importance != "bn_scale":
            return default
        layers = [n for n, m in model.named_modules() if default(n, m)]
        with_bn = set(find_following_bn(model, layers, self.example_input(), detector_core_forward))
        return lambda name, module: default(name, module) and name in with_bn

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """Zeros of the budget's input size (what pruning traces the model with)."""
        import torch

        h, w = self.config.budget.input_size
        return torch.zeros(batch, 3, h, w)

    # ------------------------------------------------------------------ measurements
    def evaluate_map(self, model: nn.Module, val: CocoDetectionDataset | None = None) -> MapScore:
        """Eager COCO mAP on ``val`` (default: the job's val subset); the model's mode is restored."""
        from perception.evaluate import evaluate_model

        m = evaluate_model(model, self.val_set if val is None else val, batch_size=4)
        return MapScore(map=_finite(m.map), map50=_finite(m.map50))

    def size_of(self, model: nn.Module) -> ModelSize:
        import torch
        import torch_pruning as tp

        from deploy.core_graph import CoreModule, model_meta

        core = CoreModule(model, model_meta(model)).eval()
        with torch.no_grad():
            macs, _ = tp.utils.count_ops_and_params(core, self.example_input())
        return ModelSize(params=int(sum(p.numel() for p in model.parameters())), gmacs=float(macs) / 1e9)

    def measure_latency(self, model: nn.Module, work_dir: Path) -> LatencySummary:
        """Latency per batch of ``model`` on the budget's runtime, device and thread count."""
        from deploy.timing import measure_latency

        b = self.config.budget
        with self._runtime(model, work_dir / "latency_probe.onnx") as rt:
            # one batch of budget.batch frames per call
            return measure_latency(rt, [self.timing_frames], warmup=3, iters=b.measure_iters, end_to_end=b.end_to_end)

    def measure_latency_blocks(self, model: nn.Module, work_dir: Path, blocks: int = BASELINE_BLOCKS) -> PairedTiming:
        """``model``'s latency per batch as ``blocks`` (>= 5) timed blocks of ``budget.measure_iters``
        calls in all (:func:`deploy.timing.time_paired` with one model): the median of the blocks'
        p50s is a budget that one slow block cannot move, and their spread says how far to trust it."""
        from deploy.timing import time_paired

        b = self.config.budget
        blocks = max(int(blocks), BASELINE_BLOCKS)
        with self._runtime(model, work_dir / "latency_probe.onnx") as rt:
            # one batch of budget.batch frames per call, as measure_latency times it
            return time_paired({"dense": _batch_call(rt, self.timing_frames, b.end_to_end)}, [None], blocks=blocks,
                               block_size=max(1, -(-b.measure_iters // blocks)), warmup=3)

    def measure_latency_paired(self, model: nn.Module, dense: nn.Module | Path, work_dir: Path, *,
                               dense_ms: float, pairs: int | None = None,
                               clock_ns: Callable[[], int] | None = None) -> tuple[LatencySummary, float]:
        """``model``'s latency as the job's quiet baseline would have measured it, and the load factor.

        Trials share a node: one measures while another trains, which slows every call (measured
        here: a dense-sized candidate at 16.7-21.5 ms against the 12.8 ms quiet baseline, enough to
        drive the controller's latency correction to its clip and prune far past the budget). So
        ``model`` is timed interleaved with the dense model ``dense`` (a module or its exported
        graph, :meth:`runtime_target`) on the same frames, call by call; the load slows both
        alike. The candidate's p50 is ``dense_ms`` (the baseline's dense p50) over the median ratio
        of the dense call to the candidate call beside it, and its other percentiles scale with it.
        Returns (that summary, the load factor: ``dense_ms`` over the dense p50 of this run, < 1
        under load). ``pairs``: how many dense/candidate call pairs (default ``budget.measure_iters``,
        at least 10). ``clock_ns``: the timer (default ``time.perf_counter_ns``).
        """
        import numpy as np

        from deploy.timing import LatencySummary, time_paired

        if not dense_ms > 0:
            raise ValueError(f"dense_ms must be the baseline's dense p50 (> 0 ms); got {dense_ms}")
        b = self.config.budget
        with self._runtime(model, work_dir / "latency_probe.onnx") as rt, self._open(dense) as drt:
            calls = {name: _batch_call(r, self.timing_frames, b.end_to_end) for name, r in (("dense", drt), ("model", rt))}
            # one call per block, the order rotating: each candidate call has a dense call beside it
            n = b.measure_iters if pairs is None else int(pairs)
            timing = time_paired(calls, [None], blocks=max(n, 2 * BASELINE_BLOCKS), block_size=1,
                                 warmup=3, **({} if clock_ns is None else {"clock_ns": clock_ns}))
        # The median of the per-pair ratios, not the ratio of the medians: the other trial's load
        # comes in bursts. Measured here, a dense graph against itself while two trials trained:
        # ratio of p50s 0.81-1.00 over six runs, median pair ratio 0.95-1.04.
        d, m = np.asarray(timing.block_p50_ms["dense"]), np.asarray(timing.block_p50_ms["model"])
        speedup = float(np.median(d / m))
        summary = timing.summaries["model"]
        k = float(dense_ms) / speedup / summary.p50_ms  # the candidate's samples, at the baseline's conditions
        scaled = LatencySummary(p50_ms=summary.p50_ms * k, p90_ms=summary.p90_ms * k, p99_ms=summary.p99_ms * k,
                                mean_ms=summary.mean_ms * k, n=summary.n)
        return scaled, float(dense_ms) / timing.summaries["dense"].p50_ms

    def frame_timing(self, dense: nn.Module, pruned: nn.Module, work_dir: Path, *, frames: int = 8,
                     blocks: int = BASELINE_BLOCKS) -> PairedTiming:
        """Dense and pruned, whole frames (pre-processing, graph, decode + NMS), batch 1, paired and
        interleaved on the same ``frames`` val frames (:func:`deploy.timing.time_runtimes`): frame
        and per-stage summaries of both models from one run, and the frame speed-up with its interval."""
        from deploy.timing import time_runtimes

        val = self.val_set
        images = [val.load_image(i % len(val)) for i in range(frames)]
        with self._runtime(dense, work_dir / "frame_dense.onnx") as d, \
                self._runtime(pruned, work_dir / "frame_pruned.onnx") as p:
            # one frame per block entry, the models alternating frame by frame (the closest pairing)
            return time_runtimes({"dense": d, "pruned": p}, images, reference="dense",
                                 blocks=max(blocks, 2) * len(images), block_size=1, warmup=2)

    @contextlib.contextmanager
    def _runtime(self, model: nn.Module, onnx_path: Path) -> Iterator[Any]:
        """``model`` opened on the budget's runtime, device and thread count (exported to ``onnx_path``
        unless the runtime is PyTorch)."""
        with self._open(self.runtime_target(model, onnx_path)) as rt:
            yield rt

    def runtime_target(self, model: nn.Module, onnx_path: Path) -> nn.Module | Path:
        """What the budget's runtime opens: the model itself (PyTorch) or its core graph exported to ``onnx_path``."""
        model = model.eval()
        return model if self.config.budget.runtime == "pytorch" else self.export_core(model, onnx_path)

    @contextlib.contextmanager
    def _open(self, target: nn.Module | Path) -> Iterator[Any]:
        import torch

        from deploy.runtimes import open_runtime

        b = self.config.budget
        # Pre/post-processing run in torch: give them the budget's threads too, as deployed.
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(b.threads)
        try:
            with open_runtime(target, backend=b.runtime, device=b.device, threads=b.threads) as rt:
                yield rt
        finally:
            torch.set_num_threads(torch_threads)

    def export_core(self, model: nn.Module, path: Path) -> Path:
        """The NMS-free core graph as ONNX (legacy exporter: fast, and known to work for every family)."""
        from deploy.export import export_onnx

        path.parent.mkdir(parents=True, exist_ok=True)
        return Path(export_onnx(model, path, form="core", exporter="legacy").path)

    def export_verified(self, model: nn.Module, path: Path, *, max_images: int | None = 64) -> VerifiedExport:
        """The shipped ONNX: the core graph, kept only once ONNX Runtime reproduces PyTorch's outputs,
        detections and mAP on validation images (:func:`deploy.verify.export_verified`)."""
        from deploy.verify import export_verified

        path.parent.mkdir(parents=True, exist_ok=True)
        return export_verified(model, path, self.val_set, form="core", exporter="legacy",
                               score_thresh=self.config.budget.score_thresh, max_images=max_images,
                               threads=self.config.budget.threads)


def _batch_call(rt: Any, frames: Any, end_to_end: bool) -> Callable[[Any], None]:
    """One timed call of ``rt`` on the budget's batch: whole frames, or the graph on the batch
    pre-processed once. Returns nothing (a returned mapping would read as stage timings)."""
    fn, batch = (rt.infer, frames) if end_to_end else (rt.run, rt.preprocess(frames))

    def call(_: Any) -> None:
        fn(batch)

    return call


def _finite(v: float) -> float:
    return 0.0 if v != v else float(v)  # NaN: no ground truth in a bucket counts as nothing found
