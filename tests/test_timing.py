"""Paired timing: interleaving, rotation, the ratio and its interval, on a simulated clock (exact)."""

from __future__ import annotations

import numpy as np
import pytest

from deploy.timing import percentile, summarize, time_paired, time_runtimes
from tests.conftest import MS, FakeRuntime


class Clock:
    def __init__(self) -> None:
        self.t = 0

    def now_ns(self) -> int:
        return self.t


def _calls(clock: Clock, ms: dict[str, object], log: list[tuple[str, int]]):
    def make(name: str):
        def call(x: int) -> None:
            log.append((name, x))
            cost = ms[name]
            clock.t += round((cost(x) if callable(cost) else cost) * MS)

        return call

    return {name: make(name) for name in ms}


def test_interleaved_rotated_same_inputs_and_exact_ratio():
    clock, log = Clock(), []
    calls = _calls(clock, {"dense": 10.0, "pruned": 4.0, "int8": 5.0}, log)
    t = time_paired(calls, [0, 1, 2, 3], blocks=6, block_size=2, warmup=1, clock_ns=clock.now_ns)
    assert t.reference == "dense" and set(t.ratios) == {"pruned", "int8"}
    assert t.ratios["pruned"].ratio == pytest.approx(2.5) and t.ratios["int8"].ratio == pytest.approx(2.0)
    assert t.ratios["pruned"].low == pytest.approx(2.5) and t.ratios["pruned"].high == pytest.approx(2.5)
    assert t.summaries["dense"].n == 12 and t.summaries["pruned"].p50_ms == pytest.approx(4.0)
    timed = log[3 * 2:]  # after one warm-up round of each model on the first block's inputs
    blocks = [timed[i : i + 6] for i in range(0, len(timed), 6)]
    # every model sees the same inputs within a block; inputs continue cyclically across blocks
    for b, block in enumerate(blocks):
        assert {x for _, x in block} == {(2 * b) % 4, (2 * b + 1) % 4}
    # the order rotates: each model leads once every 3 blocks
    assert [block[0][0] for block in blocks] == ["dense", "pruned", "int8"] * 2


def test_interval_covers_the_point_and_is_seeded():
    rng = np.random.default_rng(1)
    noise = {i: float(x) for i, x in enumerate(rng.gamma(4.0, 0.5, size=64))}

    def run(seed: int):
        clock = Clock()
        calls = _calls(clock, {"ref": lambda i: 9.0 + noise[i], "cand": lambda i: 3.0 + noise[(i + 7) % 64]}, [])
        return time_paired(calls, list(range(64)), reference="ref", blocks=8, block_size=8, warmup=0,
                           clock_ns=clock.now_ns, seed=seed)

    a, b, c = run(0), run(0), run(1)
    ra = a.ratios["cand"]
    assert ra.low < ra.ratio < ra.high and ra.confidence == 0.95 and ra.resamples == 2000
    assert ra == b.ratios["cand"]  # same seed, same interval
    assert (c.ratios["cand"].low, c.ratios["cand"].high) != (ra.low, ra.high)
    assert len(a.block_p50_ms["ref"]) == 8
    assert a.to_dict()["percentile"].startswith("numpy linear")


def test_runtimes_each_with_its_own_stages():
    clock = Clock()

    class Rt(FakeRuntime):
        def run(self, prepared):
            clock.t += round(self.model_ms(0) * MS)
            return 0

    frames = [np.full((4, 4, 3), i, np.uint8) for i in range(3)]
    rts = {"dense": Rt(None, lambda i: 8.0), "pruned": Rt(None, lambda i: 2.0)}
    t = time_runtimes(rts, frames, reference="dense", blocks=3, warmup=0, clock_ns=clock.now_ns)
    assert t.ratios["pruned"].ratio == pytest.approx(4.0)
    assert set(t.stages["dense"]) == {"preprocess", "graph", "postprocess"}
    assert t.stages["dense"]["graph"].p50_ms == pytest.approx(8.0) and t.stages["pruned"]["preprocess"].p50_ms == 0
    g = time_runtimes(rts, frames, end_to_end=False, blocks=2, warmup=0, clock_ns=clock.now_ns)
    assert g.ratios["pruned"].ratio == pytest.approx(4.0) and set(g.stages["dense"]) == {"graph"}


def test_errors():
    clock = Clock()
    calls = _calls(clock, {"a": 1.0, "b": 1.0}, [])
    with pytest.raises(ValueError, match="at least one model"):
        time_paired({}, [0])
    alone = time_paired({"a": calls["a"]}, [0, 1], blocks=5, clock_ns=clock.now_ns)  # a baseline: blocks' spread
    assert alone.ratios == {} and alone.block_p50_ms["a"] == (1.0,) * 5
    with pytest.raises(ValueError, match="reference 'c'"):
        time_paired(calls, [0], reference="c")
    with pytest.raises(ValueError, match="at least one input"):
        time_paired(calls, [])
    with pytest.raises(ValueError, match="blocks >= 2"):
        time_paired(calls, [0], blocks=1)


def test_one_percentile_definition():
    # summarize uses the same definition as percentile (numpy linear, Hyndman & Fan type 7)
    samples = [5.0, 1.0, 4.0, 2.0, 100.0]
    s = summarize(samples)
    assert s.p50_ms == 4.0 and s.p90_ms == pytest.approx(float(percentile(samples, 90))) == pytest.approx(62.0)
    assert s.p99_ms == pytest.approx(96.2)
