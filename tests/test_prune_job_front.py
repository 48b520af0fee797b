"""benchmarks.prune_job's Pareto fronts and the channel+block vs channel comparison at equal drop."""

from __future__ import annotations

import pytest

from benchmarks.prune_job_front import best_within, compare_fronts, pareto_front, speedup_at, target_line


def _p(name: str, speed: float, drop: float, kind: str = "final") -> dict:
    return {"name": name, "graph_speedup": speed, "map_drop_points": drop, "kind": kind}


def test_front_keeps_only_non_dominated_points_sorted_by_drop() -> None:
    pts = [_p("a", 1.5, 0.2), _p("b", 1.4, 0.5), _p("c", 2.0, 1.0, "search"), _p("d", 2.0, 1.2), _p("e", 1.2, -0.1)]
    assert [q["name"] for q in pareto_front(pts)] == ["e", "a", "c"]
    assert pareto_front([]) == []


def test_speedup_reads_the_front_linearly_and_flat_after_its_last_point() -> None:
    front = pareto_front([_p("a", 1.5, 0.0), _p("b", 2.5, 1.0)])
    assert speedup_at(front, -0.1) is None
    assert speedup_at(front, 0.0) == 1.5
    assert speedup_at(front, 0.5) == pytest.approx(2.0)
    assert speedup_at(front, 3.0) == 2.5


def test_comparison_over_the_common_drop_range() -> None:
    chan = pareto_front([_p("c1", 1.5, 0.0), _p("c2", 2.0, 1.0)])
    both = pareto_front([_p("b1", 1.8, 0.0), _p("b2", 2.4, 1.0)])
    res = compare_fronts(chan, both, 1.15)
    assert res["range"] == [0.0, 1.0] and res["drops"] == [0.0, 1.0]
    assert res["ratios"] == pytest.approx([1.2, 1.2]) and res["met"]
    # a front right of the other only at one end is not 15% right of it everywhere
    weak = pareto_front([_p("b1", 1.6, 0.0), _p("b2", 2.4, 1.0)])
    res = compare_fronts(chan, weak, 1.15)
    assert not res["met"] and res["min_ratio"] == pytest.approx(1.6 / 1.5)
    # fronts that never share a drop cannot be compared
    far = pareto_front([_p("x", 3.0, 5.0)])
    res = compare_fronts(chan, far, 1.15)
    assert not res["met"] and "share no range" in res["reason"]


def test_targets_name_the_best_point_within_the_drop() -> None:
    pts = [_p("a", 1.7, 0.4), _p("b", 2.6, 1.4), _p("c", 2.1, 0.9, "search")]
    best = best_within(pts, 1.0)
    assert best["name"] == "c"
    met, line = target_line("#12", best, 2.0, 1.0)
    assert met and "met" in line and "2.10x at 0.90 points (c)" in line
    met, line = target_line("#14", best, 2.5, 1.0)
    assert not met and "NOT met" in line
    assert target_line("#14", best_within(pts, 0.1), 2.5, 1.0)[0] is False
