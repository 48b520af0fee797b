"""Training and fine-tuning loop for every detector of :mod:`perception.models`.

One plain loop: the learning rate is a function of the step (:mod:`perception.lr_schedule`),
the batch order is a function of (seed, step), and ``out_dir/last.pt`` holds everything else
(weights, optimizer, RNG, hook state, history), so a resumed run continues exactly where the
interrupted one checkpointed. Hooks (e.g. the pruner) run after ``optimizer.step()`` and before
the next ``zero_grad``, so ``.grad`` still holds this step's gradients.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from perception.lr_schedule import lr_at
from perception.models import resize_to_state_dict, save_checkpoint

log = logging.getLogger(__name__)

TRAIN_STATE_VERSION = 1
OPTIMIZERS = ("adamw", "sgd")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the checkpoint kept."""


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides the optimisation (see :func:`default_train_settings`)."""

    steps: int
    batch_size: int = 8
    optimizer: str = "adamw"  # "adamw" or "sgd"
    lr: float = 2e-3
    momentum: float = 0.9  # SGD momentum; AdamW's beta1
    weight_decay: float = 1e-4  # not applied to biases and norm layers
    warmup_steps: int = 50
    min_lr_ratio: float = 0.02  # final rate as a fraction of lr
    checkpoint_every: int = 200
    seed: int = 0
    num_workers: int = 0
    max_grad_norm: float | None = 10.0
    augment: bool = True
    num_threads: int | None = None  # torch intra-op threads; None keeps torch's setting

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.warmup_steps < 0 or self.num_workers < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps, num_workers and weight_decay must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {self.max_grad_norm}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {self.num_threads}")


@dataclass(frozen=True)
class StepContext:
    """What a hook sees after optimizer step ``step`` (0-based; ``step + 1`` steps are done)."""

    step: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: float
    losses: dict[str, float]
    lr: float
    total_steps: int = 0


class Hook(Protocol):
    def __call__(self, ctx: StepContext) -> None: ...


@dataclass(frozen=True)
class TrainResult:
    steps_done: int
    last_loss: float
    history: list[dict[str, Any]]
    checkpoint_path: Path | None  # out_dir/last.pt (weights + training state)
    model_path: Path | None = None  # out_dir/model.pt (weights only), written when training ends
    stopped: str = "completed"  # "completed" or "time_limit"
    train_time_s: float = 0.0  # training wall time over all runs of this out_dir, evaluation excluded


# ----------------------------------------------------------------------------- pieces


def build_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """SGD or AdamW; weight decay on weights only (decaying BatchNorm/bias terms hurts small nets)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(settings.momentum, 0.999))


class StepBatches(torch.utils.data.Sampler[list[int]]):
    """Batch ``k`` is a pure function of (seed, k): epoch ``k // per_epoch`` of a seeded shuffle.

    The last partial batch of each epoch is dropped (BatchNorm needs full batches), and a
    resumed run starts at its step without replaying the data before it.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, start_step: int, total_steps: int) -> None:
        if n < batch_size:
            raise ValueError(f"the training set has {n} images, fewer than batch_size={batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.per_epoch = n // batch_size

    def batch(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g)
        return perm[k * self.batch_size : (k + 1) * self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.total_steps):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)


def _check_inputs(model: nn.Module, dataset: Any, settings: TrainSettings, out_dir: Path | None) -> None:
    from torchvision.models.detection.ssd import SSD

    if isinstance(model, SSD) and settings.batch_size < 2:
        raise ValueError(
            f"batch_size={settings.batch_size}: SSD's extra layers end in 1x1 feature maps and BatchNorm "
            "needs >= 2 values per channel in training; use batch_size >= 2"
        )
    num_classes = getattr(model, "avprune_meta", {}).get("num_classes")
    top = max(getattr(dataset, "category_ids", [0]) or [0])
    if num_classes is not None and top >= num_classes:
        raise ValueError(
            f"{getattr(dataset, 'ann_file', 'dataset')}: category id {top} needs num_classes >= {top + 1} "
            f"(ids are class indices, 0 = background); the model has num_classes={num_classes}"
        )
    if out_dir is not None and "name" not in getattr(model, "avprune_meta", {}):
        raise ValueError("checkpointing needs a model from perception.models.build_detector / load_detector")


def _hook_states(hooks: Sequence[Hook]) -> list[Any]:
    return [h.state_dict() if callable(getattr(h, "state_dict", None)) else None for h in hooks]


def _save_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, **state: Any) -> None:
    train_state = {
        "version": TRAIN_STATE_VERSION,
        "step": step,
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        **state,
    }
    # An avprune model checkpoint with the training state in "extra": load_detector reads it too.
    save_checkpoint(path, model, extra={"train_state": train_state})


def _restore(path: Path, model: nn.Module, settings: TrainSettings, hooks: Sequence[Hook]) -> dict[str, Any]:
    from perception.models import read_checkpoint

    ckpt = read_checkpoint(path)
    state = ckpt.get("extra", {}).get("train_state")
    if not state or state.get("version") != TRAIN_STATE_VERSION:
        raise ValueError(f"{path}: no training state to resume from; pass resume=False to start over")
    saved = state.get("settings", {})
    changed = {k: (saved.get(k), v) for k, v in asdict(settings).items() if k in saved and saved[k] != v}
    changed.pop("steps", None), changed.pop("checkpoint_every", None), changed.pop("num_threads", None)
    if changed:
        log.warning("resuming %s with changed settings (saved -> now): %s", path, changed)
    sd = ckpt["state_dict"]
    if any(sd[k].shape != v.shape for k, v in model.state_dict().items() if k in sd):
        resize_to_state_dict(model, sd)  # the run was pruned physically before its checkpoint
    model.load_state_dict(sd, strict=True)
    hook_states = state.get("hooks") or []
    for hook, hs in zip(hooks, hook_states, strict=False):
        if hs is not None and callable(getattr(hook, "load_state_dict", None)):
            hook.load_state_dict(hs)
    return state


# ----------------------------------------------------------------------------- the loop


def train(
    model: nn.Module,
    dataset: Any,
    settings: TrainSettings,
    *,
    out_dir: str | Path | None = None,
    hooks: Sequence[Hook] = (),
    resume: bool = True,
    progress: bool = True,
    eval_fn: Callable[[nn.Module], dict] | None = None,
    eval_every: int | None = None,
    eval_every_s: float | None = None,
    time_limit_s: float | None = None,
    device: str | torch.device = "cpu",
) -> TrainResult:
    """Train ``model`` on ``dataset`` (a :class:`~perception.data.CocoDetectionDataset`).

    With ``out_dir``, ``out_dir/last.pt`` is written atomically every ``checkpoint_every``
    steps and at the end, and ``out_dir/model.pt`` (weights only) at the end; ``resume=True``
    continues from ``last.pt``. ``eval_fn(model)`` runs every ``eval_every`` steps and/or every
    ``eval_every_s`` seconds of training (its time is not counted as training time) and its dict
    goes into the history. ``time_limit_s`` stops this call after that much training time and
    checkpoints. A NaN/inf loss raises :class:`NonFiniteLossError` and leaves ``last.pt`` as it was.
    ``device`` moves the model and batches (CUDA RNG state is not checkpointed: resume is exact
    on CPU only).
    """
    from tqdm import tqdm

    from perception.data import collate

    out = Path(out_dir) if out_dir is not None else None
    _check_inputs(model, dataset, settings, out)
    if settings.num_threads is not None:
        torch.set_num_threads(settings.num_threads)
    last_path = out / "last.pt" if out is not None else None
    state: dict[str, Any] = {}
    if last_path is not None and last_path.is_file():
        if resume:
            state = _restore(last_path, model, settings, hooks)
            log.info("resuming %s at step %d", last_path, state["step"])
        else:
            log.warning("%s exists; starting over (resume=False) and overwriting it", last_path)
    model.train().to(device)
    optimizer = build_optimizer(model, settings)  # after a resize: it must see the resized parameters
    if state:
        optimizer.load_state_dict(state["optimizer"])
    start = int(state.get("step", 0))
    history: list[dict[str, Any]] = list(state.get("history", []))
    train_time = float(state.get("train_time_s", 0.0))

    data = dataset.augmented(settings.augment) if hasattr(dataset, "augmented") else dataset
    sampler = StepBatches(len(data), settings.batch_size, seed=settings.seed, start_step=start, total_steps=settings.steps)
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=sampler, collate_fn=collate, num_workers=settings.num_workers
    )
    batches = iter(loader)
    # After creating the iterator (which draws from the global RNG): augmentation randomness
    # then matches between an uninterrupted and a resumed run (exactly with num_workers=0).
    if state:
        torch.set_rng_state(state["rng"])
    else:
        torch.manual_seed(settings.seed)

    def checkpoint(step: int) -> None:
        if last_path is not None:
            _save_state(
                last_path, model, optimizer, step, settings=asdict(settings), hooks=_hook_states(hooks),
                history=history, train_time_s=train_time,
            )

    step, last_loss = start, float("nan")
    last_good: int | None = start if state else None
    call_time, since_eval, stopped = 0.0, 0.0, "completed"
    bar = tqdm(total=settings.steps, initial=start, desc="train", unit="step", disable=not progress, file=sys.stderr)
    try:
        while step < settings.steps:
            if time_limit_s is not None and call_time >= time_limit_s:
                stopped = "time_limit"
                break
            t0 = time.perf_counter()
            images, targets = next(batches)
            if str(device) != "cpu":
                images = [im.to(device, non_blocking=True) for im in images]
                targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
            lr = lr_at(step, base_lr=settings.lr, total_steps=settings.steps,
                       warmup_steps=settings.warmup_steps, min_lr_ratio=settings.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss_dict = model(images, targets)
            loss = sum(loss_dict.values())
            last_loss = float(loss.detach())
            if not math.isfinite(last_loss):
                kept = f"{last_path} (step {last_good})" if last_good is not None else "none written yet"
                raise NonFiniteLossError(
                    f"loss is {last_loss} at step {step} "
                    f"({', '.join(f'{k}={float(v.detach()):.4g}' for k, v in loss_dict.items())}); last good checkpoint: "
                    f"{kept}. Lower lr, raise warmup_steps or set max_grad_norm."
                )
            loss.backward()
            if settings.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            optimizer.step()
            losses = {k: float(v.detach()) for k, v in loss_dict.items()}
            ctx = StepContext(step, model, optimizer, last_loss, losses, lr, settings.steps)
            for hook in hooks:
                hook(ctx)
            dt = time.perf_counter() - t0
            call_time, since_eval, train_time = call_time + dt, since_eval + dt, train_time + dt
            step += 1
            history.append({"step": step, "loss": last_loss, "lr": lr, "time_s": round(train_time, 3), **losses})
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{lr:.2e}", img_s=f"{settings.batch_size / dt:.1f}")
            due = (eval_every is not None and step % eval_every == 0) or (
                eval_every_s is not None and since_eval >= eval_every_s
            )
            if eval_fn is not None and due and step < settings.steps:
                since_eval = 0.0
                history.append({"step": step, "time_s": round(train_time, 3), "eval": eval_fn(model)})
                model.train()
            if step % settings.checkpoint_every == 0 or step == settings.steps:
                checkpoint(step)
                last_good = step if last_path is not None else None
    finally:
        bar.close()
    model_path = None
    if out is not None:
        if last_good != step:
            checkpoint(step)  # the time limit stopped between checkpoints
        model_path = out / "model.pt"
        save_checkpoint(model_path, model, extra={"steps": step, "train_time_s": train_time})
    return TrainResult(step, last_loss, history, last_path, model_path, stopped, train_time)


# ----------------------------------------------------------------------------- recipe


#: The default detector of the recipe (``build_detector(**DEFAULT_DETECTOR)``): SSDlite320 with
#: smaller default boxes, because most synthetic objects are under 32x32 px at the model input.
DEFAULT_DETECTOR: dict[str, Any] = {
    "name": "ssdlite320_mobilenet_v3_large",
    "num_classes": 8,
    "image_size": (320, 320),
    "ssd_anchor_scales": (0.06, 0.9),
}

#: Measured for the default detector (SSDlite320, 8 classes, batch 8) on 2 idle CPU cores.
NOMINAL_SECONDS_PER_STEP = 0.84


def default_train_settings(minutes: float, *, seconds_per_step: float | None = None, **overrides: Any) -> TrainSettings:
    """The default from-scratch recipe for SSDlite320 sized to ``minutes`` of training.

    Chosen by a step-matched search (570 steps = 8 min at 0.84 s/step on 2 cores; synthetic
    data, 1600 train / 400 val images): AdamW 2e-3 without augmentation reached val mAP 0.52 /
    AP50 0.83; with flip + photometric jitter 0.43 / 0.72 (augmentation pays off only in longer
    runs), SGD 0.03 0.19 / 0.37, AdamW 4e-3 0.41 / 0.70, torchvision's anchor scales 0.37 / 0.62.
    The cosine schedule needs the step count up front, so the minutes are turned into steps
    with ``seconds_per_step`` (measure it with :func:`measure_seconds_per_step` on the machine
    at hand; the nominal figure is for 2 CPU cores). Pair it with ``time_limit_s`` as a guard.
    """
    if minutes <= 0:
        raise ValueError(f"minutes must be positive, got {minutes}")
    sps = seconds_per_step or NOMINAL_SECONDS_PER_STEP
    steps = max(20, int(minutes * 60 / sps))
    base: dict[str, Any] = {
        "steps": steps,
        "batch_size": 8,
        "optimizer": "adamw",
        "lr": 2e-3,
        "weight_decay": 1e-4,
        "warmup_steps": min(100, steps // 10),
        "min_lr_ratio": 0.02,
        "checkpoint_every": max(50, steps // 10),
        "max_grad_norm": 10.0,
        "augment": False,  # see above: minutes-long runs converge faster on the raw frames
    }
    return TrainSettings(**{**base, **overrides})


def measure_seconds_per_step(model: nn.Module, dataset: Any, settings: TrainSettings, *, steps: int = 3) -> float:
    """Seconds per training step on this machine (median of ``steps`` after one warm-up step).

    The model's weights are restored afterwards, so the measurement does not train it.
    """
    import copy

    from perception.data import collate

    probe = copy.deepcopy(model).train()
    opt = build_optimizer(probe, settings)
    data = dataset.augmented(settings.augment) if hasattr(dataset, "augmented") else dataset
    sampler = StepBatches(len(data), settings.batch_size, seed=settings.seed, start_step=0, total_steps=steps + 1)
    times = []
    for k, idx in enumerate(sampler):
        t0 = time.perf_counter()
        images, targets = collate([data[i] for i in idx])
        opt.zero_grad(set_to_none=True)
        sum(probe(images, targets).values()).backward()
        opt.step()
        if k > 0:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
