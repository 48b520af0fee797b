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


def test_results_section_and_plot_from_a_record(tmp_path) -> None:
    """The RESULTS.md section renders from the JSON record alone (``--report-only``), with the verdicts."""
    from benchmarks import prune_job
    from benchmarks.prune_job_front import plot_fronts
    from benchmarks.prune_job_report import markdown

    row = {"map": 0.5, "map50": 0.8, "graph_p50_ms": 2.0, "graph_speedup": 2.4, "graph_speedup_ci": [2.2, 2.6],
           "frame_p50_ms": 4.0, "frame_speedup": 1.6, "frame_speedup_ci": None, "params": 1e6, "gmacs": 0.2}
    cand = {**_p("channel+block c0", 2.4, 0.6), "granularity": "channel+block", "channel_multiple": 16,
            "removed_blocks": ["backbone.features.0.3"], "blocks_restored": [], "feasible": False}
    points = {"channel": [_p("channel c0", 1.9, 0.7), _p("channel c0@50", 1.2, 0.1, "search")],
              "channel+block": [cand, _p("channel+block c0@50", 1.5, 0.2, "search")]}
    record = {"quick": False, "machine": "test machine", "steps": 400, "budget_speedup": 2.5, "max_drop_points": 1.0,
              "candidates_per_granularity": 2, "ramp": 0.5, "measure_every": 50, "dense_long_map_job_val": 0.51,
              "map_floor": 0.5, "wall_s": 1800.0,
              "config": {"channel": {"budget": {"input_size": [320, 320], "threads": 2, "score_thresh": 0.01},
                                     "finetune": {"batch_size": 8, "distill": True},
                                     "pruning": {"importances": ["magnitude"], "controller": "allocation",
                                                 "allocation": "uniform", "channel_multiple": 16}}},
              "jobs": {"channel": {"job_wall_s": 600.0, "peak_rss_gib": 5.0, "candidate_id": "c0",
                                   "stage_wall_s": {"search": 500.0}, "infeasible": "infeasible budget: x"}},
              "side_by_side": {"dense": {**row, "graph_speedup": 1.0}, "dense_long": {**row, "map": 0.51},
                               "channel+block c0": row, "one-shot 75% (ceiling)": {**row, "graph_speedup": 3.0}},
              "candidates": [cand], "points": points,
              "pareto": {g: pareto_front(p) for g, p in points.items()},
              "sensitivity": [{"layers": 4, "one_worker_s": 9.0, "two_workers_s": 6.0, "speedup": 1.5}]}
    record.update(prune_job._verdicts(record))
    assert record["targets"]["issue12_required"]["met"] and not record["targets"]["issue14_target"]["met"]
    assert record["comparison"]["range"] == [0.2, 0.6]  # where both fronts have points
    md = markdown(record, "prune_job_pareto.png")
    assert "**400 fine-tune steps**" in md and "#14 target, channel+block" in md and "NOT met" in md
    assert "channel+block vs channel at equal drop" in md and "results/prune_job_pareto.png" in md
    assert "re-solved" not in md
    record["config"]["channel"]["pruning"]["reconstruct_images"] = 64
    assert "each cut re-solved against the dense model on 64 training images" in markdown(record, "x.png")
    assert "gates folded" not in md and "squeeze-excitation" not in md
    record["config"]["channel"]["pruning"]["fold_gates"] = 64
    record["jobs"]["channel"].update(dense_graph_ms=8.0, gate_fold={"images": 64, "map": 0.49, "p50_ms": 6.9,
                                                                    "seconds": 40.0, "gates": 8})
    md = markdown(record, "x.png")
    assert "squeeze-excitation gates folded before pruning on 64 training images" in md
    assert "`channel` folded 8 squeeze-excitation gates on 64 training images" in md and "(1.16x the dense 8.00 ms" in md
    assert "latency_margin" not in md
    record["config"]["channel"]["budget"]["latency_margin"] = 0.04
    assert "trials aiming 4% under the budget (`budget.latency_margin`" in markdown(record, "x.png")
    png = plot_fronts(tmp_path / "p.png", points, record["pareto"], 1.0, (1.5, 2.0, 2.5), "t")
    assert png.stat().st_size > 1000
