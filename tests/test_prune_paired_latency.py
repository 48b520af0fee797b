"""A trial's latency under load (issue #13's pairing in the prune job): trials share a node, so one
measures while another trains. The candidate is timed interleaved with the dense model and scaled by
the quiet baseline's dense p50, so the controller sees the latency the budget was set against.

Deterministic stand-ins: each 'runtime' advances a fake clock by its model's cost times the node's
current load, so the test checks the pairing and the scaling, not this machine's speed.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from torch import nn

from avprune.config.prune import PruneJobConfig
from avprune.prune_job.env import JobEnv

ROOT = Path(__file__).resolve().parents[1]


class _Clock:
    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


class _Costed(nn.Module):
    def __init__(self, cost_ms: float) -> None:
        super().__init__()
        self.cost_ms = cost_ms


class _Runtime:
    """Pre-processing is free; a graph call costs the model's milliseconds times the load."""

    def __init__(self, model: _Costed, clock: _Clock, load: list[float]) -> None:
        self.model, self.clock, self.load = model, clock, load

    def preprocess(self, frames):
        return frames

    def run(self, batch):
        self.clock.ns += int(self.model.cost_ms * self.load[0] * 1e6)

    def infer(self, frames):
        self.run(self.preprocess(frames))


@pytest.fixture
def env(tmp_path, monkeypatch):
    ckpt = tmp_path / "dense.pt"
    ckpt.write_bytes(b"x")
    data = yaml.safe_load((ROOT / "avprune/config/examples/prune_tiny.yaml").read_text())
    data["model"]["checkpoint"] = str(ckpt)
    e = JobEnv(PruneJobConfig.model_validate(data))
    e.__dict__["timing_frames"] = [np.zeros((8, 8, 3), np.uint8)]  # no data set needed
    clock, load = _Clock(), [1.0]
    monkeypatch.setattr(JobEnv, "runtime_target", lambda self, model, path: model)

    @contextlib.contextmanager
    def _open(self, target):
        yield _Runtime(target, clock, load)

    monkeypatch.setattr(JobEnv, "_open", _open)
    return e, clock, load


@pytest.mark.parametrize("end_to_end", [False, True])
def test_paired_latency_reads_the_same_under_load(env, tmp_path, end_to_end):
    e, clock, load = env
    cfg = e.config.model_copy(update={"budget": e.config.budget.model_copy(update={"end_to_end": end_to_end})})
    e = JobEnv(cfg)
    e.__dict__["timing_frames"] = [np.zeros((8, 8, 3), np.uint8)]
    dense, pruned = _Costed(12.8), _Costed(6.0)
    quiet, f_quiet = e.measure_latency_paired(pruned, dense, tmp_path, dense_ms=12.8, clock_ns=clock)
    assert f_quiet == pytest.approx(1.0) and quiet.p50_ms == pytest.approx(6.0)
    assert quiet.n == max(cfg.budget.measure_iters, 10)  # one candidate call per pair
    many, _ = e.measure_latency_paired(pruned, dense, tmp_path, dense_ms=12.8, pairs=40, clock_ns=clock)
    assert many.n == 40 and many.p50_ms == pytest.approx(6.0)  # select's longer re-timing
    load[0] = 1.6  # another trial trains on the node: every call takes 1.6x as long
    loaded, f_loaded = e.measure_latency_paired(pruned, dense, tmp_path, dense_ms=12.8, clock_ns=clock)
    assert f_loaded == pytest.approx(1 / 1.6)
    assert loaded.p50_ms == pytest.approx(6.0) and loaded.p99_ms == pytest.approx(6.0)
    # the baseline was measured slower than the dense model times now: the candidate scales with it
    slow_base, f = e.measure_latency_paired(pruned, dense, tmp_path, dense_ms=25.6, clock_ns=clock)
    assert f == pytest.approx(2 / 1.6) and slow_base.p50_ms == pytest.approx(12.0)


def test_paired_latency_needs_the_baseline(env, tmp_path):
    e, clock, _ = env
    with pytest.raises(ValueError, match="dense_ms must be the baseline's dense p50"):
        e.measure_latency_paired(_Costed(1.0), _Costed(2.0), tmp_path, dense_ms=0.0, clock_ns=clock)
