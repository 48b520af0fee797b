"""Stage 1b, gate_fold: fold the detector's channel gates before any pruning (``pruning.fold_gates``).

MobileNetV3's squeeze-excitation gates cost almost no MACs but five passes over their tensor on a
CPU runtime; :func:`pruning.gate_fold.fold_gates` replaces each by its mean scale over the first
``pruning.fold_gates`` training images, folded into the conv that reads it. Measured on the trained
SSDlite320 (``benchmarks/RESULTS.md`` ``oneshot_recovery_foldse``): 1.14-1.16x graph for the dense
model at 0.648 -> 0.645 mAP before any fine-tuning, and a 1.37x channel cut with its gates folded
ran 1.68x.

Folding first, not at the end, is so every later stage sees the graph that will ship: the latency
table is measured (and keyed) on the folded graph and calibrated to this stage's timing of it, the
sensitivity scan and the trials prune it, and the fine-tune recovers what the fold lost alongside
what pruning lost. The dense figures stay the unfolded checkpoint's: the baseline latency and mAP,
the dense shadow, the distillation teacher. So the job's speed-up and mAP drop include the fold.
"""

from __future__ import annotations

import logging
import time

from avprune.prune_job.context import StageContext
from avprune.prune_job.records import BaselineRecord, FoldedGate, GateFoldRecord

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> GateFoldRecord:
    """Fold, save the folded model where :meth:`JobEnv.load_start` reads it, and measure it."""
    cfg, env = ctx.config, ctx.env
    images = cfg.pruning.fold_gates
    if not images:
        return GateFoldRecord(images=0, reason="off (pruning.fold_gates: 0)")
    from perception.models import drop_blocks, save_checkpoint
    from pruning.filters import detector_core_forward
    from pruning.gate_fold import fold_gates

    base = ctx.record(BaselineRecord)
    t0 = time.perf_counter()
    ctx.progress.stage_start("gate_fold", note=f"folding channel gates on {images} training images")
    model = env.load_dense().eval()
    folds = fold_gates(model, env.calibration_batches(model, images), forward_fn=detector_core_forward)
    # the fold left nn.Identity where each gate was; the checkpoint's meta names them so load_detector
    # (and JobEnv.build_start_architecture) rebuild the folded architecture
    drop_blocks(model, [f.gate for f in folds])
    env.folded_checkpoint.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(env.folded_checkpoint, model, extra={"folded_gates": [f.gate for f in folds]})
    gates = tuple(FoldedGate(f.gate, f.consumer, f.channels, f.mean_scale, f.scale_spread) for f in folds)
    if not folds:
        log.warning("pruning.fold_gates: %s has no foldable channel gates; pruning starts from the dense model",
                    cfg.model.name)
        return GateFoldRecord(images=images, reason=f"{cfg.model.name} has no foldable channel gates",
                              checkpoint=str(env.folded_checkpoint), seconds=time.perf_counter() - t0)
    folded = env.load_start()  # as every later stage loads it (score threshold, folded architecture)
    ctx.progress.stage_start("gate_fold", note="folded model's mAP")
    score = env.evaluate_map(folded)
    ctx.progress.stage_start("gate_fold", note=f"folded model's latency on {cfg.budget.runtime}")
    # paired with dense and scaled to the baseline's conditions: the latency table is calibrated to it
    work = ctx.out_dir / "work" / "gate_fold"
    dense = env.runtime_target(env.load_dense(), work / "latency_dense.onnx")  # exported for ORT, as trials do
    lat, _ = env.measure_latency_paired(folded, dense, work, dense_ms=base.dense.p50_ms)
    log.info("folded %d gates: mAP %.3f (dense %.3f), p50 %.2f ms (dense %.2f, %.2fx)", len(folds), score.map,
             base.dense.map, lat.p50_ms, base.dense.p50_ms, base.dense.p50_ms / lat.p50_ms)
    return GateFoldRecord(images=images, checkpoint=str(env.folded_checkpoint), gates=gates, map=score.map,
                          p50_ms=lat.p50_ms, seconds=time.perf_counter() - t0)


def start_latency_ms(ctx: StageContext) -> float:
    """The measured p50 of the model pruning starts from: the folded model's, or the dense baseline's."""
    fold = ctx.find(GateFoldRecord)
    if fold is not None and fold.p50_ms is not None:
        return fold.p50_ms
    return ctx.record(BaselineRecord).dense.p50_ms


def gate_fold_section(rec: GateFoldRecord | None, base: BaselineRecord) -> dict[str, object] | None:
    """report.json's ``gate_fold``: the folded gates and the fold's own cost and gain before any
    fine-tuning (None when the job folded nothing)."""
    if rec is None or not rec.gates:
        return None
    speedup = base.dense.p50_ms / rec.p50_ms if rec.p50_ms else None
    return {"images": rec.images, "gates": [g.to_dict() for g in rec.gates], "map_folded": rec.map,
            "map_dense": base.dense.map, "p50_ms_folded": rec.p50_ms, "p50_ms_dense": base.dense.p50_ms,
            "speedup": speedup, "seconds": rec.seconds}


def gate_fold_html(doc: dict[str, object]) -> str:
    """report.html's section on the folded gates ("" when the job folded none)."""
    from avprune.prune_job.report import _table

    sec = doc.get("gate_fold")
    if not isinstance(sec, dict):
        return ""
    speed = f"{sec['speedup']:.2f}x" if sec.get("speedup") else "-"
    return (f"<h2>Folded channel gates ({len(sec['gates'])})</h2><p>Before pruning, each squeeze-excitation gate was "
            f"replaced by its mean scale over {sec['images']} training images, folded into the conv that reads it "
            f"(pruning.gate_fold). Before any fine-tuning the folded model ran {speed} the dense graph at mAP "
            f"{sec['map_folded']:.3f} (dense {sec['map_dense']:.3f}); the speed-up and drop above include it. "
            "<i>scale_spread</i>: the scale's standard deviation over the images, what the fold gave up.</p>"
            + _table(sec["gates"], ["gate", "consumer", "channels", "mean_scale", "scale_spread"]))
