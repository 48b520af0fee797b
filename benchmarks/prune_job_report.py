"""The RESULTS.md section of ``benchmarks.prune_job``, from its JSON record alone (``--report-only``)."""

from __future__ import annotations

from typing import Any

from benchmarks.prune_job_front import target_line

_TARGET_LABELS = {"issue12_required": "#12 required, channel", "issue12_target": "#12 target, channel",
                  "issue14_target": "#14 target, channel+block"}


def _f(v: Any, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def _ci(v: Any) -> str:
    return "" if not v else f" [{v[0]:.2f}, {v[1]:.2f}]"


def markdown(record: dict[str, Any], png: str, tag: str = "prune_job") -> str:
    quick = record["quick"]
    title = tag if tag.startswith("prune_job") else f"prune_job ({tag})"
    lines = [f"## {title}{' (--quick smoke run: not a measurement)' if quick else ''}", "", record["machine"], ""]
    cfg = next(iter(record["config"].values()))
    ft, p = cfg["finetune"], cfg["pruning"]
    jobs = record["jobs"]
    lines.append(
        f"One prune job per granularity ({', '.join(f'`{g}`' for g in jobs)}) on SSDlite320 "
        f"({cfg['budget']['input_size'][0]}x{cfg['budget']['input_size'][1]}), budget **{record['budget_speedup']}x "
        f"lower graph latency** on ONNX Runtime (CPU, {cfg['budget']['threads']} threads) at <= "
        f"{record['max_drop_points']} mAP-point drop; {record['candidates_per_granularity']} candidates each "
        f"(importances {', '.join(p['importances'])}), **{record['steps']} fine-tune steps** (the benchmark's choice: "
        f"#12's minimum; {_ramps_text(record)}), "
        + (f"peak rate {ft['lr']:g}, " if "lr" in ft else "")
        + f"batch {ft['batch_size']}, controller `{p['controller']}`"
        + (f" (allocation `{p.get('allocation')}`" + (", MAC costs" if p.get("latency_costs") == "macs" else "")
           + ")" if p.get("allocation") else "")
        + f", channel groups of {p['channel_multiple']}, distillation {'on' if ft.get('distill', True) else 'off'}"
        + (f", each cut re-solved against the dense model on {p['reconstruct_images']} training images once it reached "
           "the budget (`pruning.reconstruct_images`)" if p.get("reconstruct_images") else "")
        + (f", squeeze-excitation gates folded before pruning on {p['fold_gates']} training images "
           "(`pruning.fold_gates`)" if p.get("fold_gates") else "")
        + (f", trials aiming {cfg['budget']['latency_margin']:.0%} under the budget (`budget.latency_margin`; "
           "select judges at the budget)" if cfg["budget"].get("latency_margin") else "")
        + ". "
          f"*dense-long*: the dense checkpoint fine-tuned {record['steps']} steps with the same recipe, without pruning"
        + (" (the first job's dense shadow, the model its floor was judged against)"
           if record.get("dense_long_source") == "shadow" else " (trained apart from the jobs' shadows)")
        + "; "
          f"its mAP on the jobs' val images ({record['dense_long_map_job_val']:.3f}) minus {record['max_drop_points']} "
          f"point ({record['map_floor']:.3f}) is the benchmark's floor, and every drop below is against it. Each job "
          f"judges its own floor against a dense shadow trained alongside (same recipe and seed; the shadow's mAP at "
          f"each measured step minus {record['max_drop_points']} point). Every model deployed at score threshold "
          f"{cfg['budget'].get('score_thresh')}. Whole benchmark {record.get('wall_s', 0) / 60:.1f} min.")
    lines += ["", "| job | wall s | peak RSS GiB | selected | note |", "|---|---:|---:|---|---|"]
    for g, j in jobs.items():
        note = j.get("infeasible") or ""
        if j.get("unreachable"):
            note = (f"budget unreachable by the latency table ({j['unreachable'][:160]}); run at the nearest "
                    f"feasible budget, {_f(j.get('latency_budget_ms'))} ms. {note}")
        stages = ", ".join(f"{k} {v:.0f}" for k, v in (j.get("stage_wall_s") or {}).items())
        lines.append(f"| {g} | {j['job_wall_s']:.0f}{f' ({stages})' if stages else ''} | {j['peak_rss_gib']:.2f} | {j.get('candidate_id') or '-'} "
                     f"| {note[:400]} |")
    for g, j in jobs.items():
        fold = j.get("gate_fold") or {}
        if fold.get("gates") and fold.get("p50_ms") and j.get("dense_graph_ms"):
            lines += ["", f"`{g}` folded {fold['gates']} squeeze-excitation gates on {fold['images']} training images "
                          f"before pruning (`gate_fold` stage, {fold.get('seconds') or 0:.0f} s): the folded model, before "
                          f"any fine-tuning, at mAP {fold['map']:.3f} and graph p50 {fold['p50_ms']:.2f} ms "
                          f"({j['dense_graph_ms'] / fold['p50_ms']:.2f}x the dense {j['dense_graph_ms']:.2f} ms, timed "
                          "paired in the job)."]
    table = record["side_by_side"]
    if table:
        lines += ["", "Side by side (mAP on the same val images; latency paired and interleaved, "
                      "`deploy.timing.time_runtimes`, speed-ups are paired ratios vs dense with 95% intervals):", "",
                  "| model | mAP | drop vs dense-long (points) | graph p50 ms | graph speed-up | frame p50 ms | "
                  "frame speed-up | params M | GMACs |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        dl = table["dense_long"]["map"]
        for name, r in table.items():
            lines.append(f"| {name} | {r['map']:.3f} | {100 * (dl - r['map']):.2f} | {r['graph_p50_ms']:.2f} | "
                         f"{r['graph_speedup']:.2f}x{_ci(r.get('graph_speedup_ci'))} | {r['frame_p50_ms']:.2f} | "
                         f"{r['frame_speedup']:.2f}x{_ci(r.get('frame_speedup_ci'))} | {r['params'] / 1e6:.2f} | "
                         f"{r['gmacs']:.3f} |")
    cands = record["candidates"]
    if cands:
        lines += ["", "| candidate | multiple | blocks removed | blocks ramped back | feasible (side by side) |",
                  "|---|---:|---|---|---|"]
        for c in cands:
            lines.append(f"| {c['name']} | {c.get('channel_multiple') or '-'} | "
                         f"{', '.join(c.get('removed_blocks') or []) or '-'} | "
                         f"{', '.join(c.get('blocks_restored') or []) or '-'} | {'yes' if c['feasible'] else 'no'} |")
    lines += ["", f"![Pareto fronts](results/{png})", "",
              "Pareto fronts (graph speed-up vs mAP drop against dense-long) over the final models and the "
              f"candidates' measured points during the search (every {record['measure_every']} steps; their "
              "latency was measured in the trial, paired with the dense model, the node's other trials paused, "
              "and expressed at the baseline's dense latency; speed-up = the baseline's dense p50 over "
              "that):", ""]
    for g, front in record["pareto"].items():
        pts = ", ".join(f"{q['graph_speedup']:.2f}x @ {q['map_drop_points']:.2f} ({q['name']})" for q in front)
        lines.append(f"- `{g}`: {pts or 'no point'}")
    comp = record.get("comparison")
    if comp is not None:
        if comp.get("drops"):
            ratios = ", ".join(f"{r:.2f}x at {d:.2f}" for d, r in zip(comp["drops"], comp["ratios"], strict=True)
                               if r is not None)
            lines += ["", f"channel+block vs channel at equal drop (fronts interpolated, drops "
                          f"{comp['range'][0]:.2f} to {comp['range'][1]:.2f} points): speed-up ratio {ratios}; "
                          f"worst {_f(comp.get('min_ratio'))}x vs the required {comp['gain']:.2f}x: "
                          f"**{'met' if comp['met'] else 'NOT met'}**."]
        else:
            lines += ["", f"channel+block vs channel at equal drop: **NOT met** ({comp.get('reason')})."]
    for key, t in record.get("targets", {}).items():
        _, line = target_line(_TARGET_LABELS.get(key, key), t.get("best"), t["speedup"], t["max_drop"])
        fin = t.get("best_final")
        line += (f"; by a final model (side by side): {'met' if t['met_by_final_model'] else 'not met'}"
                 + (f", best {fin['graph_speedup']:.2f}x at {fin['map_drop_points']:.2f} ({fin['name']})" if fin else ""))
        lines.append(f"- {line}.")
    reached = [q for pts in record["points"].values() for q in pts if q["graph_speedup"] >= 2.0]
    if reached:
        q = min(reached, key=lambda q: q["map_drop_points"])
        lines.append(f"- Smallest drop at >= 2.0x graph: {q['map_drop_points']:.2f} points at "
                     f"{q['graph_speedup']:.2f}x ({q['name']}).")
    ceiling = {k: v for k, v in table.items() if k.endswith("(ceiling)")}
    if ceiling:
        top = max(ceiling, key=lambda k: ceiling[k]["graph_speedup"])
        lines += ["", f"Speed ceiling of channel pruning here (Torch-Pruning one-shot, accuracy ignored): {top} "
                      f"of the prunable channels runs its graph **{ceiling[top]['graph_speedup']:.2f}x** faster."]
    sens = record["sensitivity"]
    lines += ["", "Sensitivity stage, 1 vs 2 Ray workers (same layers, same scan; target >= 1.7x):", "",
              "| layers scanned | 1 worker s | 2 workers s | speed-up |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['layers']} | {r['one_worker_s']:.1f} | {r['two_workers_s']:.1f} | **{r['speedup']:.2f}x** |"
              for r in sens]
    lines += ["", f"Raw numbers: `benchmarks/results/{tag}.json` (per candidate `graph_speedup`, `frame_speedup`, "
                  "`map_drop_points`, `channel_multiple`, `feasible`; `pareto` per granularity; `comparison`; `targets`)."]
    return "\n".join(lines)


def _ramps_text(record: dict) -> str:
    """How the candidates reach the budget: ramps (older records hold one ``ramp``); 0 is one-shot."""
    ramps = record.get("ramps", [record.get("ramp", 0.5)])
    parts = ["one-shot (the whole cut at the end of the warm-up, its floor not judged while it recovers)" if r == 0
             else f"a ramp reaching the budget by {r:.0%} of the steps" for r in ramps]
    return "candidates cycle importances x " + "; ".join(parts) + ", the rest recovers"

