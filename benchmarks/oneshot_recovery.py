"""Benchmark: one-shot aligned pruning, then a long distilled fine-tune, beside dense trained as long.

    python -m benchmarks.oneshot_recovery            # the real run (~25 minutes per row on a quiet 2-core machine)
    python -m benchmarks.oneshot_recovery --quick    # a smoke run of the plumbing (printed, not written to RESULTS.md)
    python -m benchmarks.oneshot_recovery --checkpoint DENSE.pt --data COCO_DIR --ratios 0.3,0.4 --steps 1000

Issue #12 asks for the recovery levers measured on and off: the gradual schedule against one-shot,
and the fine-tune length. This is the one-shot side, and the baseline the prune job's gradual
controller has to beat at equal steps (HALP's schedule with its ramp at zero):

1. The dense checkpoint and data of ``benchmarks.prune_job`` (``--checkpoint`` / ``--data``).
2. Per ``--ratios`` value: Torch-Pruning's MetaPruner removes that share of every channel group at
   step 0 (L2 magnitude, counts multiples of ``MULTIPLE``, the heads' output convs kept).
   Per ``--depth BLOCKS:SHARE`` value (issue #14's lever, one-shot): the BLOCKS residual blocks
   that cost the least detection loss per millisecond saved are removed first (measured on the
   checkpoint: :func:`rank_blocks`), then SHARE of every channel group as above.
3. Every row, dense included, gets the same fine-tune: distilled from the checkpoint (the prune
   job's default for SSDlite), AdamW, 10% linear warm-up then cosine, batch 8, one seed, the same
   batches; mAP on the val images every ``--eval-every`` steps (the recovery curves). The dense row
   is "dense trained as long": every drop is against it. ``--feature-weight W`` adds attention
   transfer on the backbone's feature maps to the pruned rows' distillation (the dense row's
   features are its teacher's own, so it keeps the head-only recipe and its cached row).
4. Side by side in one run: mAP, ORT graph (core) and frame (pre-processing + graph + decode/NMS)
   latency timed paired and interleaved (``deploy.timing.time_runtimes``), speed-ups as paired
   ratios with their bootstrap intervals.

Rows are cached by recipe under ``benchmarks/_work/TAG`` (a rerun after a failure
trains only what is missing). Results: ``benchmarks/results/oneshot_recovery.json``, a PNG of the
curves, and the ``oneshot_recovery`` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

from benchmarks._results import ASSETS, check_tag, machine_line, publish
from perception.io import atomic_write_json

log = logging.getLogger("benchmarks.oneshot_recovery")

WORK = Path(__file__).with_name("_work") / "oneshot_recovery"
EXAMPLE = Path(__file__).resolve().parents[1] / "avprune" / "config" / "examples" / "prune_default.yaml"
MULTIPLE = 16  # ORT's NCHWc block on AVX-512: counts off the block save nothing (issue #12)
REQUIRED_SPEEDUP, MAX_DROP_POINTS = 1.5, 1.0  # issue #12's required point


def _config(args: argparse.Namespace, ckpt: Path, coco: Path, work: Path) -> Any:
    """The example job pointed at the checkpoint and data: its env evaluates, exports and times."""
    from avprune.config.prune import load_prune_config

    return load_prune_config(EXAMPLE, {
        "model.checkpoint": str(ckpt),
        "data": {"source": "coco", "root": str(coco), "val_images": args.val_images},
        "budget.score_thresh": 0.01,  # deployed threshold, as in benchmarks.prune_job
        "pruning.fold_gates": 0,  # rows fold after their cut themselves (--fold-gates), not the job's way
        "finetune.steps": args.steps, "finetune.lr": args.lr, "finetune.optimizer": "adamw",
        "finetune.measure_every": min(args.eval_every, args.steps),
        "output_dir": str(work / "job"), "cache_dir": str(WORK.parent / "cache"), "seed": args.seed,
    })


def one_shot(model: Any, ratio: float, input_size: tuple[int, int]) -> Any:
    """``ratio`` of every channel group removed at once, counts multiples of :data:`MULTIPLE`."""
    import torch
    import torch_pruning as tp

    from benchmarks.compare_baselines import head_output_convs
    from pruning.filters import DetectorCore

    if ratio <= 0:
        return model
    model.eval()
    tp.pruner.MetaPruner(DetectorCore(model), torch.zeros(1, 3, *input_size),
                         importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
                         global_pruning=False, ignored_layers=head_output_convs(model), round_to=MULTIPLE).step()
    return model


def uniform_reconstructed(env: Any, ratio: float, images: int) -> tuple[Any, dict[str, Any]]:
    """``ratio`` of every channel group masked by the job's pruner (L2 magnitude, multiples of
    :data:`MULTIPLE`, the same layer filter), the layers reading pruned channels re-solved on
    ``images`` training images (:func:`pruning.reconstruct.reconstruct`), then finalized."""
    from benchmarks.oneshot_knapsack import reconstruct_masked
    from pruning import Pruner
    from pruning.controllers import FixedController

    model = env.load_dense().eval()
    pruner = Pruner(model, importance="magnitude", granularity="channel", controller=FixedController(ratio),
                    example_inputs=env.example_input(1), layer_filter=env.layer_filter(model, "magnitude"),
                    channel_multiple=MULTIPLE)
    pruner.update()
    info = {"reconstruct": reconstruct_masked(env, model, images)}
    return pruner.finalize().eval(), info


def fold_gates_of(env: Any, model: Any, images: int) -> dict[str, Any]:
    """Fold ``model``'s squeeze-excitation gates into their consumer convs as their mean scale over
    ``images`` training images (:func:`pruning.gate_fold.fold_gates`), recorded in the checkpoint's
    architecture like removed blocks; a summary."""
    from perception.models import drop_blocks
    from pruning.filters import detector_core_forward
    from pruning.gate_fold import fold_gates

    t0 = time.perf_counter()
    folds = fold_gates(model, env.calibration_batches(model, images), forward_fn=detector_core_forward)
    drop_blocks(model, [f.gate for f in folds])
    out = {"images": images, "seconds": time.perf_counter() - t0, "gates": [f.gate for f in folds],
           "mean_scale_spread": sum(f.scale_spread for f in folds) / max(len(folds), 1)}
    log.info("folded %d gates on %d images in %.0f s (mean scale spread %.3f)", len(folds), images, out["seconds"],
             out["mean_scale_spread"])
    return out


def rank_blocks(env: Any, cache: Path) -> list[dict[str, Any]]:
    """The dense model's removable blocks, cheapest first: detection-loss increase per ms saved.

    Loss: :func:`perception.loss_probe.loss_metric` on 64 fixed training images (not the val images
    every row is judged on). Latency: :func:`pruning.blocks.block_latency`, the dense core and each
    single removal exported and timed interleaved on ORT (process CPU ms, steady under load).
    Kept in ``cache`` per checkpoint: the timing is noisy, and a rerun that re-ranked would change
    the depth rows' recipes and retrain rows already cached.
    """
    from benchmarks.depth import ort_measure_all
    from perception.loss_probe import loss_metric
    from pruning.blocks import block_latency, block_sensitivity, require_blocks

    ckpt = str(env.config.model.checkpoint)
    if cache.is_file() and json.loads(cache.read_text()).get("checkpoint") == ckpt:
        return json.loads(cache.read_text())["ranking"]
    dense = env.load_dense().eval()
    blocks = require_blocks(dense)
    lat = block_latency(dense, None, blocks, rounds=1, measure_all=ort_measure_all(40, {}))
    loss_up = block_sensitivity(dense, loss_metric(env.train_set, images=64, seed=0), blocks)
    rows = [{"name": b.name, "ms": lat[b.name].ms, "share": lat[b.name].share, "loss_up": loss_up[b.name]}
            for b in blocks]
    # A block timed as saving nothing (noise) is ranked last, whatever its loss.
    ranking = sorted(rows, key=lambda r: r["loss_up"] / r["ms"] if r["ms"] > 0 else float("inf"))
    atomic_write_json(cache, {"checkpoint": ckpt, "ranking": ranking})
    return ranking


def _row(name: str, ratio: float, cfg: Any, args: argparse.Namespace, work: Path,
         blocks: tuple[str, ...] = (), knapsack: float | None = None, recon: int = 0, fold: int = 0) -> dict[str, Any]:
    """Remove ``blocks``, prune (``ratio`` > 0 uniformly, or HALP's knapsack to the measured speed-up
    ``knapsack``) and fine-tune one row, or reuse it when its recipe is cached."""
    from avprune.prune_job.env import JobEnv
    from perception.distill import DistilledDetector
    from perception.models import drop_blocks, save_checkpoint
    from perception.train import TrainSettings, train

    folder = work / name.replace(" ", "_").replace("%", "pct")
    recipe = {"checkpoint": str(cfg.model.checkpoint), "ratio": ratio, "multiple": MULTIPLE, "steps": args.steps,
              "lr": args.lr, "eval_every": args.eval_every, "val_images": args.val_images, "seed": args.seed,
              "distill": True}
    feature_weight = args.feature_weight if ratio > 0 or blocks or knapsack else 0.0
    if feature_weight > 0:  # only then in the key: rows cached before the option stay valid
        recipe["feature_weight"] = feature_weight
    if blocks:
        recipe["blocks"] = list(blocks)
    if recon:  # only then in the key: rows cached before the option stay valid
        recipe["reconstruct"] = recon
    if fold:
        recipe["fold_gates"] = fold
    if knapsack:
        recipe["knapsack"], recipe["knapsack_cost"] = knapsack, args.knapsack_cost
        if args.knapsack_share is not None:
            recipe["knapsack_share"] = args.knapsack_share
    done = folder / "row.json"
    if done.is_file() and json.loads(done.read_text()).get("recipe") == recipe:
        log.info("%s: cached (%s)", name, done)
        return json.loads(done.read_text())
    env = JobEnv.from_config(cfg)
    teacher = env.load_dense().eval()
    cut: dict[str, Any] = {}
    if knapsack:
        from benchmarks.allocation import damage_curves
        from benchmarks.oneshot_knapsack import knapsack_cut

        folder.mkdir(parents=True, exist_ok=True)
        damage, _ = damage_curves(Path(cfg.model.checkpoint), env.train_set)
        student, cut = knapsack_cut(env, knapsack, damage, folder, cost=args.knapsack_cost, share=args.knapsack_share,
                                    reconstruct_images=recon)
    elif recon:
        student, cut = uniform_reconstructed(env, ratio, recon)
    else:
        student = copy.deepcopy(teacher)
        drop_blocks(student, list(blocks))  # depth first, so the width cut sees the shallower graph
        student = one_shot(student, ratio, tuple(cfg.budget.input_size))
    folded = fold_gates_of(env, student, fold) if fold else None  # after the width cut: it timed the gates in
    settings = TrainSettings(steps=args.steps, batch_size=8, optimizer="adamw", lr=args.lr,
                             warmup_steps=cfg.finetune.warmup(), checkpoint_every=10**9, seed=args.seed, num_threads=2)
    t0 = time.perf_counter()
    start = env.evaluate_map(student).map
    log.info("%s: ratio %.2f, mAP at step 0 %.4f; fine-tuning %d steps", name, ratio, start, args.steps)
    res = train(DistilledDetector(student, teacher, feature_weight=feature_weight), env.train_set, settings, progress=True, resume=False,
                eval_fn=lambda _m: {"map": env.evaluate_map(student).map}, eval_every=args.eval_every)
    curve = [[0, start]] + [[h["step"], h["eval"]["map"]] for h in res.history if "eval" in h]
    if curve[-1][0] != args.steps:
        curve.append([args.steps, env.evaluate_map(student).map])
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder / "model.pt", student.eval())
    row = {"name": name, "ratio": ratio, "blocks": list(blocks), "knapsack": (cut or None) if knapsack else None,
           "reconstruct": cut.get("reconstruct"), "fold_gates": folded, "recipe": recipe, "curve": curve, "checkpoint": str(folder / "model.pt"),
           "train_s": time.perf_counter() - t0}
    atomic_write_json(done, row)
    return row


def _is_dense(row: dict[str, Any]) -> bool:
    return row["ratio"] == 0 and not row.get("blocks") and not row.get("knapsack")


def parse_depth(spec: str) -> list[tuple[int, float]]:
    """``"7:0,4:0.1"`` -> ``[(7, 0.0), (4, 0.1)]``: blocks removed and share of channels cut per row."""
    out = []
    for item in filter(None, (p.strip() for p in spec.split(","))):
        k, sep, r = item.partition(":")
        try:
            pair = (int(k), float(r) if sep else 0.0)
        except ValueError:
            pair = (0, -1.0)
        if pair[0] < 1 or not 0 <= pair[1] < 0.9:
            raise ValueError(f"--depth item {item!r}: give BLOCKS:SHARE, BLOCKS >= 1 and SHARE in [0, 0.9), e.g. 7:0,4:0.1")
        out.append(pair)
    return out


def _row_name(k: int, ratio: float, feat: str) -> str:
    width = f"{round(100 * ratio)}%" if ratio else ""
    depth = f"{k} block{'s' if k > 1 else ''}" if k else ""
    return "one-shot " + " + ".join(p for p in (depth, width) if p) + feat


def _suffix(recon: int, fold: int) -> str:
    """What a pruned row's name adds for its re-solve and gate fold (nothing for either when off)."""
    return (f" +recon {recon}" if recon else "") + (f" +fold SE {fold}" if fold else "")


def _plot(path: Path, rows: list[dict[str, Any]], title: str) -> Path:
    from deploy.html_kit import figure, figure_png
    from perception.io import atomic_write_bytes

    fig, ax = figure(7, 4.2)
    for r in rows:
        xs, ys = zip(*r["curve"], strict=True)
        label = r["name"] if _is_dense(r) else f"{r['name']} ({r['graph_speedup']:.2f}x graph)"
        ax.plot(xs, ys, marker="o", ms=3, label=label, lw=2 if _is_dense(r) else 1.2)
    ax.set_xlabel("fine-tune step")
    ax.set_ylabel("mAP@[.5:.95] (val)")
    ax.set_ylim(bottom=max(0.0, min(y for r in rows for _, y in r["curve"][1:]) - 0.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    atomic_write_bytes(path, figure_png(fig))
    return path


def _cached_note(rows: list[dict[str, Any]], wall_s: float) -> str:
    """Where rows came from the cache, the run's wall time is only the timing: say what the fine-tunes took."""
    train_s = sum(r.get("train_s", 0.0) for r in rows)
    if train_s <= wall_s:
        return ""
    return f" (rows reused from the cache; their fine-tunes took {train_s / 60:.0f} min in all)"


def rows_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: each row's size, paired speed-ups, mAP and drop against dense trained as long."""
    lines = ["| row | params M | graph ms | graph speed-up [95% CI] | frame speed-up | mAP | drop vs dense as long (points) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ci = r.get("graph_speedup_ci")
        ci_s = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
        lines.append(f"| {r['name']} | {r['params_m']:.2f} | {r['graph_p50_ms']:.2f} | {r['graph_speedup']:.2f}x{ci_s} | "
                     f"{r['frame_speedup']:.2f}x | {r['map']:.3f} | {r['map_drop_points']:+.1f} |")
    return lines


def curve_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: every row's mAP at each evaluated fine-tune step ('-' where it was not read)."""
    steps = sorted({s for r in rows for s, _ in r["curve"]})
    lines = ["| step | " + " | ".join(r["name"] for r in rows) + " |", "|---:|" + "---:|" * len(rows)]
    for s in steps:
        cells = [next((f"{m:.3f}" for st, m in r["curve"] if st == s), "-") for r in rows]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines


def markdown(rec: dict[str, Any], png: str) -> str:
    rows = rec["rows"]
    tag, fw = rec.get("tag", "oneshot_recovery"), rec.get("feature_weight", 0.0)
    ratios = ",".join(dict.fromkeys(str(r["ratio"]) for r in rows if r["ratio"] and not r.get("blocks")))
    depth = ",".join(f"{len(r['blocks'])}:{r['ratio']:g}" for r in rows if r.get("blocks"))
    knap = ",".join(dict.fromkeys(f"{r['recipe']['knapsack']:g}" for r in rows if r.get("knapsack")))
    knap_cost = next((r["recipe"].get("knapsack_cost", "ort") for r in rows if r.get("knapsack")), "")
    knap_share = next((r["recipe"].get("knapsack_share") for r in rows if r.get("knapsack")), None)
    recon = next((r["recipe"]["reconstruct"] for r in rows if r.get("recipe", {}).get("reconstruct")), 0)
    fold = next((r["recipe"]["fold_gates"] for r in rows if r.get("recipe", {}).get("fold_gates")), 0)
    cmd = (f"python -m benchmarks.oneshot_recovery --tag {tag} --checkpoint {rec['checkpoint']} --data {rec['data']} "
           f"--ratios '{ratios}' "
           + (f"--depth {depth} " if depth else "")
           + (f"--knapsack {knap} --knapsack-cost {knap_cost} " if knap else "")
           + (f"--knapsack-share {knap_share:g} " if knap_share else "")
           + f"--steps {rec['steps']} --eval-every {rec.get('eval_every', 250)} --lr {rec['lr']:g}"
           + (f" --feature-weight {fw:g}" if fw else "")
           + (f" --reconstruct {recon}" if recon else "")
           + (f" --fold-gates {fold}" if fold else ""))
    feat = (f"; the pruned rows add attention transfer on the backbone's feature maps (weight {fw:g}), the dense "
            "row keeps head distillation only" if fw else "")
    lines = [
        f"## {tag}: one-shot aligned pruning + a long distilled fine-tune, beside dense trained as long",
        "",
        f"`{cmd}` on {rec['machine']}. Data "
        f"`{rec['data']}`, {rec['val_images']} val images at score threshold 0.01. Each pruned row: Torch-Pruning "
        f"removes that share of every channel group at step 0 (L2 magnitude, multiples of {MULTIPLE}, heads' "
        f"output convs kept); every row, dense included, gets the same distilled fine-tune (teacher = the "
        f"checkpoint; AdamW {rec['lr']:g}, 10% warm-up then cosine, batch 8, seed {rec['seed']}, same batches{feat}). "
        f"Latency: ORT CPU, 2 threads, paired interleaved blocks, dense as the reference. Wall time "
        f"{rec['wall_s'] / 60:.1f} min{_cached_note(rows, rec['wall_s'])}.",
        "",
        *rows_table(rows),
        "", "mAP during the fine-tune (val images):", "",
        *curve_table(rows),
    ]
    for r in rows:
        rc = r.get("reconstruct")
        if rc:
            how = ("HALP's knapsack (below), as masks" if r.get("knapsack")
                   else f"the prune job's pruner (masks, L2 magnitude, multiples of {MULTIPLE})")
            lines += ["", f"{r['name']}: cut by {how}, "
                      f"then every 1x1 conv reading pruned channels re-solved by least squares against the dense model "
                      f"on {rc['images']} training images (`pruning.reconstruct`): {rc['layers']} layers in "
                      f"{rc['seconds']:.0f} s, mean relative output error {rc['mean_error_before']:.3f} -> "
                      f"{rc['mean_error_after']:.3f}; step-0 mAP {r['curve'][0][1]:.3f}."]
        fg = r.get("fold_gates")
        if fg:
            lines += ["", f"{r['name']}: after the cut, its {len(fg['gates'])} squeeze-excitation gates folded into the "
                      f"convs that read them as their mean scale over {fg['images']} training images "
                      f"(`pruning.gate_fold`; mean spread of the scale across images {fg['mean_scale_spread']:.3f}); "
                      f"step-0 mAP {r['curve'][0][1]:.3f}."]
        k = r.get("knapsack")
        if k:
            tries = ", ".join(f"{t['budget_ms']:.2f} ms predicted -> {t['measured_speedup']:.2f}x" for t in k["tries"])
            cut = ", ".join(f"{u} {kept}/{size}" for u, (kept, size) in sorted(k["cut_units"].items()))
            table = "MACs per layer scaled to the dense latency" if k.get("cost") == "macs" else "in-graph calibrated ORT table"
            share = r["recipe"].get("knapsack_share")
            how = (f"the budget fixed at {share:.4f} of the dense prediction, no search ({tries})" if share else
                   f"the predicted budget corrected to the measured speed-up ({tries})")
            lines += ["", f"{r['name']}: HALP's knapsack ({table}, per-unit loss damage at "
                      f"25/50/75%, groups of {MULTIPLE}), {how}. Units cut (kept/dense channels): {cut or 'none'}."]
    if rec.get("block_ranking"):
        lines += ["", "Depth rows remove the blocks cheapest first: detection-loss increase (64 training images, "
                  "the block alone removed from the checkpoint) per ms saved (ORT, the block alone removed, "
                  "process CPU time):", "",
                  "| rank | block | ms saved | loss increase | per ms | removed in |",
                  "|---:|---|---:|---:|---:|---|"]
        for i, b in enumerate(rec["block_ranking"], 1):
            used = ", ".join(r["name"] for r in rows if b["name"] in r.get("blocks", ())) or "-"
            per = f"{b['loss_up'] / b['ms']:.2f}" if b["ms"] > 0 else "-"
            lines.append(f"| {i} | {b['name']} | {b['ms']:.2f} | {b['loss_up']:+.3f} | {per} | {used} |")
    best = rec.get("best_within_drop")
    verdict = (["(smoke run on an untrained model: no verdict)"] if rec["quick"] else [
              f"Issue #12's required point (>= {REQUIRED_SPEEDUP}x graph at <= {MAX_DROP_POINTS} point): "
              + ("**met** by " + best["name"] + f" ({best['graph_speedup']:.2f}x at {best['map_drop_points']:+.1f})"
                 if best and best["graph_speedup"] >= REQUIRED_SPEEDUP else
                 "**not met** by one-shot pruning here"
                 + (f" (fastest within the drop: {best['name']}, {best['graph_speedup']:.2f}x at "
                    f"{best['map_drop_points']:+.1f})" if best else " (no pruned row within the drop)")) + "."])
    lines += ["", f"![curves](results/{png})", "", *verdict, "",
              f"Raw numbers: `benchmarks/results/{png.removesuffix('.png')}.json`."]
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: a few steps on the quick data (not written)")
    ap.add_argument("--checkpoint", type=Path, help="dense checkpoint (default: benchmarks.prune_job's)")
    ap.add_argument("--data", type=Path, help="COCO folder of that checkpoint (default: benchmarks.prune_job's)")
    ap.add_argument("--ratios", default="0.3,0.4", help="shares of every channel group removed, one row each "
                    "(default 0.3,0.4; '' for none)")
    ap.add_argument("--knapsack", default="", help="knapsack rows, measured graph speed-ups comma-separated (e.g. "
                    "1.55): HALP's latency-aware allocation with measured per-unit damage, cut until the ORT graph "
                    "speed-up over dense is within 2%% of each (benchmarks.oneshot_knapsack)")
    ap.add_argument("--knapsack-cost", choices=("ort", "macs"), default="macs",
                    help="the knapsack's per-layer cost: macs (default: multiply-accumulates scaled to the dense "
                    "latency) or ort (the prune job's in-graph-calibrated ORT table)")
    ap.add_argument("--knapsack-share", type=float, default=None,
                    help="no search: the knapsack's budget is this share of the dense prediction (an earlier "
                    "row's 'share' in its JSON repeats its cut exactly)")
    ap.add_argument("--depth", default="", help="depth rows, BLOCKS:SHARE comma-separated (e.g. 7:0,4:0.1): remove the "
                    "BLOCKS residual blocks cheapest in loss per ms saved (measured on the checkpoint), then cut "
                    "SHARE of every channel group")
    ap.add_argument("--steps", type=int, help="fine-tune steps of every row (default 1000; quick 6)")
    ap.add_argument("--eval-every", type=int, help="steps between mAP evaluations (default 250; quick 3)")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW peak rate (default 1e-3)")
    ap.add_argument("--val-images", type=int, help="val images every mAP is judged on (default 480; quick 16)")
    ap.add_argument("--feature-weight", type=float, default=0.0,
                    help="attention-transfer weight on the backbone feature maps for the pruned rows (default 0: "
                         "head distillation only). At weight 1 the attention loss is ~0.14 for a fresh 30%% cut and ~0.04 for dense "
                         "(BatchNorm's batch statistics), against a detection loss of ~0.75: 5 weighs them alike")
    ap.add_argument("--fold-gates", type=int, default=0, metavar="IMAGES",
                    help="fold every pruned row's squeeze-excitation gates into the next conv as their mean scale "
                         "over this many training images, after the cut (pruning.gate_fold; default 0: off)")
    ap.add_argument("--reconstruct", type=int, default=0, metavar="IMAGES",
                    help="add, beside each width row, the same row with the layers reading pruned channels "
                         "re-solved on this many training images before the fine-tune (least squares against the "
                         "dense model, pruning.reconstruct; default 0: off). A re-solved uniform row is cut by the "
                         "prune job's pruner (masks, L2 magnitude, multiples of 16) instead of Torch-Pruning's "
                         "MetaPruner; not with --depth")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", help="results name: benchmarks/results/TAG.json, its RESULTS.md section and the "
                    "row cache benchmarks/_work/TAG (default oneshot_recovery; quick oneshot_recovery_quick)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the RESULTS.md section from the last run")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    tag = check_tag(args.tag or ("oneshot_recovery_quick" if args.quick else "oneshot_recovery"))
    if args.report_only:
        rec = json.loads((ASSETS / f"{tag}.json").read_text())
        return _write(rec, tag)
    try:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        raise SystemExit(f"--ratios {args.ratios!r}: give comma-separated shares in (0, 0.9), e.g. 0.3,0.4") from None
    if any(not 0 < r < 0.9 for r in ratios):
        raise SystemExit(f"--ratios {args.ratios!r}: give comma-separated shares in (0, 0.9), e.g. 0.3,0.4")
    try:
        depth = parse_depth(args.depth)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    try:
        knapsacks = [float(v) for v in args.knapsack.split(",") if v.strip()]
    except ValueError:
        knapsacks = [0.0]
    if any(not 1 < v < 5 for v in knapsacks):
        raise SystemExit(f"--knapsack {args.knapsack!r}: give measured graph speed-ups in (1, 5), e.g. 1.55")
    if args.knapsack_share is not None and not 0 < args.knapsack_share < 1:
        raise SystemExit(f"--knapsack-share {args.knapsack_share}: give a share of the dense prediction in (0, 1)")
    if not ratios and not depth and not knapsacks:
        raise SystemExit("no pruned row: give --ratios (e.g. 0.3), --depth (e.g. 7:0) and/or --knapsack (e.g. 1.55)")
    args.steps = args.steps or (6 if args.quick else 1000)
    args.eval_every = args.eval_every or (3 if args.quick else 250)
    args.val_images = args.val_images or (16 if args.quick else 480)
    for flag, v in (("--steps", args.steps), ("--eval-every", args.eval_every), ("--val-images", args.val_images)):
        if v < 1:
            raise SystemExit(f"{flag} {v}: give a positive integer")
    if not args.feature_weight >= 0:
        raise SystemExit(f"--feature-weight {args.feature_weight}: give a weight >= 0 (0 = head distillation only)")
    if not args.lr > 0:
        raise SystemExit(f"--lr {args.lr}: give a positive rate, e.g. 1e-3")
    if args.reconstruct < 0:
        raise SystemExit(f"--reconstruct {args.reconstruct}: give a number of calibration images >= 0 (e.g. 64)")
    if args.fold_gates < 0:
        raise SystemExit(f"--fold-gates {args.fold_gates}: give a number of calibration images >= 0 (e.g. 64)")
    if args.reconstruct and depth:
        raise SystemExit("--reconstruct with --depth: reconstruction solves the masked width cut; run depth rows without it")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from benchmarks.prune_job import _data, _dense_checkpoint, _side_by_side

    work = WORK.with_name(tag)  # a tag of its own keeps another checkpoint's rows from overwriting these
    t_start = time.perf_counter()
    coco = _data(args.quick, args.seed, args.data)
    ckpt = _dense_checkpoint(args.quick, coco, args.seed, args.checkpoint)
    cfg = _config(args, ckpt, coco, work)
    rows = [_row("dense as long", 0.0, cfg, args, work)]
    feat = f" +feat {args.feature_weight:g}" if args.feature_weight > 0 else ""
    # with --reconstruct each width row comes twice: as cut, and with its layers re-solved (paired)
    recons = [0, args.reconstruct] if args.reconstruct else [0]
    rows += [_row(_row_name(0, r, feat + _suffix(n, args.fold_gates)), r, cfg, args, work, recon=n,
                  fold=args.fold_gates) for r in ratios for n in recons]
    rows += [_row(f"one-shot knapsack {v:g}x {args.knapsack_cost}{feat}{_suffix(n, args.fold_gates)}", 0.0, cfg, args,
                  work, knapsack=v, recon=n, fold=args.fold_gates) for v in knapsacks for n in recons]
    ranking: list[dict[str, Any]] = []
    if depth:
        from avprune.prune_job.env import JobEnv

        ranking = rank_blocks(JobEnv.from_config(cfg), work / "block_ranking.json")
        log.info("blocks, cheapest first: %s", [(b["name"], round(b["ms"], 2), round(b["loss_up"], 3)) for b in ranking])
        for k, r in depth:
            if k > len(ranking):
                raise SystemExit(f"--depth {k}:{r:g}: the model has only {len(ranking)} removable blocks")
            names = tuple(b["name"] for b in ranking[:k])
            rows.append(_row(_row_name(k, r, feat), r, cfg, args, work, blocks=names))
    models = {"dense": ckpt, **{r["name"]: Path(r["checkpoint"]) for r in rows}}
    table = _side_by_side(cfg, models, work, blocks=3 if args.quick else 20)
    ref = table["dense as long"]["map"]
    for r in rows:
        t = table[r["name"]]
        r.update({k: t[k] for k in ("map", "map50", "graph_p50_ms", "graph_speedup", "graph_speedup_ci",
                                    "frame_p50_ms", "frame_speedup", "frame_speedup_ci")})
        r["params_m"] = t["params"] / 1e6
        r["map_drop_points"] = 100 * (ref - r["map"])
    within = [r for r in rows if not _is_dense(r) and r["map_drop_points"] <= MAX_DROP_POINTS]
    rec = {"tag": tag, "quick": args.quick, "feature_weight": args.feature_weight, "checkpoint": str(ckpt), "data": str(coco), "steps": args.steps, "lr": args.lr,
           "eval_every": args.eval_every, "val_images": args.val_images, "seed": args.seed, "multiple": MULTIPLE,
           "block_ranking": ranking,
           "dense_checkpoint_map": table["dense"]["map"], "rows": rows, "machine": machine_line(),
           "best_within_drop": max(within, key=lambda r: r["graph_speedup"]) if within else None,
           "wall_s": time.perf_counter() - t_start}
    ASSETS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(ASSETS / f"{tag}.json", rec)
    return _write(rec, tag)


def _write(rec: dict[str, Any], tag: str) -> int:
    png = _plot(ASSETS / f"{tag}.png", rec["rows"], f"one-shot pruning + {rec['steps']}-step distilled fine-tune")
    publish(tag, markdown(rec, png.name), quick=rec["quick"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
