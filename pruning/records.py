"""Per-update records: what the pruner decided and why (the interpretability trail)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class LayerRecord:
    """One unit (a layer, or a coupled channel group named by its root layer) at one update.

    ``threshold`` is on normalised importance ŝ = s / mean(s) (see :mod:`pruning.granularity`);
    ``importance`` summarises ŝ over the unit (min / median / max), so a threshold near the
    median means about half of the unit is pruned.
    """

    target: float  # sparsity the controller asked for
    threshold: float
    sparsity: float  # sparsity actually applied (after rounding channel counts / N:M quantisation)
    importance: dict[str, float] = field(default_factory=dict)
    channels: int | None = None  # kept channels (channel granularity)
    # channels that changed side at this update beyond the kept count's change (a pruned one in for
    # a kept one out counts 1); None in records written before it was counted
    swapped: int | None = None


@dataclass(frozen=True)
class UpdateRecord:
    """All units at one mask update."""

    step: int
    layers: dict[str, LayerRecord]
    predicted_latency_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> UpdateRecord:
        return UpdateRecord(
            step=int(d["step"]),
            layers={k: LayerRecord(**v) for k, v in d["layers"].items()},
            predicted_latency_ms=d.get("predicted_latency_ms"),
        )
