"""Bad inputs through the real CLI: exit code, seconds to fail, and nothing left behind (issue 15).

    python -m benchmarks.reliability [--node-loss]

Every case runs ``python -m avprune ...`` as a subprocess (a fresh interpreter, as a user would),
so "seconds to fail" includes Python start-up and imports. A case passes when the exit code is
the one in ``avprune.errors``'s table, stderr is one line holding the expected words, no output
path exists afterwards, and the failure came in under :data:`TARGET_S` seconds, before any export,
fine-tune or real-time replay. One gate case (decode errors; kind "gate", listed apart from the bad
inputs) replays on purpose and exits 1.

``--node-loss`` also runs the tiny prune job on a two-node Ray cluster and SIGKILLs the worker
node's raylet mid-search (``tests/test_ray_two_node.py`` asserts the same run).
Writes ``benchmarks/results/reliability.json`` and the ``reliability`` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from benchmarks._results import ASSETS, machine_line, write_section
from perception.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 5.0


@dataclass
class Case:
    name: str
    args: list[str]
    expect_code: int
    expect_words: str
    outputs: list[Path] = field(default_factory=list)  # must not exist afterwards
    replays: bool = False  # a gate case: it runs on purpose


@dataclass
class Outcome:
    name: str
    kind: str  # "bad input" (must fail fast, exit 2) or "gate" (replays on purpose, exit 1)
    command: str
    exit_code: int
    expected_code: int
    seconds: float
    cpu_s: float  # the child's user + system CPU time: what the failure cost, whatever the load
    message: str
    one_line: bool
    words_found: bool
    output_left: list[str]
    mentions_unsafe_load: bool
    replays: bool
    correct: bool  # expected code, one line, expected words, nothing written, no unsafe-load hint
    ok: bool  # correct, and under TARGET_S unless it replays on purpose


# ----------------------------------------------------------------------------- inputs


def _kitti(root: Path, n: int, *, timestamps: bool = True, broken: tuple[int, ...] = ()) -> Path:
    import cv2

    data = root / "image_02" / "data"
    data.mkdir(parents=True)
    for i in range(n):
        img = np.full((96, 128, 3), (i * 20) % 256, np.uint8)
        cv2.imwrite(str(data / f"{i:010d}.png"), img)
    for i in broken:
        (data / f"{i:010d}.png").write_bytes(b"\x89PNG broken")
    if timestamps:
        (root / "image_02" / "timestamps.txt").write_text(
            "".join(f"2011-09-26 13:02:{25 + i // 10:02d}.{(i % 10) * 100_000_000:09d}\n" for i in range(n)))
    return root


def _mp4(path: Path, n: int = 20) -> Path:
    import cv2

    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (128, 96))
    for i in range(n):
        w.write(np.full((96, 128, 3), i * 10, np.uint8))
    w.release()
    return path


def build_cases(work: Path) -> list[Case]:
    """The bad inputs, each with its own output paths under ``work``."""
    import torch

    from perception.models import build_detector, save_checkpoint

    ckpt = work / "X.pt"
    save_checkpoint(ckpt, build_detector("ssdlite320_mobilenet_v3_large", image_size=96))
    rnd = work / "random.pt"
    rnd.write_bytes(np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8).tobytes())
    text = work / "text.pt"
    text.write_text("not weights\n" * 50)
    pickled = work / "pickled.pt"
    torch.save(torch.nn.Linear(4, 4), pickled)
    plain = work / "plain.pt"
    torch.save(build_detector("ssdlite320_mobilenet_v3_large", image_size=96).state_dict(), plain)
    kitti = _kitti(work / "kitti", 30)
    no_stamps = _kitti(work / "no_stamps", 30, timestamps=False)
    first_broken = _kitti(work / "first_broken", 10, broken=(0,))
    some_broken = _kitti(work / "some_broken", 30, broken=(5, 12, 20))
    good_mp4 = _mp4(work / "good.mp4")
    truncated = work / "truncated.mp4"
    truncated.write_bytes(good_mp4.read_bytes()[: good_mp4.stat().st_size // 2])
    text_mp4 = work / "text.mp4"
    text_mp4.write_text("not a video\n" * 20)
    coco = work / "coco"
    (coco / "annotations").mkdir(parents=True)
    blocker = work / "a_file"
    blocker.write_text("")
    rep = work / "rep"

    def validate(name, model, streams, words, *extra, code=2, outputs=(), replays=False):
        args = ["validate", str(model), *(a for s in streams for a in ("--stream", str(s))), "--budget-ms", "100",
                "--report", str(rep / name), *extra]
        return Case(f"validate: {name}", args, code, words, [*([] if replays else [rep / name]), *outputs], replays)

    def engine(name, model, words, *extra):
        out = work / "eng" / name / "model.onnx"
        return Case(f"build-engine: {name}", ["build-engine", str(model), "--out", str(out), *extra], 2, words,
                    [out.parent, model.with_name(f"{model.stem}.source.onnx")])

    prune_job = _prune_job(work, rnd)
    cases = [
        validate("random-bytes checkpoint", rnd, [kitti], "not a PyTorch checkpoint (or damaged)"),
        validate("text checkpoint", text, [kitti], "not a PyTorch checkpoint (or damaged)"),
        validate("pickled-object checkpoint", pickled, [kitti], "holds pickled Python objects"),
        Case("validate: damaged reference model", ["validate", str(ckpt), str(rnd), "--stream", str(kitti),
                                                   "--budget-ms", "100", "--report", str(rep / "ref")], 2,
             "not a PyTorch checkpoint (or damaged)", [rep / "ref"]),
        validate("missing stream", ckpt, [work / "nope.mp4"], "does not exist"),
        validate("truncated MP4", ckpt, [truncated], "cannot be opened"),
        validate("text file named .mp4", ckpt, [text_mp4], "cannot be opened"),
        validate("bad second stream", ckpt, [kitti, text_mp4], "cannot be opened"),
        validate("first frame does not decode", ckpt, [first_broken], "its first frame does not decode"),
        validate("KITTI folder without timestamps.txt", ckpt, [no_stamps], "holds 30 images but no timestamps.txt"),
        validate("--video-out unsupported extension", ckpt, [kitti], "unsupported extension '.gif'",
                 "--video-out", str(work / "v.gif"), outputs=[work / "v.gif"]),
        validate("--video-out under a file", ckpt, [kitti], "is a file, not a folder",
                 "--video-out", str(blocker / "v.mp4")),
        validate("--fail-on unknown rule", ckpt, [kitti], "--fail-on 'p42'", "--fail-on", "p42"),
        validate("gate decode-errors:0, 3 of 30 frames broken (replays by design)", ckpt, [some_broken],
                 "3 frames failed to decode", "--fail-on", "p99,decode-errors:0", "--mode", "throughput", "--warmup",
                 "0", code=1, replays=True),
        engine("random-bytes checkpoint", rnd, "not a PyTorch checkpoint (or damaged)", "--val", str(coco)),
        engine("int8 without --calib", ckpt, "--precision int8 needs --calib", "--precision", "int8", "--val",
               str(coco)),
        engine("--backend tensorrt without TensorRT", ckpt, "--backend tensorrt", "--backend", "tensorrt",
               "--val", str(coco)),
        Case("build-engine: --out under a file", ["build-engine", str(ckpt), "--out", str(blocker / "m.onnx"),
                                                  "--val", str(coco)], 2, "is a file, not a folder",
             [work / "X.source.onnx"]),
        Case("prune: random-bytes checkpoint", ["prune", str(prune_job), "--no-progress"], 2,
             "not a PyTorch checkpoint (or damaged)", [work / "prune_out", work / "prune_cache"]),
        Case("prune: checkpoint of another model", ["prune", str(_prune_job(work, ckpt, "job_mismatch", num_classes=5)),
                                                    "--no-progress"], 2,
             "the checkpoint says ssdlite320_mobilenet_v3_large with 8 classes, the job says", [work / "prune_out",
                                                                                             work / "prune_cache"]),
        Case("prune: plain state_dict", ["prune", str(_prune_job(work, plain, "job_plain")), "--no-progress"], 2,
             "is a plain state_dict", [work / "prune_out", work / "prune_cache"]),
        Case("prune: val split without boxes", ["prune", str(_prune_job(work, ckpt, "job_empty",
                                                                        coco=_empty_coco(work))), "--no-progress"],
             2, "no boxes (annotations is empty)", [work / "prune_out", work / "prune_cache"]),
        Case("eval: text checkpoint", ["eval", str(text), "--data", str(coco), "--json", str(work / "e.json")], 2,
             "not a PyTorch checkpoint (or damaged)", [work / "e.json"]),
        Case("data synth: --images 0", ["data", "synth", "--out", str(work / "synth"), "--images", "0", "-q"], 2,
             "images must be an integer >= 1", [work / "synth" / "manifest.json"]),
    ]
    return cases


def _prune_job(work: Path, checkpoint: Path, name: str = "job", *, coco: Path | None = None, **model) -> Path:
    import yaml

    from tests.conftest import _write_coco

    job = yaml.safe_load((ROOT / "avprune/config/examples/prune_tiny.yaml").read_text())
    job["model"].update({"checkpoint": str(checkpoint), **model})
    if coco is None:
        coco = work / "prune_coco"
        if not coco.is_dir():
            _write_coco(coco, 2, 2)
    job["data"] = {"source": "coco", "root": str(coco), "val_images": 2}
    job.update(output_dir=str(work / "prune_out"), cache_dir=str(work / "prune_cache"))
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _empty_coco(work: Path) -> Path:
    """A COCO folder whose val split lists images but no boxes."""
    import json

    from tests.conftest import _write_coco

    root = work / "prune_coco_empty"
    if not root.is_dir():
        _write_coco(root, 2, 2)
    ann = root / "annotations" / "instances_val.json"
    ann.write_text(json.dumps({**json.loads(ann.read_text()), "annotations": []}))
    return root


# ----------------------------------------------------------------------------- running


def run_case(case: Case) -> Outcome:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    t0, cpu0 = time.perf_counter(), _children_cpu()
    proc = subprocess.run([sys.executable, "-m", "avprune", *case.args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    seconds, cpu_s = time.perf_counter() - t0, _children_cpu() - cpu0
    err = proc.stderr.strip()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    message = lines[-1] if lines else ""
    left = [str(p) for p in case.outputs if p.exists()]
    one_line = len(lines) == 1 or case.replays  # a replay logs its progress lines before the verdict
    found = case.expect_words in (proc.stdout if case.replays else err)
    unsafe = "weights_only" in err or "arbitrary code" in err
    correct = proc.returncode == case.expect_code and one_line and found and not left and not unsafe
    ok = correct and (case.replays or seconds < TARGET_S)
    shown = " ".join(a if len(a) < 40 else "…/" + Path(a).name for a in case.args)
    if case.replays:  # the verdict line on stdout, not the replay's progress
        message = next((ln for ln in reversed(proc.stdout.splitlines()) if case.expect_words in ln), "")
    return Outcome(case.name, "gate" if case.replays else "bad input", f"avprune {shown}", proc.returncode,
                   case.expect_code, round(seconds, 2), round(cpu_s, 2), message, one_line, found, left, unsafe, case.replays,
                   correct, ok)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for children, cumulative
    return usage.ru_utime + usage.ru_stime


def torch_import_seconds() -> tuple[float, float]:
    """Wall and CPU seconds a fresh interpreter takes to ``import torch`` right now: the floor of
    any case that must read a checkpoint's tensors, and (wall / CPU) a gauge of the machine's load."""
    t0, cpu0 = time.perf_counter(), _children_cpu()
    subprocess.run([sys.executable, "-c", "import torch"], check=True, timeout=300)
    return round(time.perf_counter() - t0, 2), round(_children_cpu() - cpu0, 2)


def _markdown(outcomes: list[Outcome], node_loss: dict | None, context: dict) -> str:
    bad = [o for o in outcomes if not o.replays]
    gates = [o for o in outcomes if o.replays]
    fast = sum(o.seconds < TARGET_S for o in bad)
    lines = [
        "## reliability",
        "",
        f"`python -m benchmarks.reliability` on {machine_line()}.",
        "",
        f"{len(bad)} bad inputs through the real CLI (a fresh `python -m avprune` each, so imports count): "
        f"{sum(o.correct for o in bad)} / {len(bad)} exit with the expected code, one line, the expected words, "
        f"nothing written and no `weights_only` hint; {fast} / {len(bad)} fail in under {TARGET_S:g} s "
        f"(median {np.median([o.seconds for o in bad]):.2f} s, max {max(o.seconds for o in bad):.2f} s; CPU time "
        f"median {np.median([o.cpu_s for o in bad]):.2f} s, max {max(o.cpu_s for o in bad):.2f} s), "
        "all before any export, fine-tune or replay. "
        "Exit codes: 0 ok, 1 gate failed, 2 input or usage error, 3 internal error.",
        "",
        f"Machine state during the run: load average {context['load_before']} before, {context['load_after']} after "
        f"(this process at nice {os.nice(0)}); a fresh `python -c 'import torch'` took "
        f"{context['torch_import_s']:.2f} s ({context['torch_import_cpu_s']:.2f} s CPU): wall seconds above the CPU "
        "seconds are time spent waiting for a core. "
        f"{sum(o.cpu_s < context['torch_import_cpu_s'] for o in bad)} / {len(bad)} bad inputs fail in less CPU time "
        "than that import alone, as they should: checkpoints are first read without torch (`perception.io.peek_torch_file`: "
        "random bytes, text, pickled objects, a plain state_dict and the detector/class identity), job files "
        "check detector names against a torch-free list (`perception.names`) and annotation files are read "
        "without torch (`perception.coco_json`); every tensor is still read by `torch.load(weights_only=True)` "
        "once the cheap checks pass.",
        "",
        "| bad input | exit (expected) | seconds | CPU s | ok | message |",
        "|---|---:|---:|---:|:-:|---|",
    ]
    lines += [_row(o) for o in bad]
    if gates:
        lines += ["", "Gate cases (not bad inputs: the run replays the stream on purpose, then the gate fails with "
                  "exit 1; the seconds are the replay's):", "",
                  "| gate | exit (expected) | seconds | CPU s | ok | verdict line |", "|---|---:|---:|---:|:-:|---|"]
        lines += [_row(o) for o in gates]
    if node_loss:
        lines += ["", f"Node loss ({node_loss.get('run_utc', '?')}; `--node-loss`): two `ray start` nodes on this "
                  "machine, 1 CPU each; the worker node's raylet SIGKILLed while a trial fine-tuned there:", "",
                  f"- exit code {node_loss['exit_code']}, {node_loss['seconds']:.0f} s; trials per node: "
                  f"{node_loss['trial_nodes']}",
                  f"- trials lost with the node: {node_loss['lost']}; retried on the head: {node_loss['retried']}; "
                  f"final candidate: {node_loss['selected']}"]
    return "\n".join(lines)


def _row(o: Outcome) -> str:
    msg = o.message.replace("|", "\\|")
    msg = msg if len(msg) < 110 else msg[:107] + "..."
    verdict = "yes" if o.ok else ("slow" if o.correct else "NO")
    return f"| {o.name} | {o.exit_code} ({o.expected_code}) | {o.seconds:.2f} | {o.cpu_s:.2f} | {verdict} | {msg} |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--node-loss", action="store_true", help="also run the two-node Ray node-loss scenario")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="avprune-reliability."))
    context = {"load_before": _load()}
    try:
        cases = build_cases(work)
        outcomes = []
        for case in cases:
            o = run_case(case)
            outcomes.append(o)
            print(f"{'ok ' if o.ok else 'BAD'} {o.seconds:6.2f} s ({o.cpu_s:5.2f} s CPU)  exit {o.exit_code}  [{o.kind}] {o.name}: "
                  f"{o.message[:100]}", flush=True)
        context["torch_import_s"], context["torch_import_cpu_s"] = torch_import_seconds()
        context["load_after"] = _load()
        node_loss = _previous_node_loss()  # kept from the last --node-loss run unless rerun now
        if args.node_loss:
            from tests.test_ray_two_node import run_node_loss

            node_loss = {k: v for k, v in run_node_loss(work / "node_loss").items() if k != "stdout"}
            node_loss["run_utc"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            node_loss["load_after"] = _load()
            print(f"node loss: { {k: v for k, v in node_loss.items() if k != 'stderr_tail'} }", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {"target_s": TARGET_S, "machine": machine_line(), **context, "cases": [asdict(o) for o in outcomes],
           "node_loss": node_loss}
    atomic_write_json(ASSETS / "reliability.json", doc)
    path = write_section("reliability", _markdown(outcomes, node_loss, context))
    print(f"wrote {ASSETS / 'reliability.json'} and the reliability section of {path}")
    return 0 if all(o.ok for o in outcomes) else 1


def _previous_node_loss() -> dict | None:
    path = ASSETS / "reliability.json"
    try:
        import json

        return json.loads(path.read_text()).get("node_loss")
    except (OSError, ValueError):
        return None


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
