"""``Pruner``: dynamic-threshold pruning inside an ordinary training loop.

    pruner = Pruner(model, importance="taylor", granularity="channel",
                    controller=build_controller("cubic", final_sparsity=0.5, end_step=2000),
                    example_inputs=torch.randn(1, 3, 320, 320))
    for batch in loader:
        loss = model(batch).backward(); optimizer.step()
        pruner.step()          # every `update_every` steps: recompute importance, thresholds, masks
        optimizer.zero_grad()
    small = pruner.finalize()  # plain nn.Module, channels physically removed

Masks are parametrizations (:mod:`pruning.masks`); stored weights keep their values and keep
receiving gradients, so a unit's mask is recomputed from scratch at every update and weights whose
importance rises again come back (Dynamic Network Surgery, Guo et al., NeurIPS 2016).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from pruning import filters as _filters
from pruning._controller import Controller
from pruning.bn_stats import BatchNormStatsKeeper
from pruning.finalize import finalize_model, pruned_root_indices, root_keep
from pruning.granularity import (
    MaskResult,
    channel_mask_kept,
    check_channel_multiple,
    check_granularity,
    kept_channels,
    nm_layer_mask,
    normalise,
    stable_channel_mask,
    swapped_channels,
    unstructured_mask,
)
from pruning.groups import (
    PRUNABLE_TYPES,
    ChannelGroup,
    Coupling,
    build_coupling,
    find_following_bn,
    run_forward,
)
from pruning.importance import CRITERIA, build_criterion, importance_summary
from pruning.masks import WeightMask, add_mask, get_mask
from pruning.nm import check_nm, nm_skip_reason
from pruning.records import LayerRecord, UpdateRecord

log = logging.getLogger(__name__)


def _out_channels(m: nn.Module) -> int:
    return int(getattr(m, "out_channels", getattr(m, "out_features", 0)))


def _in_channels(m: nn.Module) -> int:
    return int(getattr(m, "in_channels", getattr(m, "in_features", 0)))


class Pruner:
    """Recompute importance, per-unit thresholds and masks every ``update_every`` steps.

    A *unit* is what one threshold governs: a layer (``unstructured``, ``nm``) or a coupled
    channel group named by its root layer (``channel``).

    ``channel_multiple`` (older name ``round_to``): channels go in whole groups of this many, so
    every pruned layer keeps a multiple of it (the runtime's channel block; see
    :mod:`pruning.alignment` to measure it). A controller with ``allocate`` (e.g.
    :class:`pruning.allocation_controller.AllocationController`) decides kept channels per group
    at each update instead of one target sparsity per unit.

    ``stable_masks``: a channel group's kept channels change only with its kept count
    (:func:`pruning.granularity.stable_channel_mask`); by default every update re-ranks all
    channels, and a pruned channel that outscores a kept one swaps in. Each update records the
    swaps it made (``LayerRecord.swapped``) either way.

    ``freeze_after``: no mask update after this step (the controller still steps and measures).
    The fine-tune's last steps then recover from the last change, and a measurement there is of
    the model that ships: with updates to the last step, a final allocation cut groups that never
    trained without them (measured: mAP 0.553 at step 395's masks, 0.518 at step 400's).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        importance: str = "magnitude",
        granularity: str = "channel",
        controller: Controller,
        example_inputs: Any = None,
        layer_filter: Callable[[str, nn.Module], bool] | None = None,
        update_every: int = 1,
        channel_multiple: int | None = None,
        round_to: int | None = None,
        nm: tuple[int, int] = (2, 4),
        importance_kwargs: Mapping[str, Any] | None = None,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        predict_latency: Callable[[dict[str, int]], float] | None = None,
        straight_through: bool = True,
        coupling: Coupling | None = None,
        freeze_after: int | None = None,
        stable_masks: bool = False,
    ) -> None:
        CRITERIA.get(importance)  # unknown names fail before any tracing
        check_granularity(granularity)
        if not isinstance(controller, Controller):
            raise TypeError(f"controller must be a pruning.controllers.Controller; got {type(controller).__name__}")
        if not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be an int >= 1; got {update_every!r}")
        if freeze_after is not None and (not isinstance(freeze_after, int) or freeze_after < 0):
            raise ValueError(f"freeze_after must be None or an int >= 0 (the last step that updates masks); "
                             f"got {freeze_after!r}")
        self.freeze_after = freeze_after
        if not isinstance(stable_masks, bool):
            raise TypeError(f"stable_masks must be a bool; got {stable_masks!r}")
        self.stable_masks = stable_masks
        # ``round_to`` is the older name of ``channel_multiple`` (kept for existing callers).
        if channel_multiple is not None and round_to is not None and channel_multiple != round_to:
            raise ValueError(f"channel_multiple={channel_multiple!r} and round_to={round_to!r} disagree; pass "
                             "channel_multiple only")
        chosen = channel_multiple if channel_multiple is not None else round_to if round_to is not None else 8
        channel_multiple = check_channel_multiple(chosen, "channel_multiple" if channel_multiple is not None else "round_to")
        n, m = nm
        check_nm(n, m)
        self.model, self.importance, self.granularity = model, importance, granularity
        self.controller, self.update_every, self.nm = controller, update_every, (n, m)
        self.channel_multiple = channel_multiple
        self.example_inputs = example_inputs
        if forward_fn is None and _filters.is_detector(model):
            forward_fn = _filters.detector_core_forward
        self.forward_fn = forward_fn
        self.predict_latency = predict_latency or getattr(controller, "predict_latency", None)
        self.layer_filter = layer_filter or _filters.default_filter(model)
        self.modules = dict(model.named_modules())
        self.layers = {
            name: mod for name, mod in self.modules.items() if isinstance(mod, PRUNABLE_TYPES) and self.layer_filter(name, mod)
        }
        if not self.layers:
            raise ValueError("layer_filter selected no Conv/Linear layer; nothing to prune (check the filter's names)")
        self.skipped: dict[str, str] = {}
        self.groups: tuple[ChannelGroup, ...] = ()
        self.step_count = 0
        self.history: list[UpdateRecord] = []
        self.finalized = False  # set by finalize(): the model is plain from then on

        if granularity == "channel":
            if example_inputs is None:
                raise ValueError("channel granularity needs example_inputs to trace channel coupling (Torch-Pruning)")
            # A precomputed coupling (same architecture and filter) skips re-tracing, e.g. in sensitivity scans.
            coupling = coupling or build_coupling(model, example_inputs, self.layer_filter, forward_fn)
            self.groups, self.skipped = coupling.groups, dict(coupling.skipped)
            if not self.groups:
                raise ValueError(f"no prunable channel group among the selected layers; skipped: {self.skipped}")
            self.units = [g.root for g in self.groups]
        elif granularity == "nm":
            for name, mod in self.layers.items():
                reason = nm_skip_reason(mod, m)
                if reason:
                    self.skipped[name] = reason
            self.units = [name for name in self.layers if name not in self.skipped]
            if not self.units:
                raise ValueError(f"no selected layer can hold a {n}:{m} pattern; skipped: {self.skipped}")
        else:
            self.units = list(self.layers)
        if self.skipped:
            log.info("%s pruning skips %d units: %s", granularity, len(self.skipped), self.skipped)

        self._add_masks(straight_through)
        self.bn_stats = BatchNormStatsKeeper(self.modules)
        self.criterion = build_criterion(importance, **dict(importance_kwargs or {}))
        # Only BN-aware criteria need the conv -> BatchNorm map (it costs one forward pass).
        needs_bn = self.criterion.needs_bn or (importance == "taylor" and granularity == "channel")
        bn_after = find_following_bn(model, list(self.layers), example_inputs, forward_fn) if needs_bn else {}
        self.criterion.attach(self.layers, bn_after)
        self.controller.bind(self.units, self.config_at)
        if hasattr(self.controller, "bind_groups"):  # allocating controllers decide kept channels per group
            if granularity != "channel":
                raise ValueError(f"{type(controller).__name__} allocates channel groups; it needs "
                                 f"granularity='channel', not {granularity!r}")
            from pruning.allocation import Unit

            self.controller.bind_groups([Unit(g.root, g.size, g.out_layers) for g in self.groups], channel_multiple)

    @property
    def round_to(self) -> int:
        """The older name of :attr:`channel_multiple`."""
        return self.channel_multiple

    # ------------------------------------------------------------------ setup
    def _add_masks(self, straight_through: bool) -> None:
        self.masks: dict[tuple[str, str], WeightMask] = {}
        if self.granularity == "channel":
            self._vec_index: dict[tuple[str, str, int], torch.Tensor] = {}
            for g in self.groups:
                for mem in g.members:
                    mod = self.modules[mem.module]
                    for tname, dim in mem.tensors:
                        self.masks[(mem.module, tname)] = add_mask(mod, tname, straight_through)
                        size = getattr(mod, tname).shape[dim]
                        self._vec_index.setdefault((mem.module, tname, dim), torch.ones(size))
        else:
            for name in self.units:
                self.masks[(name, "weight")] = add_mask(self.layers[name], "weight", straight_through)

    # ------------------------------------------------------------------ training-loop hooks
    def step(self) -> None:
        """Call after ``optimizer.step()``: advance the controller, update masks every ``update_every`` steps."""
        if self.finalized:
            raise ValueError("this pruner was finalized: its model has no masks left to update")
        self.step_count += 1
        self.controller.step()
        self.criterion.observe()
        if self.step_count % self.update_every == 0 and (self.freeze_after is None or self.step_count <= self.freeze_after):
            self.update()

    def __call__(self, ctx: Any = None) -> None:
        """``perception.train`` hook protocol: called after ``optimizer.step()`` with a StepContext."""
        self.step()

    @torch.no_grad()
    def observe_activations(self, batches: Iterable[Any]) -> int:
        """Run calibration batches through the model to collect activation statistics; returns the count."""
        if not hasattr(self.criterion, "collecting"):
            raise ValueError(f"observe_activations needs importance='activation'; this pruner uses {self.importance!r}")
        was_training = self.model.training
        self.model.eval()
        self.criterion.collecting = True
        count = 0
        try:
            for batch in batches:
                run_forward(self.model, batch, self.forward_fn)
                count += 1
        finally:
            self.criterion.collecting = False
            self.model.train(was_training)
        if count == 0:
            raise ValueError("observe_activations got no calibration batches (an empty iterable)")
        return count

    # ------------------------------------------------------------------ mask updates
    @torch.no_grad()
    def update(self) -> UpdateRecord:
        """Recompute importance and masks now, at the controller's current targets; record and return it."""
        records: dict[str, LayerRecord] = {}
        if self.granularity == "channel":
            dirty: set[tuple[str, str]] = set()
            all_scores = {g.root: self._group_scores(g) for g in self.groups}
            allocate = getattr(self.controller, "allocate", None)
            alloc = allocate(all_scores) if allocate is not None else None
            targets = self.controller.targets()
            for g in self.groups:
                scores = all_scores[g.root]
                if alloc is not None:  # per-layer kept counts
                    kept = alloc.kept[g.root]
                else:
                    kept = kept_channels(scores.numel(), targets[g.root], self.channel_multiple)
                before = root_keep(g, self._vec_index)
                if self.stable_masks:
                    res = stable_channel_mask(scores, kept, before)
                else:
                    res = channel_mask_kept(scores, kept)
                if alloc is not None:  # threshold = weakest kept group's importance
                    res = dataclasses.replace(res, threshold=alloc.thresholds[g.root])
                dirty |= self._scatter_group(g, res.mask)
                records[g.root] = self._record(targets[g.root], res, scores, channels=int(res.mask.sum()),
                                               swapped=swapped_channels(before, res.mask))
            self._compose_channel_masks(dirty)
        else:
            targets = self.controller.targets()
            n, m = self.nm
            for name in self.units:
                mod = self.layers[name]
                scores = self.criterion.weight_scores(name, mod)
                if self.granularity == "nm":
                    res = nm_layer_mask(scores, targets[name], n, m)
                else:
                    res = unstructured_mask(scores, targets[name])
                self.masks[(name, "weight")].mask.copy_(res.mask.to(self.masks[(name, "weight")].mask))
                records[name] = self._record(targets[name], res, scores)
        latency = float(self.predict_latency(self.channel_config())) if self.predict_latency else None
        rec = UpdateRecord(step=self.step_count, layers=records, predicted_latency_ms=latency)
        self.history.append(rec)
        return rec

    @staticmethod
    def _record(target: float, res: MaskResult, scores: torch.Tensor, channels: int | None = None,
                swapped: int | None = None) -> LayerRecord:
        return LayerRecord(
            target=float(target), threshold=res.threshold, sparsity=res.sparsity,
            importance=importance_summary(normalise(scores)), channels=channels, swapped=swapped,
        )

    def _group_scores(self, g: ChannelGroup) -> torch.Tensor:
        """Aggregate member scores in root index space, each member normalised by its mean first.

        Normalising per member keeps one wide consumer (or a BN with large γ) from drowning the
        others; this mirrors Torch-Pruning's group importance with ``normalizer="mean"``.
        """
        total = torch.zeros(g.size)
        contributed = False
        for mem in g.members:
            s = self.criterion.channel_scores(mem.module, self.modules[mem.module], mem.role)
            if s is None:
                continue
            s = s.detach().float().reshape(-1)[mem.idxs]
            mean = s.mean()
            total.index_add_(0, mem.root_idxs, s / mean if mean > 0 else s)
            contributed = True
        if not contributed:
            raise ValueError(f"importance {self.importance!r} has no score for channel group {g.root!r}")
        return total

    def _scatter_group(self, g: ChannelGroup, keep: torch.Tensor) -> set[tuple[str, str]]:
        """Write a group's keep vector into its members' per-dim vectors; return the tensors that changed."""
        changed: set[tuple[str, str]] = set()
        for mem in g.members:
            vals = keep[mem.root_idxs]
            for i, (tname, dim) in enumerate(mem.tensors):
                vec = self._vec_index[(mem.module, tname, dim)]
                if not torch.equal(vec[mem.idxs], vals):
                    if mem.role == "bn" and i == 0:
                        self.bn_stats.transition(mem.module, mem.idxs, vec[mem.idxs].clone(), vals)
                    vec[mem.idxs] = vals
                    changed.add((mem.module, tname))
        return changed

    def _compose_channel_masks(self, dirty: set[tuple[str, str]]) -> None:
        """Each changed tensor's mask = outer product of its per-dim keep vectors.

        Only tensors whose keep vectors changed are rewritten: once thresholds settle most updates
        touch nothing, which keeps ``update_every=1`` cheap on large models.
        """
        for mod, tname in dirty:
            mask = self.masks[(mod, tname)].mask
            composed = None
            for dim in range(mask.dim()):
                vec = self._vec_index.get((mod, tname, dim))
                if vec is None:
                    continue
                shape = [1] * mask.dim()
                shape[dim] = -1
                composed = vec.view(shape) if composed is None else composed * vec.view(shape)
            if composed is not None:
                mask.copy_(composed.expand_as(mask))

    # ------------------------------------------------------------------ views
    def config_at(self, sparsity: float) -> dict[str, int]:
        """Kept output channels per layer if every unit were at ``sparsity`` (for latency prediction)."""
        config = {name: _out_channels(mod) for name, mod in self.modules.items() if isinstance(mod, PRUNABLE_TYPES)}
        for g in self.groups:
            kept = kept_channels(g.size, sparsity, self.channel_multiple)
            for layer in g.out_layers:
                config[layer] = kept
        return config

    def channel_config(self) -> dict[str, int]:
        """Kept output channels per Conv/Linear layer under the current masks."""
        config = {name: _out_channels(mod) for name, mod in self.modules.items() if isinstance(mod, PRUNABLE_TYPES)}
        if self.granularity == "channel":
            for (mod, tname, dim), vec in self._vec_index.items():
                if tname == "weight" and dim == 0 and mod in config:
                    config[mod] = int(vec.sum())
        return config

    def layer_channels(self) -> dict[str, tuple[int, int]]:
        """(kept input channels, kept output channels) per Conv/Linear layer under the current masks."""
        out = self.channel_config()
        result = {}
        for name, mod in self.modules.items():
            if not isinstance(mod, PRUNABLE_TYPES):
                continue
            cin = _in_channels(mod)
            vec = getattr(self, "_vec_index", {}).get((name, "weight", 1))
            if vec is not None:
                cin = int(vec.sum())
            elif getattr(mod, "groups", 1) > 1 and getattr(mod, "groups", 1) == cin:
                cin = out[name]  # depthwise: inputs follow outputs
            result[name] = (cin, out[name])
        return result

    def layer_sparsity(self) -> dict[str, float]:
        """Fraction of masked weights per masked Conv/Linear layer."""
        out = {}
        for (mod, tname), wm in self.masks.items():
            if tname == "weight" and isinstance(self.modules[mod], PRUNABLE_TYPES):
                out[mod] = float(1.0 - wm.mask.mean())
        return out

    def masked_fraction(self) -> float:
        """Fraction of all masked Conv/Linear weights (model-level sparsity of the selected layers)."""
        total = zeros = 0
        for (mod, tname), wm in self.masks.items():
            if tname == "weight" and isinstance(self.modules[mod], PRUNABLE_TYPES):
                total += wm.mask.numel()
                zeros += int((wm.mask == 0).sum())
        return zeros / total if total else 0.0

    def mask_digest(self) -> str:
        """A digest of every current mask: equal digests, the same network. What a caller compares
        to tell whether anything was pruned or regrown since it last looked (e.g. before re-estimating
        BatchNorm statistics, :mod:`pruning.bn_recalibration`)."""
        import hashlib

        h = hashlib.sha256()
        for (mod, tname), wm in sorted(self.masks.items()):
            h.update(f"{mod}.{tname}".encode())
            h.update((wm.mask != 0).flatten().numpy().tobytes())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: step, masks, importance state, controller, history."""
        return {
            "step": self.step_count,
            "importance": self.importance,
            "granularity": self.granularity,
            "masks": {f"{m}::{t}": wm.mask.clone() for (m, t), wm in self.masks.items()},
            "vectors": {f"{m}::{t}::{d}": v.clone() for (m, t, d), v in getattr(self, "_vec_index", {}).items()},
            "criterion": self.criterion.state_dict(),
            "controller": self.controller.state_dict(),
            "history": [r.to_dict() for r in self.history],
            "bn_stats": self.bn_stats.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict` (same model architecture, importance and granularity)."""
        for key in ("importance", "granularity"):
            if state[key] != getattr(self, key):
                raise ValueError(f"state was saved with {key}={state[key]!r}; this pruner uses {getattr(self, key)!r}")
        masks = state["masks"]
        mine = {f"{m}::{t}" for m, t in self.masks}
        if set(masks) != mine:
            raise ValueError(f"saved masks do not match this model: {len(set(masks) ^ mine)} tensors differ")
        self.step_count = int(state["step"])
        for (m, t), wm in self.masks.items():
            wm.mask.copy_(masks[f"{m}::{t}"])
        for (m, t, d), v in getattr(self, "_vec_index", {}).items():
            v.copy_(state["vectors"][f"{m}::{t}::{d}"])
        self.criterion.load_state_dict(state["criterion"])
        self.controller.load_state_dict(state["controller"])
        self.history = [UpdateRecord.from_dict(r) for r in state["history"]]
        self.bn_stats.load_state_dict(state.get("bn_stats", {}))

    # ------------------------------------------------------------------ finish
    @property
    def channel_keep_vectors(self) -> Mapping[tuple[str, str, int], torch.Tensor]:
        """``(module, tensor, dim) -> 0/1 keep vector`` of channel granularity (empty otherwise); read-only view."""
        return MappingProxyType(getattr(self, "_vec_index", {}))

    def finalize(self) -> nn.Module:
        """Make the pruning permanent and return a plain model, changed in place (see :mod:`pruning.finalize`)."""
        if self.finalized:
            raise ValueError("this pruner was already finalized; its model is a plain module now")
        self.criterion.detach()
        to_remove = pruned_root_indices(self.groups, self.channel_keep_vectors) if self.granularity == "channel" else {}
        self.finalized = True  # the masks go first: from here on the model has none to update
        return finalize_model(self.model, to_remove, example_inputs=self.example_inputs, forward_fn=self.forward_fn)

    def mask_of(self, layer: str, tensor: str = "weight") -> torch.Tensor:
        """The current mask of ``layer.tensor`` (1 keep, 0 pruned)."""
        wm = get_mask(self.modules[layer], tensor)
        if wm is None:
            raise ValueError(f"{layer}.{tensor} is not masked by this pruner")
        return wm.mask
