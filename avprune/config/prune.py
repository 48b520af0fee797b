"""The prune job file (`avprune prune JOB.yaml`), validated once at the edge.

Every path is checked here, before anything is written: a job that cannot start leaves no
output folder behind. Relative paths are resolved against the current directory once, here, so
Ray workers (which run elsewhere) see the same files; on a multi-node cluster they must be on a
shared file system, as Ray Tune's storage already requires.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from avprune.config.base import ConfigError, StrictModel, format_validation_error, load_config

Importance = Literal["magnitude", "taylor", "activation", "bn_scale"]
Controller = Literal["budget", "cubic", "fixed", "layer_adaptive", "allocation"]
Granularity = Literal["channel", "unstructured", "nm", "block", "channel+block"]

#: ORT's CPU convs run NCHWc with 16 channels per block on AVX-512 (8 on AVX2): counts off the block
#: are padded, MACs paid for nothing (FIELD_NOTES; issue #12 measured 2.62x vs 2.02x at 50%).
DEFAULT_CHANNEL_MULTIPLE = 16


class ModelSpec(StrictModel):
    """The dense detector to prune: a registry name and a local checkpoint."""

    name: str = "ssdlite320_mobilenet_v3_large"
    checkpoint: Path
    num_classes: int = Field(8, ge=2)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        # The torch-free name list: a job file is checked in milliseconds, before torch is imported.
        # A detector registered at run time (perception.models.register_detector) is in the registry only.
        from perception.names import DETECTOR_NAMES

        models = sys.modules.get("perception.models")
        names = sorted({*DETECTOR_NAMES, *(models.list_detectors() if models is not None else ())})
        if v not in names:
            raise ValueError(f"unknown detector {v!r}; valid names: {', '.join(names)}")
        return v

    @field_validator("checkpoint")
    @classmethod
    def _exists(cls, v: Path) -> Path:
        if not v.is_file():
            raise ValueError(f"checkpoint file not found: {v} (train one with `avprune train`)")
        return v.resolve()


class DataSpec(StrictModel):
    """`synthetic` generates the drive data set into `root` (a cache) when missing; `coco` reads `root`."""

    source: Literal["synthetic", "coco"] = "synthetic"
    root: Path | None = None  # coco: folder holding train/ val/ annotations/; synthetic: cache folder
    images: int = Field(96, ge=8, description="synthetic only: images to generate")
    seed: int = 0
    train_images: int | None = Field(None, ge=2, description="fine-tune subset size (None: all)")
    val_images: int = Field(32, ge=1, description="images scored at every mAP evaluation")

    @field_validator("root")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        return None if v is None else v.expanduser().resolve()

    @model_validator(mode="after")
    def _root(self) -> DataSpec:
        if self.source == "coco":
            if self.root is None:
                raise ValueError("data.root is required when data.source is 'coco'")
            if not self.root.is_dir():
                raise ValueError(f"data.root: COCO folder not found: {self.root}")
            if not (self.root / "annotations").is_dir():
                raise ValueError(f"data.root: {self.root} has no annotations/ folder (expected COCO layout)")
        return self

    def coco_root(self) -> Path:
        """Where the COCO layout lives (synthetic: under the cache folder)."""
        if self.source == "coco":
            assert self.root is not None
            return self.root
        return self.synthetic_dir() / "coco"

    def synthetic_dir(self) -> Path:
        base = self.root or Path.home() / ".cache" / "avprune" / "synthetic"
        return base / f"images{self.images}-seed{self.seed}"


class BudgetSpec(StrictModel):
    """The latency budget (one of `latency_ms` / `speedup`) and the mAP floor (one of `map_floor` / `max_map_drop`)."""

    latency_ms: float | None = Field(None, gt=0, description="latency per batch, p50 (the graph; end to end with end_to_end)")
    speedup: float | None = Field(None, gt=1, description="alternative: dense p50 / pruned p50 at least this")
    runtime: Literal["onnxruntime", "tensorrt", "pytorch"] = "onnxruntime"
    device: str = "cpu"
    input_size: tuple[int, int] = (320, 320)
    batch: int = Field(1, ge=1)
    threads: int = Field(2, ge=1)
    map_floor: float | None = Field(None, ge=0, le=1, description="absolute COCO mAP@[.5:.95]")
    max_map_drop: float | None = Field(None, ge=0, le=1, description="alternative: dense mAP - floor")
    measure_iters: int = Field(30, ge=5)
    latency_margin: float = Field(
        0.0, ge=0, lt=0.5,
        description="the search aims this share under the latency budget; select still judges every model at "
        "the budget itself. A search that stops at the budget delivers a model that the select stage, re-timing "
        "it, finds over budget half the time: three timings of one model spread 7% on a shared 2-core host "
        "(benchmarks/RESULTS.md prune_job_foldse). 0: aim at the budget")
    score_thresh: float | None = Field(
        None, gt=0, lt=1,
        description="deployed score threshold for every model of the job (None: the checkpoint's); "
        "decoding + NMS cost grows with the boxes above it, so it is part of the latency",
    )
    end_to_end: bool = Field(
        False,
        description="False (default): the budget applies to the model graph, what pruning changes; True: "
        "time pre-processing + model + decoding/NMS per batch",
    )

    @field_validator("input_size")
    @classmethod
    def _size(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 32:
            raise ValueError(f"input_size must be (height, width), each >= 32; got {v}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v != "cpu" and not v.startswith("cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {v!r}")
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> BudgetSpec:
        if (self.latency_ms is None) == (self.speedup is None):
            raise ValueError("give exactly one of budget.latency_ms and budget.speedup")
        if (self.map_floor is None) == (self.max_map_drop is None):
            raise ValueError("give exactly one of budget.map_floor and budget.max_map_drop")
        if self.runtime == "tensorrt" and not self.device.startswith("cuda"):
            raise ValueError("budget.runtime 'tensorrt' needs budget.device 'cuda'")
        return self

    def latency_target(self, dense_p50_ms: float) -> float:
        """The budget in ms, given the dense model's measured p50."""
        return float(self.latency_ms) if self.latency_ms is not None else dense_p50_ms / float(self.speedup)

    def search_target(self, budget_ms: float) -> float:
        """The latency the search aims at: the budget less ``latency_margin`` of it."""
        return float(budget_ms) * (1.0 - float(self.latency_margin))

    def floor(self, dense_map: float) -> float:
        """The mAP floor, given the dense model's mAP."""
        return float(self.map_floor) if self.map_floor is not None else max(0.0, dense_map - float(self.max_map_drop))


class PruningSpec(StrictModel):
    """What the candidates vary over: importances × ramp speeds (controllers fixed to one list).

    ``channel_multiple`` (``round_to`` is its older name) prunes whole groups of that many channels
    (``auto``: the latency-table stage probes 1/8/16/32 on the runtime and records the choice and
    why). ``allocation`` is how the ``allocation`` controller splits the budget over layers:
    ``uniform`` (one aligned ratio; measured 2.4x graph at 50% on ORT CPU) or ``latency`` (HALP's
    knapsack over the latency table). ``granularity`` ``block`` / ``channel+block`` also removes
    whole residual blocks (issue #14).
    """

    importances: list[Importance] = Field(default_factory=lambda: ["magnitude", "bn_scale"], min_length=1)
    granularity: Granularity = "channel"
    controller: Controller = "budget"
    allocation: Literal["latency", "uniform"] = "uniform"
    ramps: list[float] = Field(
        default_factory=lambda: [0.5], min_length=1,
        description="share of the fine-tune steps after the warm-up by which the latency target reaches the budget; "
        "0: one-shot (the whole cut at the end of the warm-up, uncapped by max_cut_per_update; the rest recovers)")
    channel_multiple: int | Literal["auto"] = Field(
        DEFAULT_CHANNEL_MULTIPLE, description="channels pruned per group (16: ORT AVX-512 blocks), or 'auto'")
    round_to: int | None = Field(None, ge=1, description="older name of channel_multiple")
    update_every: int = Field(5, ge=1)
    floor_allowance: float = Field(
        0.02, ge=0, le=1,
        description="allocation controller: mAP the model may sit under the floor while the ramp runs, shrinking "
        "to 0 at the last step (a model cut during the ramp has not had the steps to recover); 0: the full "
        "floor at every measurement")
    step_back: float = Field(
        0.5, ge=0, le=1,
        description="allocation controller: under the floor, raise the latency target this share of the way back "
        "to the last target that met it (pruned groups regrow), then bisect; 0: hold the target instead")
    regrow_until: float = Field(
        0.8, ge=0, le=1,
        description="allocation controller: share of the fine-tune steps after which a model under the floor "
        "holds its target instead of stepping back (regrown channels late have too few steps, at too low a rate, "
        "to fit back in: step backs from step 1350 of 1600 took a 0.628 model at 2.06x to 0.614 at 1.57x, "
        "benchmarks/RESULTS.md prune_job_s1600); 1: step back until the last interval")
    max_cut_per_update: float | None = Field(
        0.08, gt=0, le=1,
        description="allocation controller: the most predicted latency one mask update may cut, as a share of the "
        "dense prediction (None: no cap)")
    one_shot_recovery: float = Field(
        0.5, ge=0, lt=1,
        description="allocation controller, one-shot candidates (ramp 0): share of the fine-tune steps after the "
        "warm-up during which the mAP floor is not judged (latency feedback still runs), so the cut is not "
        "regrown before it has had steps to recover (a one-shot 1.35x cut with the gates folded sat 16.6 "
        "points under dense at step 0 and 1.8 after 250 steps; benchmarks/RESULTS.md oneshot_recovery_foldse)")
    max_sparsity: float = Field(0.75, gt=0, lt=1)
    latency_costs: Literal["measured", "macs"] = Field(
        "measured",
        description="the latency table's per-layer costs: 'measured' (each layer timed on the budget's runtime, "
        "cached) or 'macs' (multiply-accumulates scaled to the baseline's dense latency: noise-free; on ONNX "
        "Runtime CPU the measured table's knapsack reached 1.42x at most where a MAC table's reached 1.69x, "
        "benchmarks/RESULTS.md oneshot_recovery_knapsack). The measured latency corrects either")
    reconstruct_images: int = Field(
        0, ge=0,
        description="re-solve the 1x1 convs that read pruned channels by least squares against the dense model, "
        "on this many training images, once the cut has reached the budget (He et al. 2017; "
        "pruning.reconstruct). 0: off. Measured one-shot: step-0 mAP of a 1.6x cut 0.35 -> 0.57 (dense 0.648), "
        "but after 1000 fine-tune steps it ends only 0.4 points closer to dense (2.2 against 2.6 under); "
        "it costs ~1-3 min per candidate on one CPU thread at 64 images")
    fold_gates: int = Field(
        0, ge=0,
        description="fold the detector's squeeze-excitation gates into the conv that reads each as its mean "
        "scale over this many training images, before any pruning (pruning.gate_fold; the job's gate_fold "
        "stage). 0: off. The gates are ~0.1% of SSDlite320's MACs but five passes each on a CPU runtime: "
        "measured 1.14-1.16x graph for the dense model at 0.648 -> 0.645 mAP before fine-tuning, "
        "multiplying a channel cut's speed-up alike (benchmarks/RESULTS.md oneshot_recovery_foldse)")
    stable_masks: bool = Field(
        False,
        description="a channel group's kept channels change only when its kept count does: a cut drops the "
        "weakest kept channels, growth revives the best pruned ones (pruning.granularity.stable_channel_mask). "
        "Off: every mask update re-ranks all channels, and a pruned channel that outscores a kept one swaps "
        "in (Dynamic Network Surgery). pruning.json records the swaps of every update either way")
    in_graph_calibration: bool | None = Field(
        None,
        description="re-fit the latency table's per-layer costs to the whole graph (one probe per channel "
        "group, timed on the budget's runtime; cached with the table). None: on for controller 'allocation' "
        "with allocation 'latency', whose knapsack an isolated-layer table misleads on ONNX Runtime CPU",
    )

    saving_fit: bool | None = Field(
        None,
        description="fit the latency table's overall scale to the start model timed whole, dense and thinned "
        "uniformly to 25/50/75% (4 timings on the budget's runtime; cached with the table). None: on whenever "
        "the in-graph calibration is off and the costs are measured. Why: layers timed alone sum to ~2.4x the "
        "graph on ONNX Runtime CPU, and the table anchored by a constant predicted 1.84 ms for a 4.8 ms model "
        "(benchmarks/RESULTS.md prune_job_oneshot2)",
    )

    @field_validator("channel_multiple", mode="before")
    @classmethod
    def _multiple(cls, v: object) -> object:
        if v == "auto":
            return v
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"channel_multiple must be a positive integer (16 for ORT's AVX-512 blocks, 8 for "
                             f"AVX2, 32 for tensor cores) or 'auto'; got {v!r}")
        return v

    @field_validator("ramps")
    @classmethod
    def _ramps(cls, v: list[float]) -> list[float]:
        bad = [r for r in v if not 0 <= r <= 1]
        if bad:
            raise ValueError(f"ramps are fractions of the fine-tune steps in [0, 1] (0: one-shot); got {bad}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _alias(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("round_to") is not None:
            rt, cm = data["round_to"], data.get("channel_multiple")
            if cm is not None and cm != rt:
                raise ValueError(f"pruning.round_to ({rt}) and pruning.channel_multiple ({cm}) disagree; give "
                                 "channel_multiple only")
            data = {**data, "channel_multiple": rt}
        return data

    @model_validator(mode="after")
    def _combination(self) -> PruningSpec:
        if self.controller == "allocation" and self.granularity not in ("channel", "channel+block"):
            raise ValueError(f"pruning.controller 'allocation' allocates channel groups; it needs granularity "
                             f"'channel' or 'channel+block', not {self.granularity!r}")
        if self.in_graph_calibration and self.latency_costs == "macs":
            raise ValueError("pruning.in_graph_calibration re-fits measured per-layer costs; latency_costs 'macs' "
                             "has none to fit. Set in_graph_calibration: false or latency_costs: measured")
        if self.reconstruct_images and not self.prunes_channels:
            raise ValueError(f"pruning.reconstruct_images re-solves layers that read pruned channels, and granularity "
                             f"{self.granularity!r} prunes none; set it to 0 or use granularity 'channel'")
        if self.saving_fit and not self.prunes_channels:
            raise ValueError(f"pruning.saving_fit: its timings thin channel groups, and granularity "
                             f"{self.granularity!r} prunes none; set it to false or use granularity 'channel'")
        if self.saving_fit and self.in_graph():
            raise ValueError("pruning.saving_fit and the in-graph calibration both fit the table to whole-graph "
                             "timings; the in-graph one also fits each layer's share. Set saving_fit: false or "
                             "in_graph_calibration: false")
        if self.in_graph_calibration and not self.prunes_channels:
            raise ValueError(f"pruning.in_graph_calibration: its probes thin channel groups, and granularity "
                             f"{self.granularity!r} prunes none; set it to false or use granularity 'channel'")
        return self

    def in_graph(self) -> bool:
        """Whether the latency-table stage calibrates the table in-graph (``in_graph_calibration``, resolved)."""
        if self.in_graph_calibration is not None:
            return self.in_graph_calibration
        return self.controller == "allocation" and self.allocation == "latency" and self.latency_costs == "measured"

    def fits_saving(self) -> bool:
        """Whether the latency-table stage fits the table's scale to whole-graph uniform cuts
        (``saving_fit``, resolved; the budget's runtime may still rule it out, see the stage)."""
        if self.saving_fit is not None:
            return self.saving_fit
        return not self.in_graph() and self.latency_costs == "measured" and self.prunes_channels

    @property
    def prunes_channels(self) -> bool:
        return self.granularity in ("channel", "channel+block")

    @property
    def prunes_blocks(self) -> bool:
        return self.granularity in ("block", "channel+block")

    def pruner_granularity(self) -> str:
        """The :class:`pruning.Pruner` granularity for channels (block-only jobs keep the channel
        machinery at zero sparsity so the trial loop is one shape)."""
        return "channel" if self.granularity in ("block", "channel+block") else self.granularity


class SensitivitySpec(StrictModel):
    """Per-layer scan: each unit alone pruned at a few sparsities, its damage measured.

    ``metric: loss`` measures the detection loss on ``eval_images`` fixed training images (a
    forward pass: cheap, deterministic, moves with every channel); ``map`` measures mAP on that
    many val images (what the ``layer_adaptive`` controller needs: it reads drops in mAP). The
    ``allocation`` controller's latency knapsack compares units by these curves (issue #12: by
    normalised importance alone it cut the sensitive residual streams to their floor).
    """

    metric: Literal["loss", "map"] | None = Field(
        None, description="None: map for the layer_adaptive controller (it reads mAP drops), loss otherwise")
    max_layers: int | None = Field(
        None, ge=1, description="the largest units only (by weights). None: every unit when the latency knapsack "
        "reads the curves (controller allocation, allocation latency), else 8")
    sparsities: list[float] | None = Field(
        None, min_length=1, description="None: [0.25, 0.5, 0.75] for the latency knapsack (its curves reach the "
        "pruning's depth), else [0.3, 0.6]")
    eval_images: int = Field(16, ge=1)
    bn_recalibration_images: int = Field(
        0, ge=0,
        description="re-estimate each scanned model's BatchNorm statistics on this many training images before "
        "its metric (adaptive BN, EagleEye ECCV 2020): a unit pruned alone is otherwise scored through the "
        "statistics of the unpruned network after it. 0: off (the scan's BatchNorms stay frozen)",
    )

    @field_validator("sparsities")
    @classmethod
    def _range(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return v
        bad = [s for s in v if not 0 < s < 1]
        if bad:
            raise ValueError(f"sensitivity sparsities must be in (0, 1); got {bad}")
        return sorted(v)


class FinetuneSpec(StrictModel):
    steps: int = Field(200, ge=1)
    lr: float = Field(0.005, gt=0)
    batch_size: int = Field(8, ge=2, description=">= 2: SSDlite's 1x1 maps need BatchNorm statistics")
    measure_every: int = Field(50, ge=1, description="steps between measured latency + mAP")
    optimizer: Literal["sgd", "adamw"] = "sgd"
    distill: bool | None = Field(
        None,
        description="distil from the dense checkpoint (the teacher) while fine-tuning; None: on for the "
        "detectors perception.distill supports (SSD / SSDlite), off otherwise",
    )
    warmup_steps: int | None = Field(
        None, ge=0,
        description="linear learning-rate warm-up, during which nothing is pruned (None: 10% of the steps). "
        "A fresh optimizer at full rate knocks a trained detector back for a while, and a controller "
        "would read that dip as pruning damage",
    )
    bn_recalibration_images: int | None = Field(
        None, ge=0,
        description="before an in-job mAP measurement of a candidate whose network changed since its last "
        "one (channels cut or regrown, a block gate moved), re-estimate the BatchNorm statistics on this many "
        "training images (adaptive BN, pruning.bn_recalibration): a cut's BNs follow it only at their "
        "momentum (0.03 in SSDlite), and a model measured soon after a cut reads far worse than it is. The "
        "model keeps the re-estimated statistics. None: 64; 0: off",
    )

    augment: bool | None = Field(
        None,
        description="train on flipped and colour-jittered images while fine-tuning. None: off, as the "
        "project's training recipe (minutes-long runs converge faster on the raw frames): the demo's "
        "checkpoint, trained without, fine-tuned dense for 120 steps read 0.544 mAP with augmentation and "
        "0.562 without (0.550 at the start). true for long fine-tunes of a checkpoint trained with it",
    )

    def augmentation(self) -> bool:
        """Whether fine-tuning augments its training images (None: off)."""
        return bool(self.augment)

    def recalibration_images(self) -> int:
        """Training images BatchNorm statistics are re-estimated on before each measurement (0: off)."""
        return 64 if self.bn_recalibration_images is None else self.bn_recalibration_images

    @model_validator(mode="after")
    def _warmup_below_steps(self) -> FinetuneSpec:
        if self.warmup_steps is not None and self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps}): nothing is "
                             "pruned during the warm-up")
        return self

    def warmup(self) -> int:
        """The warm-up steps in effect."""
        return self.warmup_steps if self.warmup_steps is not None else max(1, round(0.1 * self.steps))


class SearchSpec(StrictModel):
    candidates: int = Field(2, ge=1)
    early_stopping: bool = Field(True, description="ASHA stops trials in the bottom half at each rung")
    grace_period: int = Field(2, ge=1, description="ASHA: reports before a trial may be stopped")
    max_failures: int = Field(2, ge=0, description="restarts per trial after a worker dies")
    shadow_dense: bool | None = Field(
        None,
        description="train a dense 'shadow' (same recipe, seed and steps, nothing pruned) as a Ray Tune trial "
        "before the candidates, and judge a relative floor (budget.max_map_drop) against it: at each "
        "measurement the floor is the shadow's mAP at that step minus the drop, and selection uses its final "
        "mAP. None: on when budget.max_map_drop is set. false: the floor is judged against the starting "
        "checkpoint (the baseline's dense mAP), as the demo does to save the extra fine-tune",
    )


class ResourcesSpec(StrictModel):
    cpus_per_trial: float = Field(1, gt=0)
    gpus_per_trial: float = Field(0, ge=0)
    torch_threads: int = Field(1, ge=1, description="torch threads inside each Ray worker")


class PruneJobConfig(StrictModel):
    """A whole `avprune prune` job."""

    model: ModelSpec
    data: DataSpec = DataSpec()
    budget: BudgetSpec
    pruning: PruningSpec = PruningSpec()
    sensitivity: SensitivitySpec = SensitivitySpec()
    finetune: FinetuneSpec = FinetuneSpec()
    search: SearchSpec = SearchSpec()
    resources: ResourcesSpec = ResourcesSpec()
    output_dir: Path = Path("runs/prune")
    cache_dir: Path = Field(Path.home() / ".cache" / "avprune", description="latency tables, per runtime+device")
    seed: int = 0

    @field_validator("output_dir", "cache_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @model_validator(mode="after")
    def _cross(self) -> PruneJobConfig:
        if self.finetune.distill and not distill_supported(self.model.name):
            raise ValueError(f"finetune.distill: distillation supports SSD / SSDlite detectors, not "
                             f"{self.model.name!r}; set finetune.distill: false")
        if self.search.shadow_dense and self.budget.max_map_drop is None:
            raise ValueError("search.shadow_dense: the dense shadow judges a relative floor (budget.max_map_drop); "
                             "budget.map_floor is absolute and stays so. Set budget.max_map_drop, or drop "
                             "search.shadow_dense")
        if self.pruning.saving_fit and self.budget.runtime == "tensorrt":
            raise ValueError("pruning.saving_fit: the whole-graph timings run on onnxruntime or pytorch, not "
                             "tensorrt; set it to false")
        if self.pruning.in_graph_calibration and self.budget.runtime == "tensorrt":
            raise ValueError("pruning.in_graph_calibration: the whole-graph probes run on onnxruntime or pytorch, "
                             "not tensorrt; set it to false")
        if self.pruning.controller == "layer_adaptive" and self.sensitivity.metric == "loss":
            raise ValueError("sensitivity.metric: the layer_adaptive controller sets each layer's sparsity from "
                             "its mAP drop against the floor; set sensitivity.metric: map")
        if self.finetune.measure_every > self.finetune.steps:
            raise ValueError(
                f"finetune.measure_every ({self.finetune.measure_every}) must be <= finetune.steps ({self.finetune.steps})"
            )
        return self

    def knapsack_reads_sensitivity(self) -> bool:
        """Whether the sensitivity curves are the latency knapsack's damage (controller allocation, latency)."""
        return self.pruning.controller == "allocation" and self.pruning.allocation == "latency"

    def sensitivity_metric(self) -> str:
        """``sensitivity.metric``, resolved: map for layer_adaptive, loss otherwise."""
        m = self.sensitivity.metric
        return m if m is not None else ("map" if self.pruning.controller == "layer_adaptive" else "loss")

    def sensitivity_max_layers(self) -> int | None:
        """``sensitivity.max_layers``, resolved (None: every unit)."""
        m = self.sensitivity.max_layers
        return m if m is not None else (None if self.knapsack_reads_sensitivity() else 8)

    def sensitivity_sparsities(self) -> list[float]:
        """``sensitivity.sparsities``, resolved."""
        s = self.sensitivity.sparsities
        return list(s) if s is not None else ([0.25, 0.5, 0.75] if self.knapsack_reads_sensitivity() else [0.3, 0.6])

    def shadow_dense(self) -> bool:
        """Whether the search trains a dense shadow to judge the floor against (``search.shadow_dense``, resolved)."""
        s = self.search.shadow_dense
        return self.budget.max_map_drop is not None if s is None else bool(s)

    def distill(self) -> bool:
        """Whether trials distil from the dense model (``finetune.distill``, resolved)."""
        d = self.finetune.distill
        return distill_supported(self.model.name) if d is None else bool(d)

    def fingerprint(self) -> str:
        """Hash of everything that changes results (not where they go): guards `--resume`."""
        data = self.model_dump(mode="json", exclude={"output_dir"})
        # Fields added by issues #12/#14 leave out when they hold what a job file written before them
        # meant, so such a job folder keeps its fingerprint and `--resume` accepts it.
        p, ft = data["pruning"], data["finetune"]
        if p.get("round_to") is not None and p.get("channel_multiple") == p["round_to"]:
            p.pop("channel_multiple")
        if p.get("controller") != "allocation":  # these steer the allocation controller only
            for key in ("allocation", "floor_allowance", "step_back", "max_cut_per_update", "regrow_until"):
                p.pop(key, None)
        if p.get("regrow_until") == 1.0:  # what a job file written before the field meant
            p.pop("regrow_until")
        for key in ("distill", "bn_recalibration_images", "augment"):  # None: the resolved default
            if ft.get(key) is None:
                ft.pop(key, None)
        for key in ("in_graph_calibration", "saving_fit"):  # None: the resolved default (older folders resume)
            if p.get(key) is None:
                p.pop(key, None)
        if p.get("latency_costs") == "measured":  # every table before the field was measured
            p.pop("latency_costs", None)
        for key in ("reconstruct_images", "fold_gates", "stable_masks"):  # off: what every job before the field did
            if not p.get(key):
                p.pop(key, None)
        if 0 not in p.get("ramps", []):  # read by one-shot candidates only, which no job before the field had
            p.pop("one_shot_recovery", None)
        if not data["budget"].get("latency_margin"):
            data["budget"].pop("latency_margin", None)
        if data["search"].get("shadow_dense") is None:
            data["search"].pop("shadow_dense", None)
        for key in ("metric", "max_layers", "sparsities"):  # None: resolved as a job before them meant
            if data["sensitivity"].get(key) is None:
                data["sensitivity"].pop(key, None)
        if not data["sensitivity"].get("bn_recalibration_images"):  # off: what every scan before the field did
            data["sensitivity"].pop("bn_recalibration_images", None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def distill_supported(model_name: str) -> bool:
    """perception.distill.DistilledDetector wraps SSD / SSDlite detectors only."""
    return model_name.startswith("ssd")


def load_prune_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> PruneJobConfig:
    """Read and validate a prune job file; raises ConfigError naming every bad field.

    ``overrides`` replaces values by dotted key before validation, e.g.
    ``{"model.checkpoint": "runs/demo/train/model.pt", "finetune.steps": 40}`` (the demo and
    benchmarks start from the example files this way).
    """
    if not overrides:
        return load_config(path, PruneJobConfig)
    path = Path(path)
    data = load_config(path, _Raw).model_dump()
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node[leaf] = value
    try:
        return PruneJobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(f"{path} (with overrides)", e)) from None


class _Raw(BaseModel):
    """Any mapping: the file's YAML before overrides are applied."""

    model_config = ConfigDict(extra="allow")
