"""Channel coupling: which parameter slices one channel decision touches, from Torch-Pruning's DepGraph.

Torch-Pruning (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023) traces the
model once and groups every parameter slice that must go together when a channel goes: the
producing conv's filters and bias, its BatchNorm's γ/β, every consumer's input-channel slice,
depthwise convs in between, and every conv joined through residual adds, concatenations, FPN
lateral paths and SE blocks. We build the graph once, turn each group into index tensors, and
mask *all* coupled slices of a pruned channel, so the masked model computes exactly what the
physically pruned model (``finalize``) computes: a conv with masked filters and a BatchNorm with
γ = β = 0 outputs 0 on that channel; consumers' masked input slices ignore whatever the channel
still carries (e.g. hardsigmoid(0) = 0.5 inside an SE block multiplies a zero channel anyway).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

log = logging.getLogger(__name__)

PRUNABLE_TYPES = (nn.Conv2d, nn.Conv1d, nn.Linear)


@dataclass(frozen=True, eq=False)
class Member:
    """One module's slice of a coupled group."""

    module: str  # qualified module name
    role: str  # "out" (its output channels), "in" (it consumes them), "bn" (norm layer on them)
    tensors: tuple[tuple[str, int], ...]  # (parameter name, dim) pairs to mask
    idxs: torch.Tensor  # channel indices in this module
    root_idxs: torch.Tensor  # the same channels in the group's root index space


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    """Channels that must be pruned together; one threshold and one decision per root channel."""

    root: str
    size: int
    members: tuple[Member, ...]
    out_layers: tuple[str, ...] = field(default=())  # conv/linear whose output channels these are


@dataclass(frozen=True)
class Coupling:
    groups: tuple[ChannelGroup, ...]
    skipped: dict[str, str]  # root layer -> why its group cannot be pruned


def flatten_tensors(obj: Any) -> list[torch.Tensor]:
    """All tensors in a nested dict/list/tuple output, in order (for tracing multi-output models)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in flatten_tensors(o)]
    return []


def run_forward(model: nn.Module, example_inputs: Any, forward_fn: Callable[[nn.Module, Any], Any] | None) -> Any:
    if forward_fn is not None:
        return forward_fn(model, example_inputs)
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, tuple):
        return model(*example_inputs)
    return model(example_inputs)


def hooked_forward(model: nn.Module, example_inputs: Any, forward_fn: Callable[[nn.Module, Any], Any] | None,
                   handles: list[Any]) -> Any:
    """One eval-mode, no-grad forward for the hooks in ``handles``; the hooks are removed and the
    model's mode restored afterwards, whatever happens."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return run_forward(model, example_inputs, forward_fn)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def _member_tensors(module: nn.Module, role: str) -> tuple[tuple[str, int], ...] | None:
    """Which parameters and dims a role masks; None if we cannot express it exactly."""
    if isinstance(module, _BatchNorm):
        return (("weight", 0), ("bias", 0)) if module.affine else ()
    if isinstance(module, nn.Linear):
        return (("weight", 0), ("bias", 0)) if role == "out" else (("weight", 1),)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        depthwise = module.groups == module.in_channels == module.out_channels and module.groups > 1
        if role == "out" or depthwise:
            return (("weight", 0), ("bias", 0))
        if module.groups != 1:
            return None  # grouped (non-depthwise) consumer: index mapping is per group
        return (("weight", 1),)
    return None


def build_coupling(
    model: nn.Module,
    example_inputs: Any,
    layer_filter: Callable[[str, nn.Module], bool],
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> Coupling:
    """Trace ``model`` once and return its prunable channel groups (plus the skipped ones, with reasons).

    A group is prunable when every conv/linear whose *output* channels it removes passes
    ``layer_filter``, none of its channels is a model output, and every parameter it touches is
    one we can mask exactly (conv, linear, BatchNorm).
    """
    import torch_pruning as tp

    was_training = model.training
    model.eval()  # BatchNorm in train mode fails on 1x1 maps with batch 1 (SSDlite extras)
    try:
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(
                model,
                example_inputs=example_inputs,
                forward_fn=(lambda m, x: run_forward(m, x, forward_fn)),
                output_transform=flatten_tensors,
                verbose=False,
            )
    finally:
        model.train(was_training)
    names = {m: n for n, m in model.named_modules()}
    direct_outputs = _direct_output_layers(model, example_inputs, forward_fn)
    ignored = [m for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES) and not layer_filter(n, m)]
    groups: list[ChannelGroup] = []
    skipped: dict[str, str] = {}
    for g in dg.get_all_groups(ignored_layers=ignored, root_module_types=PRUNABLE_TYPES):
        root_mod = g[0].dep.target.module
        root = names.get(root_mod, str(root_mod))
        members: list[Member] = []
        reason = None
        for item in g:
            dep = item.dep
            mod = dep.target.module
            if dep.target.type == tp.ops.OPTYPE.OUTPUT:
                reason = "its channels are a model output"
                break
            if dep.target.type == tp.ops.OPTYPE.PARAMETER:
                reason = "it touches a bare nn.Parameter"
                break
            if not isinstance(mod, nn.Module) or not any(True for _ in mod.parameters(recurse=False)):
                continue  # reshape / add / concat nodes carry no parameters
            is_out = dg.is_out_channel_pruning_fn(dep.handler)
            if is_out and names.get(mod) in direct_outputs:
                reason = "its channels are a model output"
                break
            role = "bn" if isinstance(mod, _BatchNorm) else ("out" if is_out else "in")
            tensors = _member_tensors(mod, role)
            if tensors is None:
                reason = f"cannot mask {type(mod).__name__} {names.get(mod)!r} exactly"
                break
            tensors = tuple((t, d) for t, d in tensors if getattr(mod, t, None) is not None)
            members.append(
                Member(
                    module=names[mod],
                    role=role,
                    tensors=tensors,
                    idxs=torch.as_tensor(list(item.idxs), dtype=torch.long),
                    root_idxs=torch.as_tensor(list(item.root_idxs), dtype=torch.long),
                )
            )
        if reason is not None:
            skipped[root] = reason
            continue
        size = dg.get_pruner_of_module(root_mod).get_out_channels(root_mod)
        outs = tuple(dict.fromkeys(m.module for m in members if m.role == "out"))
        groups.append(ChannelGroup(root=root, size=int(size), members=tuple(members), out_layers=outs))
    if skipped:
        log.info("channel groups left unpruned: %s", skipped)
    return Coupling(groups=tuple(groups), skipped=skipped)


def _direct_output_layers(
    model: nn.Module, example_inputs: Any, forward_fn: Callable[[nn.Module, Any], Any] | None
) -> set[str]:
    """Layers whose output tensor *is* a model output (Torch-Pruning marks only outputs behind other ops)."""
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    handles = [
        m.register_forward_hook(lambda mod, a, o, n=n: produced.__setitem__(id(o), (n, o)))
        for n, m in model.named_modules()
        if isinstance(m, PRUNABLE_TYPES)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outs = flatten_tensors(run_forward(model, example_inputs, forward_fn))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {produced[id(t)][0] for t in outs if id(t) in produced and produced[id(t)][1] is t}


def find_following_bn(
    model: nn.Module,
    layers: Sequence[str],
    example_inputs: Any = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[str, tuple[str, nn.Module]]:
    """Map each layer to ``(name, BatchNorm)`` of the BatchNorm that consumes its output directly, if any.

    With example inputs the answer is exact: a BN whose input tensor *is* the layer's output
    tensor. Without, we fall back to registration order (a BN registered right after the conv
    with matching channel count), which holds for torchvision's Conv-BN-Act blocks.
    """
    mods = dict(model.named_modules())
    wanted = set(layers)
    found: dict[str, tuple[str, nn.Module]] = {}
    if example_inputs is not None:
        outputs: dict[int, tuple[str, torch.Tensor]] = {}
        handles = []
        for n in wanted:
            handles.append(mods[n].register_forward_hook(lambda m, a, o, n=n: outputs.__setitem__(id(o), (n, o))))
        for bn_name, bn in ((n, m) for n, m in mods.items() if isinstance(m, _BatchNorm)):
            def pre(m: nn.Module, args: tuple[Any, ...], bn_name: str = bn_name) -> None:
                hit = outputs.get(id(args[0])) if args else None
                if hit is not None and hit[1] is args[0]:
                    found.setdefault(hit[0], (bn_name, m))
            handles.append(bn.register_forward_pre_hook(pre))
        hooked_forward(model, example_inputs, forward_fn, handles)
        return found
    order = list(mods.items())
    for i, (n, m) in enumerate(order):
        if n in wanted and i + 1 < len(order):
            nxt = order[i + 1][1]
            out_ch = getattr(m, "out_channels", getattr(m, "out_features", None))
            if isinstance(nxt, _BatchNorm) and nxt.num_features == out_ch:
                found[n] = (order[i + 1][0], nxt)
    return found
