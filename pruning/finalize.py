"""Make pruning permanent: a plain ``nn.Module`` with no parametrizations.

- ``channel``: masked channels are removed physically with Torch-Pruning (``group.prune()`` on the
  chosen indices), so the result is a smaller torchvision model that trains, saves and exports.
  Kept counts are already multiples of ``round_to`` (the masks were rounded up at every update),
  so the finalized model computes exactly what the masked model computed.
- ``unstructured`` / ``nm``: masks are squashed into the weights (``stored * mask``) and the
  parametrizations removed; the N:M pattern survives as exact zeros in TensorRT's layout.

``Pruner.finalize()`` calls these with its groups and keep vectors; this module never sees the
Pruner (imports point one way: pruner -> finalize).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pruning.groups import ChannelGroup, flatten_tensors, run_forward
from pruning.masks import remove_masks

log = logging.getLogger(__name__)


def pruned_root_indices(
    groups: Sequence[ChannelGroup], keep_vectors: Mapping[tuple[str, str, int], torch.Tensor]
) -> dict[str, list[int]]:
    """Per channel group (by root layer), the root-space indices its masks prune.

    ``keep_vectors`` maps ``(module, tensor, dim)`` to that tensor's 0/1 keep vector
    (:attr:`pruning.pruner.Pruner.channel_keep_vectors`).
    """
    return {g.root: [int(i) for i in torch.nonzero(root_keep(g, keep_vectors) == 0).flatten()] for g in groups}


def root_keep(g: ChannelGroup, keep_vectors: Mapping[tuple[str, str, int], torch.Tensor]) -> torch.Tensor:
    """A channel group's 0/1 keep vector in root index space, read from its root layer's output mask."""
    keep = torch.ones(g.size)
    for mem in g.members:
        if mem.role == "out" and mem.module == g.root:
            keep[mem.root_idxs] = keep_vectors[(mem.module, "weight", 0)][mem.idxs]
            break
    return keep


def finalize_model(
    model: nn.Module, to_remove: Mapping[str, Sequence[int]], *, example_inputs: Any = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> nn.Module:
    """Squash the masks into the weights, then remove the channels ``to_remove`` (root layer ->
    root-space indices, from :func:`pruned_root_indices`) physically; returns ``model``, changed in place.

    ``example_inputs``/``forward_fn`` trace Torch-Pruning's dependency graph; they are needed only
    when channels are removed.
    """
    remove_masks(model, apply=True)
    if not any(to_remove.values()):
        return model
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(
                model,
                example_inputs=example_inputs,
                forward_fn=lambda m, x: run_forward(m, x, forward_fn),
                output_transform=flatten_tensors,
                verbose=False,
            )
    finally:
        model.train(was_training)
    modules = dict(model.named_modules())
    for root, idxs in to_remove.items():
        if not idxs:
            continue
        mod = modules[root]
        fn = tp.prune_linear_out_channels if isinstance(mod, nn.Linear) else tp.prune_conv_out_channels
        group = dg.get_pruning_group(mod, fn, list(idxs))
        group.prune()
    removed = sum(len(v) for v in to_remove.values())
    log.info("finalize removed %d channels across %d groups", removed, sum(1 for v in to_remove.values() if v))
    return model
