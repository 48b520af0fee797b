"""`avprune eval CHECKPOINT --data ROOT`: COCO mAP of a detector checkpoint on a COCO split."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from avprune.errors import EXIT_OK

HELP = """\
Score a detector checkpoint with COCO mAP (pycocotools) on a COCO-format split.

ROOT holds {split}/ images and annotations/instances_{split}.json, e.g. the coco/ folder that
`avprune data synth --out DIR` writes (DIR/coco). CHECKPOINT is a .pt written by `avprune train`
(model.pt or last.pt) or `avprune prune`; pruned checkpoints rebuild at their reduced widths.

Prints AP@[.5:.95], AP50, AP75, AP for small/medium/large boxes and AP per class;
--json writes the same numbers to a file.

example:
  avprune eval runs/train/model.pt --data runs/demo/data/coco --split val --json runs/train/val.json
"""


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def metrics_table(metrics, title: str):
    """A rich Table of CocoMetrics: summary row, then AP per class."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("mAP", "AP50", "AP75", "AP_S", "AP_M", "AP_L", "images"):
        table.add_column(col, justify="right")
    m = metrics
    table.add_row(*(_fmt(v) for v in (m.map, m.map50, m.map75, m.map_small, m.map_medium, m.map_large)),
                  str(m.num_images))
    per_class = Table(title="AP@[.5:.95] per class", title_justify="left")
    per_class.add_column("class")
    per_class.add_column("AP", justify="right")
    for name, ap in m.per_class.items():
        per_class.add_row(name, _fmt(ap))
    return table, per_class


def print_metrics(metrics, title: str) -> None:
    """Print the summary and per-class tables on stdout."""
    from rich.console import Console

    console = Console()
    for t in metrics_table(metrics, title):
        console.print(t)


def run(args: argparse.Namespace) -> int:
    from perception.io import check_torch_file

    check_torch_file(args.checkpoint)  # a damaged file fails before torch and the data set load
    if not args.data.is_dir():
        raise FileNotFoundError(f"--data {args.data}: COCO folder not found")
    from avprune.checks import check_checkpoint

    check_checkpoint(args.checkpoint)  # a plain state_dict says what to do from the CLI
    from perception.data import load_split, subset
    from perception.evaluate import evaluate_model
    from perception.io import atomic_write_json
    from perception.models import load_detector

    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max-images must be >= 1, got {args.max_images}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = load_detector(args.checkpoint)
    dataset = load_split(args.data, args.split, train=False)
    if args.max_images is not None:
        dataset = subset(dataset, args.max_images, seed=0)
    metrics = evaluate_model(model, dataset, device=args.device, batch_size=args.batch_size, progress=True)
    print_metrics(metrics, f"{args.checkpoint} on {args.data} [{args.split}]")
    if args.json:
        atomic_write_json(args.json, {"checkpoint": str(args.checkpoint), "data": str(args.data),
                                      "split": args.split, **metrics.to_dict()})
    return EXIT_OK


def register(sub) -> None:
    p = sub.add_parser("eval", help="COCO mAP of a detector checkpoint on a COCO split",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="detector checkpoint (.pt)")
    p.add_argument("--data", type=Path, required=True, metavar="ROOT", help="COCO folder (e.g. DIR/coco)")
    p.add_argument("--split", default="val", help="split to score (default: val)")
    p.add_argument("--max-images", type=int, default=None, metavar="N", help="score N images drawn at random (seed 0)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the metrics as JSON")
    p.set_defaults(func=run)
