"""Bad inputs fail early and clearly, and leave nothing behind (issue 15).

Each case runs the real CLI (``avprune.cli.main``) and asserts the exit code from the one table
(``avprune.errors``), the one-line message, and that no output was written. Validate runs use
the fake runtimes of ``tests.test_validate_cli`` on a simulated clock, so "nothing was replayed"
is checked exactly: the runtime records every call.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import deploy.realtime
import deploy.runtimes
from avprune.cli import build_parser, main
from avprune.errors import EXIT_CODES_HELP, exit_code_for
from deploy.realtime import SimulatedClock
from tests.conftest import IdRuntime, stamps, write_kitti, write_mp4
from tests.conftest import stream_frames as make_frames

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def opened(monkeypatch) -> list[IdRuntime]:
    """Fake 20 ms models (any path); every runtime opened is recorded, with its calls."""
    clock = SimulatedClock()
    monkeypatch.setattr(deploy.realtime, "MonotonicClock", lambda: clock)
    runtimes: list[IdRuntime] = []

    def opener(path, *, backend=None, device="cpu", threads=None, host_ops="host"):
        rt = IdRuntime(clock, lambda i: 20.0)
        runtimes.append(rt)
        return rt

    monkeypatch.setattr(deploy.runtimes, "open_runtime", opener)
    return runtimes


@pytest.fixture
def model(tmp_path) -> str:
    p = tmp_path / "m.onnx"
    p.write_bytes(b"fake model for the fake runtime")
    return str(p)


@pytest.fixture
def kitti(tmp_path) -> str:
    return str(write_kitti(tmp_path / "kitti", make_frames(9), stamps(9)))


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, f"expected one line, got:\n{err}"
    return err


def _corrupt_files(tmp_path: Path) -> dict[str, Path]:
    import torch

    rnd = tmp_path / "random.pt"
    rnd.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    text = tmp_path / "text.pt"
    text.write_text("this is a README, not weights\n" * 20)
    pickled = tmp_path / "pickled.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a whole pickled module: runs code when unpickled
    return {"random": rnd, "text": text, "pickled": pickled}


# ----------------------------------------------------------------------------- case 2: corrupt .pt


@pytest.mark.parametrize("kind", ["random", "text"])
def test_corrupt_checkpoint_in_validate_and_build_engine(tmp_path, capsys, opened, kitti, kind):
    bad = _corrupt_files(tmp_path)[kind]
    report = tmp_path / "rep"
    rc = main(["validate", str(bad), "--stream", kitti, "--budget-ms", "50", "--report", str(report)])
    line = _err_line(capsys)
    assert rc == 2 and line == f"avprune validate: error: not a PyTorch checkpoint (or damaged): {bad}"
    assert not report.exists() and not opened  # failed before any runtime was opened or frame replayed

    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    out = tmp_path / "eng" / "x.onnx"
    rc = main(["build-engine", str(bad), "--out", str(out), "--val", str(coco)])
    line = _err_line(capsys)
    assert rc == 2 and line == f"avprune build-engine: error: not a PyTorch checkpoint (or damaged): {bad}"
    assert not out.parent.exists()


def test_pickled_module_is_refused_without_suggesting_unsafe_load(tmp_path, capsys, opened, kitti):
    bad = _corrupt_files(tmp_path)["pickled"]
    rc = main(["validate", str(bad), "--stream", kitti, "--budget-ms", "50"])
    line = _err_line(capsys)
    assert rc == 2 and f"{bad} holds pickled Python objects" in line
    assert "weights_only" not in line and "arbitrary code" not in line and not opened


@pytest.mark.parametrize("kind", ["random", "text"])
def test_corrupt_checkpoint_in_prune_writes_no_output_folder(tmp_path, capsys, kind):
    import yaml

    from tests.conftest import ROOT, _write_coco

    bad = _corrupt_files(tmp_path)[kind]
    job = yaml.safe_load((ROOT / "avprune/config/examples/prune_tiny.yaml").read_text())
    out = tmp_path / "out"
    job["model"]["checkpoint"] = str(bad)
    job["data"] = {"source": "coco", "root": str(_write_coco(tmp_path / "coco", 2, 2)), "val_images": 2}
    job.update(output_dir=str(out), cache_dir=str(tmp_path / "cache"))
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    rc = main(["prune", str(path), "--no-progress"])
    line = _err_line(capsys)
    assert rc == 2 and line == f"avprune prune: error: not a PyTorch checkpoint (or damaged): {bad}"
    assert not out.exists() and not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------- case 3: int8 without --calib


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from perception.models import build_detector, save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "X.pt"
    save_checkpoint(path, build_detector("ssdlite320_mobilenet_v3_large", image_size=96))
    return path


def test_int8_without_calib_fails_before_export(tmp_path, capsys, checkpoint, monkeypatch):
    import deploy.export

    def no_export(*a, **k):
        raise AssertionError("export started before the options were checked")

    monkeypatch.setattr(deploy.export, "export_onnx", no_export)
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    out = tmp_path / "eng" / "X.onnx"
    rc = main(["build-engine", str(checkpoint), "--out", str(out), "--precision", "int8", "--val", str(coco)])
    line = _err_line(capsys)
    assert rc == 2 and "--precision int8 needs --calib DATA" in line
    assert not out.parent.exists()
    assert not list(checkpoint.parent.glob("*.onnx"))  # no X.source.onnx beside anything
    # a --calib that is not there fails the same way, naming it
    rc = main(["build-engine", str(checkpoint), "--out", str(out), "--precision", "int8", "--calib",
               str(tmp_path / "nope.mp4"), "--val", str(coco)])
    assert rc == 2 and "nope.mp4 does not exist" in _err_line(capsys) and not out.parent.exists()


# ----------------------------------------------------------------------------- case 4: bad --video-out


def test_bad_video_out_fails_before_replay(tmp_path, capsys, opened, model, kitti):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    report = tmp_path / "rep"
    cases = [
        (tmp_path / "v.gif", "unsupported extension '.gif'"),
        (tmp_path / "v", "unsupported extension '(none)'"),
        (blocker / "v.mp4", "is a file, not a folder"),
        (tmp_path, "is a folder; give a file path"),
    ]
    for dest, cause in cases:
        rc = main(["validate", model, "--stream", kitti, "--budget-ms", "50", "--report", str(report),
                   "--video-out", str(dest)])
        line = _err_line(capsys)
        assert rc == 2 and line.startswith("avprune validate: error: --video-out") and cause in line, line
        assert "codec" not in line  # the old, wrong cause
    assert not report.exists() and not opened
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "kitti", "m.onnx"]  # no probe left


# ----------------------------------------------------------------------------- case 5 (part): streams first


def test_bad_second_stream_fails_before_the_first_is_replayed(tmp_path, capsys, opened, model, kitti):
    text_mp4 = tmp_path / "text.mp4"
    text_mp4.write_text("not a video\n" * 10)
    bad_frame0 = write_kitti(tmp_path / "k2", make_frames(3), stamps(3))
    (bad_frame0 / "image_02" / "data" / "0000000000.png").write_bytes(b"\x89PNG broken")
    for spec, words in ((str(text_mp4), "cannot be opened"), (str(bad_frame0), "its first frame does not decode")):
        rc = main(["validate", model, "--stream", kitti, "--stream", spec, "--budget-ms", "50",
                   "--report", str(tmp_path / "rep")])
        line = _err_line(capsys)
        assert rc == 2 and words in line and Path(spec).name in line, line
    assert not opened and not (tmp_path / "rep").exists()


# ----------------------------------------------------------------------------- case 6: native logs


def test_truncated_and_text_mp4_print_one_clean_line(tmp_path, capfd, opened, model):
    full = write_mp4(tmp_path / "full.mp4", make_frames(10)).read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full[: len(full) // 2])
    text = tmp_path / "text.mp4"
    text.write_text("hello\n" * 40)
    for bad in (cut, text):
        rc = main(["validate", model, "--stream", str(bad), "--budget-ms", "50"])
        captured = capfd.readouterr()
        err = captured.err.strip()
        assert rc == 2 and err.count("\n") == 0, err
        assert err.startswith(f"avprune validate: error: video {bad}") and "cannot be opened" in err
        assert "moov" not in err and "WARN" not in err and "VIDEOIO" not in err
    assert not opened
    import cv2

    assert cv2.utils.logging.getLogLevel() != cv2.utils.logging.LOG_LEVEL_SILENT  # restored
    assert "OPENCV_FFMPEG_LOGLEVEL" not in os.environ or os.environ["OPENCV_FFMPEG_LOGLEVEL"] != "-8"


# ----------------------------------------------------------------------------- case 8: KITTI without timestamps


def test_kitti_folder_without_timestamps(tmp_path, capsys, opened, model):
    root = write_kitti(tmp_path / "drive", make_frames(12), stamps(12))
    (root / "image_02" / "timestamps.txt").unlink()
    rc = main(["validate", model, "--stream", str(root), "--budget-ms", "50"])
    line = _err_line(capsys)
    assert rc == 2 and "holds 12 images but no timestamps.txt" in line and "--fps" in line, line
    assert not opened
    report = tmp_path / "rep"
    rc = main(["validate", model, "--stream", str(root), "--budget-ms", "50", "--fps", "10", "--warmup", "0",
               "--report", str(report)])
    assert rc == 0, capsys.readouterr().err
    import json

    doc = json.loads((report / "report.json").read_text())
    assert doc["overall"][0]["stats"]["offered"] == 12
    assert doc["streams"][0]["notes"] == ["timestamps are frame index / 10 FPS (no timestamps.txt)"]


# ----------------------------------------------------------------------------- case 9: decode errors gate


def test_decode_errors_gate(tmp_path, capsys, opened, model):
    root = write_kitti(tmp_path / "k", make_frames(12), stamps(12))
    for i in (3, 7, 9):
        (root / "image_02" / "data" / f"{i:010d}.png").write_bytes(b"\x89PNG broken")
    base = ["validate", model, "--stream", str(root), "--budget-ms", "500", "--warmup", "0"]
    assert main(base) == 0  # latency alone passes: decode failures are not latency misses
    capsys.readouterr()
    assert main([*base, "--fail-on", "p99,decode-errors:0"]) == 1
    assert "3 frames failed to decode > 0 allowed" in capsys.readouterr().out
    assert main([*base, "--fail-on", "p99", "--fail-on", "decode-errors:3"]) == 0
    capsys.readouterr()
    assert main([*base, "--fail-on", "decode-errors:x"]) == 2
    assert "decode-errors:N" in _err_line(capsys)


# ----------------------------------------------------------------------------- case 10: one exit-code table


def _leaf_parsers(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from ([sub] if not any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)
                            else _leaf_parsers(sub))


def test_every_command_help_ends_with_the_exit_code_table():
    leaves = list(_leaf_parsers(build_parser()))
    assert {p.prog.split(" ", 1)[1] for p in leaves} >= {"data synth", "data import-kitti", "train", "eval", "prune",
                                                         "build-engine", "validate"}
    for p in leaves:
        text = p.format_help()
        assert EXIT_CODES_HELP.strip() in text, p.prog
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "| 3 | internal error" in readme and "| 2 | input or usage error" in readme


def test_exceptions_map_to_one_table(monkeypatch, capsys, tmp_path):
    from avprune.prune_job.errors import InfeasibleBudgetError

    infeasible = InfeasibleBudgetError(latency_budget_ms=1, map_floor=0.5, best_latency_ms=2, best_map=0.4,
                                       nearest_latency_ms=2, nearest_map_floor=None)
    assert [exit_code_for(e) for e in (ValueError("v"), FileNotFoundError("f"), TypeError("t"), infeasible,
                                       RuntimeError("r"), KeyError("k"), KeyboardInterrupt())] == [2, 2, 2, 1, 3, 3, 130]
    import avprune.commands.eval as eval_cmd

    def crash(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(eval_cmd, "run", crash)
    rc = main(["eval", str(tmp_path / "m.pt"), "--data", str(tmp_path)])
    line = _err_line(capsys)
    assert rc == 3 and line == ("avprune eval: internal error: division by zero "
                                "(ZeroDivisionError; run with -vv for the traceback)")


# ----------------------------------------------------------------------------- case 11: --video-out


def test_video_out_honours_max_frames(tmp_path, opened, model, kitti):
    import cv2

    video = tmp_path / "v.mp4"
    assert main(["validate", model, "--stream", kitti, "--budget-ms", "100", "--warmup", "0", "--max-frames", "5",
                 "--video-out", str(video)]) == 0
    cap = cv2.VideoCapture(str(video))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 5
    cap.release()


def test_labels_near_the_top_are_drawn_below_the_banner():
    from deploy.report_video import BANNER_HEIGHT, banner, draw_detections, label_origin
    from perception.detections import Detections

    x, y = label_origin(10, 2, 60, 128, 96)
    assert y - 10 >= BANNER_HEIGHT and y <= 60  # inside the box, under the banner
    assert label_origin(10, 50, 90, 128, 96) == (12, 46)  # room above: the usual place
    # Pixels: a box touching the top edge; its label must survive the banner drawn over the frame.
    dets = Detections(boxes=np.array([[4.0, 0.0, 120.0, 80.0]], np.float32), scores=np.array([0.9], np.float32),
                      labels=np.array([1], np.int64))
    img = banner(draw_detections(np.zeros((96, 128, 3), np.uint8), dets), "status", alarm=False)
    colour = np.array([230, 25, 75])
    # rows between the banner and the box's bottom edge (y=80), columns inside its side edges (x=4, 120)
    label_rows = np.where((np.abs(img[BANNER_HEIGHT + 1:70, 8:100].astype(int) - colour).sum(-1) < 60).any(1))[0]
    assert len(label_rows) >= 3  # the text's strokes, drawn below the banner
