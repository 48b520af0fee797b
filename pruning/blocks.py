"""Removable residual blocks: found from the graph, removed physically, timed and scored one by one.

Depth pruning removes whole residual blocks ``y = post(x + branch(x))`` by replacing them with the
skip alone (``nn.Identity``). Layer/block removal as a latency lever for MobileNets follows Fu et
al., "DepthShrinker" (ICML 2022) and Elkerdawy et al., "To filter prune, or to layer prune, that is
the question" (ACCV 2020); the gate and its importance live in :mod:`pruning.block_gates`.

A submodule is a *removable block* when, structurally and numerically:

1. **shape** - one tensor in, one tensor out, equal shapes at the example input (hooks on one
   forward of the model), so the skip alone fits in its place;
2. **identity skip** - its *own* forward (traced by ``torch.fx`` with every child a leaf, so a
   container never inherits its children's adds) contains an ``add`` whose one operand is the
   module's input itself and whose other operand (the branch) depends on that input, and the
   output is that add, possibly followed by a chain of one-input ops (ResNet's post-add ReLU);
3. **branch removal is the identity** - the traced forward with the branch operand replaced by
   zeros returns the input exactly on the recorded example input (this is what makes
   ``nn.Identity`` faithful: a post-add ReLU is harmless only because the block's input is
   already non-negative, which the check confirms instead of assuming).

No class names or attributes (``use_res_connect``, ``downsample``) are consulted, so any module
class with an identity-skip add qualifies: torchvision's MobileNetV3 ``InvertedResidual`` with
``use_res_connect`` and ResNet ``BasicBlock``/``Bottleneck`` without ``downsample`` are found,
their strided/channel-changing siblings are not.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import operator
import statistics
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from pruning.filters import detector_core_forward, is_detector

log = logging.getLogger(__name__)

ForwardFn = Callable[[nn.Module, Any], Any]
MeasureFn = Callable[[nn.Module], float]
MeasureAllFn = Callable[[Sequence[nn.Module]], Sequence[float]]
EvaluateFn = Callable[[nn.Module], float]

_ADDS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


@dataclass(frozen=True)
class Block:
    """A removable residual block: its qualified module name, class and (input = output) shape."""

    name: str
    cls: str
    shape: tuple[int, ...]
    post: tuple[str, ...] = ()  # one-input ops after the add (e.g. ("relu",)), checked to be identity on the skip


@dataclass(frozen=True)
class BlockLatency:
    """A block's measured cost: ``ms`` saved by removing it alone, ``share`` = ms / dense ms."""

    name: str
    ms: float
    share: float
    dense_ms: float


class _LeafTracer(fx.Tracer):
    """Trace only a module's own forward: every child module is one opaque call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _default_example(model: nn.Module) -> torch.Tensor:
    hw = (getattr(model, "avprune_meta", None) or {}).get("image_size", (320, 320))
    return torch.randn(1, 3, int(hw[0]), int(hw[1]))


def _run(model: nn.Module, example_inputs: Any, forward_fn: ForwardFn | None) -> Any:
    if forward_fn is None and is_detector(model):
        forward_fn = detector_core_forward  # the NMS-free core: what is pruned and exported
    if forward_fn is not None:
        return forward_fn(model, example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def _record_shape_preserving(
    model: nn.Module, example_inputs: Any, forward_fn: ForwardFn | None
) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """``{name: (module, input)}`` for every non-``torch.nn`` submodule mapping one tensor to one of equal shape."""
    seen: dict[str, tuple[nn.Module, torch.Tensor] | None] = {}
    pending: dict[str, tuple[torch.Tensor, int]] = {}
    handles = []

    def pre(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
                pending[name] = (args[0], args[0]._version)
            else:
                seen[name] = None  # several inputs: its place cannot be taken by the skip alone
        return hook

    def post(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            got = pending.pop(name, None)
            if got is None or (name in seen and seen[name] is None):
                return
            x, version = got
            ok = isinstance(out, torch.Tensor) and out.shape == x.shape and x._version == version
            if not ok:
                seen[name] = None
            elif name not in seen:
                seen[name] = (module, x.detach().clone())  # a shared module keeps its first input
        return hook

    for name, m in model.named_modules():
        # torch.nn's own classes (convs, norms, activations, containers) have no skip of their own.
        if not name or type(m).__module__.startswith("torch.nn"):
            continue
        handles.append(m.register_forward_pre_hook(pre(name), with_kwargs=True))
        handles.append(m.register_forward_hook(post(name), with_kwargs=True))
    was_training = {m: m.training for m in model.modules()}
    try:
        model.eval()  # BatchNorm on 1x1 maps refuses train mode at batch 1; eval is also what deploy runs
        with torch.no_grad():
            _run(model, example_inputs, forward_fn)
    finally:
        for h in handles:
            h.remove()
        for m, t in was_training.items():
            m.train(t)
    return {n: v for n, v in seen.items() if v is not None}


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADDS:
        return len(node.args) == 2 and not node.kwargs
    return node.op == "call_method" and node.target in _ADD_METHODS and len(node.args) == 2 and not node.kwargs


def _depends_on(node: Any, target: fx.Node) -> bool:
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        if n is target:
            return True
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _skip_structure(module: nn.Module) -> tuple[fx.GraphModule, fx.Node, int, tuple[str, ...]] | None:
    """(traced module, the skip add, index of its branch operand, post-add op names) or None."""
    try:
        graph = _LeafTracer().trace(module)
    except Exception as e:  # data-dependent control flow etc.: not a block we can prove removable
        log.debug("cannot trace %s: %s", type(module).__name__, e)
        return None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    if len(placeholders) != 1 or not isinstance(output.args[0], fx.Node):
        return None
    x = placeholders[0]
    for add in (n for n in graph.nodes if _is_add(n)):
        a, b = add.args
        if a is x and b is not x:
            branch_idx = 1
        elif b is x and a is not x:
            branch_idx = 0
        else:
            continue
        if not _depends_on(add.args[branch_idx], x):
            continue  # adding a constant or parameter, not a residual branch
        post = _chain_to_output(add, output)
        if post is not None:
            return fx.GraphModule(module, graph), add, branch_idx, post
    return None


def _chain_to_output(node: fx.Node, output: fx.Node) -> tuple[str, ...] | None:
    """Names of the single-user, single-input ops leading from ``node`` to the output, or None."""
    names: list[str] = []
    while len(node.users) == 1:
        (user,) = node.users
        if user is output:
            return tuple(names)
        if user.all_input_nodes != [node]:
            return None
        names.append(getattr(user.target, "__name__", str(user.target)))
        node = user
    return None


def _branch_removal_is_identity(gm: fx.GraphModule, add: fx.Node, branch_idx: int, x: torch.Tensor) -> bool:
    graph = gm.graph
    ph = next(n for n in graph.nodes if n.op == "placeholder")
    with graph.inserting_before(add):
        zeros = graph.call_function(torch.zeros_like, (ph,))
    args = list(add.args)
    args[branch_idx] = zeros
    add.args = tuple(args)
    gm.recompile()
    with torch.no_grad():
        out = gm(x.clone())
    return isinstance(out, torch.Tensor) and torch.equal(out, x)


def discover_blocks(
    model: nn.Module, example_inputs: Any = None, forward_fn: ForwardFn | None = None
) -> list[Block]:
    """The removable residual blocks of ``model`` in forward order (empty when there are none).

    ``example_inputs`` default to a random ``[1, 3, H, W]`` batch (H, W from the detector's
    ``avprune_meta`` image size, else 320); detectors run their NMS-free core
    (:func:`pruning.filters.detector_core_forward`) unless ``forward_fn(model, inputs)`` is given.
    The model is left as it was (mode and weights).
    """
    if example_inputs is None:
        example_inputs = _default_example(model)
    candidates = _record_shape_preserving(model, example_inputs, forward_fn)
    blocks = []
    for name, (module, x) in candidates.items():
        found = _skip_structure(module)
        if found is None:
            continue
        gm, add, branch_idx, post = found
        was = module.training
        module.eval()
        try:
            if not _branch_removal_is_identity(gm, add, branch_idx, x):
                log.debug("%s: the skip alone is not its input (post-add %s)", name, post)
                continue
        finally:
            module.train(was)
        blocks.append(Block(name=name, cls=type(module).__name__, shape=tuple(x.shape), post=post))
    return blocks


def require_blocks(
    model: nn.Module, example_inputs: Any = None, forward_fn: ForwardFn | None = None
) -> list[Block]:
    """:func:`discover_blocks`, raising ValueError naming the model class when it finds none."""
    blocks = discover_blocks(model, example_inputs, forward_fn)
    if not blocks:
        raise ValueError(
            f"{_model_label(model)} has no removable residual block (a submodule whose output is its "
            "input plus a branch, with equal shapes); use granularity='channel' for this model"
        )
    return blocks


def _names(blocks: Iterable[Block | str]) -> list[str]:
    return [b.name if isinstance(b, Block) else str(b) for b in blocks]


def _outermost(names: Iterable[str]) -> list[str]:
    """Drop names nested in another listed block: removing the outer one removes them too."""
    names = list(dict.fromkeys(names))
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


def _model_label(model: nn.Module) -> str:
    name = (getattr(model, "avprune_meta", None) or {}).get("name")
    return f"{type(model).__name__} ({name})" if name else type(model).__name__


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    head, _, last = name.rpartition(".")
    parent = model.get_submodule(head) if head else model
    if last not in parent._modules:
        raise ValueError(f"{name!r} is not a submodule of {type(model).__name__}")
    return parent, last


def remove_blocks(model: nn.Module, blocks: Iterable[Block | str]) -> nn.Module:
    """Replace each named block by ``nn.Identity`` (the skip alone), in place; returns ``model``.

    Also rebuilds a finalized architecture from the dense one before loading its state_dict
    (the removed blocks' keys are gone from it).
    """
    for name in _outermost(_names(blocks)):
        parent, last = _parent(model, name)
        setattr(parent, last, nn.Identity())
    return model


@contextlib.contextmanager
def blocks_removed(model: nn.Module, blocks: Iterable[Block | str]) -> Iterator[nn.Module]:
    """Temporarily replace ``blocks`` by ``nn.Identity``; the originals (with their hooks) come back after."""
    saved = []
    try:
        for name in _outermost(_names(blocks)):
            parent, last = _parent(model, name)
            saved.append((parent, last, parent._modules[last]))
            setattr(parent, last, nn.Identity())
        yield model
    finally:
        for parent, last, module in reversed(saved):
            setattr(parent, last, module)


def block_latency(
    model: nn.Module,
    measure: MeasureFn | None,
    blocks: Sequence[Block | str],
    *,
    rounds: int = 3,
    measure_all: MeasureAllFn | None = None,
) -> dict[str, BlockLatency]:
    """Each block's latency: ``measure(model)`` with all blocks minus with that block removed.

    ``measure(model) -> ms`` is injected (ONNX Runtime, TensorRT, eager...). Each round times the
    dense model and then every removal, and a block's saving is the median over rounds of the
    paired difference, so drift on a shared machine hits both sides of a pair alike.

    ``measure_all(models) -> [ms, ...]`` (instead of ``measure``) receives the dense model and one
    copy per block with that block removed, all at once, so it can time them interleaved run by
    run (much steadier under load than one model after another); it is called once per round.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1; got {rounds}")
    if (measure is None) == (measure_all is None):
        raise ValueError("pass exactly one of measure(model) -> ms and measure_all(models) -> [ms]")
    names = _names(blocks)
    if not names:
        raise ValueError(f"no blocks given to time for {type(model).__name__}; see require_blocks()")
    dense, saved = [], {n: [] for n in names}
    variants = None
    if measure_all is not None:
        variants = [model] + [remove_blocks(copy.deepcopy(model), [n]) for n in names]
    for _ in range(rounds):
        if variants is not None:
            ms = [float(v) for v in measure_all(variants)]
            if len(ms) != len(variants):
                raise ValueError(f"measure_all returned {len(ms)} latencies for {len(variants)} models")
            d, without = ms[0], ms[1:]
        else:
            d = float(measure(model))
            without = []
            for n in names:
                with blocks_removed(model, [n]):
                    without.append(float(measure(model)))
        dense.append(d)
        for n, w in zip(names, without, strict=True):
            saved[n].append(d - w)
    dense_ms = statistics.median(dense)
    return {
        n: BlockLatency(name=n, ms=statistics.median(s), share=statistics.median(s) / dense_ms, dense_ms=dense_ms)
        for n, s in saved.items()
    }


def block_sensitivity(
    model: nn.Module, evaluate_fn: EvaluateFn, blocks: Sequence[Block | str]
) -> dict[str, float]:
    """Metric drop when each block alone is removed: ``evaluate_fn(dense) - evaluate_fn(without it)``.

    ``evaluate_fn(model) -> metric`` (higher is better, e.g. mAP) is injected; the model is
    restored after each removal. Feed the result to ``BlockGates.set_sensitivity``.
    """
    base = float(evaluate_fn(model))
    out = {}
    for n in _names(blocks):
        with blocks_removed(model, [n]):
            out[n] = base - float(evaluate_fn(model))
    return out
