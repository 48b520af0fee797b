"""The prune job: stage records and resume (stand-in stages), then real tiny jobs through Ray.

Real jobs use SSDlite at 128x128 on a hand-made 24-image COCO folder with an untrained dense
checkpoint: they test plumbing (Ray, Tune, fault tolerance, artifacts), not accuracy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from avprune.config.prune import PruneJobConfig
from avprune.prune_job.errors import InfeasibleBudgetError, JobConfigMismatchError, JobFolderInUseError
from avprune.prune_job.progress import JobProgress
from avprune.prune_job.records import Point
from avprune.prune_job.runner import Stage, run_stages
from avprune.prune_job.select import choose, pareto_front
from avprune.prune_job.state import StageStore
from tests.conftest import PY, ROOT, _free_port, _stop_cluster, tiny_job, write_tiny_coco

# ----------------------------------------------------------------------------- stage records


def _cfg(tmp_path: Path) -> PruneJobConfig:
    ckpt = tmp_path / "x.pt"
    ckpt.write_bytes(b"x")
    data = yaml.safe_load((ROOT / "avprune/config/examples/prune_tiny.yaml").read_text())
    data["model"]["checkpoint"] = str(ckpt)
    return PruneJobConfig.model_validate(data)


@pytest.mark.parametrize("controller", ["budget", "cubic"])
def test_candidates_prune_nothing_during_the_lr_warmup(tmp_path, controller):
    from avprune.prune_job.context import TrialSpec
    from avprune.prune_job.records import Candidate
    from avprune.prune_job.search import _controller

    cfg = _cfg(tmp_path)
    cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"steps": 40, "warmup_steps": 10,
                                                                           "measure_every": 5})})
    cand = Candidate(candidate_id="c0", index=0, importance="magnitude", controller=controller, ramp=1.0, seed=0)
    spec = TrialSpec(candidate=cand, job={}, out_dir=str(tmp_path), latency_table="", latency_budget_ms=1.0,
                     map_floor=0.0, dense_map=0.5)
    ctl = _controller(cfg, spec, None, lambda config: 10.0 * sum(config.values()) / max(1, len(config)),
                      lambda: (5.0, 0.5))
    if controller == "budget":  # the budget keeps its one name from the trial spec to the controller
        assert ctl.latency_budget_ms == spec.latency_budget_ms
    ctl.bind(["a", "b"], lambda u: {"a": round(64 * (1 - u)), "b": 64})
    for _ in range(10):
        ctl.step()
    assert ctl.target("a") == 0.0  # still warming up
    for _ in range(20):
        ctl.step()
    assert ctl.target("a") > 0.0  # pruning began after it


def test_the_tables_holdout_reaches_the_allocation_controller_as_its_saving_scale(tmp_path):
    """The latency-table stage's held-out pruned model (predicted vs measured) crosses the Tune boundary
    in the trial spec and sets the controller's saving scale; without one the scale is 1."""
    from avprune.prune_job.context import TrialSpec
    from avprune.prune_job.records import Candidate, LatencyTableRecord
    from avprune.prune_job.search import _controller, _holdout
    from pruning.latency_model import LatencyTable
    from tests.conftest import small_net

    rec = LatencyTableRecord(path="t.json", cache="c", source="measured", entries=1, overhead_ms=0.0,
                             in_graph_holdout_predicted_ms=2.0, in_graph_holdout_measured_ms=6.0)
    assert _holdout(rec) == (2.0, 6.0) and _holdout(LatencyTableRecord("t", "c", "m", 1, 0.0)) is None
    cfg = _cfg(tmp_path)
    cfg = cfg.model_copy(update={"pruning": cfg.pruning.model_copy(update={"controller": "allocation"})})
    import torch

    table = LatencyTable.measure(small_net(), torch.randn(1, 3, 16, 16), lambda m, x: 1.0, runtime="synthetic",
                                 device="test", multiple=8)
    dense = table.predict({})
    cand = Candidate(candidate_id="c0", index=0, importance="magnitude", controller="allocation", ramp=0.5, seed=0)
    for holdout, scale in (((0.5 * dense, 0.75 * dense), 0.5), (None, 1.0)):
        spec = TrialSpec(candidate=cand, job={}, out_dir=str(tmp_path), latency_table="", latency_budget_ms=1.0,
                         map_floor=0.0, dense_map=0.5, holdout_ms=holdout)
        spec = TrialSpec.from_dict(json.loads(json.dumps(spec.to_dict())))  # as Tune stores it
        assert spec.holdout_ms == holdout
        ctl = _controller(cfg, spec, table, lambda config: dense, lambda: (dense, 0.5))
        assert ctl.saving_scale == pytest.approx(scale)


@dataclass(frozen=True)
class _Seen:
    """A stand-in stage record: how many records the stage saw, and which."""

    value: int
    seen: tuple[str, ...]

    @property
    def note(self) -> str:
        return f"saw {self.value}"

    def to_dict(self) -> dict:
        return {"value": self.value, "seen": list(self.seen)}

    @classmethod
    def from_dict(cls, d: dict) -> _Seen:
        return cls(value=int(d["value"]), seen=tuple(d["seen"]))


def test_run_stages_records_each_stage_and_resume_skips_them(tmp_path):
    cfg, out = _cfg(tmp_path), tmp_path / "out"
    calls: list[str] = []

    def stage(name, fail=False):
        def fn(ctx):
            calls.append(name)
            if fail:
                raise RuntimeError(f"{name} broke")
            return _Seen(len(ctx.results), tuple(sorted(ctx.results)))

        return Stage(name, fn, _Seen)

    store = StageStore(out)
    store.open(fingerprint=cfg.fingerprint(), config={}, resume=False)
    with pytest.raises(RuntimeError, match="b broke"):
        run_stages([stage("a"), stage("b", fail=True), stage("c")], config=cfg, out_dir=out, store=store,
                   progress=JobProgress(False))
    assert store.finished() == ["a"] and not (out / "stages" / "b.json").exists()
    assert not list((out / "stages").glob(".*tmp"))  # no half-written record left behind

    # A finished stage without resume: refused, naming the folder and what is done (not CLI flags).
    with pytest.raises(JobFolderInUseError, match=r"already holds a prune job \(a done\)") as e:
        StageStore(out).open(fingerprint=cfg.fingerprint(), config={}, resume=False)
    assert str(out) in str(e.value) and "--" not in str(e.value)
    with pytest.raises(JobConfigMismatchError, match="different job config") as e:
        StageStore(out).open(fingerprint="other", config={}, resume=True)
    assert f"{cfg.fingerprint()} vs other" in str(e.value) and "--" not in str(e.value)

    calls.clear()
    store = StageStore(out)
    store.open(fingerprint=cfg.fingerprint(), config={}, resume=True)
    results = run_stages([stage("a"), stage("b"), stage("c")], config=cfg, out_dir=out, store=store,
                         progress=JobProgress(False))
    assert calls == ["b", "c"]  # "a" was loaded from its record
    assert results["a"] == _Seen(0, ())  # read back through its record type
    assert results["c"] == _Seen(2, ("a", "b"))
    assert store.finished() == ["a", "b", "c"]


def test_choose_highest_map_within_budget_with_deterministic_ties():
    cands = [
        Point(9.0, 0.50, 0.8, "c0", 0),
        Point(4.0, 0.48, 0.7, "c1", 1),
        Point(4.5, 0.48, 0.7, "c2", 2),  # same mAP and AP50 as c1: the lower index wins, not latency
        Point(3.0, 0.30, 0.6, "c3", 3),  # under the floor
    ]
    assert choose(cands, budget_ms=5.0, floor=0.4).source == "c1"
    assert choose(list(reversed(cands)), budget_ms=5.0, floor=0.4).source == "c1"


def test_choose_infeasible_reports_best_tradeoff_and_nearest_budget():
    cands = [Point(6.0, 0.45, source="c0", index=0), Point(4.0, 0.30, source="c1", index=1)]
    dense = Point(10.0, 0.50, source="dense")
    with pytest.raises(InfeasibleBudgetError) as e:
        choose(cands, budget_ms=5.0, floor=0.4, others=[dense])
    err = e.value
    assert err.nearest_latency_ms == pytest.approx(6.0)  # fastest point that keeps the floor
    assert err.nearest_map_floor == pytest.approx(0.30)  # best mAP within the budget
    assert (err.best_latency_ms, err.best_map) in {(6.0, 0.45), (4.0, 0.30)}
    assert "latency_ms >= 6.00" in str(err) and "map_floor <= 0.300" in str(err)
    # a floor above every measured model (a dense shadow fine-tuned past the checkpoint) and a budget
    # nobody reached: the message says so, not that mAP was lost
    with pytest.raises(InfeasibleBudgetError) as e:
        choose(cands, budget_ms=3.0, floor=0.6, others=[dense])
    assert e.value.nearest_latency_ms is None and e.value.nearest_map_floor is None
    assert "no measured model, the dense one included, keeps mAP >= 0.600, and none runs within 3.00 ms" in str(e.value)


@pytest.mark.parametrize(("steps", "hooked"), [(120, [20, 40, 60, 80, 100]), (130, [20, 40, 60, 80, 100, 120])])
def test_the_last_step_is_reported_by_finish_alone(tmp_path, steps, hooked):
    """The hook reports every measure_every steps before the last; the last is finish()'s report,
    made once pruned.pt is written. A hook report of the last step let ASHA stop a candidate that had
    trained every step before its model was saved (the demo's job: c0 'stopped early' at step 120
    of 120, no pruned.pt)."""
    from types import SimpleNamespace

    from avprune.prune_job.search import _Trial, report_count

    cfg = _cfg(tmp_path)
    cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"steps": steps, "measure_every": 20})})
    trial = _Trial(None, SimpleNamespace(config=cfg), tmp_path / "c0")
    trial.pruner = SimpleNamespace(predict_latency=None, masked_fraction=lambda: 0.0, channel_config=lambda: {})
    measured, reported = [], []
    trial.measure = lambda: measured.append(1)
    trial.report = lambda step, **_: reported.append(step)
    for s in range(steps):
        trial.hook(SimpleNamespace(step=s))
    # the last step is still measured when it falls on measure_every (its snapshot, reused by finish())
    assert reported == hooked and len(measured) == len(hooked) + (steps % 20 == 0)
    assert report_count(cfg.finetune) == len(hooked) + 1  # ASHA's max_t: the hook's reports and finish()'s


def test_asha_compares_candidates_only_after_their_ramps(tmp_path):
    from avprune.prune_job.records import Candidate
    from avprune.prune_job.search import asha_grace, ramp_end_step, recovery_steps

    def cands(*ramps: float) -> list[Candidate]:
        return [Candidate(candidate_id=f"c{i}", index=i, importance="magnitude", controller="allocation", ramp=r, seed=i)
                for i, r in enumerate(ramps)]

    cfg = _cfg(tmp_path)
    cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"steps": 400, "measure_every": 50,
                                                                           "warmup_steps": 40})})
    # the ramp ends at 40 + 0.5 * 360 = 220: its 5th report, then one recovering measurement
    assert asha_grace(cfg, cands(0.5, 0.5)) == 6
    assert asha_grace(cfg, cands(0.25, 1.0)) == 8  # a full-length ramp: compared at the last report only
    three = cfg.model_copy(update={"search": cfg.search.model_copy(update={"grace_period": 3})})
    # one-shot: cut at step 40, its floor not judged for half the steps after the warm-up (to 220)
    assert asha_grace(three, cands(0.0, 0.0)) == 6
    assert recovery_steps(three, cands(0.0)[0]) == 180 and recovery_steps(three, cands(0.5)[0]) == 0
    no_window = three.model_copy(update={"pruning": three.pruning.model_copy(update={"one_shot_recovery": 0.0})})
    assert asha_grace(no_window, cands(0.0, 0.0)) == 3  # no window: the configured grace holds
    # one helper says where every ramp ends (controller, reconstruction, blocks, ASHA)
    assert ramp_end_step(cfg, cands(0.5)[0]) == 220 and ramp_end_step(cfg, cands(0.0)[0]) == 41


def test_block_ramp_back_waits_out_a_one_shot_candidates_recovery_window(tmp_path):
    """Inside a one-shot candidate's window no floor is judged, the blocks' included: the controller's
    window when it keeps one (it moves with the steps held), else the configured one after the cut."""
    from avprune.prune_job.records import Candidate
    from avprune.prune_job.search import in_recovery
    from pruning.allocation_controller import AllocationController
    from pruning.controllers import FixedController
    from pruning.latency_model import LatencyTable

    cfg = _cfg(tmp_path)
    cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"steps": 400, "measure_every": 50,
                                                                           "warmup_steps": 40})})
    one_shot, ramp = (Candidate(candidate_id="c0", index=0, importance="magnitude", controller="allocation", ramp=r,
                                seed=0) for r in (0.0, 0.5))
    fixed = FixedController(0.0)  # no window of its own: the configured one, steps 41-220
    assert [in_recovery(cfg, one_shot, fixed, s) for s in (40, 41, 220, 221)] == [False, True, True, False]
    assert not any(in_recovery(cfg, ramp, fixed, s) for s in (40, 100, 220, 221, 300))
    table = LatencyTable(runtime="test", device="cpu", overhead_ms=5.0)
    ctrl = AllocationController(table, 2.0, total_steps=400, ramp_fraction=0.0, warmup_steps=40, recovery_steps=180)
    ctrl.held_steps = 30  # held under the floor: the window ends 30 steps later
    assert in_recovery(cfg, one_shot, ctrl, 230) and not in_recovery(cfg, one_shot, ctrl, 250)


def test_shadow_takes_the_slots_its_candidates_will_share(tmp_path):
    from avprune.prune_job.shadow import shadow_share

    cfg = _cfg(tmp_path)
    two = cfg.model_copy(update={"search": cfg.search.model_copy(update={"candidates": 2})})
    assert shadow_share(two, node_cpus=2) == (2, 2)
    assert shadow_share(two, node_cpus=16) == (2, 2)  # never more than the candidates will use
    assert shadow_share(two, node_cpus=1) == (1, 1)  # nor more than one node has
    four = two.model_copy(update={"search": two.search.model_copy(update={"candidates": 4}),
                                  "resources": two.resources.model_copy(update={"cpus_per_trial": 2, "torch_threads": 2})})
    assert shadow_share(four, node_cpus=6) == (6, 6)


def test_pareto_front_drops_dominated_points():
    pts = [Point(5, 0.4), Point(3, 0.2), Point(4, 0.5), Point(6, 0.45), Point(2, 0.1)]
    assert [(p.latency_ms, p.map) for p in pareto_front(pts)] == [(2, 0.1), (3, 0.2), (4, 0.5)]


# ----------------------------------------------------------------------------- real tiny jobs


@pytest.fixture(scope="module")
def ray_local():
    from avprune.prune_job.ray_exec import ray_session

    with ray_session(None, num_cpus=2, object_store_memory=128 * 1024**2) as info:
        yield info


def test_sensitivity_workers_share_the_layers(assets, ray_local, tmp_path):
    """4 layers on 2 Ray slots: each worker process scans its share of the layers (the record names
    the process per layer), none scans more than its share, and no layer is scanned by the driver."""
    from collections import Counter

    from avprune.prune_job.sensitivity import calls_per_worker, largest_units, scan

    cfg = PruneJobConfig.model_validate(tiny_job(assets, tmp_path / "job", **{"sensitivity.max_layers": 4}))
    layers = largest_units(cfg, 4)
    share = calls_per_worker(len(layers), cfg.resources.cpus_per_trial)
    curves = scan(cfg, layers, dense_value=0.0)
    assert sorted(curves) == sorted(layers)
    per_worker = Counter(rec.worker_pid for rec in curves.values())
    assert None not in per_worker and os.getpid() not in per_worker
    assert share == 2 and max(per_worker.values()) <= share  # max_calls retired each worker after its share
    assert len(per_worker) < len(layers)  # shared: fewer worker processes than layers
    for rec in curves.values():
        assert [c.sparsity for c in rec.curve] == cfg.sensitivity.sparsities


def _kill_first_trial_worker(out: Path, killed: list[int], stop: list[bool]) -> None:
    """Background thread: SIGKILL the first trial worker once it has started fine-tuning."""
    from avprune.prune_job.search import pid_files

    deadline = time.monotonic() + 240
    while not stop and time.monotonic() < deadline:
        pids = pid_files(out)
        if "c0" in pids and (out / "search" / "trials" / "c0" / "train" / "last.pt").exists():
            os.kill(pids["c0"], signal.SIGKILL)
            killed.append(pids["c0"])
            return
        time.sleep(0.2)


#: The reference job and the driver-killed one fold SSDlite's gates first (same config: same choice)
FOLD = {"pruning.fold_gates": 4}


@pytest.fixture(scope="module")
def reference(assets, ray_local, tmp_path_factory) -> dict:
    """The tiny job run in-process on the module's local Ray, with one trial worker SIGKILLed
    mid fine-tune; later tests compare their selection with this uninterrupted run's."""
    import threading

    from avprune.prune_job import run_prune_job

    out = tmp_path_factory.mktemp("reference") / "job"
    cfg = PruneJobConfig.model_validate(tiny_job(assets, out, **FOLD))
    killed: list[int] = []
    stop: list[bool] = []
    killer = threading.Thread(target=_kill_first_trial_worker, args=(out, killed, stop), daemon=True)
    killer.start()
    try:
        result = run_prune_job(cfg, out_dir=out, progress=False)
    finally:
        stop.append(True)
        killer.join()
    return {"result": result, "out": out, "killed": killed}


def test_tiny_job_local_ray_survives_a_killed_trial_worker(reference):
    result, out = reference["result"], reference["out"]
    assert reference["killed"], "the trial worker was never killed (the retry was not exercised)"
    assert result.candidate_id.split("@")[0] in {"c0", "c1"}  # a final model, or a trial's best snapshot
    for path in (result.checkpoint, result.onnx, result.report_json, result.report_html, out / "latency_table.json"):
        assert path.is_file(), path
    assert StageStore(out).finished() == ["baseline", "gate_fold", "latency_table", "sensitivity", "search", "select",
                                          "finalize"]
    report = json.loads(result.report_json.read_text())
    c0 = next(c for c in report["candidates"] if c["candidate_id"] == "c0")
    assert c0["status"] == "done" and c0["history"], c0  # retried after the kill, and finished
    # every measured point was timed paired with the dense model (another trial trains on the node)
    timed = [h for c in report["candidates"] for h in c["history"] if h.get("latency_ms") is not None]
    assert timed and all(h["load_factor"] > 0 for h in timed), timed
    assert {c["importance"] for c in report["candidates"]} == {"magnitude", "bn_scale"}
    assert report["layers"] and report["sensitivity"]["layers"]
    html = result.report_html.read_text()
    assert html.count("data:image/png;base64,") >= 3 and "<script src" not in html and "Pareto" in html
    assert result.pruned.params < result.dense.params  # the finalized model is physically smaller
    assert result.pruned.gmacs < result.dense.gmacs
    from perception.models import load_detector

    pruned = load_detector(result.checkpoint)
    assert sum(p.numel() for p in pruned.parameters()) == result.pruned.params
    # pruning.fold_gates: the 8 squeeze-excitation gates were folded before pruning; every trial
    # (the killed one resumed too) pruned the folded model, and the shipped checkpoint rebuilds it
    from torchvision.ops.misc import SqueezeExcitation

    fold = report["gate_fold"]
    assert len(fold["gates"]) == 8 and fold["p50_ms_folded"] > 0 and 0 <= fold["map_folded"] <= 1
    assert not any(isinstance(m, SqueezeExcitation) for m in pruned.modules())
    assert not report["removed_blocks"]  # folded gates are not depth pruning
    assert "Folded channel gates (8)" in html


def test_tiny_job_judges_its_relative_floor_against_a_dense_shadow(reference):
    """Issue #12: with budget.max_map_drop the search trains a dense shadow (its own Tune trial, same
    steps); every candidate measurement is judged against the shadow's mAP at that step minus the drop,
    and selection against its final mAP; report.json and report.html show both curves."""
    from avprune.prune_job.records import SearchRecord, SelectRecord

    out = reference["out"]
    search = SearchRecord.from_dict(StageStore(out).load("search"))
    sel = SelectRecord.from_dict(StageStore(out).load("select"))
    base = json.loads((out / "stages" / "baseline.json").read_text())["result"]
    shadow = search.shadow
    assert shadow is not None and shadow.max_map_drop == 1.0 and shadow.steps == 6
    assert [p.step for p in shadow.curve] == [0, 3, 6]  # the checkpoint, then every measure_every steps
    assert shadow.curve[0].map == base["dense"]["map"]
    attempts = list((out / "search" / "trials" / "shadow").glob("attempt-*.json"))
    assert attempts and (out / "search" / "shadow_tune").is_dir()  # a Ray Tune trial of its own
    curve = json.loads((out / "search" / "trials" / "shadow" / "curve.json").read_text())
    assert curve["done"] and [p["map"] for p in curve["points"]] == [p.map for p in shadow.curve[1:]]
    assert curve["torch_threads"] == 2  # alone before the candidates: it takes the 2 slots they share
    judged = [(c.candidate_id, h) for c in search.candidates for h in c.history if h.step is not None]
    assert judged
    for cid, h in judged:  # the floor at each measurement: shadow mAP at that step minus the drop
        assert h.map_floor == pytest.approx(max(0.0, shadow.map_at(h.step) - 1.0)), (cid, h)
    assert sel.floor_reference == "shadow" and sel.reference_map == pytest.approx(shadow.final_map)
    assert sel.map_floor == pytest.approx(shadow.final_floor)
    report = json.loads((out / "report.json").read_text())
    assert report["floor"]["reference"] == "shadow" and report["map_floor"] == pytest.approx(shadow.final_floor)
    assert [p["map"] for p in report["floor"]["shadow"]["curve"]] == [p.map for p in shadow.curve]
    assert set(report["floor"]["candidates"]) == {"c0", "c1"}
    assert "mAP floor" in (out / "report.html").read_text() and "dense shadow" in (out / "report.html").read_text()


def test_every_trial_of_the_tiny_job_trained_with_the_jobs_finetune_recipe(reference):
    """Candidates and the dense shadow fine-tune with one recipe (``JobEnv.finetune_settings``): what
    each trial's training saved in its resumable state, not TrainSettings' own defaults (augmentation,
    for one, is on there and off in the job)."""
    from dataclasses import asdict

    from avprune.prune_job.env import JobEnv
    from perception.models import read_checkpoint

    out = reference["out"]
    cfg = PruneJobConfig.model_validate(json.loads((out / "job.json").read_text())["config"])
    want = asdict(JobEnv(cfg).finetune_settings(seed=cfg.seed, threads=None))
    recipe = ("steps", "batch_size", "optimizer", "lr", "warmup_steps", "checkpoint_every", "augment")
    assert want["augment"] is False  # the job's default; TrainSettings' own is on
    trials = {p.parent.parent.name: p for p in (out / "search" / "trials").glob("*/train/last.pt")}
    assert set(trials) == {"c0", "c1", "shadow"}, trials
    for name, path in trials.items():
        saved = read_checkpoint(path)["extra"]["train_state"]["settings"]
        assert {k: saved[k] for k in recipe} == {k: want[k] for k in recipe}, name


def _cli(job: Path, *args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "avprune", "prune", str(job), "--no-progress", *args], cwd=ROOT,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **kw)


def test_driver_killed_then_resume_selects_the_same_candidate(assets, reference, tmp_path):
    """SIGKILL the whole driver (and its local Ray) once sensitivity is recorded; --resume finishes."""
    out = tmp_path / "job"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(tiny_job(assets, out, **FOLD)))
    proc = _cli(job)
    deadline = time.monotonic() + 240
    while not (out / "stages" / "sensitivity.json").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "sensitivity stage never finished"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = StageStore(out).finished()
    assert "search" not in done_before and "baseline" in done_before
    mtimes = {n: (out / "stages" / f"{n}.json").stat().st_mtime for n in done_before}

    again = _cli(job, "--resume")
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr
    assert {n: (out / "stages" / f"{n}.json").stat().st_mtime for n in done_before} == mtimes  # not redone
    selected = json.loads((out / "stages" / "select.json").read_text())["result"]["candidate_id"]
    assert f"candidate {selected}" in stdout
    # Same config (the output folder is not part of it): the uninterrupted job's choice.
    assert selected == reference["result"].candidate_id

    # Resuming a finished job redoes nothing and reports the same candidate (nor re-trains the dense shadow).
    shadow_dir = out / "search" / "trials" / "shadow"
    shadow_files = {p.name: p.stat().st_mtime for p in shadow_dir.iterdir()}
    assert "curve.json" in shadow_files and any(n.startswith("attempt-") for n in shadow_files)
    third = _cli(job, "--resume")
    stdout3, stderr3 = third.communicate(timeout=120)
    assert third.returncode == 0 and f"candidate {selected}" in stdout3
    assert "Ray not started" in stderr3  # nothing left to run: the records are read back
    assert {p.name: p.stat().st_mtime for p in shadow_dir.iterdir()} == shadow_files


@pytest.fixture
def ray_cluster():
    """A real `ray start --head` on 127.0.0.1 (auth off for this throwaway cluster), stopped after.

    Its own short RAY_TMPDIR (Unix socket paths are capped at 107 bytes) keeps it apart from
    any other Ray on the machine. It is stopped by the pids of its own processes (those that
    carry that RAY_TMPDIR), not with `ray stop`, which would end every Ray of this user.
    """
    import shutil
    import tempfile

    ray_bin = Path(PY).with_name("ray")
    port = _free_port()
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": tmp}
    start = subprocess.run(
        [str(ray_bin), "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
         "--include-dashboard=false", "--object-store-memory", str(128 * 1024**2), "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert start.returncode == 0, start.stderr
    try:
        yield f"127.0.0.1:{port}", env
    finally:
        _stop_cluster(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def test_address_runs_on_an_existing_cluster_and_infeasible_budget_exits_1(assets, tmp_path, ray_cluster):
    """`--address` connects to a running cluster; an impossible budget ends with exit code 1 (budget not met)."""
    address, env = ray_cluster
    out = tmp_path / "job"
    job = tmp_path / "job.yaml"
    # A reachable latency budget (the table's feasibility check passes) with a floor no model keeps:
    # a budget below the table's reach stops before fine-tuning instead (exit 2, tested below).
    data = tiny_job(assets, out, **{"budget.max_map_drop": None, "budget.map_floor": 1.0,
                                    "pruning.controller": "budget", "search.candidates": 1})
    job.write_text(yaml.safe_dump(data))
    proc = _cli(job, "--address", address, env=env)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr
    assert "infeasible budget" in stderr and "best trade-off reached" in stderr and "nearest feasible budget" in stderr
    assert "map_floor <=" in stderr  # the floor that the reached latency keeps
    # Nothing is lost: the best trade-off is finalized under a name that cannot be mistaken for a pass.
    assert StageStore(out).finished()[-1] == "finalize"
    assert not (out / "pruned.pt").exists() and (out / "best_tradeoff.pt").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["feasible"] is False and "infeasible budget" in report["infeasible"]["message"]
    assert "Budget NOT met" in (out / "report.html").read_text()
    # The job ran on the cluster: Tune's trial worker was one of the cluster's processes.
    assert (out / "search" / "trials" / "c0" / "pruned.pt").is_file()


def test_budget_below_the_tables_reach_stops_before_fine_tuning(assets, ray_local, tmp_path):
    """Issue #12: a budget the widest allowed pruning cannot reach (by the latency table) ends in the
    latency-table stage with the nearest feasible budget named: no sensitivity scan, no trial."""
    from avprune.errors import EXIT_INPUT_ERROR, exit_code_for
    from avprune.prune_job import run_prune_job
    from avprune.prune_job.errors import BudgetUnreachableError

    out = tmp_path / "job"
    cfg = PruneJobConfig.model_validate(tiny_job(assets, out, **{"budget.latency_ms": 0.01}))
    with pytest.raises(BudgetUnreachableError) as e:
        run_prune_job(cfg, out_dir=out, progress=False)
    assert exit_code_for(e.value) == EXIT_INPUT_ERROR
    msg = str(e.value)
    assert "budget.latency_ms: 0.01 ms" in msg and "nearest feasible budget: latency_ms >=" in msg
    assert e.value.nearest_latency_ms > 0.01
    assert StageStore(out).finished() == ["baseline", "gate_fold"] and not (out / "search").exists()
    # issue #13: the budget's dense p50 is the median of >= 5 timed blocks, each recorded
    base = StageStore(out).load("baseline")
    blocks = base["latency_blocks_ms"]
    assert len(blocks) >= 5 and base["latency"]["p50_ms"] == pytest.approx(float(np.median(blocks)))
    assert base["latency_spread"]["min_ms"] == min(blocks) and base["dense"]["p50_ms"] == base["latency"]["p50_ms"]


def test_allocation_controller_with_blocks_tiny_job(assets, ray_local, tmp_path):
    """Issues #12 + #14 in one tiny trial: the allocation controller (uniform, aligned groups of 16)
    with distillation and channel+block granularity. The kept counts are multiples of 16 (or the
    dense width), the blocks the budget needs are gated off and recorded, and the checkpoint
    rebuilds without them; report.json names the multiple, the allocation and the removed blocks."""
    from avprune.prune_job import run_prune_job
    from perception.models import load_detector

    out = tmp_path / "job"
    changes = {"budget.latency_ms": None, "budget.speedup": 1.06, "budget.max_map_drop": 1.0,
               "pruning.controller": "allocation", "pruning.allocation": "uniform", "pruning.granularity": "channel+block",
               "pruning.max_sparsity": 0.05, "pruning.importances": ["magnitude"], "search.candidates": 1,
               "sensitivity.max_layers": 1, "search.shadow_dense": False}
    cfg = PruneJobConfig.model_validate(tiny_job(assets, out, **changes))
    assert cfg.distill()
    try:
        run_prune_job(cfg, out_dir=out, progress=False)
    except InfeasibleBudgetError:
        pass  # measured latency on a shared machine may miss the budget; the artifacts are written either way
    trial = out / "search" / "trials" / "c0"
    rec = json.loads((trial / "pruning.json").read_text())
    assert rec["channel_multiple"] == 16 and rec["allocation"] == "uniform"
    points = rec["controller_points"]  # every measurement: what the controller aimed at and corrected
    assert points and all(pt["latency_ms"] > 0 and pt["correction"] is not None for pt in points)
    for name, ch in rec["channels"].items():
        assert ch["kept"] == ch["dense"] or ch["kept"] % 16 == 0, (name, ch)
    # at max_sparsity 0.05 the channels (groups of 16) reach almost nothing: blocks cover the budget
    assert rec["removed_blocks"], rec
    table = json.loads((out / "stages" / "latency_table.json").read_text())["result"]
    assert table["channel_multiple"] == 16 and "in the job config" in table["channel_multiple_reason"]
    assert set(rec["removed_blocks"]) <= set(table["blocks"])
    pruned = load_detector(trial / "pruned.pt")
    for b in rec["removed_blocks"]:
        assert type(pruned.get_submodule(b)).__name__ == "Identity"
    report = json.loads((out / "report.json").read_text())
    assert report["channel_multiple"]["value"] == 16 and report["allocation"]["mode"] == "uniform"
    assert {"dense", "kept"} <= set(next(iter(report["channels"].values())))
    removed = [b["block"] for b in report["removed_blocks"]]
    assert removed == sorted(rec["removed_blocks"]) or not report["candidate_id"] == "c0"
    html = (out / "report.html").read_text()
    assert "Channels per layer" in html and "Channel multiple" in html


def test_reconstruct_images_resolves_the_cut_once_in_a_tiny_job(assets, ray_local, tmp_path, monkeypatch):
    """pruning.reconstruct_images: the trial re-solves its consumer layers once, after its ramp, and
    records when, how many layers and their output error before/after in pruning.json. The output
    folder is given relative (``--out job``): Tune runs trials in folders of their own."""
    from avprune.prune_job import run_prune_job

    out = tmp_path / "job"
    changes = {"budget.latency_ms": None, "budget.speedup": 1.1, "budget.max_map_drop": 1.0,
               "pruning.controller": "allocation", "pruning.allocation": "uniform", "pruning.granularity": "channel",
               "pruning.max_sparsity": 0.5, "pruning.importances": ["magnitude"], "pruning.reconstruct_images": 4,
               "search.candidates": 1, "sensitivity.max_layers": 1, "search.shadow_dense": False}
    cfg = PruneJobConfig.model_validate(tiny_job(assets, out, **changes))
    monkeypatch.chdir(tmp_path)
    try:
        run_prune_job(cfg, out_dir=Path("job"), progress=False)
    except InfeasibleBudgetError:
        pass  # measured latency on a shared machine may miss the budget; the artifacts are written either way
    rec = json.loads((out / "search" / "trials" / "c0" / "pruning.json").read_text())
    solved = rec["reconstruction"]
    assert solved is not None, rec
    ft = cfg.finetune
    assert ft.warmup() < solved["step"] <= ft.steps and solved["step"] % cfg.pruning.update_every == 0
    cut = any(ch["kept"] < ch["dense"] for ch in rec["channels"].values())
    assert solved["layers"] >= 1 or not cut
    assert solved["mean_error_after"] <= solved["mean_error_before"]
    report = json.loads((out / "report.json").read_text())
    if report["candidate_id"] == "c0":  # the final model of c0 (not a mid-run snapshot) was selected
        assert report["reconstruction"] == solved
        assert f"at step {solved['step']} the {solved['layers']} 1x1 convs" in (out / "report.html").read_text()


def test_live_progress_callback_survives_tunes_pickling():
    """Tune pickles callbacks into the experiment state; the live display must not go with them."""
    from ray import cloudpickle

    from avprune.prune_job.progress import tune_callback

    with JobProgress(True) as progress:
        cb = tune_callback(progress, total_steps=10)
        cloudpickle.dumps(cb)  # what Tune does when it saves experiment state: fails if the display (locks) goes along
        state = cb.__getstate__()
        json.dumps(state)  # plain data only
        # what unpickling does, without loading any bytes
        restored = object.__new__(type(cb))
        restored.__setstate__(state)
    assert restored.total_steps == 10 and not restored.progress.enabled


def test_deliverables_include_each_trials_best_snapshot_in_a_fixed_order():
    from avprune.prune_job.records import Candidate, CandidateRecord, SearchRecord
    from avprune.prune_job.select import deliverables

    def rec(i, checkpoint, snapshot=None, step=None, steps=100):
        cand = Candidate(candidate_id=f"c{i}", index=i, importance="magnitude", controller="cubic", ramp=0.5, seed=i)
        return CandidateRecord(candidate=cand, status="done" if checkpoint else "stopped early", checkpoint=checkpoint,
                               snapshot=snapshot, snapshot_step=step, steps=steps if checkpoint else 40)

    search = SearchRecord(candidates=(rec(0, "a/pruned.pt", "a/snapshot.pt", 60), rec(1, None, "b/snapshot.pt", 40),
                                      rec(2, "c/pruned.pt"), rec(3, "d/pruned.pt", "d/snapshot.pt", 100)))
    got = [(d.candidate_id, d.index, d.checkpoint) for d in deliverables(search)]
    # c3's snapshot is from its last step: its final model again, not measured twice
    assert got == [("c0", 0, "a/pruned.pt"), ("c0@60", 1, "a/snapshot.pt"), ("c1@40", 3, "b/snapshot.pt"),
                   ("c2", 4, "c/pruned.pt"), ("c3", 6, "d/pruned.pt")]
    assert SearchRecord.from_dict(search.to_dict()) == search  # the record survives its JSON


# ----------------------------------------------------------------------------- a job folder from before the typed records

OLD_JOB = ROOT / "tests" / "data" / "old_job_folder"  # see its SOURCE.md


def _contains(old, new, path="") -> list[str]:
    """Where ``new`` lacks or changes a value ``old`` has (human notes aside)."""
    if isinstance(old, dict):
        if not isinstance(new, dict):
            return [path]
        return [p for k, v in old.items() if k != "note" for p in _contains(v, new.get(k, _MISSING), f"{path}.{k}")]
    if isinstance(old, list):
        if not isinstance(new, list) or len(new) != len(old):
            return [path]
        return [p for i, (a, b) in enumerate(zip(old, new, strict=True)) for p in _contains(a, b, f"{path}[{i}]")]
    return [] if old == new else [path]


_MISSING = object()


def test_job_folder_written_before_the_typed_records_resumes(tmp_path):
    """The records of a job folder written by the code before issue #11 read back into their types
    (and write back every value they held), the stored config keeps its fingerprint (so `--resume`
    accepts the folder), selection over the recorded measurements picks the recorded candidate, and a
    resume with finalize's record removed re-runs finalize on the old records and ships that candidate."""
    import shutil

    from avprune.prune_job.records import RECORD_TYPES, BaselineRecord, SelectRecord
    from avprune.prune_job.runner import default_stages, summarize
    from avprune.prune_job.select import pick
    from perception.models import build_detector, save_checkpoint

    out = tmp_path / "job"
    shutil.copytree(OLD_JOB, out)
    store = StageStore(out)
    names = ["baseline", "latency_table", "sensitivity", "search", "select", "finalize"]
    assert store.finished() == names
    records = {name: RECORD_TYPES[name].from_dict(store.load(name)) for name in names}
    for name, rec in records.items():
        assert not _contains(store.load(name), rec.to_dict()), (name, _contains(store.load(name), rec.to_dict()))
    base, sel = records["baseline"], records["select"]
    assert isinstance(base, BaselineRecord) and isinstance(sel, SelectRecord)
    assert base.latency_budget_ms == 1000.0 and sel.candidate_id == "c0"
    chosen, infeasible = pick(sel.measured, base)  # re-selection on the recorded measurements
    assert chosen.candidate_id == sel.candidate_id and infeasible is None

    # The stored config validates under today's schema to the same fingerprint (paths swapped for
    # files that exist here to validate, then swapped back).
    stored = json.loads((out / "job.json").read_text())
    ckpt, coco = tmp_path / "dense.pt", tmp_path / "coco"
    for split in ("train", "val"):  # finalize verifies the shipped ONNX on validation images
        write_tiny_coco(coco, split, n=6, size=(128, 128), seed=int(split == "val"))
    save_checkpoint(ckpt, build_detector("ssdlite320_mobilenet_v3_large", num_classes=8, image_size=128))
    data = json.loads(json.dumps(stored["config"]))
    data["model"]["checkpoint"], data["data"]["root"], data["output_dir"] = str(ckpt), str(coco), str(out)
    cfg = PruneJobConfig.model_validate(data)
    dumped = cfg.model_dump(mode="json")
    # issues #12/#14 added these; everything the old file held is kept as it was (round_to: 8 is
    # the channel multiple the old job pruned with)
    assert dumped["pruning"].pop("channel_multiple") == data["pruning"]["round_to"] == 8
    assert dumped["pruning"].pop("allocation") == "uniform" and dumped["finetune"].pop("distill") is None
    assert dumped["pruning"].pop("in_graph_calibration") is None and dumped["search"].pop("shadow_dense") is None
    assert dumped["pruning"].pop("latency_costs") == "measured"  # every table before the field was timed
    assert dumped["sensitivity"].pop("metric") is None  # resolved: what the old job meant
    # the allocation controller's floor handling (not read by this job's cubic controller)
    assert [dumped["pruning"].pop(k) for k in ("floor_allowance", "step_back", "regrow_until", "max_cut_per_update")
            ] == [0.02, 0.5, 0.8, 0.08]
    assert dumped["pruning"].pop("reconstruct_images") == 0  # reconstruction off: what every older job did
    assert dumped["pruning"].pop("fold_gates") == 0  # gates kept: what every older job did
    # no older job could have a one-shot candidate (ramps were in (0, 1]), so the window changes nothing
    assert dumped["pruning"].pop("one_shot_recovery") == 0.5
    # the old job's latency-table record stands on resume: the saving fit's default does not re-run it
    assert dumped["pruning"].pop("saving_fit") is None
    assert dumped["budget"].pop("latency_margin") == 0.0  # aimed at the budget: what every older job did
    # adaptive BN, resolved to 64 images: it changes how a changed network is measured, not the records kept
    assert dumped["finetune"].pop("bn_recalibration_images") is None
    # augmentation, resolved to off: a trial resumed mid-fine-tune trains on raw frames from there on
    assert dumped["finetune"].pop("augment") is None
    assert dumped["pruning"].pop("stable_masks") is False  # every older job re-ranked its masks at each update
    assert dumped["sensitivity"].pop("bn_recalibration_images") == 0  # the scan's BNs frozen: what every scan did
    assert dumped == data  # no other field added, dropped or re-defaulted
    as_stored = cfg.model_copy(update={
        "model": cfg.model.model_copy(update={"checkpoint": Path(stored["config"]["model"]["checkpoint"])}),
        "data": cfg.data.model_copy(update={"root": Path(stored["config"]["data"]["root"])}),
    })
    assert as_stored.fingerprint() == stored["fingerprint"]
    store.open(fingerprint=as_stored.fingerprint(), config=stored["config"], resume=True)  # accepted

    # Resume with finalize to redo: a stand-in model where the selected checkpoint was (the real one is
    # 1 MB and not kept); every other stage is read from its old record, none runs (no Ray here).
    (out / "stages" / "finalize.json").unlink()
    (out / sel.checkpoint).parent.mkdir(parents=True)
    shutil.copy(ckpt, out / sel.checkpoint)
    results = run_stages(default_stages(), config=cfg, out_dir=out, store=store, progress=JobProgress(False))
    assert store.finished()[-1] == "finalize"
    result = summarize(out, results, {})
    assert result.candidate_id == "c0" and result.latency_budget_ms == 1000.0
    assert result.pruned.p50_ms == pytest.approx(sel.selected.p50_ms)
    report = json.loads(result.report_json.read_text())
    assert report["candidate_id"] == "c0" and report["feasible"] is True and len(report["candidates"]) == 2
    assert result.checkpoint.is_file() and result.onnx.is_file() and result.report_html.is_file()
