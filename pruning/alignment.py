"""``channel_multiple: auto``: probe which channel multiple the target runtime runs fastest.

Runtimes lay channels out in blocks: ONNX Runtime's CPU convs use NCHWc with 16 channels per block
on AVX-512 (8 on AVX2), TensorRT's tensor-core tiles are 8/16/32 channels (HALP prunes in groups of
32-128 on GPU for this reason). A count off the block is padded (its MACs are paid, nothing saved)
or falls out of the blocked path altogether. Which multiple pays is a property of the runtime and
the machine, so we measure it: a few representative layers are timed at about the same width
rounded to each candidate multiple, and the multiple with the lowest time per MAC wins (the smallest
multiple among those within ``tolerance`` of the best, since finer groups cost less accuracy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pruning.latency_model import LatencyTable, LayerSpec, MeasureFn

CANDIDATES = (1, 8, 16, 32)


@dataclass(frozen=True)
class MultipleChoice:
    """The chosen multiple, why, and what was measured (µs per million MACs, summed over the probe layers)."""

    multiple: int
    reason: str
    measured: tuple[tuple[int, float], ...]  # (multiple, cost) per candidate


def _probe_count(full: int, fraction: float, multiple: int) -> int:
    """About ``fraction`` of ``full`` channels as a count the multiple allows.

    ``multiple == 1`` stands for free counts, which in practice are off the block: the probe takes
    the nearest count that is not a multiple of 8.
    """
    want = max(1, int(round(full * fraction)))
    if multiple == 1:
        return want - 1 if want % 8 == 0 and want > 1 else want
    return max(multiple, int(round(want / multiple)) * multiple)


def _macs(spec: LayerSpec, cin: int, cout: int) -> float:
    stride = spec.stride[0] * spec.stride[1]
    groups = cin if spec.depthwise else spec.groups
    return spec.input_hw[0] * spec.input_hw[1] / stride * (cin / groups) * cout * spec.kernel[0] * spec.kernel[1]


def representative_layers(table: LatencyTable, n: int = 4, min_channels: int = 64) -> list[LayerSpec]:
    """The ``n`` dense convs of ``table`` with the largest measured full-width latency (wide enough to probe)."""
    specs = [
        (table.entries.get(s.key(s.in_channels, s.out_channels), 0.0), name, s)
        for name, s in table.layers.items()
        if s.type == "conv" and not s.depthwise and s.groups == 1 and min(s.in_channels, s.out_channels) >= min_channels
    ]
    return [s for _, _, s in sorted(specs, key=lambda t: (-t[0], t[1]))[:n]]


def choose_channel_multiple(
    measure_fn: MeasureFn,
    layers: Sequence[LayerSpec],
    *,
    candidates: Sequence[int] = CANDIDATES,
    fraction: float = 0.55,
    tolerance: float = 0.03,
) -> MultipleChoice:
    """Time ``layers`` at ~``fraction`` width rounded to each candidate; return the fastest multiple and why."""
    if not layers:
        raise ValueError("choose_channel_multiple needs at least one layer to probe (e.g. representative_layers(table))")
    if not candidates or any(not isinstance(c, int) or c < 1 for c in candidates):
        raise ValueError(f"candidates must be ints >= 1; got {candidates!r}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction!r}")
    costs: list[tuple[int, float]] = []
    for m in candidates:
        total = 0.0
        for spec in layers:
            cin = spec.in_channels if spec.in_channels <= m else _probe_count(spec.in_channels, fraction, m)
            cout = spec.out_channels if spec.out_channels <= m else _probe_count(spec.out_channels, fraction, m)
            ms = float(measure_fn(spec.build(cin, cout).eval(), spec.input_shape(cin)))
            total += 1e3 * ms / max(_macs(spec, cin, cout) / 1e6, 1e-9)
        costs.append((m, total))
    best = min(c for _, c in costs)
    ok = sorted(m for m, c in costs if c <= best * (1.0 + tolerance))
    chosen = ok[0]
    table = ", ".join(f"{m}: {c:.3g}" for m, c in costs)
    reason = (f"multiple {chosen} has the lowest time per MAC (within {tolerance:.0%} of the best, smallest such) "
              f"on {len(layers)} probe layers at ~{fraction:.0%} width; µs per M MACs by multiple: {table}")
    if math.isclose(best, 0.0):
        reason += " (all probes measured ~0 ms: the measuring callable may be too coarse)"
    return MultipleChoice(multiple=chosen, reason=reason, measured=tuple(costs))
