"""The node gate: a latency measurement runs only while every other trial on the node is between steps."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from avprune.prune_job.node_gate import NodeGate

STEP_S = 0.03


def _trainer(folder: str, log_path: str, seconds: float) -> None:
    """Training steps of STEP_S, yielding between them; writes each step's (start, end)."""
    gate = NodeGate(Path(folder))
    gate.start_training()
    steps, t_end = [], time.monotonic() + seconds
    while time.monotonic() < t_end:
        t0 = time.monotonic()
        while time.monotonic() - t0 < STEP_S:  # busy, like a step
            pass
        steps.append((t0, time.monotonic()))
        gate.yield_to_measurements()
    gate.close()
    Path(log_path).write_text(json.dumps(steps))


def _measurer(folder: str, log_path: str, n: int, hold_s: float) -> None:
    gate = NodeGate(Path(folder))
    spans = []
    for _ in range(n):
        t_ask = time.monotonic()
        with gate.exclusive():
            t0 = time.monotonic()
            time.sleep(hold_s)
            spans.append((t_ask, t0, time.monotonic()))
        time.sleep(0.05)
    gate.close()
    Path(log_path).write_text(json.dumps(spans))


def _holder(folder: str) -> None:
    gate = NodeGate(Path(folder))
    gate.start_training()
    time.sleep(60)


@pytest.fixture
def ctx() -> mp.context.BaseContext:
    return mp.get_context("fork")


def test_measurements_never_overlap_a_training_step_and_are_not_starved(tmp_path: Path, ctx) -> None:
    trainers = [ctx.Process(target=_trainer, args=(str(tmp_path), str(tmp_path / f"t{i}.json"), 2.0)) for i in range(2)]
    for p in trainers:
        p.start()
    time.sleep(0.2)  # both trainers hold the gate
    meas = ctx.Process(target=_measurer, args=(str(tmp_path), str(tmp_path / "m.json"), 5, 0.1))
    meas.start()
    for p in [*trainers, meas]:
        p.join(30)
        assert p.exitcode == 0
    spans = json.loads((tmp_path / "m.json").read_text())
    steps = [s for i in range(2) for s in json.loads((tmp_path / f"t{i}.json").read_text())]
    assert len(spans) == 5
    for _ask, t0, t1 in spans:
        overlapping = [s for s in steps if s[0] < t1 and s[1] > t0]
        assert not overlapping, f"a training step ran during the measurement {t0:.3f}-{t1:.3f}: {overlapping}"
    # a measurement waits for at most the steps in flight, never for trainers renewing their hold
    waits = [t0 - ask for ask, t0, _ in spans]
    assert max(waits) < 20 * STEP_S, waits
    # training went on between and after the measurements
    assert sum(s[0] > spans[-1][2] for s in steps) > 5


def test_a_measuring_trainer_releases_its_own_hold_and_takes_it_back(tmp_path: Path) -> None:
    with NodeGate(tmp_path) as gate:
        gate.start_training()
        with gate.exclusive():  # would deadlock on its own shared hold otherwise
            assert not gate._training
        assert gate._training
        gate.yield_to_measurements()
        assert gate._training


def test_a_dead_trainer_does_not_block_measurements(tmp_path: Path, ctx) -> None:
    holder = ctx.Process(target=_holder, args=(str(tmp_path),))
    holder.start()
    time.sleep(0.3)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(5)
    meas = ctx.Process(target=_measurer, args=(str(tmp_path), str(tmp_path / "m.json"), 1, 0.01))
    meas.start()
    meas.join(10)
    assert meas.exitcode == 0, "the kernel releases a killed holder's flock"


def test_a_live_trainer_blocks_a_measurement_until_it_yields(tmp_path: Path, ctx) -> None:
    holder = ctx.Process(target=_holder, args=(str(tmp_path),))
    holder.start()
    try:
        time.sleep(0.3)
        meas = ctx.Process(target=_measurer, args=(str(tmp_path), str(tmp_path / "m.json"), 1, 0.01))
        meas.start()
        meas.join(1.0)
        assert meas.is_alive(), "the measurement ran while a trainer held the gate mid-step"
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(5)
    meas.join(10)
    assert meas.exitcode == 0
