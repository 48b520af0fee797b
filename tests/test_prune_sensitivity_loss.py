"""Issue #12: the sensitivity stage measures detection loss per unit, and the latency knapsack reads it.

The knapsack by importance normalised within each unit cut the sensitive residual streams of a
trained SSDlite to their floor (-11.6 mAP points against uniform at 2x); given each unit's measured
damage curve it compares units by what pruning them does. These tests run the stage's Ray task
body in-process on the tiny job's assets.
"""

from __future__ import annotations

import pytest
import torch

from avprune.config.prune import PruneJobConfig
from avprune.prune_job.records import CurvePoint, LayerSensitivity, SensitivityRecord
from tests.conftest import tiny_job


def _cfg(assets, tmp_path, **changes) -> PruneJobConfig:
    return PruneJobConfig.model_validate(tiny_job(assets, tmp_path / "job", **changes))


def _calibrated(assets, path):
    """The tiny checkpoint with BatchNorm statistics measured on its images: an untrained model with
    default statistics (mean 0, var 1) shrinks its activations to nothing through the depth, so no
    channel of its backbone moves the loss."""
    from perception.data import collate, load_split
    from perception.models import load_detector, save_checkpoint

    model = load_detector(assets["ckpt"])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the passes below
    data = load_split(assets["coco"], "train").augmented(False)
    model.train()
    with torch.no_grad():
        for i in range(0, 16, 8):
            model(*collate([data[j] for j in range(i, i + 8)]))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    save_checkpoint(path, model.eval())
    return path


def test_loss_metric_is_deterministic_and_leaves_the_model_as_it_was(assets):
    from perception.data import load_split
    from perception.loss_probe import loss_metric
    from perception.models import load_detector

    model = load_detector(assets["ckpt"]).eval()
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    stats = bn.running_mean.clone()
    metric = loss_metric(load_split(assets["coco"], "train"), images=6, batch_size=4)
    first, second = metric(model), metric(model)
    assert first == second and first < 0  # minus a positive loss, the same batches every call
    assert not model.training and torch.equal(bn.running_mean, stats)  # eval mode back, BN statistics untouched
    with torch.no_grad():  # a different model gives a different value: it measures the model
        model.head.regression_head.module_list[0][-1].bias.add_(1.0)  # boxes off: the box loss rises
    assert metric(model) != first
    with pytest.raises(ValueError, match="images >= 1"):
        loss_metric(load_split(assets["coco"], "train"), images=0)


def test_scan_task_measures_loss_drops_against_the_dense_value(assets, tmp_path):
    from avprune.prune_job.env import JobEnv
    from avprune.prune_job.sensitivity import ScanTask, dense_value, largest_units, metric_fn, scan_layer_task

    cfg = _cfg(assets, tmp_path, **{"sensitivity.sparsities": [0.25, 0.75], "sensitivity.eval_images": 6,
                                    "model.checkpoint": str(_calibrated(assets, tmp_path / "calibrated.pt"))})
    assert cfg.sensitivity_metric() == "loss"  # the default (the tiny job's controller is cubic)
    env = JobEnv.from_config(cfg)
    dense = dense_value(cfg)
    assert dense == metric_fn(env)(env.load_dense()) < 0
    units = largest_units(cfg, None)
    assert len(units) > len(largest_units(cfg, 2)) == 2  # None: every unit
    moved = []
    for layer in units[:3]:  # the largest units; one may feed a scale where these images have no boxes
        task = ScanTask(job=cfg.model_dump(mode="json"), layer=layer, sparsities=(0.25, 0.75),
                        importance="magnitude", dense_value=dense, channel_multiple=16)
        name, rec = scan_layer_task(task)
        assert name == layer and [c.sparsity for c in rec.curve] == [0.25, 0.75]
        for c in rec.curve:
            assert c.drop == pytest.approx(dense - c.value)
        moved.append(rec.curve[-1].value != dense)
    assert any(moved), "pruning none of the three largest units to 25% moved the loss"


def test_sensitivity_record_reads_older_map_records_and_round_trips():
    old = {"dense_map": 0.5, "layers": {"a": {"curve": [{"sparsity": 0.3, "map": 0.45, "drop": 0.05}]}}}
    rec = SensitivityRecord.from_dict(old)
    assert rec.metric == "map" and rec.dense_value == 0.5 and rec.profile() == {"a": [(0.3, 0.05)]}
    new = SensitivityRecord(dense_value=-1.5, layers={"a": LayerSensitivity((CurvePoint(0.5, -1.7, 0.2),), 7)},
                            metric="loss")
    back = SensitivityRecord.from_dict(new.to_dict())
    assert back == new and "detection loss" in back.note


@pytest.mark.parametrize("allocation", ["latency", "uniform"])
def test_the_latency_knapsack_gets_the_scans_damage_curves(assets, tmp_path, allocation):
    from avprune.prune_job.context import TrialSpec
    from avprune.prune_job.records import Candidate
    from avprune.prune_job.search import _controller
    from pruning import LatencyTable

    cfg = _cfg(assets, tmp_path, **{"pruning.controller": "allocation", "pruning.allocation": allocation})
    cand = Candidate(candidate_id="c0", index=0, importance="magnitude", controller="allocation", ramp=0.5, seed=0)
    curves = {"backbone.features.0.7.block.2.0": [(0.25, 0.2), (0.5, 1.3)], "backbone.extra.0.1.0": [(0.5, 0.08)]}
    spec = TrialSpec(candidate=cand, job={}, out_dir=str(tmp_path), latency_table="", latency_budget_ms=1.0,
                     map_floor=0.0, dense_map=0.5, sensitivity=curves)
    table = LatencyTable(runtime="synthetic", device="test", layers={}, meta={})
    ctl = _controller(cfg, spec, table, lambda config: 1.0, lambda: (1.0, 0.5))
    assert ctl.damage == (curves if allocation == "latency" else {})  # uniform is one ratio: no damage to weigh
