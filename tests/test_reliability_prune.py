"""The prune job's bad inputs and folders (issue 15, cases 1, 7 and 12), through the real CLI.

Each case asserts the exit code from the one table, the one-line message, and that nothing was
written (no output folder, no cache). Ray is a tripwire in the CLI cases: starting it fails the
test, so "refused before Ray starts" is checked, not assumed.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
import yaml

import avprune.prune_job.ray_exec
from avprune.cli import main
from avprune.config.prune import PruneJobConfig
from tests.conftest import ROOT, _write_coco

pytestmark = pytest.mark.timeout(120)

SSD = "ssdlite320_mobilenet_v3_large"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A dense SSDlite checkpoint (8 classes), one with 4 classes, a plain state_dict, a COCO set."""
    from perception.models import build_detector, save_checkpoint

    base = tmp_path_factory.mktemp("prune_inputs")
    torch.manual_seed(0)
    model = build_detector(SSD, image_size=128)
    save_checkpoint(base / "dense.pt", model)
    torch.save(model.state_dict(), base / "plain.pt")
    save_checkpoint(base / "four.pt", build_detector(SSD, num_classes=4, image_size=128))
    return {"dense": base / "dense.pt", "plain": base / "plain.pt", "four": base / "four.pt",
            "coco": _write_coco(base / "coco", 4, 3)}


@pytest.fixture
def no_ray(monkeypatch):
    def tripwire(*a, **k):
        raise AssertionError("Ray was started before the inputs were checked")

    monkeypatch.setattr(avprune.prune_job.ray_exec, "ray_session", tripwire)


def _job(tmp_path: Path, files: dict[str, Path], *, ckpt: Path | None = None, coco: Path | None = None,
         **model) -> Path:
    job = yaml.safe_load((ROOT / "avprune/config/examples/prune_tiny.yaml").read_text())
    job["model"].update({"checkpoint": str(ckpt or files["dense"]), **model})
    job["data"] = {"source": "coco", "root": str(coco or files["coco"]), "val_images": 2}
    job.update(output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, f"expected one line, got:\n{err}"
    return err


def _nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------- case 1: another model's checkpoint


def test_checkpoint_of_another_model_is_refused_naming_both(tmp_path, capsys, files, no_ray):
    four = files["four"]
    cases = [
        ({}, f"the checkpoint says {SSD} with 4 classes, the job says {SSD} with 8 classes"),
        ({"name": "fasterrcnn_mobilenet_v3_large_320_fpn", "num_classes": 5},
         f"the checkpoint says {SSD} with 4 classes, the job says fasterrcnn_mobilenet_v3_large_320_fpn with 5 classes"),
    ]
    for model, words in cases:
        rc = main(["prune", str(_job(tmp_path, files, ckpt=four, **model)), "--no-progress"])
        line = _err_line(capsys)
        assert rc == 2 and line.startswith(f"avprune prune: error: model.checkpoint {four} does not match"), line
        assert words in line and "model.name, model.num_classes" in line, line
        _nothing_written(tmp_path)


def _table_config(tmp_path: Path, **budget) -> PruneJobConfig:
    ckpt = tmp_path / "x.pt"
    ckpt.write_bytes(b"x")
    data = yaml.safe_load((ROOT / "avprune/config/examples/prune_tiny.yaml").read_text())
    data["model"]["checkpoint"] = str(ckpt)
    data["budget"].update(runtime="pytorch", **budget)
    data["cache_dir"] = str(tmp_path / "cache")
    return PruneJobConfig.model_validate(data)


def _net(width: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(width, 8, 3, padding=1)).eval()


def test_latency_cache_is_keyed_by_the_graph_not_the_name(tmp_path, caplog):
    from avprune.prune_job.latency_table import graph_fingerprint, load_or_measure

    calls: list[tuple[int, ...]] = []

    def measure(module, shape):  # a MAC count as "latency": the test is about which table is used
        calls.append(shape)
        return float(sum(p.numel() for p in module.parameters())) * 1e-4

    cfg = _table_config(tmp_path)
    x = torch.zeros(1, 3, 32, 32)
    t16, p16, src = load_or_measure(_net(16), x, cfg, measure)
    assert src == "measured" and calls and p16.is_file()
    n = len(calls)
    again, p, src = load_or_measure(_net(16), x, cfg, measure)  # other weights, same graph: reused
    assert (src, p, len(calls)) == ("cache", p16, n) and again.entries == t16.entries
    # Same job config (same model.name), another graph: its own table, never the other's.
    t32, p32, src = load_or_measure(_net(32), x, cfg, measure)
    assert src == "measured" and p32 != p16 and len(calls) > n and t32.entries != t16.entries
    # Threads are part of the key too.
    _, p2, src = load_or_measure(_net(16), x, _table_config(tmp_path, threads=2), measure)
    assert src == "measured" and p2 not in (p16, p32)
    # A cached file whose stored fingerprint does not match is re-measured, with a log line.
    doc = json.loads(p16.read_text())
    doc["meta"]["fingerprint"] = "0" * 16
    p16.write_text(json.dumps(doc))
    n = len(calls)
    with caplog.at_level(logging.WARNING, logger="avprune.prune_job.latency_table"):
        _, p, src = load_or_measure(_net(16), x, cfg, measure)
    assert src == "measured" and p == p16 and len(calls) > n
    assert "measured for another graph/runtime" in caplog.text and "re-measuring" in caplog.text
    assert json.loads(p16.read_text())["meta"]["fingerprint"] != "0" * 16
    # The detector's graph: the class count changes it, weights do not.
    from perception.models import build_detector

    fp8 = graph_fingerprint(build_detector(SSD, image_size=128))
    torch.manual_seed(1)
    assert graph_fingerprint(build_detector(SSD, image_size=128)) == fp8
    assert graph_fingerprint(build_detector(SSD, num_classes=4, image_size=128)) != fp8


# ----------------------------------------------------------------------------- case 7: failures leave nothing


def _coco_variant(tmp_path: Path, files: dict[str, Path], kind: str) -> Path:
    import shutil

    root = tmp_path / f"coco_{kind}"
    shutil.copytree(files["coco"], root)
    ann = root / "annotations" / "instances_val.json"
    doc = json.loads(ann.read_text())
    if kind == "no_boxes":
        doc["annotations"] = []
    else:  # no images
        doc["images"], doc["annotations"] = [], []
    ann.write_text(json.dumps(doc))
    return root


@pytest.mark.parametrize("kind,words", [
    ("no_boxes", "instances_val.json has 3 images but no boxes (annotations is empty): nothing to score mAP on"),
    ("no_images", "instances_val.json: the data set is empty (no images)"),
])
def test_empty_data_set_fails_before_anything_is_written(tmp_path, capsys, files, no_ray, kind, words):
    rc = main(["prune", str(_job(tmp_path, files, coco=_coco_variant(tmp_path, files, kind))), "--no-progress"])
    line = _err_line(capsys)
    assert rc == 2 and words in line, line
    _nothing_written(tmp_path)


def test_plain_state_dict_says_what_to_do_from_the_cli(tmp_path, capsys, files, no_ray):
    plain = files["plain"]
    rc = main(["prune", str(_job(tmp_path, files, ckpt=plain)), "--no-progress"])
    line = _err_line(capsys)
    assert rc == 2 and line.startswith(f"avprune prune: error: {plain} is a plain state_dict"), line
    assert "`avprune train TRAIN.yaml`" in line and "build_detector" not in line
    _nothing_written(tmp_path)
    # build-engine and eval give the same message before anything runs
    rc = main(["build-engine", str(plain), "--out", str(tmp_path / "e" / "x.onnx"), "--val", str(files["coco"])])
    line = _err_line(capsys)
    assert rc == 2 and "is a plain state_dict" in line and "build_detector" not in line
    assert not (tmp_path / "e").exists()
    rc = main(["eval", str(plain), "--data", str(files["coco"])])
    line = _err_line(capsys)
    assert rc == 2 and "is a plain state_dict" in line and "build_detector" not in line


@pytest.fixture(scope="module")
def ray_local():
    from avprune.prune_job.ray_exec import ray_session

    with ray_session(None, num_cpus=1, object_store_memory=80 * 1024**2) as info:
        yield info


class _Rec:
    """A stand-in stage record: the runner only needs note / to_dict / from_dict."""

    note = "ok"

    def to_dict(self) -> dict:
        return {}

    @classmethod
    def from_dict(cls, d: dict) -> _Rec:
        return cls()


def _stage(name: str, fail: bool = False):
    from avprune.prune_job.runner import Stage

    def run(ctx):
        (ctx.out_dir / "work").mkdir(exist_ok=True)
        (ctx.out_dir / "work" / f"{name}.txt").write_text("partial")
        if fail:
            raise RuntimeError(f"{name} broke")
        return _Rec()

    return Stage(name, run, _Rec)


def test_failure_after_the_checks_leaves_no_folder_or_a_failed_marker(tmp_path, files, ray_local):
    from avprune.config.prune import load_prune_config
    from avprune.prune_job.runner import run_prune_job

    cfg = load_prune_config(_job(tmp_path, files))
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="first broke"):
        run_prune_job(cfg, progress=False, stages=[_stage("first", fail=True)])
    assert not out.exists()  # nothing finished: what the run wrote is gone, the folder with it
    out.mkdir()
    (out / "mine.txt").write_text("the user's")  # a folder that existed keeps what was there
    with pytest.raises(RuntimeError, match="first broke"):
        run_prune_job(cfg, progress=False, stages=[_stage("first", fail=True)])
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    (out / "mine.txt").unlink()

    with pytest.raises(RuntimeError, match="second broke"):
        run_prune_job(cfg, progress=False, stages=[_stage("first"), _stage("second", fail=True)])
    failed = json.loads((out / "failed.json").read_text())
    assert failed["error"] == "RuntimeError" and failed["finished_stages"] == ["first"]
    with pytest.raises(Exception, match="already holds a prune job"):  # kept for --resume, not overwritten
        run_prune_job(cfg, progress=False, stages=[_stage("first")])
    with pytest.raises(KeyError, match="baseline"):  # the summary needs the real records; the stages finished
        run_prune_job(cfg, progress=False, resume=True, stages=[_stage("first"), _stage("second")])
    assert (out / "stages" / "second.json").is_file() and not (out / "failed.json").exists()  # superseded


# ----------------------------------------------------------------------------- case 12: --resume trust


class _Boom:
    """Unpickling this writes a marker file: proof that a planted pickle was (not) loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def _plant(out: Path, marker: Path) -> None:
    tune = out / "search" / "tune"
    tune.mkdir(parents=True)
    (tune / "experiment_state.pkl").write_bytes(pickle.dumps(_Boom(marker)))


def test_resume_refuses_a_folder_it_cannot_trust(tmp_path, capsys, files, no_ray):
    from avprune.config.prune import load_prune_config

    job = _job(tmp_path, files)
    fingerprint = load_prune_config(job).fingerprint()
    out, marker = tmp_path / "out", tmp_path / "pwned"

    def folder(**job_json) -> None:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        _plant(out, marker)
        if job_json:
            (out / "job.json").write_text(json.dumps({"version": 1, "config": {}, **job_json}))

    uid = os.getuid()
    cases = [
        (dict(fingerprint="0123456789abcdef", owner_uid=uid), f"different job config (fingerprint 0123456789abcdef vs "
                                                             f"{fingerprint})"),
        (dict(fingerprint=fingerprint, owner_uid=uid + 1), f"job.json names owner uid {uid + 1}, this user is uid {uid}"),
        ({}, "it holds job results but no job.json"),
    ]
    for job_json, words in cases:
        folder(**job_json)
        rc = main(["prune", str(job), "--resume", "--no-progress"])
        line = _err_line(capsys)
        assert rc == 2 and words in line, line
        assert not marker.exists()
    # files another user owns, or that everyone may write, are refused too (before the stored fingerprint is
    # even read)
    folder(fingerprint=fingerprint, owner_uid=uid)
    pkl = out / "search" / "tune" / "experiment_state.pkl"
    pkl.chmod(0o666)
    rc = main(["prune", str(job), "--resume", "--no-progress"])
    line = _err_line(capsys)
    assert rc == 2 and f"{pkl} is writable by every user" in line and "unpickling" in line, line
    pkl.chmod(0o644)
    if uid == 0:  # only root can give a file away
        os.chown(pkl, 4242, -1)
        rc = main(["prune", str(job), "--resume", "--no-progress"])
        line = _err_line(capsys)
        assert rc == 2 and f"{pkl} is owned by uid 4242, not by this user (uid {uid})" in line, line
    assert not marker.exists()
    assert json.loads((out / "job.json").read_text())["fingerprint"] == fingerprint  # left as it was


# ----------------------------------------------------------------------------- where the job ran


def _attempt(tmp_path: Path, n: int) -> dict:
    from avprune.prune_job.cluster import record_attempt

    work = tmp_path / "search" / "trials" / f"c{n}"
    work.mkdir(parents=True, exist_ok=True)
    return json.loads(record_attempt(work).read_text())


def test_trial_attempts_name_their_node_and_the_cluster_block_finds_none_lost(tmp_path, ray_local):
    import ray

    from avprune.prune_job.cluster import cluster_block, node_snapshot, trial_attempts
    from avprune.prune_job.ray_exec import map_tasks

    start = node_snapshot()
    rows = map_tasks(_attempt, [{"tmp_path": tmp_path, "n": 0}, {"tmp_path": tmp_path, "n": 1}])
    node = ray.get_runtime_context().get_node_id()
    assert {r["node_id"] for r in rows} == {node} and all(r["worker_pid"] != os.getpid() for r in rows)
    block = cluster_block(start, node_snapshot(), trial_attempts(tmp_path))
    assert [n["node_id"] for n in block["nodes_start"] if n["alive"]] == [node]
    assert block["lost_nodes"] == [] and block["retried"] == {}
    assert set(block["trials"]) == {"c0", "c1"} and all(len(v) == 1 for v in block["trials"].values())


def test_cluster_block_names_the_lost_node_and_the_retried_trials():
    from avprune.prune_job.cluster import cluster_block

    start = [{"node_id": "H", "alive": True}, {"node_id": "W", "alive": True}]
    end = [{"node_id": "H", "alive": True}, {"node_id": "W", "alive": False}]
    attempts = {"c0": [{"node_id": "W", "worker_pid": 11, "started_at": 1.0},
                       {"node_id": "H", "worker_pid": 12, "started_at": 5.0}],
                "c1": [{"node_id": "H", "worker_pid": 13, "started_at": 1.5}]}
    block = cluster_block(start, end, attempts)
    assert block["lost_nodes"] == ["W"]
    assert block["retried"] == {"c0": {"attempts": 2, "lost_on": ["W"], "finished_on": "H"}}
    assert block["trials"]["c1"] == [{"node_id": "H", "worker_pid": 13}]
