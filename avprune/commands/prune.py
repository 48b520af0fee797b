"""`avprune prune JOB.yaml`: the Ray-distributed prune job against an mAP floor and a latency budget."""

from __future__ import annotations

import argparse
import sys

from avprune.errors import EXIT_GATE_FAILED as EXIT_INFEASIBLE  # the one exit-code table

_EPILOG = """\
stages (each recorded in OUT/stages/NAME.json; --resume skips the finished ones):
  baseline       dense mAP and measured p50/p99 latency on the budget's runtime
  gate_fold      with pruning.fold_gates: squeeze-excitation gates folded into the next conv
                 as their mean scale before pruning (folded model's mAP and latency); else "off"
  latency_table  per-layer latency table for that runtime (cached by model graph, runtime,
                 threads and device)
  sensitivity    per-layer sensitivity scan, layers in parallel as Ray tasks
  search         candidates fine-tuned in parallel as Ray Tune trials (ASHA stops hopeless ones)
  select         highest-mAP candidate whose re-measured latency meets the budget
  finalize       pruned checkpoint, ONNX, report.json, report.html, latency table

An infeasible budget exits 1 (budget not met): the message gives the best trade-off reached
and the nearest feasible budget. The checkpoint and data are checked before Ray starts; a job
that fails leaves no new folder (nothing finished) or OUT/failed.json (finished stages kept).
--resume only uses a folder this user's own job wrote for the same config (README: trust model).
Example job files: avprune/config/examples/prune_default.yaml, prune_tiny.yaml.
"""


def register(sub) -> None:
    p = sub.add_parser(
        "prune",
        help="Ray prune job against an mAP floor and a latency budget",
        description=__doc__,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("job", metavar="JOB.yaml", help="prune job file")
    p.add_argument("--address", default=None,
                   help="Ray cluster to run on (default: $RAY_ADDRESS, else a local instance)")
    p.add_argument("--resume", action="store_true", help="continue a killed job in its output folder")
    p.add_argument("--out", default=None, help="output folder (default: output_dir from the job file)")
    p.add_argument("--no-progress", action="store_true", help="no live progress lines")
    p.set_defaults(func=run, error_exit_code=1)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from avprune.checks import check_prune_job
    from avprune.config.prune import load_prune_config
    from avprune.prune_job import (
        InfeasibleBudgetError,
        JobConfigMismatchError,
        JobFolderInUseError,
        run_prune_job,
        summary_table,
    )

    config = load_prune_config(args.job)  # validated before anything is written
    check_prune_job(config)  # checkpoint and data fit the job, before Ray starts or OUT is created
    try:
        result = run_prune_job(
            config, out_dir=args.out, address=args.address, resume=args.resume, progress=not args.no_progress,
            preflight=False,
        )
    except InfeasibleBudgetError as e:
        print(f"avprune prune: {e}", file=sys.stderr)
        return EXIT_INFEASIBLE
    # The job names the folder and the values; the flags that fix it are the CLI's to name.
    except JobFolderInUseError as e:
        raise ValueError(f"{e} (pass --resume to continue it, or --out to start a new one)") from None
    except JobConfigMismatchError as e:
        raise ValueError(f"--resume: {e} (give a new --out)") from None
    console = Console()
    console.print(summary_table(result))
    console.print(f"pruned checkpoint: {result.checkpoint}\nONNX: {result.onnx}\nreport: {result.report_html}")
    return 0
