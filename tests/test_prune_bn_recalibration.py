"""The prune job re-estimates BatchNorm statistics before each in-job mAP (finetune.bn_recalibration_images)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from avprune.config.prune import PruneJobConfig
from avprune.prune_job.env import JobEnv
from pruning.bn_recalibration import tracked_batchnorms
from tests.conftest import tiny_job


def _stats(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t.clone() for bn in tracked_batchnorms(model) for t in (bn.running_mean, bn.running_var)]


def test_config_default_on_with_64_images_and_older_fingerprints_kept(assets, tmp_path):
    data = tiny_job(assets, tmp_path / "job")
    default = PruneJobConfig.model_validate(data)
    assert default.finetune.recalibration_images() == 64
    # None is the resolved default: a job folder written before the field keeps its fingerprint
    explicit_none = tiny_job(assets, tmp_path / "job", **{"finetune.bn_recalibration_images": None})
    assert PruneJobConfig.model_validate(explicit_none).fingerprint() == default.fingerprint()
    off = PruneJobConfig.model_validate(tiny_job(assets, tmp_path / "job", **{"finetune.bn_recalibration_images": 0}))
    assert off.finetune.recalibration_images() == 0 and off.fingerprint() != default.fingerprint()
    with pytest.raises(ValidationError, match="bn_recalibration_images"):
        PruneJobConfig.model_validate(tiny_job(assets, tmp_path / "job", **{"finetune.bn_recalibration_images": -1}))


def test_env_recalibrates_a_cut_detector_on_training_images_and_off_leaves_it(assets, tmp_path):
    cfg = PruneJobConfig.model_validate(tiny_job(assets, tmp_path / "job", **{"finetune.bn_recalibration_images": 8}))
    env = JobEnv(cfg)
    model = env.load_dense().eval()
    with torch.no_grad():  # a cut: half of the first conv's output channels zeroed
        model.backbone.features[0][0][0].weight[::2] = 0
    before = _stats(model)
    assert env.recalibrate_bn(model) == len(tracked_batchnorms(model)) > 10
    after = _stats(model)
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    first_bn = model.backbone.features[0][0][1]
    assert torch.all(first_bn.running_mean[::2] == 0)  # the cut channels now carry zeros, and say so
    assert not model.training  # the mode it came in
    again = _stats(model)
    env.recalibrate_bn(model)  # the same images every time: the same statistics
    assert all(torch.allclose(a, b) for a, b in zip(again, _stats(model), strict=True))

    off = JobEnv(PruneJobConfig.model_validate(tiny_job(assets, tmp_path / "job", **{"finetune.bn_recalibration_images": 0})))
    kept = _stats(model)
    assert off.recalibrate_bn(model) == 0
    assert all(torch.equal(a, b) for a, b in zip(kept, _stats(model), strict=True))


def test_a_trial_re_estimates_when_its_network_changed_since_it_last_measured(tmp_path):
    """Cut or regrown since the last measurement: re-estimated. Unchanged (the masks frozen for the last
    interval, or nothing cut yet): the statistics training estimated are kept."""
    from avprune.prune_job.search import _Trial
    from pruning import Pruner
    from pruning.controllers import FixedController
    from tests.conftest import small_net

    calls: list[torch.nn.Module] = []

    class Env:  # the trial's environment, recording what it was asked to re-estimate
        def recalibrate_bn(self, model: torch.nn.Module) -> int:
            calls.append(model)
            return 1

    ctrl = FixedController(0.0)
    pruner = Pruner(small_net(), example_inputs=torch.randn(1, 3, 32, 32), controller=ctrl, channel_multiple=4)
    trial = _Trial(None, Env(), tmp_path / "c0")
    trial.pruner = pruner

    def measured() -> int:
        before = len(calls)
        trial._recalibrate_if_cut()
        return len(calls) - before

    assert measured() == 0  # nothing cut yet
    ctrl.default = 0.5
    pruner.update()
    assert measured() == 1 and calls[-1] is pruner.model  # cut since: re-estimated
    assert measured() == 0  # unchanged since the last measurement
    ctrl.default = 0.25
    pruner.update()
    assert measured() == 1  # regrown: re-estimated
    saved = trial.state_dict()  # what the training checkpoint keeps of the trial hook
    restarted = _Trial(None, Env(), tmp_path / "c0")  # a restarted worker, from that checkpoint
    restarted.pruner = pruner
    restarted.load_state_dict(saved)
    before = len(calls)
    restarted._recalibrate_if_cut()
    assert len(calls) == before  # unchanged since the measurement the checkpoint recorded
    fresh = _Trial(None, Env(), tmp_path / "c0")  # no saved state: its first measurement of a cut model
    fresh.pruner = pruner
    fresh._recalibrate_if_cut()
    assert len(calls) == before + 1


def test_the_sensitivity_scan_can_score_each_cut_through_re_estimated_statistics(assets, tmp_path):
    """sensitivity.bn_recalibration_images: each scanned model's BatchNorms re-estimated before its metric
    (EagleEye); 0 (the default) scores it through the unpruned network's statistics, as before."""
    from avprune.prune_job.sensitivity import metric_fn, scan_metric

    cfg = PruneJobConfig.model_validate(tiny_job(assets, tmp_path / "job", **{"sensitivity.bn_recalibration_images": 8}))
    env = JobEnv(cfg)
    model = env.load_dense().eval()
    with torch.no_grad():  # a cut: half of the first conv's output channels zeroed
        model.backbone.features[0][0][0].weight[::2] = 0
    frozen = metric_fn(env)(model)
    before = _stats(model)
    value = scan_metric(env)(model)
    assert any(not torch.equal(a, b) for a, b in zip(before, _stats(model), strict=True))  # re-estimated
    assert value == pytest.approx(metric_fn(env)(model)) and value != pytest.approx(frozen)
    assert torch.all(model.backbone.features[0][0][1].running_mean[::2] == 0)
    off = JobEnv(PruneJobConfig.model_validate(tiny_job(assets, tmp_path / "job")))
    kept = _stats(model)
    assert scan_metric(off)(model) == pytest.approx(value)  # off: the statistics it has
    assert all(torch.equal(a, b) for a, b in zip(kept, _stats(model), strict=True))
    on_fp = cfg.fingerprint()
    assert on_fp != off.config.fingerprint()
    with pytest.raises(ValidationError, match="bn_recalibration_images"):
        PruneJobConfig.model_validate(tiny_job(assets, tmp_path / "job", **{"sensitivity.bn_recalibration_images": -1}))
