"""The pruning methods compared by ``benchmarks/compare.py``, one function each, registered by name.

Every method receives the same :class:`MethodContext`: the same starting checkpoint, the same
number of fine-tuning steps, the same latency target (ONNX Runtime, CPU) and a seed. It returns a
plain, physically pruned torchvision detector plus its trajectory in the mAP-latency plane.
Methods never measure their own final row: ``compare.py`` measures every final model side by side
in one pass, so a method cannot flatter itself with a lucky latency sample.

This module holds what every method shares (context, loading, the fine-tune with trajectory
probes, :class:`MethodSpec`); the methods live in :mod:`benchmarks.compare_baselines` (dense,
Torch-Pruning one-shot, network slimming, unstructured L1) and :mod:`benchmarks.compare_avprune`,
and :mod:`benchmarks.compare_registry` names them all (imports point one way: registry ->
method modules -> this module).
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrajectoryPoint:
    """One probe during a method's fine-tune: latency of the model as it would deploy now, and mAP."""

    step: int
    latency_ms: float
    map: float


@dataclass(frozen=True)
class MethodContext:
    """Everything a method may use; identical for every method of one comparison but the seed."""

    seed: int
    steps: int  # total fine-tuning optimizer steps the method may spend
    batch_size: int
    lr: float
    base_checkpoint: Path  # the shared starting point (dense, trained)
    train_set: Any  # perception.data.CocoDetectionDataset (augmented)
    latency_target_ms: float  # on the comparison's runtime, from compare.py's setup
    dense_ms: float  # the starting checkpoint's measured latency on that runtime
    channel_ratio: float  # Torch-Pruning global ratio measured to hit the target (setup bisection)
    measure_ms: Callable[[nn.Module], float]  # quick latency of a plain model on the target runtime
    probe: Callable[[nn.Module, int], TrajectoryPoint]  # latency + mAP on the probe subset
    probe_every: int  # steps between trajectory points (0: no probes at all, for tests)
    map_of: Callable[[nn.Module], float]  # mAP on a train subset (feedback controllers; never val)
    map_floor: float  # absolute mAP floor a feedback controller defends
    example_inputs: torch.Tensor  # [1, 3, H, W] at the model's input size
    bisect_iters: int = 6
    measure_every: int = 30  # feedback controllers: steps between measured latency + mAP
    latency_table: Path | None = None  # pruning.LatencyTable JSON for predicted latency (setup)
    param_sparsity: float | None = None  # for unstructured_l1: the best channel method's sparsity
    workers: int = 0
    channel_multiple: int = 16  # the aligned methods' channel groups (issue #12: ORT's NCHWc blocks)
    aligned_ratio: float = 0.0  # Torch-Pruning per-layer ratio at channel_multiple measured at the target
    aligned_ms: float = 0.0  # that ratio's measured latency (the setup bisection's)
    aligned_config: dict[str, tuple[int, int]] | None = None  # its conv shapes: avprune's held-out model
    damage: dict[str, list[list[float]]] | None = None  # per-unit loss increase at 25/50/75% (setup scan)


@dataclass
class MethodOutput:
    """What a method hands back: a plain detector (saved by the harness) and its story."""

    model: nn.Module
    trajectory: list[TrajectoryPoint]
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- shared pieces


@functools.lru_cache(maxsize=2)
def _template(path: str, mtime_ns: int) -> nn.Module:
    from perception.models import load_detector

    return load_detector(path)


def load_checkpoint_like_base(path: Path, base: Path) -> nn.Module:
    """Load a checkpoint derived from ``base`` (pruned or not) without rebuilding the detector.

    torchvision's SSDlite builder runs a dummy forward at full size to size its heads, about a
    second each time; a deep copy of the cached base resized to the checkpoint's shapes is the
    same model (``perception.models.load_detector`` does this resize after the build).
    """
    from perception.models import drop_blocks, read_checkpoint, resize_to_state_dict

    template = _template(str(base), base.stat().st_mtime_ns)
    model = copy.deepcopy(template)
    if path == base:
        return model
    ckpt = read_checkpoint(path)
    meta, own = ckpt["model"], template.avprune_meta
    differ = [k for k in ("name", "num_classes") if meta.get(k) != own[k]]
    differ += ["image_size"] if list(meta.get("image_size") or []) != list(own["image_size"]) else []
    if differ:
        raise ValueError(f"{path}: {', '.join(differ)} differ from the base checkpoint {base}; not one of this comparison's models")
    drop_blocks(model, [str(n) for n in meta.get("removed_blocks", ())])  # a depth-pruned model (channel+block)
    resize_to_state_dict(model, ckpt["state_dict"])
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model


def load_base(ctx: MethodContext) -> nn.Module:
    """A fresh copy of the shared starting checkpoint, seeded so every method starts alike."""
    torch.manual_seed(ctx.seed)
    return load_checkpoint_like_base(ctx.base_checkpoint, ctx.base_checkpoint)


def finetune(
    model: nn.Module,
    ctx: MethodContext,
    *,
    steps: int,
    snapshot: Callable[[], nn.Module],
    hooks: Sequence[Callable[[Any], None]] = (),
    step_offset: int = 0,
    lr_scale: float = 1.0,
) -> list[TrajectoryPoint]:
    """Fine-tune ``model`` for ``steps`` with perception.train, probing every ``ctx.probe_every``.

    Probes fall on multiples of ``probe_every`` counted over the method's whole budget
    (``step_offset`` shifts a second phase), strictly before its last step.

    ``snapshot()`` returns the model as it would deploy now (physically pruned, plain): the probe
    measures that, so every method's trajectory is in the same units as its final row.
    """
    from perception.train import TrainSettings, train

    points: list[TrajectoryPoint] = []
    if steps <= 0:
        return points

    def probe_hook(sc: Any) -> None:
        done = step_offset + sc.step + 1  # steps completed so far, counted over the whole method
        if ctx.probe_every and done % ctx.probe_every == 0 and done < ctx.steps:
            points.append(ctx.probe(snapshot(), done))

    settings = TrainSettings(
        steps=steps,
        batch_size=ctx.batch_size,
        lr=ctx.lr * lr_scale,
        warmup_steps=min(20, steps // 10),
        seed=ctx.seed + 1000 * step_offset,  # a second phase must not replay the first one's batches
        num_workers=ctx.workers,
    )
    train(model, ctx.train_set, settings, hooks=(*hooks, probe_hook), resume=False, progress=False)
    # No probe at the very end: the final pass measures the final model, side by side with the others.
    return points


FOLD_IMAGES = 64  # avprune_latency_fold: training images the gates' mean scales come from (the job's fold_gates)


def dense_scaled_ms(ctx: MethodContext, model: nn.Module, dense: nn.Module) -> float:
    """``model``'s latency timed right beside ``dense``, as a ratio scaled to the quiet setup's dense
    figure: timed inside the training process, absolute figures read ~1.5x high (the training
    thread pool winding down), their ratio does not."""
    return ctx.dense_ms * ctx.measure_ms(model) / ctx.measure_ms(dense)


def fold_start_model(ctx: MethodContext, model: nn.Module, dense: nn.Module) -> tuple[list[str], float]:
    """Fold ``model``'s squeeze-excitation gates (the prune job's ``gate_fold`` stage); the folded
    model's latency in the comparison's dense-scaled ms (median of 3 pairs beside ``dense``)."""
    from perception.models import core_input_batches, drop_blocks
    from pruning.filters import detector_core_forward
    from pruning.gate_fold import fold_gates

    batches = core_input_batches(model, ctx.train_set, FOLD_IMAGES)
    gates = [f.gate for f in fold_gates(model, batches, forward_fn=detector_core_forward)]
    drop_blocks(model, gates)  # recorded in the checkpoint's architecture, as the job's folded start model
    return gates, sorted(dense_scaled_ms(ctx, model, dense) for _ in range(3))[1]


def start_point(ctx: MethodContext, snapshot: Callable[[], nn.Module], step: int = 0) -> list[TrajectoryPoint]:
    """A probe outside the training loop (after a one-shot prune, say); none when probes are off."""
    return [ctx.probe(snapshot(), step)] if ctx.probe_every else []


def plain_copy(model: nn.Module) -> nn.Module:
    """A detached deep copy in eval mode, safe to export while training goes on."""
    return copy.deepcopy(model).eval()


# ----------------------------------------------------------------------------- method spec


DEPLOYS = ("fp32", "int8")


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: ``kind`` is "channel" (hits the latency target by removing channels),
    "unstructured" or "dense"; ``needs_sparsity`` methods run after the channel methods.

    ``deploy`` is how the final pass runs the method's model: "fp32" (the exported graph) or "int8"
    (that graph quantized, ONNX Runtime static QDQ with uint8 activations, calibrated on training
    frames). ``reuses`` names a method whose model of the same seed this one deploys differently
    (dense INT8 is the dense row's model, quantized): the cell copies it instead of training again,
    and runs ``run`` only when that cell is not in the work dir.
    """

    name: str
    run: Callable[[MethodContext], MethodOutput]
    kind: str
    label: str
    needs_sparsity: bool = False
    deploy: str = "fp32"
    reuses: str | None = None

    def __post_init__(self) -> None:
        if self.deploy not in DEPLOYS:
            raise ValueError(f"method {self.name!r}: deploy {self.deploy!r} is not one of {DEPLOYS}")


def timed(spec: MethodSpec, ctx: MethodContext) -> tuple[MethodOutput, float]:
    """Run a method and return its output with its wall time (the table's "method wall time")."""
    t0 = time.perf_counter()
    out = spec.run(ctx)
    return out, time.perf_counter() - t0
