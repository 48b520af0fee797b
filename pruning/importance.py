"""Importance criteria: per-weight scores plus per-output-channel scores for coupled groups.

Every criterion scores the *stored* weights (what the optimizer updates), not the masked ones,
so a pruned weight whose stored value or gradient grows again can win its place back (Dynamic
Network Surgery, Guo et al. NeurIPS 2016).

- ``magnitude``: |w|; channels by the Lp norm of their weights (Li et al., "Pruning Filters for
  Efficient ConvNets", ICLR 2017).
- ``taylor``: first-order Taylor |w · ∂L/∂w|, smoothed with an exponential moving average over
  steps (Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019).
- ``activation``: channels by mean |activation| or by 1 - APoZ (Hu et al., "Network Trimming",
  arXiv:1607.03250), measured by forward hooks after the layer's BatchNorm when it has one;
  single weights by |w| · mean |input| per input channel (Wanda, Sun et al., ICLR 2024).
- ``bn_scale``: channels by |γ| of the BatchNorm after the conv (Network Slimming, Liu et al.,
  ICCV 2017); single weights by the magnitude of the BN-folded weight |w · γ / sqrt(var + eps)|.

Channel scores are returned per *role* a module plays in a coupled group: ``"out"`` (its output
channels are the group's channels), ``"in"`` (it consumes them), ``"bn"`` (a norm layer on them).
A criterion returns None for roles it has nothing to say about.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pruning.masks import stored
from pruning.registry import Registry

CRITERIA: Registry[Callable[..., Criterion]] = Registry("importance criterion")


class Criterion:
    """Base: stateless magnitude-like scoring; subclasses add state (EMA, hooks)."""

    name = "base"
    needs_bn = False  # whether attach() needs the conv -> following-BatchNorm map
    # whether it scores only after seeing training steps or batches (gradients, activations): a
    # pruner that cuts before any (a sensitivity scan, a latency probe) cannot rank by it
    needs_data = False

    def attach(self, layers: Mapping[str, nn.Module], bn_after: Mapping[str, tuple[str, nn.Module]]) -> None:
        """Called once with the scored layers and, per layer, the ``(name, BatchNorm)`` right after it."""
        self.layers = dict(layers)
        self.bn_after = dict(bn_after)

    def observe(self) -> None:
        """Called every pruner step, after ``optimizer.step()`` (gradients still present)."""

    def weight_scores(self, name: str, module: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def channel_scores(self, name: str, module: nn.Module, role: str) -> torch.Tensor | None:
        raise NotImplementedError

    def detach(self) -> None:
        """Remove hooks; called by ``Pruner.finalize``."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def _reduce_except(t: torch.Tensor, dim: int, p: float) -> torch.Tensor:
    """Lp norm over every dim except ``dim`` (p=1: sum of |.|)."""
    if t.dim() == 1:
        return t.abs()
    dims = tuple(d for d in range(t.dim()) if d != dim)
    return torch.linalg.vector_norm(t, ord=p, dim=dims)


def _channel_dim(module: nn.Module, role: str) -> int:
    transposed = getattr(module, "transposed", False)
    if role == "out":
        return 1 if transposed else 0
    return 0 if transposed else 1


@CRITERIA.register("magnitude")
class Magnitude(Criterion):
    """|w| per weight; Lp norm (default L2) per channel."""

    name = "magnitude"

    def __init__(self, p: float = 2.0) -> None:
        if p not in (1, 1.0, 2, 2.0):
            raise ValueError(f"magnitude norm p must be 1 or 2; got {p!r}")
        self.p = float(p)

    def weight_scores(self, name: str, module: nn.Module) -> torch.Tensor:
        return stored(module).detach().abs()

    def channel_scores(self, name: str, module: nn.Module, role: str) -> torch.Tensor | None:
        if role == "bn":
            return None
        w = stored(module).detach()
        if role == "in" and getattr(module, "groups", 1) not in (1,):
            return None  # grouped consumers: their in-channel slices are covered by their "out" role
        return _reduce_except(w, _channel_dim(module, role), self.p)


@CRITERIA.register("taylor")
class Taylor(Criterion):
    """EMA over steps of |w · ∂L/∂w| (first-order Taylor estimate of the loss change on removal)."""

    name = "taylor"
    needs_data = True

    def __init__(self, beta: float = 0.9) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"taylor EMA beta must be in [0, 1); got {beta!r}")
        self.beta = beta
        self.ema: dict[str, torch.Tensor] = {}

    def attach(self, layers: Mapping[str, nn.Module], bn_after: Mapping[str, tuple[str, nn.Module]]) -> None:
        super().attach(layers, bn_after)
        self._tracked = dict(layers)
        self._bn_names = set()
        for bn_name, bn in bn_after.values():
            self._tracked[bn_name] = bn
            self._bn_names.add(bn_name)

    def observe(self) -> None:
        with torch.no_grad():
            for key, mod in self._tracked.items():
                w = stored(mod)
                if w.grad is None:
                    continue
                score = (w.detach() * w.grad).abs()
                if key in self._bn_names and getattr(mod, "bias", None) is not None:
                    b = stored(mod, "bias")
                    if b.grad is not None:
                        score = score + (b.detach() * b.grad).abs()
                prev = self.ema.get(key)
                # The first observation seeds the EMA so early scores are not biased towards zero.
                self.ema[key] = score.clone() if prev is None else prev.mul_(self.beta).add_(score, alpha=1 - self.beta)

    def _get(self, key: str, like: torch.Tensor) -> torch.Tensor:
        ema = self.ema.get(key)
        if ema is None:
            raise ValueError(
                f"taylor importance has no gradient statistics for {key!r} yet: call pruner.step() after "
                "loss.backward() and optimizer.step() (it reads .grad)"
            )
        return ema

    def weight_scores(self, name: str, module: nn.Module) -> torch.Tensor:
        return self._get(name, stored(module))

    def channel_scores(self, name: str, module: nn.Module, role: str) -> torch.Tensor | None:
        if role == "bn":
            return self.ema.get(name)
        if role == "in" and getattr(module, "groups", 1) != 1:
            return None
        if name not in self.ema:
            return None
        return _reduce_except(self.ema[name], _channel_dim(module, role), 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "ema": {k: v.clone() for k, v in self.ema.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.beta = float(state["beta"])
        self.ema = {k: v.clone() for k, v in state["ema"].items()}


@CRITERIA.register("activation")
class Activation(Criterion):
    """Channel importance from output activations; weight importance |w| · mean|input| (Wanda).

    ``mode="mean"`` scores a channel by its mean |a|; ``mode="apoz"`` by 1 - APoZ, the fraction of
    positive activations (what a following ReLU keeps). Statistics are exponential moving
    averages over the forward passes seen while collecting: calibration batches through
    ``Pruner.observe_activations`` and, with ``during_training=True``, training forwards.
    """

    name = "activation"
    needs_data = True
    needs_bn = True

    def __init__(self, mode: str = "mean", momentum: float = 0.1, during_training: bool = True) -> None:
        if mode not in ("mean", "apoz"):
            raise ValueError(f"activation mode must be 'mean' or 'apoz'; got {mode!r}")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"activation momentum must be in (0, 1]; got {momentum!r}")
        self.mode, self.momentum, self.during_training = mode, momentum, during_training
        self.out_stats: dict[str, torch.Tensor] = {}
        self.in_stats: dict[str, torch.Tensor] = {}
        self.collecting = False
        self._handles: list[Any] = []

    def _ema(self, table: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
        prev = table.get(key)
        table[key] = value if prev is None else prev.mul_(1 - self.momentum).add_(value, alpha=self.momentum)

    def _active(self, module: nn.Module) -> bool:
        return self.collecting or (self.during_training and module.training and torch.is_grad_enabled())

    def attach(self, layers: Mapping[str, nn.Module], bn_after: Mapping[str, tuple[str, nn.Module]]) -> None:
        super().attach(layers, bn_after)
        for name, mod in layers.items():
            self._handles.append(mod.register_forward_pre_hook(self._in_hook(name, mod)))
            # Channel statistics after the BatchNorm: raw conv outputs ignore BN's rescaling.
            src = bn_after[name][1] if name in bn_after else mod
            self._handles.append(src.register_forward_hook(self._out_hook(name, src)))

    def _in_hook(self, name: str, mod: nn.Module) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not self._active(module) or not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0].detach()
            dims = [d for d in range(x.dim()) if d != (1 if x.dim() > 2 else x.dim() - 1)]
            self._ema(self.in_stats, name, x.abs().mean(dims).float())

        return hook

    def _out_hook(self, name: str, mod: nn.Module) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if not self._active(module) or not isinstance(out, torch.Tensor):
                return
            y = out.detach()
            cdim = 1 if y.dim() > 2 else y.dim() - 1
            dims = [d for d in range(y.dim()) if d != cdim]
            stat = (y > 0).float().mean(dims) if self.mode == "apoz" else y.abs().mean(dims).float()
            self._ema(self.out_stats, name, stat)

        return hook

    def _need(self, table: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        if name not in table:
            raise ValueError(
                f"activation importance has no statistics for layer {name!r}: call "
                "pruner.observe_activations(batches) with calibration data (or train with during_training=True) first"
            )
        return table[name]

    def weight_scores(self, name: str, module: nn.Module) -> torch.Tensor:
        w = stored(module).detach().abs()
        x = self._need(self.in_stats, name)
        shape = [1] * w.dim()
        if getattr(module, "groups", 1) != 1:  # depthwise: input channel j feeds only output j
            return w * x.view(-1, *shape[1:])
        shape[1] = -1
        return w * x.view(shape)

    def channel_scores(self, name: str, module: nn.Module, role: str) -> torch.Tensor | None:
        if role != "out":
            return None
        return self._need(self.out_stats, name)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"out": {k: v.clone() for k, v in self.out_stats.items()},
                "in": {k: v.clone() for k, v in self.in_stats.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.out_stats = {k: v.clone() for k, v in state["out"].items()}
        self.in_stats = {k: v.clone() for k, v in state["in"].items()}


@CRITERIA.register("bn_scale")
class BNScale(Criterion):
    """|γ| of the BatchNorm after each conv (Network Slimming)."""

    name = "bn_scale"
    needs_bn = True

    def attach(self, layers: Mapping[str, nn.Module], bn_after: Mapping[str, tuple[str, nn.Module]]) -> None:
        missing = sorted(n for n in layers if n not in bn_after)
        if missing:
            raise ValueError(
                f"bn_scale importance needs a BatchNorm right after every pruned layer; none follows "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''}: exclude them with layer_filter or use 'magnitude'"
            )
        super().attach(layers, bn_after)

    def _gamma(self, name: str) -> torch.Tensor:
        return stored(self.bn_after[name][1]).detach().abs()

    def weight_scores(self, name: str, module: nn.Module) -> torch.Tensor:
        bn = self.bn_after[name][1]
        scale = self._gamma(name) / torch.sqrt(bn.running_var + bn.eps)
        w = stored(module).detach().abs()
        return w * scale.view(-1, *([1] * (w.dim() - 1)))

    def channel_scores(self, name: str, module: nn.Module, role: str) -> torch.Tensor | None:
        if role == "out" and name in self.bn_after:
            return self._gamma(name)
        return None


def build_criterion(name: str, **kwargs: Any) -> Criterion:
    """Instantiate a registered criterion by name (valid names: ``CRITERIA.names()``)."""
    return CRITERIA.get(name)(**kwargs)


def importance_summary(scores: Iterable[float] | torch.Tensor) -> dict[str, float]:
    """min / median / max of a score tensor, for the per-update record."""
    t = torch.as_tensor(scores).float().reshape(-1)
    if t.numel() == 0:
        return {"min": 0.0, "median": 0.0, "max": 0.0}
    return {"min": float(t.min()), "median": float(t.median()), "max": float(t.max())}


def offline_importance(names: Sequence[str]) -> str:
    """The first of ``names`` that scores without data (weights only), else ``"magnitude"``: what a
    pruner that cuts before any training step or batch (a sensitivity scan, a latency probe) ranks by.
    Which channels such a probe removes does not change its latency, and a scan's damage is measured
    on the channels a data-free criterion would cut."""
    for name in names:
        if not getattr(CRITERIA.get(name), "needs_data", False):
            return name
    return "magnitude"
