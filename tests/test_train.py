"""Training loop: exact resume, NaN stop, hooks, schedule, bad settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from perception.data import load_split
from perception.lr_schedule import lr_at
from perception.models import build_detector, load_detector
from perception.train import NonFiniteLossError, StepContext, TrainSettings, default_train_settings, train
from tests.conftest import write_tiny_coco

SSD = "ssdlite320_mobilenet_v3_large"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    write_tiny_coco(root, "train", n=8)
    return load_split(root, "train")


def _model():
    torch.manual_seed(0)
    return build_detector(SSD, image_size=96)


SETTINGS = TrainSettings(steps=6, batch_size=2, lr=1e-3, warmup_steps=2, checkpoint_every=3, augment=True)


class _Stop(RuntimeError):
    pass


class CountingHook:
    """A hook with state: counts steps and checks that this step's gradients are still there."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.calls, self.stop_at = 0, stop_at

    def __call__(self, ctx: StepContext) -> None:
        assert any(p.grad is not None for p in ctx.model.parameters())
        self.calls += 1
        if self.stop_at is not None and ctx.step + 1 == self.stop_at:
            raise _Stop(f"interrupted after step {ctx.step}")

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]


def test_interrupted_run_resumes_at_same_step_with_same_optimizer_state(data, tmp_path: Path) -> None:
    ref_hook = CountingHook()
    ref_model = _model()
    ref = train(ref_model, data, SETTINGS, out_dir=tmp_path / "ref", hooks=[ref_hook], progress=False)
    assert ref.steps_done == 6 and ref_hook.calls == 6 and (tmp_path / "ref" / "model.pt").is_file()

    run = tmp_path / "run"
    with pytest.raises(_Stop):  # dies after step 4; last.pt holds step 3
        train(_model(), data, SETTINGS, out_dir=run, hooks=[CountingHook(stop_at=4)], progress=False)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["extra"]["train_state"]["step"] == 3

    hook = CountingHook()
    model = _model()
    res = train(model, data, SETTINGS, out_dir=run, hooks=[hook], progress=False)
    assert res.steps_done == 6 and hook.calls == 6  # 3 restored from the checkpoint + 3 new
    assert [h["step"] for h in res.history] == [h["step"] for h in ref.history]

    a = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)["extra"]["train_state"]["optimizer"]
    b = torch.load(run / "last.pt", weights_only=True)["extra"]["train_state"]["optimizer"]
    assert a["param_groups"] == b["param_groups"]
    for k, st in a["state"].items():
        for name, t in st.items():
            torch.testing.assert_close(b["state"][k][name], t, rtol=1e-4, atol=1e-6, msg=f"state {k}.{name}")
    for (k, p), q in zip(ref_model.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=k)

    again = train(model, data, SETTINGS, out_dir=run, progress=False)  # finished: nothing to do
    assert again.steps_done == 6 and len(again.history) == len(res.history)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path: Path) -> None:
    model = _model()

    def poison(ctx: StepContext) -> None:
        if ctx.step + 1 == 4:  # after step 4 the weights are NaN, so step 5's loss is
            with torch.no_grad():
                for p in ctx.model.parameters():
                    p.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match=r"at step 4 .*last good checkpoint: .*last\.pt \(step 3\)"):
        train(model, data, SETTINGS, out_dir=tmp_path, hooks=[poison], progress=False)
    kept = load_detector(tmp_path / "last.pt")
    assert all(torch.isfinite(p).all() for p in kept.parameters())
    assert not (tmp_path / "model.pt").exists()


def test_time_limit_stops_and_checkpoints(data, tmp_path: Path) -> None:
    res = train(_model(), data, SETTINGS, out_dir=tmp_path, time_limit_s=0.0, progress=False)
    assert res.stopped == "time_limit" and res.steps_done == 0
    res = train(_model(), data, SETTINGS, out_dir=tmp_path, resume=False, progress=False,
                eval_fn=lambda m: {"training": m.training}, eval_every=2)
    evals = [h for h in res.history if "eval" in h]
    assert [h["step"] for h in evals] == [2, 4]  # not after the last step: the caller evaluates then
    assert all(h["eval"] == {"training": True} for h in evals)


def test_schedule_warms_up_then_decays() -> None:
    kw = {"base_lr": 1.0, "total_steps": 100, "warmup_steps": 10, "min_lr_ratio": 0.1}
    rates = [lr_at(s, **kw) for s in range(100)]
    assert rates[0] < rates[5] < rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:], strict=False))
    assert rates[-1] == pytest.approx(0.1)


def test_bad_settings_are_rejected(data) -> None:
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainSettings(steps=5, optimizer="adam")
    with pytest.raises(ValueError, match="batch_size >= 2"):
        train(_model(), data, TrainSettings(steps=1, batch_size=1), progress=False)
    with pytest.raises(ValueError, match="category id 7 needs num_classes >= 8"):
        train(build_detector(SSD, num_classes=4, image_size=96), data, SETTINGS, progress=False)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        train(_model(), data, TrainSettings(steps=1, batch_size=16), progress=False)


def test_default_settings_scale_with_minutes() -> None:
    short, long = default_train_settings(3), default_train_settings(8)
    assert long.steps > short.steps and short.warmup_steps < short.steps
    assert default_train_settings(3, seconds_per_step=2.0).steps < short.steps
