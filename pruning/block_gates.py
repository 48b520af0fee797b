"""Gradual, reversible removal of residual blocks: a gate g in [0, 1] on each block's branch.

During fine-tuning each removable block (:func:`pruning.blocks.discover_blocks`) computes

    out = x + g * (block(x) - x)

i.e. the skip plus ``g`` times the residual branch, where the branch is *defined* as the block's
output minus its input (for MobileNetV3's linear-output blocks that is exactly ``branch(x)``; for a
ResNet block it includes the post-add ReLU, so g interpolates between the block and the skip).
``g = 1`` returns the block's own output tensor untouched (bit-exact restore), ``g = 0`` returns
``x + 0 * (...)`` = ``x``, which is what :meth:`BlockGates.finalize` makes physical with
``nn.Identity``. A target per block (0 remove, 1 keep) moves the gate by ``1 / ramp_steps`` per
:meth:`BlockGates.step`, so a block fades out over a ramp and a block whose removal costs too much
ramps back up the same way, like the channel masks (Guo et al., "Dynamic Network Surgery",
NeurIPS 2016: removed parts stay trainable and can be spliced back).

**Why a forward hook, not a wrapper module.** A wrapper (``Gated(block)``) would rename every
parameter of the block (``features.3.block...`` -> ``features.3.inner.block...``), breaking
checkpoints and the channel pruner's layer names. A forward hook leaves the module tree, class and
``state_dict`` keys untouched; the gate state lives in this object and round-trips through
:meth:`state_dict` (``--resume`` mid-ramp). The hook is a small picklable object whose deepcopy is
itself, so a deep copy of a gated model (an export, a sensitivity probe) follows the same live gates.

**Importance** is Molchanov et al.'s first-order Taylor estimate ("Importance Estimation for Neural
Network Pruning", CVPR 2019) of the loss change from removing the branch: with the gate as the
branch's multiplier, ``dL/dg = sum(dL/dout * (block(x) - x))`` (taken with a tensor hook, no extra
parameter in the optimizer), and the loss change from g to 0 is ``|g * dL/dg|``. We score the change
from the full branch to none, ``|dL/dg|`` (equal to Molchanov's ``|g * dL/dg|`` at g = 1), so a
fading or gated-off block keeps a meaningful score: the loss it would win back by returning.
Scores are averaged as an exponential moving average over steps. A measured sensitivity (metric
drop when the block alone is removed, :func:`pruning.blocks.block_sensitivity`) can be attached
per block with :meth:`BlockGates.set_sensitivity`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from pruning.blocks import Block, ForwardFn, remove_blocks, require_blocks

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass
class _Gate:
    """One block's gate: current value, where it is heading, and how fast."""

    value: float = 1.0
    target: float = 1.0
    rate: float = 0.01  # gate change per step (1 / ramp_steps)


class _GateState:
    """What the hooks read and write: gate values and the per-step dL/dg accumulators."""

    def __init__(self) -> None:
        self.gates: dict[str, _Gate] = {}
        self.grad_acc: dict[str, float] = {}
        self.track = True


class _GateHook:
    """Forward hook computing ``x + g * (y - x)`` and recording dL/dg; picklable, deepcopy-shared."""

    def __init__(self, state: _GateState, name: str) -> None:
        self.state, self.name = state, name

    def __deepcopy__(self, memo: dict[int, Any]) -> _GateHook:
        return self  # a copied model follows the same live gates

    def __call__(self, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
        g = self.state.gates[self.name].value
        x = args[0]
        res = None if g >= 1.0 else x + g * (out - x)
        y = out if res is None else res
        if self.state.track and torch.is_grad_enabled() and y.requires_grad:
            delta = (out - x).detach()
            y.register_hook(self._accumulate(delta))
        return res  # None keeps the block's own output tensor: g = 1 is bit-exact

    def _accumulate(self, delta: torch.Tensor):  # noqa: ANN202 - a tensor hook
        def hook(grad: torch.Tensor) -> None:
            acc = self.state.grad_acc
            acc[self.name] = acc.get(self.name, 0.0) + float((grad.detach() * delta).sum())
        return hook


@dataclass(frozen=True)
class GateEvent:
    """A gate reaching an end of its ramp (``removed`` at 0, ``restored`` at 1) or turning around."""

    step: int
    block: str
    event: str  # "fading", "removed", "restoring", "restored"


class BlockGates:
    """Gates on a model's removable residual blocks; see the module docstring.

    ``blocks`` defaults to :func:`pruning.blocks.require_blocks` on ``model`` (ValueError naming
    the model class when it has none). ``ramp_steps`` is the default number of :meth:`step` calls
    a gate takes from 1 to 0 (or back); ``ema`` the importance average's decay.

    Typical loop::

        gates = BlockGates(model, ramp_steps=200)
        for batch in data:
            loss = ...; loss.backward(); optimizer.step()
            gates.step()                          # folds dL/dg into importance, moves gates
            if time_to_decide:
                gates.set_targets(remove=pick(gates.importance, latency))
        small = gates.finalize()                  # gated-off blocks become nn.Identity
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: Sequence[Block | str] | None = None,
        *,
        example_inputs: Any = None,
        forward_fn: ForwardFn | None = None,
        ramp_steps: int = 100,
        ema: float = 0.9,
    ) -> None:
        _check_ramp(ramp_steps)
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1); got {ema!r}")
        if blocks is None:
            blocks = require_blocks(model, example_inputs, forward_fn)
        self.names = [b.name if isinstance(b, Block) else str(b) for b in blocks]
        if not self.names:
            raise ValueError(f"no blocks to gate in {type(model).__name__}; see pruning.blocks.require_blocks")
        self.model, self.ramp_steps, self.ema = model, ramp_steps, ema
        self._state = _GateState()
        self.importance: dict[str, float] = {}
        self.sensitivity: dict[str, float] = {}
        self.steps = 0
        self.history: list[GateEvent] = []
        self._handles = []
        for n in self.names:
            module = model.get_submodule(n)
            self._state.gates[n] = _Gate(rate=1.0 / ramp_steps)
            self._handles.append(module.register_forward_hook(_GateHook(self._state, n)))

    # -- gates ------------------------------------------------------------------------------
    @property
    def gates(self) -> dict[str, float]:
        """Current gate value of every block."""
        return {n: g.value for n, g in self._state.gates.items()}

    def gate(self, name: str) -> float:
        return self._get(name).value

    def set_gate(self, name: str, value: float) -> None:
        """Jump a gate (and its target) to ``value`` in [0, 1] at once, e.g. for a sensitivity probe."""
        _check_unit("gate", value)
        g = self._get(name)
        g.value = g.target = float(value)

    def set_target(self, name: str, target: float, ramp_steps: int | None = None) -> None:
        """Ramp ``name``'s gate towards ``target`` (0 remove, 1 keep) over ``ramp_steps`` steps (per full swing)."""
        _check_unit("target", target)
        g = self._get(name)
        if ramp_steps is not None:
            _check_ramp(ramp_steps)
            g.rate = 1.0 / ramp_steps
        if float(target) != g.target:
            turning = "fading" if target < g.value else "restoring" if target > g.value else None
            if turning:
                self.history.append(GateEvent(self.steps, name, turning))
        g.target = float(target)

    def set_targets(self, remove: Iterable[str], ramp_steps: int | None = None) -> None:
        """Target 0 for the blocks in ``remove``, 1 for every other block."""
        remove = set(remove)
        unknown = remove - set(self.names)
        if unknown:
            raise ValueError(f"unknown blocks {sorted(unknown)}; gated blocks: {self.names}")
        for n in self.names:
            self.set_target(n, 0.0 if n in remove else 1.0, ramp_steps)

    def step(self) -> list[GateEvent]:
        """Fold this step's dL/dg into the importance EMA, then move every gate one ramp step."""
        self.steps += 1
        for n, acc in self._state.grad_acc.items():
            prev = self.importance.get(n)
            self.importance[n] = abs(acc) if prev is None else self.ema * prev + (1 - self.ema) * abs(acc)
        self._state.grad_acc.clear()
        events = []
        for n, g in self._state.gates.items():
            if g.value == g.target:
                continue
            # Clamp onto the target so the ends are exactly 0.0 / 1.0 (no float residue in the gate).
            g.value = max(g.target, g.value - g.rate) if g.target < g.value else min(g.target, g.value + g.rate)
            if abs(g.value - g.target) < 1e-9:  # float residue of repeated 1/ramp_steps
                g.value = g.target
            if g.value in (0.0, 1.0) and g.value == g.target:
                events.append(GateEvent(self.steps, n, "removed" if g.value == 0.0 else "restored"))
        self.history.extend(events)
        return events

    def removed(self) -> list[str]:
        """Blocks whose gate is exactly 0 (the skip alone)."""
        return [n for n, g in self._state.gates.items() if g.value == 0.0]

    def ramping(self) -> list[str]:
        """Blocks whose gate is strictly between 0 and 1."""
        return [n for n, g in self._state.gates.items() if 0.0 < g.value < 1.0]

    def set_tracking(self, on: bool) -> None:
        """Turn dL/dg recording on or off (e.g. off for a distillation teacher pass)."""
        self._state.track = bool(on)

    # -- importance -------------------------------------------------------------------------
    def set_sensitivity(self, name: str, value: float) -> None:
        """Attach a measured sensitivity (metric drop when the block alone is removed)."""
        self._get(name)
        if not math.isfinite(value):
            raise ValueError(f"sensitivity of {name!r} must be finite; got {value!r}")
        self.sensitivity[name] = float(value)

    def importance_per_ms(self, latency_ms: Mapping[str, float]) -> dict[str, float]:
        """Importance divided by each block's latency saving (ms); lowest first is the cheapest loss per ms won."""
        out = {}
        for n in self.names:
            ms = latency_ms.get(n)
            if ms is None:
                raise ValueError(f"no latency for block {n!r}; time it with pruning.blocks.block_latency")
            out[n] = self.importance.get(n, 0.0) / max(float(ms), 1e-6)
        return out

    # -- lifecycle --------------------------------------------------------------------------
    def remove_hooks(self) -> None:
        """Detach the gates from the model (it computes its full blocks again)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def finalize(self) -> nn.Module:
        """Replace every gated-off block by ``nn.Identity``, detach the gates; returns the model.

        Raises ValueError while a gate is mid-ramp (no physical model equals a half-gated block):
        finish the ramp (``step()`` until ``ramping()`` is empty) or ``set_gate`` it first.
        """
        mid = self.ramping()
        if mid:
            raise ValueError(
                f"cannot finalize while gates are mid-ramp: {({n: self.gate(n) for n in mid})}; "
                "step() until ramping() is empty or set_gate(name, 0 or 1)"
            )
        gone = self.removed()
        self.remove_hooks()
        remove_blocks(self.model, gone)
        log.info("removed %d of %d blocks: %s", len(gone), len(self.names), gone)
        return self.model

    def state_dict(self) -> dict[str, Any]:
        """Plain Python (``torch.load(weights_only=True)``-safe): gates, importance, sensitivity, history."""
        return {
            "version": STATE_VERSION,
            "names": list(self.names),
            "steps": self.steps,
            "gates": {n: asdict(g) for n, g in self._state.gates.items()},
            "importance": dict(self.importance),
            "sensitivity": dict(self.sensitivity),
            "history": [asdict(e) for e in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict` of gates on the same blocks (e.g. ``--resume`` mid-ramp)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"block-gate state version {state.get('version')!r}; expected {STATE_VERSION}")
        if list(state["names"]) != self.names:
            raise ValueError(f"block-gate state is for blocks {list(state['names'])}, these gates cover {self.names}")
        for n, g in state["gates"].items():
            self._state.gates[n] = _Gate(**{k: float(v) for k, v in g.items()})
        self.steps = int(state["steps"])
        self.importance = {k: float(v) for k, v in state["importance"].items()}
        self.sensitivity = {k: float(v) for k, v in state["sensitivity"].items()}
        self.history = [GateEvent(**e) for e in state["history"]]
        self._state.grad_acc.clear()

    def _get(self, name: str) -> _Gate:
        try:
            return self._state.gates[name]
        except KeyError:
            raise ValueError(f"unknown block {name!r}; gated blocks: {self.names}") from None


def _check_unit(what: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{what} must be in [0, 1]; got {value!r}")


def _check_ramp(ramp_steps: int) -> None:
    if int(ramp_steps) != ramp_steps or ramp_steps < 1:
        raise ValueError(f"ramp_steps must be an int >= 1; got {ramp_steps!r}")
