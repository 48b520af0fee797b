"""Stage 6, finalize: the artifacts of the selected candidate.

    OUT/pruned.pt            avprune checkpoint of the physically smaller model
    OUT/pruned.onnx          its core graph, verified against PyTorch (outputs, detections, mAP)
    OUT/latency_table.json   the latency table the budget controller predicted with
    OUT/report.json          every number of the job; OUT/report.html the same, with figures

Every file is written atomically; the stage record is written after all of them, so a job
killed here is finalized again on ``--resume``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from avprune.prune_job.context import StageContext
from avprune.prune_job.gate_fold_stage import gate_fold_section
from avprune.prune_job.records import (
    BaselineRecord,
    FinalizeRecord,
    GateFoldRecord,
    JSONDict,
    LatencyTableRecord,
    SearchRecord,
    SelectRecord,
    SensitivityRecord,
    )
from avprune.prune_job.report import write_report_html, write_report_json
from avprune.prune_job.report_blocks import block_section
from avprune.prune_job.select import floor_block
from perception.io import atomic_write_bytes

if TYPE_CHECKING:
    from torch import nn

    from deploy.timing import LatencySummary, PairedTiming

log = logging.getLogger(__name__)


def channel_sparsity(pruned: nn.Module, dense: nn.Module) -> dict[str, dict[str, float]]:
    """Fraction of output channels removed per Conv2d/Linear, read off the two architectures."""
    from torch import nn

    widths = {n: m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
              for n, m in dense.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    out = {}
    for name, m in pruned.named_modules():
        if name in widths and isinstance(m, nn.Conv2d | nn.Linear):
            kept = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            if kept < widths[name]:
                out[name] = {"sparsity": 1.0 - kept / widths[name], "channels": kept}
    return out


def channel_widths(pruned: nn.Module, dense: nn.Module) -> dict[str, dict[str, int]]:
    """Dense vs kept output channels of every Conv/Linear the dense model has (removed blocks: absent)."""
    from torch import nn

    def width(m: nn.Module) -> int:
        return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features

    kept = {n: width(m) for n, m in pruned.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    return {n: {"dense": width(m), "kept": kept[n]} for n, m in dense.named_modules()
            if isinstance(m, nn.Conv2d | nn.Linear) and n in kept}


def with_latency_shares(channels: dict[str, dict[str, Any]], table_path: Path) -> dict[str, dict[str, Any]]:
    """Each layer's share of the dense model's summed table latency, beside its widths."""
    from pruning.latency_model import LatencyTable

    if not table_path.is_file():
        return channels
    table = LatencyTable.load(table_path)
    full = table.resolve({})
    ms = {n: table.layer_latency(n, *full[n]) for n in table.layers}
    total = sum(ms.values())
    for n, v in channels.items():
        if n in ms and total > 0:
            v["latency_share"] = ms[n] / total
    return channels


def frame_figures(timing: PairedTiming) -> JSONDict:
    """Graph and frame p50/p99 of dense and pruned from ONE paired run, the per-stage split
    (preprocess, graph, decode + NMS) and both speed-ups (frame: with its bootstrap interval)."""
    def pp(s: LatencySummary) -> JSONDict:
        return {"p50_ms": s.p50_ms, "p99_ms": s.p99_ms}

    models = {
        name: {"frame": pp(timing.summaries[name]), "preprocess": pp(timing.stages[name]["preprocess"]),
               "graph": pp(timing.stages[name]["graph"]), "decode_nms": pp(timing.stages[name]["postprocess"])}
        for name in ("dense", "pruned")
    }
    return {**models,
            "frame_speedup": timing.ratios["pruned"].to_dict(),
            "graph_speedup": models["dense"]["graph"]["p50_ms"] / models["pruned"]["graph"]["p50_ms"],
            "blocks": timing.blocks, "block_size": timing.block_size,
            "how": "deploy.timing.time_runtimes: batch 1, val frames, the models alternating frame by frame"}


def run(ctx: StageContext) -> FinalizeRecord:
    """Write the pruned checkpoint, ONNX, latency table copy and reports."""
    from perception.models import save_checkpoint

    cfg, env, out = ctx.config, ctx.env, ctx.out_dir
    base, sel, search = ctx.record(BaselineRecord), ctx.record(SelectRecord), ctx.record(SearchRecord)
    cand = search.candidate(sel.candidate_id)  # "c0@60": candidate c0's snapshot at step 60
    model = env.load_model(out / sel.checkpoint)
    row = sel.selected
    floor = base.map_floor if sel.map_floor is None else sel.map_floor  # the dense shadow's, when one ran
    stem = "pruned" if sel.feasible else "best_tradeoff"  # never call a miss "pruned"
    ctx.progress.stage_start("finalize", note="checkpoint + ONNX")
    c = cand.candidate
    save_checkpoint(out / f"{stem}.pt", model, extra={"prune_job": {
        "candidate": {"importance": c.importance, "controller": c.controller, "ramp": c.ramp,
                      "candidate_id": sel.candidate_id},
        "map": row.map, "p50_ms": row.p50_ms, "latency_budget_ms": base.latency_budget_ms,
        "map_floor": floor, "runtime": cfg.budget.runtime, "device": cfg.budget.device,
    }})
    verified = env.export_verified(model, out / f"{stem}.onnx")  # raises unless outputs and mAP match
    onnx_path = verified.path
    table_src = Path(ctx.record(LatencyTableRecord).path)
    table = json.loads(table_src.read_text()) if table_src.is_file() else None
    if table_src.is_file():
        atomic_write_bytes(out / "latency_table.json", table_src.read_bytes())
    pruning_file = out / (cand.pruning_record or "")
    final_model = "@" not in sel.candidate_id  # the pruner's records describe the final model only
    pruning: JSONDict = json.loads(pruning_file.read_text()) if final_model and pruning_file.is_file() else {}
    if not pruning.get("layers"):
        pruning["layers"] = channel_sparsity(model, env.build_start_architecture())
    pruned = row.summary()
    speedup = base.dense.p50_ms / pruned.p50_ms
    sens = ctx.find(SensitivityRecord)
    table_rec = ctx.record(LatencyTableRecord)
    p = cfg.pruning
    doc = {
        "candidate_id": sel.candidate_id,
        "feasible": sel.feasible,
        "infeasible": None if sel.infeasible is None else sel.infeasible.to_dict(),
        "dense": base.dense.to_dict(),
        "pruned": pruned.to_dict(),
        "speedup": speedup,
        "latency_budget_ms": base.latency_budget_ms,
        # what the trials aimed at (budget.latency_margin under the budget); select judged at the budget
        "search_target_ms": cfg.budget.search_target(base.latency_budget_ms),
        "map_floor": floor,
        "floor": floor_block(cfg, base, sel, search),
        "runtime": cfg.budget.runtime,
        "device": cfg.budget.device,
        "threads": cfg.budget.threads,
        "candidates": [c.to_dict() for c in search.candidates],
        "measured": [m.to_dict() for m in sel.measured],
        "pareto": [p.to_dict() for p in sel.pareto],
        "sensitivity": sens.to_dict() if sens is not None else {},
        "layers": pruning.get("layers", {}),
        "channels": with_latency_shares(channel_widths(model, env.build_start_architecture()), table_src),
        "channel_multiple": {"value": table_rec.channel_multiple, "reason": table_rec.channel_multiple_reason,
                             "configured": p.channel_multiple},
        "allocation": {"controller": c.controller, "granularity": p.granularity,
                       "mode": p.allocation if c.controller == "allocation" else f"{c.controller} (one global ratio)"},
        "widest_reach_ms": table_rec.widest_reach_ms,
        # pruning.reconstruct_images: when the candidate's cut was re-solved, how many layers, their error
        "reconstruction": pruning.get("reconstruction"),
        **block_section(env, model, pruning, table_rec.block_ms, base.dense.p50_ms),  # issue #14
        # pruning.fold_gates: the gates folded before pruning, what the fold alone cost and gave
        "gate_fold": gate_fold_section(ctx.find(GateFoldRecord), base),
        "pruner_history": pruning.get("history", []),
        "artifacts": {"checkpoint": f"{stem}.pt", "onnx": onnx_path.name, "latency_table": "latency_table.json"},
        "onnx_verification": verified.to_dict(),
        "config": cfg.model_dump(mode="json"),
    }
    ctx.progress.stage_start("finalize", note="paired frame timing")
    doc["frame_timing"] = frame_figures(env.frame_timing(env.load_dense(), model, out / "work"))
    doc["baseline_latency"] = {"p50_ms": base.latency.p50_ms, "blocks_ms": list(base.latency_blocks_ms),
                               "spread": base.latency_spread()}
    ctx.progress.stage_start("finalize", note="report")
    write_report_json(out / "report.json", doc)
    write_report_html(out / "report.html", doc, table)
    return FinalizeRecord(pruned=pruned, checkpoint=f"{stem}.pt", onnx=onnx_path.name, report_json="report.json",
                          report_html="report.html", speedup=speedup)
