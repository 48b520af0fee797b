"""Benchmark: does the path to a channel cut matter? One cut reached three ways, in the same fine-tune.

    python -m benchmarks.cut_path --checkpoint DENSE.pt --data COCO_DIR   # the real run (~9 min per row, 2 cores)
    python -m benchmarks.cut_path --quick                                 # a smoke run of the plumbing (not written)

Issue #12's full-size jobs recover to the same mAP at ~2x whatever their controller did on the way
(``prune_job_settle`` against its repeat: one cut and stepped back, one held from step 550; both
0.617). This benchmark isolates the path. One cut, made by the prune job's own pruner (L2
magnitude, ``--ratio`` of every channel group, counts multiples of 16, the job's layer filter),
is reached three ways within the same distilled fine-tune (teacher = the checkpoint, AdamW,
warm-up then cosine, batch 8, one seed, the same batches):

- ``hard``: masked at step 0 (the job's one-shot schedule).
- ``fade F``: the cut channels' BatchNorm scale and shift multiplied by ``1 - t/F`` until step F,
  masked from then on. The channels keep carrying a shrinking signal while the rest trains.
- ``shrink F``: growing regularization (Wang, Qin, Zhang & Fu, "Neural Pruning via Growing
  Regularization", ICLR 2021): every tensor slice of a cut channel (its filter, its BatchNorm
  scale and shift, and the input slices of the layers that read it) decays by ``exp(-c t)`` at
  step t, with c set so the decays multiply to 1e-3 by step F; masked from then on. Unlike the
  fade, a consumer cannot scale its input slice up to make up for the loss: that slice decays too.

Every read during the fine-tune is of the cut model (masks at 0, then restored), so the reads along
a path show how much of the detector still depends on the channels it is losing. The dense row,
trained as long, is the reference for every drop. Graph and frame speed-ups come from paired,
interleaved ORT timing (``benchmarks.prune_job._side_by_side``); every pruned row has the same
architecture.

Rows are cached by recipe under ``benchmarks/_work/TAG``. Results: ``benchmarks/results/TAG.json``,
a PNG of the curves, and the TAG section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks._results import ASSETS, check_tag, machine_line, publish
from benchmarks.oneshot_recovery import MULTIPLE, _cached_note, _plot, curve_table, rows_table
from benchmarks.oneshot_recovery import _config as _recovery_config
from perception.io import atomic_write_json

log = logging.getLogger("benchmarks.cut_path")

WORK = Path(__file__).with_name("_work")
KINDS = ("hard", "fade", "shrink")
SHRINK_FLOOR = 1e-3  # what a shrunk slice is left with at the cut: near enough to zero that the mask changes nothing


def fade_scale(done: int, steps: int) -> float:
    """The fade's scale on a cut channel after ``done`` optimizer steps (1 at step 0, 0 from ``steps`` on)."""
    return max(0.0, 1.0 - done / steps) if steps > 0 else 0.0


def shrink_factor(done: int, steps: int, floor: float = SHRINK_FLOOR) -> float:
    """The decay applied after optimizer step ``done`` (1-based) of a growing shrink over ``steps`` steps.

    The rate grows linearly with the step (growing regularization), and the factors of steps
    1..``steps`` multiply to ``floor``: c * (1 + 2 + ... + steps) = ln(1/floor).
    """
    if not 0 < floor < 1:
        raise ValueError(f"floor must be in (0, 1); got {floor!r}")
    if steps <= 0 or done > steps:
        return 1.0
    c = 2.0 * math.log(1.0 / floor) / (steps * (steps + 1))
    return math.exp(-c * done)


def parse_paths(spec: str) -> list[tuple[str, int]]:
    """``"hard,fade:150,shrink:150"`` -> ``[("hard", 0), ("fade", 150), ("shrink", 150)]``."""
    out: list[tuple[str, int]] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        kind, _, n = part.partition(":")
        if kind not in KINDS or (kind == "hard") != (n == "") or (n and (not n.isdigit() or int(n) < 1)):
            raise ValueError(f"--paths {part!r}: give hard, fade:STEPS or shrink:STEPS (STEPS >= 1), "
                             "comma-separated, e.g. hard,fade:150,shrink:150")
        out.append((kind, int(n) if n else 0))
    if not out:
        raise ValueError("--paths is empty: give e.g. hard,fade:150,shrink:150")
    return out


class CutPath:
    """``perception.train`` hook: takes a pruner's channel masks to its cut along one path.

    Built after ``pruner.update()``: the pruner's masks at that moment are the cut. The hook then
    owns the masks; :meth:`cut` shows the cut model for a read, :meth:`finish` leaves the cut.
    """

    def __init__(self, pruner: Any, kind: str, steps: int) -> None:
        from torch.nn.modules.batchnorm import _BatchNorm

        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
        if kind != "hard" and steps < 1:
            raise ValueError(f"a {kind} path needs steps >= 1; got {steps!r}")
        self.pruner, self.kind, self.steps = pruner, kind, steps
        self.cut_masks = {k: wm.mask.clone() for k, wm in pruner.masks.items()}
        self.is_bn = {k: isinstance(pruner.modules[k[0]], _BatchNorm) for k in self.cut_masks}
        self.done = 0
        self._show(self.done)

    def _show(self, done: int, *, cut: bool = False) -> None:
        """Masks as the path has them after ``done`` steps, or the cut's masks."""
        on_path = not cut and self.kind != "hard" and done < self.steps
        scale = fade_scale(done, self.steps) if self.kind == "fade" else 1.0
        for k, cut_mask in self.cut_masks.items():
            mask = self.pruner.masks[k].mask
            if not on_path:
                mask.copy_(cut_mask)
            elif self.kind == "fade" and self.is_bn[k]:
                mask.copy_(cut_mask + (1 - cut_mask) * scale)
            else:  # fade: filters and input slices open; shrink: everything open, the weights decay instead
                mask.fill_(1.0)

    def __call__(self, ctx: Any) -> None:
        import torch

        self.done = ctx.step + 1
        if self.kind == "shrink" and self.done <= self.steps:
            f = shrink_factor(self.done, self.steps)
            with torch.no_grad():
                for (mod, tname), cut in self.cut_masks.items():
                    original = getattr(self.pruner.modules[mod].parametrizations, tname).original
                    original.mul_(cut + (1 - cut) * f)
        self._show(self.done)

    @contextmanager
    def cut(self) -> Iterator[None]:
        """The cut model for the duration (a read), then the path's masks again."""
        self._show(self.done, cut=True)
        try:
            yield
        finally:
            self._show(self.done)

    def finish(self) -> None:
        """Leave the cut in place (before ``pruner.finalize()``)."""
        self._show(self.done, cut=True)


def _row(name: str, kind: str | None, path_steps: int, cfg: Any, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Fine-tune one row (``kind`` None: dense as long), or reuse it when its recipe is cached."""
    from avprune.prune_job.env import JobEnv
    from perception.distill import DistilledDetector
    from perception.models import save_checkpoint
    from perception.train import TrainSettings, train
    from pruning import Pruner
    from pruning.controllers import FixedController

    folder = work / name.replace(" ", "_").replace(":", "")
    recipe = {"checkpoint": str(cfg.model.checkpoint), "ratio": args.ratio if kind else 0.0, "multiple": MULTIPLE,
              "path": kind, "path_steps": path_steps, "steps": args.steps, "lr": args.lr,
              "eval_every": args.eval_every, "val_images": args.val_images, "seed": args.seed, "distill": True}
    done = folder / "row.json"
    if done.is_file() and json.loads(done.read_text()).get("recipe") == recipe:
        log.info("%s: cached (%s)", name, done)
        return json.loads(done.read_text())
    env = JobEnv.from_config(cfg)
    teacher, student = env.load_dense().eval(), env.load_dense().eval()
    path: CutPath | None = None
    pruner = None
    if kind:
        pruner = Pruner(student, importance="magnitude", granularity="channel",
                        controller=FixedController(args.ratio), example_inputs=env.example_input(1),
                        layer_filter=env.layer_filter(student, "magnitude"), channel_multiple=MULTIPLE)
        pruner.update()
        path = CutPath(pruner, kind, path_steps)

    def read() -> float:
        if path is None:
            return env.evaluate_map(student).map
        with path.cut():
            return env.evaluate_map(student).map

    settings = TrainSettings(steps=args.steps, batch_size=8, optimizer="adamw", lr=args.lr,
                             warmup_steps=cfg.finetune.warmup(), checkpoint_every=10**9, seed=args.seed, num_threads=2)
    t0 = time.perf_counter()
    curve = [[0, read()]]
    log.info("%s: mAP of the cut at step 0 %.4f; fine-tuning %d steps", name, curve[0][1], args.steps)
    res = train(DistilledDetector(student, teacher), env.train_set, settings, progress=True, resume=False,
                hooks=[path] if path else [], eval_fn=lambda _m: {"map": read()}, eval_every=args.eval_every)
    curve += [[h["step"], h["eval"]["map"]] for h in res.history if "eval" in h]
    if curve[-1][0] != args.steps:
        curve.append([args.steps, read()])
    if path is not None and pruner is not None:
        path.finish()
        student = pruner.finalize()
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder / "model.pt", student.eval())
    row = {"name": name, "ratio": recipe["ratio"], "path": kind, "path_steps": path_steps, "recipe": recipe,
           "curve": curve, "checkpoint": str(folder / "model.pt"), "train_s": time.perf_counter() - t0}
    atomic_write_json(done, row)
    return row


def _row_name(kind: str, steps: int, ratio: float) -> str:
    how = "hard cut" if kind == "hard" else f"{kind} over {steps} steps"
    return f"{ratio:.0%} {how}"


def markdown(rec: dict[str, Any], png: str) -> str:
    rows = rec["rows"]
    tag = rec["tag"]
    paths = ",".join(r["path"] + (f":{r['path_steps']}" if r["path"] != "hard" else "") for r in rows if r["path"])
    cmd = (f"python -m benchmarks.cut_path --tag {tag} --checkpoint {rec['checkpoint']} --data {rec['data']} "
           f"--ratio {rec['ratio']:g} --paths {paths} --steps {rec['steps']} --eval-every {rec['eval_every']} "
           f"--lr {rec['lr']:g}" + (f" --seed {rec['seed']}" if rec["seed"] else ""))
    lines = [
        f"## {tag}: one channel cut reached three ways (hard, fade, growing shrink), the same fine-tune",
        "",
        f"`{cmd}` on {rec['machine']}. Data `{rec['data']}`, {rec['val_images']} val images at score threshold "
        f"0.01. The cut: the prune job's pruner removes {rec['ratio']:.0%} of every channel group (L2 magnitude on "
        f"the checkpoint, multiples of {MULTIPLE}, the job's layer filter), one cut for every pruned row. *hard*: "
        "masked at step 0. *fade F*: the cut channels' BatchNorm scale and shift multiplied by 1 - t/F, masked "
        "from step F. *shrink F*: growing regularization (Wang et al., ICLR 2021): the cut channels' filters, "
        "BatchNorm scale and shift, and the consumers' input slices decay at a growing rate to 1e-3 by step F, "
        "masked from then. Every row, dense included, gets the same distilled fine-tune (teacher = the "
        f"checkpoint; AdamW {rec['lr']:g}, 10% warm-up then cosine, batch 8, seed {rec['seed']}, same batches). "
        "Every read is of the cut model. Latency: ORT CPU, 2 threads, paired interleaved blocks, the checkpoint "
        f"as the reference. Wall time {rec['wall_s'] / 60:.1f} min{_cached_note(rows, rec['wall_s'])}.",
        "",
        *rows_table(rows),
        "", "mAP during the fine-tune (val images; the pruned rows read as cut):", "",
        *curve_table(rows),
    ]
    hard = next((r for r in rows if r["path"] == "hard"), None)
    others = [r for r in rows if r["path"] not in (None, "hard")]
    if rec["quick"]:
        verdict = "(smoke run on an untrained model: no verdict)"
    elif hard and others:
        diffs = "; ".join(f"{r['name']} {100 * (r['map'] - hard['map']):+.1f}" for r in others)
        verdict = f"Against the hard cut (mAP points, one seed): {diffs}."
    else:
        verdict = "No hard-cut row to compare the paths with."
    lines += ["", f"![curves](results/{png})", "", verdict, "",
              f"Raw numbers: `benchmarks/results/{tag}.json`."]
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: a few steps on the quick data (not written)")
    ap.add_argument("--checkpoint", type=Path, help="dense checkpoint (default: benchmarks.prune_job's)")
    ap.add_argument("--data", type=Path, help="COCO folder of that checkpoint (default: benchmarks.prune_job's)")
    ap.add_argument("--ratio", type=float, default=0.5,
                    help="share of every channel group cut (default 0.5)")
    ap.add_argument("--paths", default="hard,fade:150,shrink:150",
                    help="one row per path: hard, fade:STEPS, shrink:STEPS (default hard,fade:150,shrink:150)")
    ap.add_argument("--steps", type=int, help="fine-tune steps of every row (default 400; quick 6)")
    ap.add_argument("--eval-every", type=int, help="steps between mAP reads (default 100; quick 3)")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW peak rate (default 1e-3)")
    ap.add_argument("--val-images", type=int, help="val images every mAP is judged on (default 480; quick 16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", help="results name (default cut_path; quick cut_path_quick)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the RESULTS.md section from the last run")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    tag = check_tag(args.tag or ("cut_path_quick" if args.quick else "cut_path"))
    if args.report_only:
        last = ASSETS / f"{tag}.json"
        if not last.is_file():
            raise SystemExit(f"--report-only: no earlier run at {last}; run without --report-only first (or give --tag)")
        return _write(json.loads(last.read_text()), tag)
    try:
        paths = parse_paths(args.paths)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if not 0 < args.ratio < 0.9:
        raise SystemExit(f"--ratio {args.ratio}: give a share in (0, 0.9), e.g. 0.5")
    args.steps = args.steps or (6 if args.quick else 400)
    args.eval_every = args.eval_every or (3 if args.quick else 100)
    args.val_images = args.val_images or (16 if args.quick else 480)
    for flag, v in (("--steps", args.steps), ("--eval-every", args.eval_every), ("--val-images", args.val_images)):
        if v < 1:
            raise SystemExit(f"{flag} {v}: give a positive integer")
    if not args.lr > 0:
        raise SystemExit(f"--lr {args.lr}: give a positive rate, e.g. 1e-3")
    for kind, n in paths:
        if n >= args.steps:
            raise SystemExit(f"--paths {kind}:{n}: the path must end before the fine-tune does (--steps {args.steps})")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from benchmarks.prune_job import _data, _dense_checkpoint, _side_by_side

    work = WORK / tag
    t_start = time.perf_counter()
    coco = _data(args.quick, args.seed, args.data)
    ckpt = _dense_checkpoint(args.quick, coco, args.seed, args.checkpoint)
    cfg = _recovery_config(args, ckpt, coco, work)
    rows = [_row("dense as long", None, 0, cfg, args, work)]
    rows += [_row(_row_name(kind, n, args.ratio), kind, n, cfg, args, work) for kind, n in paths]
    table = _side_by_side(cfg, {"dense": ckpt, **{r["name"]: Path(r["checkpoint"]) for r in rows}}, work,
                          blocks=3 if args.quick else 20)
    ref = table["dense as long"]["map"]
    for r in rows:
        t = table[r["name"]]
        r.update({k: t[k] for k in ("map", "graph_p50_ms", "graph_speedup", "graph_speedup_ci", "frame_speedup")})
        r["params_m"] = t["params"] / 1e6
        r["map_drop_points"] = 100 * (ref - r["map"])
    rec = {"tag": tag, "quick": args.quick, "checkpoint": str(ckpt), "data": str(coco), "ratio": args.ratio,
           "steps": args.steps, "lr": args.lr, "eval_every": args.eval_every, "val_images": args.val_images,
           "seed": args.seed, "multiple": MULTIPLE, "rows": rows, "machine": machine_line(),
           "wall_s": time.perf_counter() - t_start}
    ASSETS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(ASSETS / f"{tag}.json", rec)
    return _write(rec, tag)


def _write(rec: dict[str, Any], tag: str) -> int:
    png = _plot(ASSETS / f"{tag}.png", rec["rows"], f"one {rec['ratio']:.0%} cut, three paths, "
                f"{rec['steps']}-step distilled fine-tune")
    publish(tag, markdown(rec, png.name), quick=rec["quick"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
