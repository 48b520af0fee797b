"""Make pruning permanent: a plain ``nn.Module`` with no parametrizations.

- ``channel``: masked channels are removed physically with Torch-Pruning (``group.prune()`` on the
  chosen indices), so the result is a smaller torchvision model that trains, saves and exports.
  Kept counts are already multiples of ``round_to`` (the masks were rounded up at every update),
  so the finalized model computes exactly what the masked model computed.
- ``unstructured`` / ``nm``: masks are squashed into the weights (``stored * mask``) and the
  parametrizations removed; the N:M pattern survives as exact zeros in TensorRT's layout.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from pruning.groups import flatten_tensors, run_forward
from pruning.masks import remove_masks

if TYPE_CHECKING:
    from pruning.pruner import Pruner

log = logging.getLogger(__name__)


def pruned_root_indices(pruner: Pruner) -> dict[str, list[int]]:
    """Per channel group (by root layer), the root-space indices its masks prune."""
    out: dict[str, list[int]] = {}
    for g in pruner.groups:
        keep = torch.ones(g.size)
        for mem in g.members:
            if mem.role == "out" and mem.module == g.root:
                keep[mem.root_idxs] = pruner._vec_index[(mem.module, "weight", 0)][mem.idxs]
                break
        out[g.root] = [int(i) for i in torch.nonzero(keep == 0).flatten()]
    return out


def finalize(pruner: Pruner) -> nn.Module:
    """Remove masks (and, for channel granularity, the masked channels); returns ``pruner.model``, changed in place."""
    if getattr(pruner, "finalized", False):
        raise ValueError("this pruner was already finalized; its model is a plain module now")
    model = pruner.model
    to_remove = pruned_root_indices(pruner) if pruner.granularity == "channel" else {}
    remove_masks(model, apply=True)
    pruner.finalized = True
    if not any(to_remove.values()):
        return model
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(
                model,
                example_inputs=pruner.example_inputs,
                forward_fn=lambda m, x: run_forward(m, x, pruner.forward_fn),
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
        group = dg.get_pruning_group(mod, fn, idxs)
        group.prune()
    removed = sum(len(v) for v in to_remove.values())
    log.info("finalize removed %d channels across %d groups", removed, sum(1 for v in to_remove.values() if v))
    return model
