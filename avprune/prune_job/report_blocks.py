"""The depth-pruning part of the job report (issue #14): which blocks went, when, what each saved
and what each costs.

For every block the selected model no longer has: its latency from the latency-table stage (the
model timed with and without it) and its share of the dense model's measured latency; when its gate
started fading and reached 0 (the gate history of :class:`pruning.block_gates.BlockGates`), its
Taylor importance at the decision, and its **mAP cost**: :func:`pruning.blocks.block_sensitivity` on
the dense checkpoint, i.e. the job's val mAP with that block alone removed, against the dense mAP,
in points (a measured scan, as the channel sensitivity stage does for layers). Blocks that faded and
ramped back up are listed too, with the step they turned around.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from avprune.prune_job.env import JobEnv

log = logging.getLogger(__name__)


def map_cost_points(env: JobEnv, blocks: Sequence[str]) -> dict[str, float]:
    """mAP points lost on the job's val images when each block alone is removed from the dense model."""
    from pruning.blocks import block_sensitivity

    if not blocks:
        return {}
    dense = env.load_dense().eval()
    drops = block_sensitivity(dense, lambda m: env.evaluate_map(m).map, list(blocks))
    return {n: 100.0 * d for n, d in drops.items()}


def _first(events: Sequence[Mapping[str, Any]], block: str, kind: str) -> int | None:
    return next((int(e["step"]) for e in events if e.get("block") == block and e.get("event") == kind), None)


def block_rows(removed: Sequence[str], pruning: Mapping[str, Any], block_ms: Mapping[str, float],
               dense_ms: float | None, cost: Mapping[str, float]) -> list[dict[str, Any]]:
    """One row per removed block and per block that ramped back (``pruning``: the trial's pruning.json)."""
    events = pruning.get("block_events") or []
    importance = pruning.get("block_importance") or {}
    restored = [b for b in pruning.get("blocks_restored") or [] if b not in removed]
    rows = []
    for b in [*removed, *restored]:
        ms = block_ms.get(b)
        rows.append({
            "block": b, "status": "removed" if b in removed else "ramped back",
            "latency_ms": ms, "share": (ms / dense_ms) if ms is not None and dense_ms else None,
            "fading_step": _first(events, b, "fading"), "removed_step": _first(events, b, "removed"),
            "restoring_step": _first(events, b, "restoring"), "importance": importance.get(b),
            "map_cost_points": cost.get(b),
        })
    return rows


def block_section(env: JobEnv, model: nn.Module, pruning: Mapping[str, Any], block_ms: Mapping[str, float],
                  dense_ms: float | None) -> dict[str, Any]:
    """report.json's ``removed_blocks`` and ``restored_blocks`` (rows above), ``block_events`` and
    ``block_decision``."""
    folded = set(env.folded_gates)  # gates the gate_fold stage replaced: report.json's gate_fold, not depth
    removed = [b for b in getattr(model, "avprune_meta", {}).get("removed_blocks", []) if b not in folded]
    restored = [b for b in pruning.get("blocks_restored") or [] if b not in removed]
    try:
        cost = map_cost_points(env, [*removed, *restored])
    except Exception as e:  # noqa: BLE001 - the report must not fail on a diagnostic
        log.warning("block mAP cost not measured: %s", e)
        cost = {}
    rows = block_rows(removed, pruning, block_ms, dense_ms, cost)
    return {
        "removed_blocks": [r for r in rows if r["status"] == "removed"],
        "restored_blocks": [r for r in rows if r["status"] != "removed"],
        "block_events": list(pruning.get("block_events") or []),
        "block_decision": {k: pruning.get(k) for k in ("block_decide_step", "blocks_chosen", "blocks_restored")
                           if k in pruning},
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return html.escape(str(v))


def blocks_html(doc: Mapping[str, Any]) -> str:
    """The report.html section ("" when no block was removed or brought back)."""
    rows = [*(doc.get("removed_blocks") or []), *(doc.get("restored_blocks") or [])]
    if not rows:
        return ""
    cols = ["block", "status", "latency_ms", "share", "fading_step", "removed_step", "restoring_step",
            "importance", "map_cost_points"]
    head = "".join(f"<th>{c}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    gone = [r for r in rows if r.get("status", "removed") == "removed"]
    share = sum(r.get("share") or 0.0 for r in gone)
    cost = [r["map_cost_points"] for r in gone if r.get("map_cost_points") is not None]
    events = doc.get("block_events") or []
    ev = "".join(f"<tr><td>{_fmt(e.get('step'))}</td><td>{_fmt(e.get('block'))}</td><td>{_fmt(e.get('event'))}</td></tr>"
                 for e in events)
    return (f"<h2>Removed blocks ({len(gone)})</h2><p>Residual blocks replaced by their skip connection: "
            f"{share:.0%} of the dense latency by the latency table's single-block timings"
            + (f"; mAP cost of each alone on the dense model (val images): {sum(cost):.2f} points summed" if cost else "")
            + ". <i>latency_ms</i>: the model timed with and without the block; <i>share</i>: of the dense "
            "model's measured latency; steps: when the gate started fading, reached 0, or turned back; "
            "<i>importance</i>: Taylor estimate |dL/dg| at the end; <i>map_cost_points</i>: "
            "pruning.blocks.block_sensitivity on the dense checkpoint.</p>"
            f"<table><tr>{head}</tr>{body}</table>"
            + (f"<h3>Gate events</h3><table><tr><th>step</th><th>block</th><th>event</th></tr>{ev}</table>" if ev else ""))


__all__ = ["block_rows", "block_section", "blocks_html", "map_cost_points"]
