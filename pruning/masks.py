"""Mask parametrizations: masked weights are zero in every forward, stored weights keep their values.

Same idea as ``torch.ao.pruning``'s ``FakeSparsity`` (a parametrization on ``weight`` that
multiplies by a ``mask`` buffer), with one deliberate difference: gradients flow *straight
through* the mask by default, as in Dynamic Network Surgery (Guo, Yao & Chen, NeurIPS 2016,
arXiv:1608.04493). A masked weight keeps receiving the gradient of the loss with respect to its
effective (zero) value, so its stored value and its magnitude/Taylor importance keep evolving and
it can be spliced back in when its importance rises above the layer's threshold again.

Optimizer state cannot resurrect a pruned weight: momentum and weight decay change the *stored*
value, but the forward always sees ``stored * mask``; only a mask update can bring it back.
Pass ``straight_through=False`` for the conventional semantics (masked weights get zero grad).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize


class _MaskSTE(torch.autograd.Function):
    """y = x * mask; dy/dx = identity (straight-through), as in Dynamic Network Surgery."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        return grad, None


class WeightMask(nn.Module):
    """Parametrization multiplying a tensor by a same-shaped ``mask`` buffer (1 = keep, 0 = pruned)."""

    def __init__(self, mask: torch.Tensor, straight_through: bool = True) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.straight_through = straight_through

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.straight_through and torch.is_grad_enabled() and x.requires_grad:
            return _MaskSTE.apply(x, self.mask)
        return x * self.mask

    def extra_repr(self) -> str:
        return f"shape={tuple(self.mask.shape)}, straight_through={self.straight_through}"


def add_mask(module: nn.Module, name: str = "weight", straight_through: bool = True) -> WeightMask:
    """Parametrize ``module.<name>`` with an all-ones mask and return the mask module.

    The original ``nn.Parameter`` object is kept (moved to ``module.parametrizations.<name>.original``),
    so an optimizer built before or after this call updates the same tensor.
    """
    existing = get_mask(module, name)
    if existing is not None:
        return existing
    param = getattr(module, name)
    if not isinstance(param, nn.Parameter):
        raise TypeError(f"{type(module).__name__}.{name} is not an nn.Parameter (got {type(param).__name__})")
    mask = WeightMask(torch.ones_like(param, dtype=param.dtype).detach(), straight_through)
    parametrize.register_parametrization(module, name, mask)
    return mask


def get_mask(module: nn.Module, name: str = "weight") -> WeightMask | None:
    """The :class:`WeightMask` on ``module.<name>``, or None."""
    if not parametrize.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:
        if isinstance(p, WeightMask):
            return p
    return None


def stored(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The stored (unmasked) parameter: what the optimizer updates."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name)


def iter_masks(model: nn.Module) -> Iterator[tuple[str, str, WeightMask]]:
    """Yield ``(module_name, tensor_name, mask)`` for every mask in ``model``."""
    for mod_name, mod in model.named_modules():
        if parametrize.is_parametrized(mod):
            for tname in list(mod.parametrizations.keys()):
                m = get_mask(mod, tname)
                if m is not None:
                    yield mod_name, tname, m


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a private copy of its injected class.

    ``copy.deepcopy`` of a parametrized model shares torch's injected ``Parametrized<Cls>``
    classes between original and copy, and ``remove_parametrizations`` deletes the property from
    that class, which would strip ``weight`` from the *other* model too. Removing from a private
    copy keeps both models intact.
    """
    cls = type(module)
    body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, body)


def remove_masks(model: nn.Module, *, apply: bool = True) -> nn.Module:
    """Remove every mask parametrization; ``apply=True`` bakes ``stored * mask`` into the weight."""
    done: set[int] = set()
    for mod_name, tname, _ in list(iter_masks(model)):
        mod = model.get_submodule(mod_name) if mod_name else model
        if id(mod) not in done:
            _own_class(mod)
            done.add(id(mod))
        parametrize.remove_parametrizations(mod, tname, leave_parametrized=apply)
    return model
