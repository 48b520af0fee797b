"""Where the budget is out of reach, the job ships the fastest model that kept the mAP floor.

The trial keeps that model as it measures (``floor_snapshot.pt``), selection sees it beside each final
model, and the best trade-off is the fastest that keeps the floor before the one nearest to both.
"""

from __future__ import annotations

import json

import pytest
import torch

from avprune.prune_job.context import TrialSpec
from avprune.prune_job.errors import InfeasibleBudgetError
from avprune.prune_job.records import Candidate, CandidateRecord, Point, SearchRecord
from avprune.prune_job.select import best_tradeoff, choose, deliverables, pick
from tests.test_prune_shadow import _base, _measured


def test_the_best_tradeoff_is_the_fastest_model_that_kept_the_floor():
    base = _base(dense_map=0.558, drop=0.01)  # floor 0.548, budget 6.0 ms
    # what the demo's job measured: c1 over-cut at its last update, c1@80 and c0@60 kept the floor
    measured = [_measured("c0", 0, 0.541, ms=6.6), _measured("c0@60", 1, 0.550, ms=7.0),
                _measured("c1", 2, 0.530, ms=6.5), _measured("c1@80", 3, 0.549, ms=6.7)]
    chosen, infeasible = pick(measured, base)
    assert chosen.candidate_id == "c1@80" and infeasible is not None
    assert (infeasible.best_latency_ms, infeasible.best_map) == (6.7, 0.549)  # the message names what ships
    assert infeasible.nearest_latency_ms == pytest.approx(6.7)  # the budget it would have met
    # nothing keeps the floor: the model nearest to both targets, as before
    under = [m for m in measured if m.map < 0.548]
    assert pick(under, base)[0].candidate_id == "c1"  # 8% over the budget and 1.8 points under beats 10% and 0.7
    assert best_tradeoff([Point(6.5, 0.530, source="a"), Point(6.6, 0.541, source="b")], 6.0, 0.548).source == "a"
    # a model that meets both still wins outright, however fast a floor-keeping one is
    assert pick([*measured, _measured("c2", 4, 0.548, ms=5.9)], base) == (_measured("c2", 4, 0.548, ms=5.9), None)


def test_the_message_of_an_infeasible_budget_names_the_model_that_ships():
    cands = [Point(6.0, 0.45, source="c0", index=0), Point(5.5, 0.42, source="c1", index=1),
             Point(4.0, 0.30, source="c2", index=2)]
    with pytest.raises(InfeasibleBudgetError) as e:
        choose(cands, budget_ms=5.0, floor=0.4, others=[Point(10.0, 0.50, source="dense")])
    assert (e.value.best_latency_ms, e.value.best_map) == (5.5, 0.42)  # not the dense one, though it keeps it too
    assert "best trade-off reached: 5.50 ms at mAP 0.420" in str(e.value)


def _candidate(i: int) -> Candidate:
    return Candidate(candidate_id=f"c{i}", index=i, importance="magnitude", controller="allocation", ramp=0.4, seed=i)


def test_floor_snapshots_are_deliverables_and_survive_the_record():
    search = SearchRecord(candidates=(
        CandidateRecord(candidate=_candidate(0), status="done", steps=120, checkpoint="a/pruned.pt",
                        floor_snapshot="a/floor_snapshot.pt", floor_snapshot_step=60),
        CandidateRecord(candidate=_candidate(1), status="stopped early", steps=80,
                        floor_snapshot="b/floor_snapshot.pt", floor_snapshot_step=40),
        CandidateRecord(candidate=_candidate(2), status="done", steps=120, checkpoint="c/pruned.pt",
                        floor_snapshot="c/floor_snapshot.pt", floor_snapshot_step=120),  # its final model again
    ))
    got = [(d.candidate_id, d.index, d.checkpoint) for d in deliverables(search)]
    assert got == [("c0", 0, "a/pruned.pt"), ("c0@60", 1, "a/floor_snapshot.pt"), ("c1@40", 3, "b/floor_snapshot.pt"),
                   ("c2", 4, "c/pruned.pt")]
    assert SearchRecord.from_dict(json.loads(json.dumps(search.to_dict()))) == search


def _named_net() -> torch.nn.Module:
    from tests.conftest import small_net

    net = small_net()
    net.avprune_meta = {"name": "small_net"}  # save_checkpoint names the architecture
    return net


def test_a_trial_keeps_the_fastest_floor_keeping_model_until_one_meets_both(tmp_path):
    from avprune.prune_job.search import _Trial

    spec = TrialSpec(candidate=_candidate(0), job={}, out_dir=str(tmp_path), latency_table="t.json",
                     latency_budget_ms=5.0, map_floor=0.50, dense_map=0.51)
    work = tmp_path / "c0"
    work.mkdir()
    trial = _Trial(spec, None, work)
    net = _named_net()

    def kept(name: str) -> dict | None:
        f = work / f"{name}.json"
        return json.loads(f.read_text()) if f.is_file() else None

    trial.keep_snapshots(net, 20, 7.0, 0.49, 0.50)  # under the floor: nothing kept
    assert kept("floor_snapshot") is None and kept("snapshot") is None
    trial.keep_snapshots(net, 40, 6.5, 0.52, 0.50)  # keeps the floor, over the budget
    assert kept("floor_snapshot") == {"step": 40, "map": 0.52, "latency_ms": 6.5}
    assert (work / "floor_snapshot.pt").is_file()
    trial.keep_snapshots(net, 60, 6.8, 0.53, 0.50)  # slower: not kept, however good its mAP
    trial.keep_snapshots(net, 80, 6.0, 0.49, 0.50)  # faster, under the floor: not kept
    assert kept("floor_snapshot")["step"] == 40
    trial.keep_snapshots(net, 100, 6.1, 0.505, 0.50)  # faster and keeps the floor
    assert kept("floor_snapshot")["step"] == 100
    restarted = _Trial(spec, None, work)  # a restarted worker remembers what it kept
    assert restarted.floor_best_ms == 6.1 and restarted.best < 0
    restarted.keep_snapshots(net, 110, 4.9, 0.51, 0.50)  # meets both: the snapshot, and floor snapshots stop
    assert kept("snapshot") == {"step": 110, "map": 0.51, "latency_ms": 4.9}
    restarted.keep_snapshots(net, 120, 5.5, 0.52, 0.50)
    assert kept("floor_snapshot")["step"] == 100 and kept("snapshot")["step"] == 110
