"""``avprune validate``: real-time latency validation of a model on recorded drives.

Exit codes: 0 when the candidate (first model) meets the budget per ``--fail-on``, 1 when it
violates it, 2 on any error (bad arguments, unreadable stream or model).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

EXIT_PASS, EXIT_FAIL, EXIT_ERROR = 0, 1, 2

_DESCRIPTION = """\
Play recorded camera streams into a model frame by frame, at their recorded timestamps, and check
every frame against a latency budget.

  avprune validate pruned.onnx --stream drive.mcap:/camera/front/image/compressed --budget-ms 33.3
  avprune validate pruned.onnx dense.pt --stream drive.mp4 --stream kitti/ --budget-ms 50 \\
      --warmup 2s --fail-on p99,miss-rate:0.01 --report runs/validate

Streams: video files (.mp4, .avi, ...), MCAP (ROS 2 Image/CompressedImage), rosbag2 folders
(sqlite3 or mcap), ROS 1 .bag, KITTI raw camera folders (timestamps.txt), plain image folders (--fps).
The first model is gated; a second one is a reference shown side by side in the report, and the two
are also timed paired (interleaved on the same frames) for the speed-up and its 95% interval.
A frame misses its deadline when completion - arrival > budget; dropped frames count as misses.
Exit code: 0 within budget, 1 budget violated, 2 error.
"""


def register(sub) -> None:
    p = sub.add_parser("validate", help="real-time latency validation on recorded drives",
                       description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", metavar="ENGINE_OR_MODEL",
                   help="candidate (.pt checkpoint, .onnx, engine) and optionally a reference model")
    p.add_argument("--stream", action="append", default=[], metavar="PATH[:TOPIC]",
                   help="a recording to play (repeatable); TOPIC picks an MCAP/bag topic or a KITTI camera")
    p.add_argument("--budget-ms", type=float, metavar="MS", help="per-frame latency budget, e.g. 33.3")
    p.add_argument("--mode", choices=("realtime", "throughput"), default="realtime",
                   help="realtime: frames arrive at their recorded times (default); throughput: back to back")
    p.add_argument("--warmup", default="10", metavar="N|Ns",
                   help="frames (10) or seconds of recorded time (2s) run first and left out of the stats (default 10)")
    p.add_argument("--drop-policy", choices=("drop", "queue"), default="drop",
                   help="frames arriving while the model is busy: drop all but the newest (default) or queue them")
    p.add_argument("--fail-on", action="append", metavar="RULE",
                   help="p50|p90|p99|p99.9|max (latency > budget fails), miss-rate:RATIO or decode-errors:N "
                        "(more than N frames that did not decode fail); comma-separated or repeated (default p99)")
    p.add_argument("--report", metavar="DIR", help="write DIR/report.json and DIR/report.html")
    p.add_argument("--video-out", metavar="FILE.mp4", help="write the stream(s) with detections drawn")
    p.add_argument("--threads", type=int, metavar="N",
                   help="intra-op threads of the runtime; set it as on the target (a large idle thread pool can "
                        "stall on wake-up between frames in realtime mode)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--host-ops", choices=("host", "graph"), default="host",
                   help="where an SSD model's pre/post-processing runs on ONNX Runtime: host (numpy/OpenCV, "
                        "default) or graph (normalisation, decoding and NMS folded into the ONNX graph; the host "
                        "only resizes in uint8: 0.3-0.45 ms of host work per frame instead of 0.7-1.4 on 2 cores, the "
                        "graph 0.3-0.4 ms longer, the frame 4-7%% faster; see benchmarks/RESULTS.md engine)")
    p.add_argument("--max-frames", type=int, metavar="N", help="read at most N frames per stream (warm-up included)")
    p.add_argument("--fps", type=float, metavar="F", help="frame rate of plain image folders (no timestamps.txt)")
    p.add_argument("--paired-frames", type=int, default=16, metavar="N",
                   help="with a reference model: decoded frames the paired speed-up is timed on (default 16)")
    p.add_argument("--paired-rounds", type=int, default=12, metavar="N",
                   help="with a reference model: passes over the paired frames, the models alternating on each "
                        "frame (default 12)")
    p.add_argument("--list-topics", action="store_true", help="list each stream's topics and exit")
    p.set_defaults(func=run, error_exit_code=EXIT_ERROR)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, RuntimeError, OSError, KeyboardInterrupt):
        raise
    except Exception as e:  # anything else is still an error (2), never "budget violated" (1)
        raise RuntimeError(f"unexpected {type(e).__name__}: {e}") from e


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    logging.getLogger("matplotlib").setLevel(max(logging.WARNING, logging.getLogger().level))  # font-cache chatter
    out, err = Console(), Console(stderr=True)
    if not out.is_terminal:  # CI logs: rich would wrap the table at 80 columns
        out = Console(width=140)
    if not args.stream:
        raise ValueError("give at least one --stream PATH[:TOPIC]")
    if args.list_topics:
        return _list_topics(args.stream, out)
    if not 1 <= len(args.models) <= 2:
        raise ValueError(f"give ENGINE_OR_MODEL [ENGINE_OR_MODEL2]; got {len(args.models)} models")
    if args.budget_ms is None:
        raise ValueError("--budget-ms is required (e.g. 33.3 for a 30 fps camera)")

    from deploy.report_html import write_report
    from deploy.validation import ValidationConfig, parse_fail_on, run_validation

    if args.budget_ms <= 0:
        raise ValueError(f"--budget-ms must be > 0; got {args.budget_ms:g}")
    config = ValidationConfig(
        budget_ms=args.budget_ms, mode=args.mode, drop_policy=args.drop_policy, warmup=args.warmup,
        fail_on=parse_fail_on(args.fail_on or ["p99"]), max_frames=args.max_frames, fps=args.fps,
        device=args.device, threads=args.threads, paired_frames=args.paired_frames,
        paired_rounds=args.paired_rounds, host_ops=args.host_ops,
    )

    from avprune.checks import check_validate_args

    check_validate_args(args)  # models, each stream's first frame, output paths: before any replay

    def progress(model: int, stream: int, stats) -> None:
        err.print(f"[dim]{Path(args.models[model]).name} on {args.stream[stream]}: {stats.processed} frames, "
                  f"p99 {_ms(stats.p99_ms)} ms, {stats.dropped} dropped[/dim]")

    outcome = run_validation(args.models, args.stream, config, on_stream_done=progress)
    _print_table(outcome.report, out)
    if args.report:
        json_path, html_path = write_report(outcome, args.report)
        out.print(f"report: {json_path}  {html_path}")
    if args.video_out:
        _write_videos(args, outcome, config)
    return EXIT_PASS if outcome.passed else EXIT_FAIL


def _list_topics(specs: list[str], out) -> int:
    from deploy.streams import list_topics, parse_stream_spec

    for spec in specs:
        path, _ = parse_stream_spec(spec)
        out.print(f"[bold]{path}[/bold]")
        for t in list_topics(path):
            count = "" if t.count is None else f"  {t.count} messages"
            out.print(f"  {t.topic}  [dim]{t.msgtype}{count}[/dim]")
    return EXIT_PASS


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _print_table(report: dict, out) -> None:
    from rich.table import Table

    cfg = report["config"]
    table = Table(title=f"budget {cfg['budget_ms']:g} ms · {cfg['mode']} · {cfg['drop_policy']} · "
                        f"fail on {', '.join(cfg['fail_on'])}")
    table.add_column("model", overflow="fold")
    table.add_column("stream", no_wrap=True)
    for col in ("frames", "dropped", "late", "miss %", "p50 ms", "p99 ms", "max ms", "FPS"):
        table.add_column(col, justify="right")
    table.add_column("verdict")
    multi = len(report["models"]) > 1
    for overall in report["overall"]:
        mi = overall["model"]
        label = report["models"][mi]["label"] + (" (ref)" if multi and mi else "")
        rows = [(_stream_label(report, r["stream"]), r["stats"], r["verdict"], False)
                for r in report["results"] if r["model"] == mi]
        rows.append(("all streams", overall["stats"], overall["verdict"], True))
        for name, s, v, bold in rows:
            tag = "[green]PASS[/green]" if v["passed"] else "[red]FAIL[/red]"
            table.add_row(label, name, str(s["offered"]), str(s["dropped"]), str(s["late"]),
                          f"{100 * s['miss_ratio']:.1f}", _ms(s["p50_ms"]), _ms(s["p99_ms"]), _ms(s["max_ms"]),
                          "-" if s["sustained_fps"] is None else f"{s['sustained_fps']:.1f}", tag,
                          style="bold" if bold else None)
    out.print(table)
    paired = report.get("paired")
    if paired:
        out.print(f"paired speed-up: {paired['candidate']} is [bold]{paired['speedup']:.2f}x[/bold] as fast as "
                  f"{paired['reference']} per frame (p50, {100 * paired['confidence']:.0f}% interval "
                  f"{paired['speedup_low']:.2f}-{paired['speedup_high']:.2f}x, {paired['frames']} frames x "
                  f"{paired['rounds']} rounds, the models alternating frame by frame)")
        for note in paired["notes"]:
            out.print(f"[yellow]note:[/yellow] {note}")
    v = report["verdict"]
    if v["passed"]:
        out.print(f"[green bold]PASS[/green bold] {report['models'][0]['label']} meets the budget")
    else:
        out.print(f"[red bold]FAIL[/red bold] {report['models'][0]['label']}: " + "; ".join(v["reasons"]))


def _stream_label(report: dict, si: int, width: int = 36) -> str:
    """``#1 drive.mcap:/camera/front/image/compressed``, shortened inside the topic when too long."""
    s = report["streams"][si]
    name, topic = Path(s["path"]).name, s.get("topic") or ""
    label = f"{name}:{topic}" if topic else name
    if len(label) > width and topic:
        keep = max(width - len(name) - 2, 8)
        label = f"{name}:…{topic[-keep:]}"
    return f"#{si} {label}"


def _write_videos(args: argparse.Namespace, outcome, config) -> None:
    from deploy.report_video import write_annotated_video

    dest = Path(args.video_out)
    labels = [m["label"] for m in outcome.report["models"]]
    for si, spec in enumerate(args.stream):
        target = dest if len(args.stream) == 1 else dest.with_name(f"{dest.stem}_{si}{dest.suffix}")
        runs = [model_runs[si] for model_runs in outcome.runs]
        write_annotated_video(spec, runs, labels, target, fps=args.fps, budget_ns=round(config.budget_ms * 1e6),
                              max_frames=args.max_frames)
        print(f"video: {target}", file=sys.stdout)
