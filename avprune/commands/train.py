"""`avprune train CONFIG.yaml`: train or fine-tune a detector from a YAML config."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from avprune.errors import EXIT_OK

log = logging.getLogger(__name__)

HELP = """\
Train (from scratch or from a local checkpoint) one of the torchvision detectors on a
COCO-format data set, then score it on the val split.

The YAML config names the model, the data folder and the optimisation; unknown keys are
rejected. Start from avprune/config/examples/train_default.yaml (the default recipe:
SSDlite320 from scratch on the synthetic data, about 8 minutes on 2 CPU cores).

Writes OUT/last.pt (weights + optimizer + RNG state, every train.checkpoint_every steps, atomically),
OUT/model.pt (weights only, at the end) and OUT/metrics.json. A run that is interrupted continues
from OUT/last.pt at the same step when started again (--no-resume starts over).

example:
  avprune data synth --out runs/data
  avprune train avprune/config/examples/train_default.yaml --out runs/train
  avprune eval runs/train/model.pt --data runs/data/coco
"""


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from avprune.commands.eval import print_metrics
    from avprune.config.base import load_config
    from avprune.config.train import TrainConfig
    from perception.data import load_split, subset
    from perception.evaluate import evaluate_model
    from perception.io import atomic_write_json
    from perception.models import build_detector
    from perception.train import train

    cfg = load_config(args.config, TrainConfig)
    settings = cfg.settings()
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        settings = dataclasses.replace(settings, steps=args.steps)
    out = args.out or cfg.out
    m = cfg.model
    model = build_detector(m.name, num_classes=m.num_classes, image_size=m.image_size,
                           ssd_anchor_scales=m.ssd_anchor_scales, checkpoint=m.checkpoint)
    train_set = load_split(cfg.data.root, cfg.data.train_split, train=settings.augment)
    val_set = load_split(cfg.data.root, cfg.data.val_split, train=False) if cfg.data.val_split else None
    if val_set is not None and cfg.data.max_eval_images:
        val_set = subset(val_set, cfg.data.max_eval_images)
    device = cfg.train.device

    eval_fn = None
    if val_set is not None and cfg.data.eval_every_minutes:
        def eval_fn(model):  # noqa: E306 - a closure over val_set
            return evaluate_model(model, val_set, device=device).to_dict()

    limit = cfg.train.time_limit_minutes * 60 if cfg.train.time_limit_minutes else None
    result = train(model, train_set, settings, out_dir=out, resume=args.resume, progress=True, eval_fn=eval_fn,
                   eval_every_s=cfg.data.eval_every_minutes * 60 if cfg.data.eval_every_minutes else None,
                   time_limit_s=limit, device=device)
    log.info("trained %d steps in %.0f s (%s); last loss %.4f", result.steps_done, result.train_time_s,
             result.stopped, result.last_loss)
    summary = {"steps_done": result.steps_done, "train_time_s": result.train_time_s, "stopped": result.stopped,
               "last_loss": result.last_loss, "model": str(result.model_path)}
    if val_set is not None:
        metrics = evaluate_model(model, val_set, device=device, progress=True)
        print_metrics(metrics, f"{result.model_path} on {cfg.data.root} [{cfg.data.val_split}], "
                               f"{result.steps_done} steps")
        summary["val"] = metrics.to_dict()
    atomic_write_json(Path(out) / "metrics.json", summary)
    return EXIT_OK


def register(sub) -> None:
    p = sub.add_parser("train", help="train / fine-tune a torchvision detector from a YAML config",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, metavar="CONFIG.yaml", help="training config (see the example)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="output folder (overrides the config's out)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from DIR/last.pt when it exists (default: yes)")
    p.add_argument("--steps", type=int, default=None, metavar="N", help="override train.steps")
    p.set_defaults(func=run)
