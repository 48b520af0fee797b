"""The dense shadow (issue #12): the floor at a measurement, selection against its final mAP, its
config switch, and that a finished shadow is never trained again. No Ray here (the tiny job in
tests/test_prune_job.py runs the shadow as a Tune trial)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from avprune.config.base import ConfigError
from avprune.config.prune import PruneJobConfig, load_prune_config
from avprune.prune_job import ray_exec, shadow
from avprune.prune_job.context import StageContext, TrialSpec
from avprune.prune_job.progress import JobProgress
from avprune.prune_job.records import (
    BaselineRecord,
    Candidate,
    CandidateRecord,
    MeasuredModel,
    ModelSummary,
    SearchRecord,
    SelectRecord,
    ShadowPoint,
    ShadowRecord,
)
from avprune.prune_job.select import judged_floor, pick
from deploy.timing import LatencySummary

ROOT = Path(__file__).resolve().parents[1]
CURVE = (ShadowPoint(0, 0.50), ShadowPoint(3, 0.60), ShadowPoint(6, 0.62))


def _base(dense_map: float = 0.50, drop: float = 0.05) -> BaselineRecord:
    return BaselineRecord(dense=ModelSummary(map=dense_map, map50=0.8, p50_ms=10.0, p99_ms=11.0, params=100, gmacs=1.0),
                          latency=LatencySummary(10.0, 10.5, 11.0, 10.2, 5), latency_budget_ms=6.0,
                          map_floor=dense_map - drop, val_images=6)


def _measured(cid: str, index: int, m: float, ms: float = 5.0) -> MeasuredModel:
    return MeasuredModel(candidate_id=cid, index=index, checkpoint=f"{cid}.pt", map=m, map50=0.7, p50_ms=ms,
                         p99_ms=ms, raw_p50_ms=ms, dense_p50_ms_beside=10.0, params=50, gmacs=0.5)


def test_floor_at_a_measurement_is_the_shadows_map_at_that_step_minus_the_drop():
    rec = ShadowRecord(curve=CURVE, max_map_drop=0.05, seed=0, steps=6)
    cand = Candidate(candidate_id="c0", index=0, importance="magnitude", controller="budget", ramp=0.5, seed=0)
    spec = TrialSpec(candidate=cand, job={}, out_dir="/x", latency_table="t.json", latency_budget_ms=6.0,
                     map_floor=0.45, dense_map=0.50, floor_curve=[(p.step, p.map) for p in rec.curve],
                     max_map_drop=rec.max_map_drop)
    for step, want in ((0, 0.45), (2, 0.45), (3, 0.55), (5, 0.55), (6, 0.57), (9, 0.57)):
        assert spec.floor_at(step) == pytest.approx(want) and rec.floor_at(step) == pytest.approx(want)
    again = TrialSpec.from_dict(json.loads(json.dumps(spec.to_dict())))  # Tune stores it as plain data
    assert again == spec and again.floor_at(3) == pytest.approx(0.55)
    # without a shadow the floor is the constant one; an older spec (no curve) reads back that way
    plain = {k: v for k, v in spec.to_dict().items() if k not in ("floor_curve", "max_map_drop", "shadow")}
    assert TrialSpec.from_dict(plain).floor_at(3) == 0.45
    assert rec.final_map == 0.62 and rec.final_floor == pytest.approx(0.57)
    assert ShadowRecord.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec


def test_selection_judges_against_the_shadows_final_map():
    base = _base()  # the starting checkpoint's floor: 0.45
    cand = Candidate(candidate_id="c0", index=0, importance="magnitude", controller="budget", ramp=0.5, seed=0)
    search = SearchRecord(candidates=(CandidateRecord(candidate=cand, status="done"),),
                          shadow=ShadowRecord(curve=CURVE, max_map_drop=0.05, seed=0, steps=6))
    floor = judged_floor(base, search, 0.05)
    assert (floor.reference, floor.map_floor, floor.reference_map) == ("shadow", pytest.approx(0.57), 0.62)
    measured = [_measured("c0", 0, 0.56), _measured("c1", 2, 0.58, ms=5.9)]
    assert pick(measured, base)[0].candidate_id == "c1"  # both pass 0.45; highest mAP
    chosen, infeasible = pick(measured, base, floor)
    assert chosen.candidate_id == "c1" and infeasible is None
    chosen, infeasible = pick(measured[:1], base, floor)  # 0.56 meets the checkpoint's floor, not the shadow's
    assert infeasible is not None and infeasible.map_floor == pytest.approx(0.57)
    assert pick(measured[:1], base)[1] is None
    # without a shadow: the starting checkpoint (relative floor) or the absolute floor, said so
    assert judged_floor(base, SearchRecord(candidates=search.candidates), 0.05).reference == "checkpoint"
    assert judged_floor(base, None, None).reference == "absolute"
    assert "dense shadow" in floor.describe(0.05) and "0.62" in floor.describe(0.05)
    # the select record keeps the floor's reference; a record written before it reads back without one
    sel = SelectRecord(candidate_id="c1", checkpoint="c1.pt", selected=measured[1], measured=tuple(measured),
                       pareto=(), map_floor=0.57, floor_reference="shadow", reference_map=0.62)
    assert SelectRecord.from_dict(sel.to_dict()) == sel
    old = {k: v for k, v in sel.to_dict().items() if k not in ("map_floor", "floor_reference", "reference_map")}
    assert SelectRecord.from_dict(old).map_floor is None


def _cfg(tmp_path: Path, **budget) -> dict:
    ckpt = tmp_path / "x.pt"
    ckpt.write_bytes(b"x")
    data = yaml.safe_load((ROOT / "avprune/config/examples/prune_tiny.yaml").read_text())
    data["model"]["checkpoint"] = str(ckpt)
    data["output_dir"] = str(tmp_path / "out")
    data["budget"].update(budget)
    return data


def test_shadow_dense_switch(tmp_path):
    data = _cfg(tmp_path)
    cfg = PruneJobConfig.model_validate(data)
    assert cfg.shadow_dense()  # on by default with max_map_drop
    off = PruneJobConfig.model_validate({**data, "search": {**data["search"], "shadow_dense": False}})
    assert not off.shadow_dense() and off.fingerprint() != cfg.fingerprint()
    absolute = _cfg(tmp_path, max_map_drop=None, map_floor=0.3)
    assert not PruneJobConfig.model_validate(absolute).shadow_dense()  # an absolute floor stays absolute
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(absolute))
    with pytest.raises(ConfigError, match="shadow_dense.*absolute"):
        load_prune_config(path, {"search.shadow_dense": True})


def test_in_graph_calibration_switch(tmp_path):
    data = _cfg(tmp_path)
    assert not PruneJobConfig.model_validate(data).pruning.in_graph()
    lat = {**data, "pruning": {**data["pruning"], "controller": "allocation", "allocation": "latency"}}
    assert PruneJobConfig.model_validate(lat).pruning.in_graph()
    assert PruneJobConfig.model_validate(
        {**data, "pruning": {**data["pruning"], "in_graph_calibration": True}}).pruning.in_graph()
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="in_graph_calibration"):
        load_prune_config(path, {"pruning.in_graph_calibration": True, "pruning.granularity": "block"})


def test_a_finished_shadow_is_read_back_not_run_again(tmp_path, monkeypatch):
    cfg = PruneJobConfig.model_validate(_cfg(tmp_path))
    out = tmp_path / "out"
    base = _base(dense_map=0.30, drop=1.0)
    ctx = StageContext(config=cfg, env=None, out_dir=out, progress=JobProgress(False), results={"baseline": base})
    work = shadow.work_dir(out)
    work.mkdir(parents=True)
    (work / "curve.json").write_text(json.dumps({"points": [{"step": 3, "map": 0.31, "map50": 0.5}], "done": False}))
    assert shadow.record_from(work, cfg, base, out) is None  # unfinished: it would be resumed
    calls = []
    monkeypatch.setattr(ray_exec, "run_trials", lambda *a, **k: calls.append(k) or [])
    with pytest.raises(RuntimeError, match="shadow_dense: false"):
        shadow.run(ctx, "t.json")  # the (stand-in) Tune run left it unfinished: said so, with the way out
    assert calls and calls[0]["name"] == "shadow_tune" and calls[0]["resume"] is True and calls[0]["scheduler"] is None
    (work / "curve.json").write_text(json.dumps({"points": [{"step": 3, "map": 0.31, "map50": 0.5},
                                                            {"step": 6, "map": 0.33, "map50": 0.55}], "done": True}))
    calls.clear()
    rec = shadow.run(ctx, "t.json")
    assert not calls  # done: read from its curve, no Ray
    assert [(p.step, p.map) for p in rec.curve] == [(0, 0.30), (3, 0.31), (6, 0.33)]
    assert rec.max_map_drop == 1.0 and rec.steps == cfg.finetune.steps and rec.path == "search/trials/shadow"


def test_the_benchmark_gives_a_second_granularity_the_first_jobs_finished_shadow(tmp_path):
    """benchmarks.prune_job: the shadow does not depend on the granularity, so the second job reads
    the first's finished curve; its folder is claimed as the job claims it, so the job resumes it."""
    from avprune.prune_job.state import StageStore
    from benchmarks.prune_job import _reuse_shadow

    cfg = PruneJobConfig.model_validate(_cfg(tmp_path))
    src, dst = tmp_path / "job-channel", tmp_path / "job-block"
    curve = {"points": [{"step": 4, "map": 0.3, "map50": 0.5}], "done": False}
    shadow.work_dir(src).mkdir(parents=True)
    (shadow.work_dir(src) / "curve.json").write_text(json.dumps(curve))
    _reuse_shadow(src, dst, cfg)
    assert not dst.exists()  # an unfinished shadow is not handed on
    (shadow.work_dir(src) / "curve.json").write_text(json.dumps({**curve, "done": True}))
    _reuse_shadow(src, dst, cfg)
    assert shadow.read_curve(shadow.work_dir(dst)) == {**curve, "done": True}
    StageStore(dst).open(fingerprint=cfg.fingerprint(), config=cfg.model_dump(mode="json"), resume=True)


def test_the_benchmark_takes_dense_long_from_a_finished_shadow_only(tmp_path):
    """benchmarks.prune_job --dense-long shadow: the first job's shadow model is dense-long once its
    curve is done and its model written (unwrapped from the distillation wrapper's ``student.``
    names, so it loads as the detector); otherwise the benchmark trains dense-long itself."""
    import torch

    from benchmarks.prune_job import _shadow_model
    from perception.models import build_detector, load_detector, save_checkpoint

    job, dest = tmp_path / "job-channel", tmp_path / "dense_long_shadow.pt"
    work = shadow.work_dir(job)
    (work / "train").mkdir(parents=True)
    (work / "curve.json").write_text(json.dumps({"points": [], "done": True}))
    assert _shadow_model(job, dest) is None  # no model written
    model = build_detector("ssdlite320_mobilenet_v3_large")
    save_checkpoint(work / "train" / "model.pt", model)
    ckpt = torch.load(work / "train" / "model.pt", weights_only=True)
    ckpt["state_dict"] = {f"student.{k}": v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, work / "train" / "model.pt")
    assert _shadow_model(job, dest) == dest
    loaded = load_detector(dest)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    (work / "curve.json").write_text(json.dumps({"points": [], "done": False}))
    assert _shadow_model(job, tmp_path / "other.pt") is None  # a shadow cut short is not the recipe's model


def test_trials_aim_under_the_budget_by_the_latency_margin_and_select_judges_at_the_budget(tmp_path):
    """budget.latency_margin: every trial's controller, snapshot and score work to the budget less the
    margin; select still picks by the budget itself (a model at 5.9 ms meets a 6.0 ms budget)."""
    from avprune.prune_job.records import LatencyTableRecord
    from avprune.prune_job.search import trial_specs

    table = LatencyTableRecord(path="t.json", cache="c.json", source="macs", entries=3, overhead_ms=0.0,
                               channel_multiple=16)
    base = _base()
    specs = {}
    for margin in (0.0, 0.05):
        cfg = PruneJobConfig.model_validate(_cfg(tmp_path, latency_margin=margin))
        ctx = StageContext(config=cfg, env=None, out_dir=tmp_path / "out", progress=JobProgress(False),
                           results={"baseline": base, "latency_table": table})
        specs[margin] = trial_specs(ctx)
    assert {s.latency_budget_ms for s in specs[0.0]} == {6.0}
    assert [s.latency_budget_ms for s in specs[0.05]] == pytest.approx([5.7] * len(specs[0.05]))
    chosen, infeasible = pick([_measured("c0", 0, 0.48, ms=5.9)], base)
    assert chosen.candidate_id == "c0" and infeasible is None
    plain = PruneJobConfig.model_validate(_cfg(tmp_path))
    assert PruneJobConfig.model_validate(_cfg(tmp_path, latency_margin=0.0)).fingerprint() == plain.fingerprint()
    assert PruneJobConfig.model_validate(_cfg(tmp_path, latency_margin=0.05)).fingerprint() != plain.fingerprint()
    with pytest.raises(ValueError, match="latency_margin"):
        PruneJobConfig.model_validate(_cfg(tmp_path, latency_margin=0.5))
    from avprune.prune_job.report import _aim_note

    note = _aim_note({"latency_budget_ms": 6.0, "search_target_ms": cfg.budget.search_target(6.0)})
    assert "aimed at 5.70 ms (5% under the budget" in note and "judged at the budget" in note
    assert _aim_note({"latency_budget_ms": 6.0, "search_target_ms": 6.0}) == ""  # no margin: nothing to say
    assert _aim_note({"latency_budget_ms": 6.0}) == ""  # a report written before the field


def test_swaps_note_counts_the_selected_candidates_swaps_after_the_last_count_change():
    from avprune.prune_job.report import swaps_note

    def rec(step, swapped, channels):
        return {"step": step, "layers": {"a": {"swapped": swapped[0], "channels": channels[0]},
                                         "b": {"swapped": swapped[1], "channels": channels[1]}}}

    history = [rec(5, (0, 0), (64, 32)), rec(10, (2, 1), (48, 32)), rec(15, (1, 0), (48, 32)),
               rec(20, (3, 2), (48, 32))]
    note = swaps_note(history)
    assert "swapped 9 channels in all (6 after step 10" in note
    old = [{"step": 5, "layers": {"a": {"channels": 64}}}]  # written before swaps were counted
    assert swaps_note(old) == "" and swaps_note([]) == ""
