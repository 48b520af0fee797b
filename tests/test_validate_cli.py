"""``avprune validate`` end to end: exit codes, report.json, topics, video, and a real SSDlite run.

Most tests swap in a fake runtime on a simulated clock (shared with the pacing engine through
``deploy.realtime.MonotonicClock``), so pass/fail outcomes are exact whatever the machine's load.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import deploy.realtime
import deploy.runtimes
from avprune.cli import main
from deploy.realtime import SimulatedClock
from tests.conftest import TOPIC, IdRuntime, stamps, write_kitti, write_mcap
from tests.conftest import stream_frames as make_frames

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def sim(monkeypatch, tmp_path):
    """Fake models on a simulated clock: a model file's name says its per-frame time in ms."""
    clock = SimulatedClock()
    monkeypatch.setattr(deploy.realtime, "MonotonicClock", lambda: clock)

    def opener(path, *, backend=None, device="cpu", threads=None, host_ops="host"):
        spec = Path(path).stem  # e.g. "m20" (20 ms) or "m250x3" (250 ms every 3rd call, else 50)
        if spec.startswith("bad"):
            raise RuntimeError("[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model failed\nstack trace ...")
        if "x" in spec:
            slow = float(spec[1:].split("x")[0])
            return IdRuntime(clock, lambda i: slow if i % 3 == 0 else 50.0)
        return IdRuntime(clock, lambda i: float(spec[1:]))

    monkeypatch.setattr(deploy.runtimes, "open_runtime", opener)

    def model(name: str) -> str:
        p = tmp_path / f"{name}.onnx"
        p.write_bytes(name.encode())
        return str(p)

    return model


@pytest.fixture
def kitti(tmp_path) -> str:
    return str(write_kitti(tmp_path / "kitti", make_frames(9), stamps(9)))


def validate(*args: str) -> int:
    return main(["validate", *args])


def test_pass_writes_versioned_report(sim, kitti, tmp_path):
    report_dir = tmp_path / "rep"
    code = validate(sim("m20"), "--stream", kitti, "--budget-ms", "33.3", "--warmup", "2", "--report", str(report_dir))
    assert code == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["schema"] == "avprune.validate.report" and report["schema_version"] == 1
    assert report["verdict"] == {"passed": True, "gated_model": 0, "fail_on": ["p99"], "reasons": []}
    stats = report["overall"][0]["stats"]
    assert (stats["warmup_frames"], stats["offered"], stats["processed"], stats["p99_ms"]) == (2, 7, 7, 20.0)
    assert report["models"][0]["sha256"] and report["models"][0]["runtime"]["backend"] == "fake"
    assert report["streams"][0]["kind"] == "kitti"
    assert {"cpu", "libraries", "python"} <= set(report["environment"])
    assert report["results"][0]["frames"]["status"].count("processed") == 9
    html = (report_dir / "report.html").read_text()
    assert 'id="timeline"' in html and "PASS" in html
    assert not list(report_dir.glob(".*"))  # atomic writes leave no temporaries


def test_fail_exit_code_and_rules(sim, kitti, tmp_path, capsys):
    # 10 fps; 250 ms on every 3rd call, else 50. Drop policy timeline (ms):
    # f0 0-250 late | drop f1, f2 250-300 | f3 300-350 | f4 400-650 late | drop f5, f6 650-700
    # f7 700-750 | f8 800-1050 late  ->  3 late + 2 dropped of 9 (55.6%), p50 100 ms, p99 250 ms
    slow = sim("m250x3")
    assert validate(slow, "--stream", kitti, "--budget-ms", "100", "--warmup", "0") == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "p99 250.00 ms > budget 100 ms" in out
    assert validate(slow, "--stream", kitti, "--budget-ms", "100", "--warmup", "0", "--fail-on", "p50") == 0
    assert validate(slow, "--stream", kitti, "--budget-ms", "100", "--warmup", "0", "--fail-on", "miss-rate:0.6") == 0
    assert validate(slow, "--stream", kitti, "--budget-ms", "100", "--warmup", "0", "--fail-on", "p50,miss-rate:50%") == 1
    # queue policy: every frame is late
    report_dir = tmp_path / "q"
    validate(slow, "--stream", kitti, "--budget-ms", "100", "--warmup", "0", "--drop-policy", "queue",
             "--report", str(report_dir))
    stats = json.loads((report_dir / "report.json").read_text())["overall"][0]["stats"]
    assert (stats["late"], stats["dropped"], stats["longest_miss_run"]) == (9, 0, 9)


def test_reference_model_does_not_gate(sim, kitti, tmp_path):
    report_dir = tmp_path / "rep"
    code = validate(sim("m20"), sim("m250x3"), "--stream", kitti, "--stream", kitti, "--budget-ms", "100",
                    "--warmup", "0", "--report", str(report_dir), "--mode", "throughput")
    assert code == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert [m["role"] for m in report["models"]] == ["candidate", "reference"]
    assert [o["verdict"]["passed"] for o in report["overall"]] == [True, False]
    assert len(report["results"]) == 4
    # 3 slow calls per stream (the 3 untimed sample-frame calls in between keep the rhythm)
    assert report["overall"][1]["stats"]["sustained_fps"] == pytest.approx(18 / 2.1)
    html = (report_dir / "report.html").read_text()
    assert "m20.onnx" in html and "m250x3.onnx" in html and "not gating" in html
    # paired timing on the simulated clock: reference p50 50 ms (2 calls in 3) / candidate 20 ms
    paired = report["paired"]
    assert (paired["candidate"], paired["reference"]) == ("m20.onnx", "m250x3.onnx")
    assert paired["speedup"] == pytest.approx(2.5) and paired["speedup_low"] <= 2.5 <= paired["speedup_high"]
    assert (paired["frames"], paired["rounds"], paired["blocks"], paired["notes"]) == (16, 12, 16 * 12, [])
    assert paired["summaries"]["m20.onnx"]["n"] == 16 * 12
    assert "Paired speed-up" in html and "2.50x as fast as m250x3.onnx" in html


def test_reference_that_cannot_load_is_an_error_before_any_replay(sim, kitti, tmp_path, capsys):
    report_dir = tmp_path / "rep"
    code = validate(sim("m20"), sim("bad"), "--stream", kitti, "--budget-ms", "100", "--report", str(report_dir))
    assert code == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "reference model" in lines[0] and "bad.onnx" in lines[0], captured.err
    assert "INVALID_PROTOBUF" in lines[0] and "stack trace" not in captured.err
    assert "m20.onnx on" not in captured.err + captured.out  # the candidate was never played
    assert not report_dir.exists()


def test_errors_exit_2(sim, kitti, tmp_path, capsys):
    model = sim("m20")
    missing = str(tmp_path / "nope.mp4")
    assert validate(model, "--stream", missing, "--budget-ms", "33") == 2
    assert "nope.mp4" in capsys.readouterr().err
    assert validate(model, "--stream", kitti, "--budget-ms", "33", "--fail-on", "p42") == 2
    assert validate(model, "--stream", kitti) == 2  # no budget
    assert validate("--stream", kitti, "--budget-ms", "33") == 2  # no model
    assert validate(model, "--stream", kitti, "--budget-ms", "33", "--warmup", "100") == 2  # nothing left
    broken = tmp_path / "broken.mcap"
    broken.write_bytes(write_mcap(tmp_path / "ok.mcap", make_frames(3), stamps(3)).read_bytes()[:900])
    assert validate(model, "--stream", f"{broken}:{TOPIC}", "--budget-ms", "33") == 2
    assert "broken.mcap" in capsys.readouterr().err
    assert validate(model, "--stream", f"{tmp_path / 'ok.mcap'}:/no/such", "--budget-ms", "33") == 2
    assert "/camera/front/image_raw" in capsys.readouterr().err  # the topics that exist
    with pytest.raises(SystemExit) as e:
        validate(model, "--stream", kitti, "--budget-ms", "33", "--mode", "bogus")
    assert e.value.code == 2


def test_list_topics(tmp_path, capsys):
    path = write_mcap(tmp_path / "d.mcap", make_frames(2), stamps(2))
    assert validate("--list-topics", "--stream", str(path)) == 0
    out = capsys.readouterr().out
    assert TOPIC in out and "sensor_msgs/msg/Image" in out


def test_video_out_side_by_side(sim, kitti, tmp_path):
    import cv2

    video = tmp_path / "out" / "annotated.mp4"
    assert validate(sim("m20"), sim("m30"), "--stream", kitti, "--budget-ms", "100", "--warmup", "0",
                    "--video-out", str(video)) == 0
    cap = cv2.VideoCapture(str(video))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 9
    assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (2 * 64, 48)
    cap.release()


@pytest.mark.slow
def test_real_ssdlite_checkpoint(tmp_path):
    """The real runtime path: untrained SSDlite320 checkpoints through open_runtime (PyTorch); the
    reference takes another input size and class count, and is still compared (and the report says so)."""
    from perception.models import build_detector, save_checkpoint

    ckpt, ref = tmp_path / "ssdlite.pt", tmp_path / "ssdlite_256_4cls.pt"
    save_checkpoint(ckpt, build_detector("ssdlite320_mobilenet_v3_large"))
    save_checkpoint(ref, build_detector("ssdlite320_mobilenet_v3_large", num_classes=4, image_size=(256, 256)))
    kitti = write_kitti(tmp_path / "kitti", make_frames(4), stamps(4))
    report_dir = tmp_path / "rep"
    # Throughput mode and a 60 s budget: the outcome cannot depend on how loaded the machine is.
    code = validate(str(ckpt), str(ref), "--stream", str(kitti), "--budget-ms", "60000", "--mode", "throughput",
                    "--warmup", "1", "--threads", "1", "--report", str(report_dir), "--paired-frames", "2",
                    "--paired-rounds", "3")
    assert code == 0
    report = json.loads((report_dir / "report.json").read_text())
    paired = report["paired"]
    assert paired["frames"] == 2 and paired["summaries"]["ssdlite.pt"]["n"] == 6
    assert paired["speedup"] > 0 and paired["speedup_low"] <= paired["speedup"] <= paired["speedup_high"]
    notes = " ".join(paired["notes"])
    assert "320x320" in notes and "256x256" in notes and "class counts (ssdlite.pt: 8" in notes
    assert set(paired["stages"]["ssdlite.pt"]) == {"preprocess", "graph", "postprocess"}
    assert "different input sizes" in (report_dir / "report.html").read_text()
    rt = report["models"][0]["runtime"]
    assert rt["backend"] == "pytorch" and report["models"][0]["sha256"]
    stages = report["overall"][0]["stages"]
    assert stages["inference"]["mean_ms"] > 0 and stages["decode"]["mean_ms"] > 0
    assert np.isclose(sum(stages[s]["mean_ms"] for s in ("queue", "decode", "preprocess", "inference", "postprocess")),
                      stages["end_to_end"]["mean_ms"], rtol=1e-3)


def test_host_ops_graph_runs_the_folded_graph(tmp_path):
    """``--host-ops graph``: an exported SSDlite320 runs with its pre/post-processing in the graph,
    and the report says so; a checkpoint (PyTorch) is refused with the fix named, exit 2."""
    from deploy.export import export_onnx
    from perception.models import build_detector, save_checkpoint

    model = build_detector("ssdlite320_mobilenet_v3_large")
    onnx_path = export_onnx(model, tmp_path / "ssdlite.onnx", exporter="legacy").path
    kitti = write_kitti(tmp_path / "kitti", make_frames(3), stamps(3))
    report_dir = tmp_path / "rep"
    code = validate(str(onnx_path), "--stream", str(kitti), "--budget-ms", "60000", "--mode", "throughput",
                    "--warmup", "1", "--threads", "1", "--report", str(report_dir), "--host-ops", "graph")
    assert code == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["config"]["host_ops"] == "graph"
    assert report["models"][0]["runtime"]["extra"]["host_ops"] == "graph"
    ckpt = tmp_path / "ssdlite.pt"
    save_checkpoint(ckpt, model)
    assert validate(str(ckpt), "--stream", str(kitti), "--budget-ms", "60000", "--host-ops", "graph") == 2
    from deploy.validation import ValidationConfig

    with pytest.raises(ValueError, match="host_ops must be one of host, graph; got 'gpu'"):
        ValidationConfig(budget_ms=33.3, host_ops="gpu")
