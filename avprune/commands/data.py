"""`avprune data`: synthesise the default data set, or import KITTI labels to COCO."""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger(__name__)

_SYNTH_EPILOG = """\
output layout (DIR):
  coco/train/*.png, coco/val/*.png, coco/annotations/instances_{train,val}.json
  drives/drive_XXX/drive.mp4, drive.mcap (ROS 2 CompressedImage on /camera/front/image/compressed),
      kitti/image_02/data/%010d.png + kitti/image_02/timestamps.txt, ground_truth.json
  manifest.json (written last: its presence means the data set is complete)

The same --seed gives byte-identical images and annotations.
example:
  avprune data synth --out data/synth --images 2000 --drives 2 --seed 0
"""


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH such as 640x384, got {text!r}") from None
    return w, h


def _synth(args: argparse.Namespace) -> int:
    from perception.synthetic.generate import generate_dataset
    from perception.synthetic.stats import dataset_stats, format_stats

    bars: dict = {}

    def progress(stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = bars.get(stage)
        if bar is None:
            for old in bars.values():
                old.close()
            bar = bars[stage] = tqdm(total=total, desc=f"synth {stage}", unit="img", file=sys.stderr,
                                     disable=args.quiet, dynamic_ncols=True)
        bar.update(done - bar.n)

    try:
        manifest = generate_dataset(args.out, images=args.images, drives=args.drives, seed=args.seed,
                                    val_fraction=args.val_fraction, size=args.size,
                                    drive_seconds=args.drive_seconds, fps=args.fps, progress=progress,
                                    workers=args.workers)
    finally:
        for bar in bars.values():
            bar.close()
    root = manifest.root
    split = "val" if manifest.splits["val"]["images"] else "train"
    stats = dataset_stats(f"{root}/{manifest.splits[split]['annotation_file']}")
    print(f"wrote {manifest.splits['train']['images']} train + {manifest.splits['val']['images']} val images "
          f"and {len(manifest.drives)} drive(s) to {root}")
    print(f"{split} split:\n{format_stats(stats)}")
    return 0


def _import_kitti(args: argparse.Namespace) -> int:
    from perception.kitti import kitti_to_coco

    kitti_to_coco(args.labels, args.images, args.out)
    print(f"wrote {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("data", help="synthesise the default data set or import KITTI labels",
                       description="Data sets: the embedded synthetic driving scenes, and KITTI import.")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True

    s = dsub.add_parser("synth", help="generate synthetic driving scenes (COCO splits + recorded drives)",
                        description="Render procedural driving scenes (road, buildings, cars, trucks, buses, "
                                    "pedestrians, cyclists, traffic lights and signs) with exact boxes, as a "
                                    "COCO data set plus recorded drives (MP4, MCAP, KITTI raw). No downloads.",
                        epilog=_SYNTH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--out", required=True, help="output folder (created; an old manifest.json is removed first)")
    s.add_argument("--images", type=int, default=2000, help="COCO images, train + val (default 2000)")
    s.add_argument("--drives", type=int, default=2, help="recorded drives (default 2; 0 for none)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--val-fraction", type=float, default=0.2, help="share of images in val (default 0.2)")
    s.add_argument("--size", type=_size, default=(640, 384), help="image size WxH (default 640x384)")
    s.add_argument("--drive-seconds", type=float, default=10.0, help="length of each drive (default 10)")
    s.add_argument("--fps", type=float, default=30.0, help="recorded frame rate of the drives (default 30)")
    s.add_argument("--workers", type=int, default=2,
                   help="processes rendering COCO images (default 2; output is identical for any value)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_synth)

    k = dsub.add_parser("import-kitti", help="convert KITTI label_2 files to a COCO instances JSON",
                        description="Convert KITTI object labels (label_2/*.txt) with their images to COCO "
                                    "(categories mapped to the avprune classes).")
    k.add_argument("--labels", required=True, help="folder of KITTI label_2 .txt files")
    k.add_argument("--images", required=True, help="folder of the matching image_2 images")
    k.add_argument("--out", required=True, help="COCO instances JSON to write")
    k.set_defaults(func=_import_kitti)
