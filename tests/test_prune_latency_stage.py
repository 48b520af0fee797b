"""The latency-table stage with in-graph calibration (issue #12), on SSDlite at 128x128, no Ray.

Deterministic 'runtimes' stand in for ONNX Runtime: the isolated one charges each conv its MACs plus
a layout conversion proportional to its input and output maps (what ORT pays around a layer timed
alone), the whole-graph one charges MACs only plus a fixed cost. The stage must fit the table to the
graph, say so in its record, cache the fit, and judge feasibility on the fitted table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from avprune.config.prune import PruneJobConfig
from avprune.prune_job import in_graph, latency_table
from avprune.prune_job.context import StageContext
from avprune.prune_job.env import JobEnv
from avprune.prune_job.errors import BudgetUnreachableError
from avprune.prune_job.progress import JobProgress
from avprune.prune_job.records import BaselineRecord, LatencyTableRecord, ModelSummary
from deploy.timing import LatencySummary
from pruning.latency_model import LatencyTable
from tests.conftest import flops_ms

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 3, 128, 128)


def isolated_ms(module: nn.Module, input_shape: tuple[int, ...]) -> float:
    """MACs plus a layout conversion of the layer's input and output maps (paid by a layer timed alone)."""
    with torch.no_grad():
        out = module(torch.zeros(input_shape))
    return flops_ms(module, input_shape) + 2e-5 * (torch.Size(input_shape).numel() + out.numel())


def graph_ms(det: nn.Module) -> float:
    """The whole core's 'latency': Σ MACs of its convs at their physically pruned shapes, + 0.3 ms."""
    from pruning.filters import DetectorCore

    core = DetectorCore(det).eval()
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:  # returns None: inputs untouched
            shapes.setdefault(name, tuple(args[0].shape))
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in core.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        core(torch.zeros(SHAPE))
    for h in hooks:
        h.remove()
    return sum(flops_ms(core.get_submodule(n), s) for n, s in shapes.items()) + 0.3


@pytest.fixture
def job(tmp_path, monkeypatch):
    from perception.models import build_detector, save_checkpoint

    torch.manual_seed(0)
    det = build_detector("ssdlite320_mobilenet_v3_large", image_size=128).eval()
    save_checkpoint(tmp_path / "dense.pt", det)
    data = yaml.safe_load((ROOT / "avprune/config/examples/prune_tiny.yaml").read_text())
    data["model"]["checkpoint"] = str(tmp_path / "dense.pt")
    data["output_dir"], data["cache_dir"] = str(tmp_path / "out"), str(tmp_path / "cache")
    data["budget"].update({"speedup": None, "latency_ms": 1.0})
    data["pruning"].update({"controller": "allocation", "allocation": "latency", "importances": ["magnitude"]})
    calls: list[int] = []

    def fake_many(config, timing):
        def measure_many(models):
            calls.append(len(models))
            return [graph_ms(m) for m in models]
        return measure_many

    monkeypatch.setattr(latency_table, "measure_fn_for", lambda config: isolated_ms)
    monkeypatch.setattr(in_graph, "measure_many_for", fake_many)
    return {"data": data, "dense_ms": graph_ms(det), "calls": calls, "out": tmp_path / "out"}


def _run(job: dict, *, baseline_ms: float | None = None, **budget) -> LatencyTableRecord:
    data = {**job["data"], "budget": {**job["data"]["budget"], **budget}}
    cfg = PruneJobConfig.model_validate(data)
    ms = baseline_ms or job["dense_ms"]  # the baseline stage's dense p50 (another timing than the probes')
    base = BaselineRecord(dense=ModelSummary(map=0.5, map50=0.7, p50_ms=ms, p99_ms=ms, params=1, gmacs=1.0),
                          latency=LatencySummary(ms, ms, ms, ms, 5), latency_budget_ms=cfg.budget.latency_target(ms),
                          map_floor=0.4, val_images=6)
    ctx = StageContext(config=cfg, env=JobEnv(cfg), out_dir=job["out"], progress=JobProgress(False),
                       results={"baseline": base})
    return latency_table.run(ctx)


def test_latency_stage_calibrates_in_graph_caches_it_and_checks_feasibility_on_it(job):
    dense = job["dense_ms"]
    rec = _run(job, latency_ms=0.9 * dense)
    assert rec.in_graph and rec.in_graph_source == "measured" and "allocation 'latency'" in rec.in_graph_reason
    assert rec.in_graph_probes > 0 and job["calls"] == [rec.in_graph_probes + 2]  # dense + probes + holdout, one call
    assert "in-graph" in rec.note
    table = LatencyTable.load(rec.path)
    assert table.layer_scale and table.meta["in_graph"]["points"] == rec.in_graph_probes
    assert table.predict({}) == pytest.approx(dense, rel=1e-6)  # anchored to the baseline's dense latency
    # Out of sample (every group at 50%, left out of the fit): the fitted table predicts the graph.
    assert rec.in_graph_holdout_predicted_ms == pytest.approx(rec.in_graph_holdout_measured_ms, rel=0.1)
    assert Path(rec.in_graph_cache).is_file()

    # The record survives its JSON; a record written before the calibration reads as "off".
    assert LatencyTableRecord.from_dict(rec.to_dict()) == rec
    old = {k: v for k, v in rec.to_dict().items() if not k.startswith("in_graph")}
    assert LatencyTableRecord.from_dict(old).in_graph is False

    # Feasibility runs on the calibrated table: a budget under its widest reach stops, naming that reach.
    with pytest.raises(BudgetUnreachableError) as e:
        _run(job, latency_ms=0.5 * rec.widest_reach_ms)
    assert e.value.nearest_latency_ms == pytest.approx(rec.widest_reach_ms, rel=1e-6)
    assert job["calls"] == [rec.in_graph_probes + 2]  # the second run read the fit from the cache

    again = _run(job, latency_ms=0.9 * dense)
    assert again.in_graph_source == "cache" and again.widest_reach_ms == pytest.approx(rec.widest_reach_ms)
    assert LatencyTable.load(again.path).layer_scale == pytest.approx(table.layer_scale)

    # The check would say something else on the isolated table: the calibration is what it reads.
    job["data"]["pruning"].update(in_graph_calibration=False, saving_fit=False)  # the isolated table as anchored
    off = _run(job, latency_ms=0.9 * dense)
    assert not off.in_graph and off.in_graph_reason == "pruning.in_graph_calibration: false"
    assert not LatencyTable.load(off.path).layer_scale
    assert abs(rec.widest_reach_ms / off.widest_reach_ms - 1) > 0.02


def test_latency_costs_macs_builds_a_proportional_mac_table_without_timing_or_in_graph_fit(job, monkeypatch):
    def no_timing(config):
        raise AssertionError("latency_costs: macs must not time layers")

    monkeypatch.setattr(latency_table, "measure_fn_for", no_timing)
    job["data"]["pruning"]["latency_costs"] = "macs"
    dense = job["dense_ms"]
    rec = _run(job, latency_ms=0.9 * dense)
    assert rec.source == "macs" and not rec.in_graph and "latency_costs: macs" in rec.in_graph_reason
    assert job["calls"] == []  # no in-graph probes either
    table = LatencyTable.load(rec.path)
    assert table.overhead_ms == 0 and table.predict({}) == pytest.approx(dense, rel=1e-6)
    # Proportional to MACs: the fake graph charges MACs + 0.3 ms, so a cut's predicted share of the
    # dense latency is its share of the dense MACs.
    from pruning import Pruner, build_controller

    det = JobEnv(PruneJobConfig.model_validate(job["data"])).load_dense()
    pruner = Pruner(det, controller=build_controller("fixed", sparsity=0.5), example_inputs=torch.zeros(SHAPE),
                    channel_multiple=8)
    pruner.update()
    config = pruner.channel_config()
    small = pruner.finalize()
    assert table.predict(config) / dense == pytest.approx((graph_ms(small) - 0.3) / (dense - 0.3), rel=1e-3)
    assert rec.widest_reach_ms < 0.9 * dense


def test_latency_costs_macs_refuses_an_in_graph_calibration_at_config_load(job):
    data = {**job["data"], "pruning": {**job["data"]["pruning"], "latency_costs": "macs", "in_graph_calibration": True}}
    with pytest.raises(ValueError, match="latency_costs 'macs' has none to fit"):
        PruneJobConfig.model_validate(data)
    macs = PruneJobConfig.model_validate({**job["data"], "pruning": {**job["data"]["pruning"], "latency_costs": "macs"}})
    assert not macs.pruning.in_graph()
    # a job folder resumes only under the costs it was pruned with
    assert macs.fingerprint() != PruneJobConfig.model_validate(job["data"]).fingerprint()


def test_reconstruct_images_is_refused_without_channels_and_off_keeps_the_fingerprint(job):
    data = job["data"]
    with pytest.raises(ValueError, match="reconstruct_images re-solves layers"):
        PruneJobConfig.model_validate({**data, "pruning": {**data["pruning"], "granularity": "block", "controller": "budget",
                                                          "reconstruct_images": 8}})
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        PruneJobConfig.model_validate({**data, "pruning": {**data["pruning"], "reconstruct_images": -1}})
    base = PruneJobConfig.model_validate(data)
    off = PruneJobConfig.model_validate({**data, "pruning": {**data["pruning"], "reconstruct_images": 0}})
    on = PruneJobConfig.model_validate({**data, "pruning": {**data["pruning"], "reconstruct_images": 8}})
    assert off.fingerprint() == base.fingerprint() != on.fingerprint()


def test_gate_fold_stage_folds_before_pruning_and_the_table_is_anchored_to_the_folded_model(job, assets, monkeypatch):
    """pruning.fold_gates: the gate_fold stage folds SSDlite's 8 squeeze-excitation gates, saves the
    folded model where every pruning stage loads it, and records its own mAP and paired latency; the
    latency table is then measured on the folded graph and calibrated to that latency, not dense's."""
    from torchvision.ops.misc import SqueezeExcitation

    from avprune.prune_job import gate_fold_stage
    from avprune.prune_job.gate_fold_stage import gate_fold_html, gate_fold_section
    from avprune.prune_job.records import GateFoldRecord

    data = {**job["data"], "data": {"source": "coco", "root": str(assets["coco"]), "val_images": 6},
            "model": {**job["data"]["model"], "checkpoint": str(assets["ckpt"])}}
    data["budget"] = {**data["budget"], "latency_ms": 0.95 * job["dense_ms"]}
    off_cfg = PruneJobConfig.model_validate(data)
    cfg = PruneJobConfig.model_validate({**data, "pruning": {**data["pruning"], "fold_gates": 4}})
    assert cfg.fingerprint() != off_cfg.fingerprint()  # a job folder resumes only with the gates it folded
    ms = job["dense_ms"]
    base = BaselineRecord(dense=ModelSummary(map=0.5, map50=0.7, p50_ms=ms, p99_ms=ms, params=1, gmacs=1.0),
                          latency=LatencySummary(ms, ms, ms, ms, 5), latency_budget_ms=0.95 * ms, map_floor=0.4,
                          val_images=6)

    def paired(self, model, dense, work_dir, *, dense_ms):  # the fake graph's time, in the baseline's units
        t = graph_ms(model)  # Σ conv MACs: the folded graph lacks the gates' two 1x1 convs each
        return LatencySummary(t, t, t, t, 5), 1.0

    monkeypatch.setattr(JobEnv, "measure_latency_paired", paired)
    env = JobEnv(cfg)
    ctx = StageContext(config=cfg, env=env, out_dir=job["out"], progress=JobProgress(False), results={"baseline": base})
    rec = gate_fold_stage.run(ctx)
    dense = env.load_dense()
    se = sorted(n for n, m in dense.named_modules() if isinstance(m, SqueezeExcitation))
    assert sorted(g.gate for g in rec.gates) == se and len(se) == 8 and rec.images == 4
    assert rec.p50_ms == pytest.approx(graph_ms(env.load_start())) and rec.p50_ms < graph_ms(dense)
    assert 0.0 <= rec.map <= 1.0
    assert GateFoldRecord.from_dict(rec.to_dict()) == rec and "8 gates folded" in rec.note

    start, arch = env.load_start(), env.build_start_architecture()
    assert not any(isinstance(m, SqueezeExcitation) for m in start.modules())
    assert {k: v.shape for k, v in start.state_dict().items()} == {k: v.shape for k, v in arch.state_dict().items()}
    assert env.folded_gates == se
    section = gate_fold_section(rec, base)
    assert section["speedup"] == pytest.approx(ms / rec.p50_ms) and len(section["gates"]) == 8
    page = gate_fold_html({"gate_fold": section})
    assert "Folded channel gates (8)" in page and all(f"<td>{g}</td>" in page for g in se)

    table_rec = latency_table.run(StageContext(config=cfg, env=env, out_dir=job["out"], progress=JobProgress(False),
                                               results={"baseline": base, "gate_fold": rec}))
    table = LatencyTable.load(table_rec.path)
    assert table.predict({}) == pytest.approx(rec.p50_ms, rel=1e-6)  # the folded model's latency, not dense's
    assert table.layers and not any(k.startswith(g + ".") for k in table.layers for g in se)  # no gate conv to price

    off = gate_fold_stage.run(StageContext(config=off_cfg, env=JobEnv(off_cfg), out_dir=job["out"] / "off",
                                           progress=JobProgress(False), results={"baseline": base}))
    assert off.gates == () and "off" in off.note and gate_fold_section(off, base) is None
    assert any(isinstance(m, SqueezeExcitation) for m in JobEnv(off_cfg).load_start().modules())


def test_the_jobs_architecture_is_the_checkpoints_anchors_included(job, tmp_path):
    """A checkpoint trained with non-default SSD anchor scales: the untrained architecture every
    stage loads state dicts into (snapshots, finalized copies, probes) has its anchors, so a model
    rebuilt from it detects what the checkpoint detects (on default anchors a trial's snapshot
    scored 0.017 mAP where the model scored 0.648)."""
    from perception.models import build_detector, save_checkpoint

    torch.manual_seed(0)
    det = build_detector("ssdlite320_mobilenet_v3_large", image_size=128, ssd_anchor_scales=(0.06, 0.9)).eval()
    save_checkpoint(tmp_path / "anchors.pt", det)
    data = {**job["data"], "model": {**job["data"]["model"], "checkpoint": str(tmp_path / "anchors.pt")}}
    env = JobEnv(PruneJobConfig.model_validate(data))
    arch = env.build_architecture().eval()
    assert arch.avprune_meta["ssd_anchor_scales"] == [0.06, 0.9]
    dense = env.load_dense().eval()
    arch.load_state_dict(dense.state_dict())
    default = build_detector("ssdlite320_mobilenet_v3_large", image_size=128).eval()
    default.load_state_dict(dense.state_dict())  # same weights, the registry's default anchors
    x = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        got, want, off = arch(x)[0], dense(x)[0], default(x)[0]
    assert len(want["boxes"]) > 0
    torch.testing.assert_close(got["boxes"], want["boxes"])
    n = min(len(off["boxes"]), len(want["boxes"]))
    assert not torch.allclose(off["boxes"][:n], want["boxes"][:n])  # what the old architecture decoded


def test_latency_stage_fits_the_saving_when_the_in_graph_calibration_is_off_and_caches_it(job):
    """Uniform allocation (no in-graph calibration): the stage times the start model whole, dense and
    cut uniformly, and fits the table's slope, so the additive anchor's over-promised savings are gone."""
    job["data"]["pruning"]["allocation"] = "uniform"
    dense = job["dense_ms"]
    rec = _run(job, latency_ms=0.9 * dense)
    assert not rec.in_graph and rec.in_graph_reason.startswith("off by default")
    assert rec.saving_fit and rec.saving_fit_source == "measured" and "by default" in rec.saving_fit_reason
    assert job["calls"] == [1 + len(rec.saving_fit_points)] and len(rec.saving_fit_points) == 3
    assert "saving fit" in rec.note
    table = LatencyTable.load(rec.path)
    assert table.predict({}) == pytest.approx(dense, rel=1e-6)  # anchored to the baseline's dense latency
    assert table.meta["saving_fit"]["points"]
    for (s, pred, meas), before in zip(rec.saving_fit_points, rec.saving_fit_before, strict=True):
        # the fake graph pays MACs only, the isolated layers MACs plus conversions: the constant anchor
        # promised too much saving, the fit predicts the graph
        assert pred == pytest.approx(meas, rel=0.1), s
        assert abs(pred - meas) < abs(before - meas), s
    assert LatencyTableRecord.from_dict(rec.to_dict()) == rec
    old = {k: v for k, v in rec.to_dict().items() if not k.startswith("saving_fit")}
    assert LatencyTableRecord.from_dict(old).saving_fit is False  # records before the fit read as "off"

    again = _run(job, latency_ms=0.9 * dense)
    assert again.saving_fit_source == "cache" and job["calls"] == [4]  # read from the cache, nothing timed
    assert [v for p in again.saving_fit_points for v in p] == pytest.approx([v for p in rec.saving_fit_points for v in p])
    # The reported slope is the fit's own, in the probes' unit: a baseline that timed the dense model
    # 30% slower (Ray starting beside it) rescales the table, not the factor the note reports.
    cached_fit = json.loads(Path(rec.saving_fit_cache).read_text())["fit"]
    assert 0 < rec.saving_fit_scale < 1 and rec.saving_fit_scale == cached_fit["scale_factor"]
    drift = _run(job, baseline_ms=1.3 * dense, latency_ms=0.9 * dense)
    assert drift.saving_fit_source == "cache" and drift.saving_fit_scale == rec.saving_fit_scale
    assert LatencyTable.load(drift.path).predict({}) == pytest.approx(1.3 * dense, rel=1e-6)

    job["data"]["pruning"]["saving_fit"] = False
    off = _run(job, latency_ms=0.9 * dense)
    assert not off.saving_fit and off.saving_fit_reason == "pruning.saving_fit: false" and job["calls"] == [4]
    assert off.widest_reach_ms < rec.widest_reach_ms  # the unfitted table promised a deeper reach


def test_saving_fit_is_refused_where_it_cannot_run_and_keeps_older_fingerprints(job):
    data = job["data"]

    def cfg(**pruning):
        return PruneJobConfig.model_validate({**data, "pruning": {**data["pruning"], **pruning}})

    with pytest.raises(ValueError, match="saving_fit: its timings thin channel groups"):
        cfg(granularity="block", controller="budget", saving_fit=True)
    with pytest.raises(ValueError, match="both fit the table"):
        cfg(allocation="latency", saving_fit=True)
    with pytest.raises(ValueError, match="saving_fit: the whole-graph timings run on onnxruntime"):
        PruneJobConfig.model_validate({**data, "budget": {**data["budget"], "runtime": "tensorrt", "device": "cuda"},
                                       "pruning": {**data["pruning"], "allocation": "uniform", "saving_fit": True}})
    assert cfg(allocation="uniform").pruning.fits_saving() and not cfg(allocation="latency").pruning.fits_saving()
    assert not cfg(allocation="uniform", latency_costs="macs").pruning.fits_saving()
    assert cfg(allocation="uniform", latency_costs="macs", saving_fit=True).pruning.fits_saving()
    assert not cfg(granularity="block", controller="budget").pruning.fits_saving()
    # the default leaves the fingerprint as it was before the field; an explicit choice changes it
    assert cfg(saving_fit=None).fingerprint() == PruneJobConfig.model_validate(data).fingerprint()
    assert cfg(allocation="uniform", saving_fit=False).fingerprint() != cfg(allocation="uniform").fingerprint()


def test_a_taylor_first_job_fits_its_table_with_a_data_free_criterion(job):
    """Taylor scores only after training steps: the stage's uniform cuts (and the sensitivity scan,
    the in-graph probes) rank by the first data-free criterion instead of failing on 'no score'."""
    from pruning.importance import offline_importance

    assert offline_importance(["taylor", "bn_scale"]) == "bn_scale"
    assert offline_importance(["taylor", "activation"]) == "magnitude"
    assert offline_importance(["magnitude", "taylor"]) == "magnitude"
    job["data"]["pruning"].update(allocation="uniform", importances=["taylor"])
    rec = _run(job, latency_ms=0.9 * job["dense_ms"])
    assert rec.saving_fit and len(rec.saving_fit_points) == 3
