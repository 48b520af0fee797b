"""Checks that need the model but nothing expensive: run before Ray starts or OUT is created.

Config load (pydantic) cannot see the architecture, so two refusals of issues #12 / #14 live here,
in the earliest step of :func:`avprune.prune_job.run_prune_job`: a ``pruning.channel_multiple`` no
prunable channel group is wider than (nothing could be pruned), and ``granularity: block`` /
``channel+block`` on a detector without a removable residual block. Both build the untrained
architecture (no checkpoint read, a few seconds) and raise ValueError (exit code 2) naming the field.

:func:`widest_reach_ms` is the latency-table stage's feasibility bound: what the table predicts at
the widest pruning the job allows (every channel group at ``max_sparsity``, aligned to the multiple,
and every removable block gone when blocks are pruned).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from avprune.config.prune import PruneJobConfig

if TYPE_CHECKING:
    from torch import nn

    from avprune.prune_job.env import JobEnv
    from pruning import Pruner
    from pruning.latency_model import LatencyTable


def probe_pruner(env: JobEnv, model: nn.Module, channel_multiple: int) -> Pruner:
    """A zero-sparsity channel pruner on ``model``: its coupled groups and ``config_at``."""
    from pruning import Pruner
    from pruning.controllers import build_controller

    imp = env.config.pruning.importances[0]
    return Pruner(model, importance=imp, granularity="channel", controller=build_controller("fixed", sparsity=0.0),
                  example_inputs=env.example_input(), channel_multiple=channel_multiple,
                  layer_filter=env.layer_filter(model, imp))


def check_channel_multiple_fits(group_sizes: Mapping[str, int], multiple: int, model_name: str) -> None:
    """ValueError when no channel group is wider than ``multiple`` (a group can only lose whole multiples)."""
    if not group_sizes:
        raise ValueError(f"{model_name}: no prunable channel group (pruning.granularity 'channel' has nothing to prune)")
    widest = max(group_sizes.values())
    if multiple >= widest:
        raise ValueError(f"pruning.channel_multiple: {multiple} is not below the widest prunable channel group of "
                         f"{model_name} ({widest} channels), so no layer could lose a group; use 16 (ORT AVX-512), "
                         "8 (AVX2) or 'auto'")


def check_model(config: PruneJobConfig) -> None:
    """The model-dependent refusals (channel multiple, blocks); ValueError naming the field and model."""
    from avprune.prune_job.env import JobEnv

    p = config.pruning
    env = JobEnv.from_config(config)
    if p.prunes_channels and isinstance(p.channel_multiple, int):
        pruner = probe_pruner(env, env.build_architecture(), p.channel_multiple)
        check_channel_multiple_fits({g.root: g.size for g in pruner.groups}, p.channel_multiple, config.model.name)
    if p.prunes_blocks:
        model_blocks(env)


def model_blocks(env: JobEnv) -> list[str]:
    """The detector's removable residual blocks; ValueError naming the model when it has none."""
    from pruning.blocks import require_blocks
    from pruning.filters import detector_core_forward, is_detector

    model = env.build_architecture().eval()
    try:
        blocks = require_blocks(model, env.example_input(), detector_core_forward if is_detector(model) else None)
    except ValueError as e:
        raise ValueError(f"pruning.granularity {env.config.pruning.granularity!r}: model "
                         f"{env.config.model.name!r}: {e}") from None
    return [b.name for b in blocks]


def widest_reach_ms(table: LatencyTable, pruner: Pruner, max_sparsity: float,
                    block_ms: Mapping[str, float] | None = None) -> float:
    """Predicted latency at the widest allowed pruning (every group at ``max_sparsity``, aligned; minus
    every removable block's measured saving when blocks are pruned)."""
    ms = float(table.predict(pruner.config_at(max_sparsity)))
    return ms - sum(max(0.0, v) for v in (block_ms or {}).values())


def budget_unreachable_message(budget_ms: float, reach_ms: float, dense_ms: float, max_sparsity: float,
                               multiple: int) -> str:
    """Why the job stops before fine-tuning, and the nearest budget it could meet."""
    return (f"budget.latency_ms: {budget_ms:.2f} ms is below what the latency table predicts at the widest "
            f"allowed pruning ({reach_ms:.2f} ms: every channel group at pruning.max_sparsity {max_sparsity:g}, "
            f"multiple {multiple}; dense {dense_ms:.2f} ms); nearest feasible budget: latency_ms >= "
            f"{reach_ms:.2f} (speedup <= {dense_ms / reach_ms:.2f}), or raise pruning.max_sparsity")


__all__ = ["budget_unreachable_message", "check_channel_multiple_fits", "check_model", "model_blocks",
           "probe_pruner", "widest_reach_ms"]
