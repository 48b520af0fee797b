"""Issue #13: graph and frame figures of dense and pruned from ONE paired run reach report.json's
``frame_timing``, the prune report's HTML and the demo's closing table; older reports still render."""

from __future__ import annotations

import json
from itertools import count

import pytest

from avprune.demo import _summary
from avprune.prune_job.finalize import frame_figures
from avprune.prune_job.records import BaselineRecord
from avprune.prune_job.report import frame_section
from deploy.timing import time_paired


def _timing():
    """A real paired run of two fake 'runtimes' on a fake clock: pruned's graph takes half as long."""
    ticks = count(0, 1)
    clock_ns = lambda: next(ticks) * 1_000_000  # noqa: E731 - every reading advances 1 ms
    stage_ms = {"dense": {"preprocess": 0.4, "graph": 6.0, "postprocess": 0.3},
                "pruned": {"preprocess": 0.4, "graph": 3.0, "postprocess": 0.3}}
    spans = {"dense": 7, "pruned": 4}  # clock readings a call spans: the frame's ms

    def call(name):
        def fn(_frame):
            for _ in range(spans[name] - 1):
                clock_ns()
            return stage_ms[name]
        return fn

    return time_paired({"dense": call("dense"), "pruned": call("pruned")}, [0, 1, 2], reference="dense",
                       blocks=10, block_size=1, warmup=0, clock_ns=clock_ns)


def _report(ft):
    row = {"map": 0.5, "map50": 0.8, "p50_ms": 6.0, "p99_ms": 7.0, "params": 2_000_000, "gmacs": 0.5}
    return {"dense": row, "pruned": {**row, "p50_ms": 3.0}, "frame_timing": ft, "runtime": "onnxruntime",
            "device": "cpu", "threads": 2, "latency_budget_ms": 4.0, "map_floor": 0.49, "feasible": True,
            "channel_multiple": {}, "allocation": {}, "speedup": 2.0,
            "baseline_latency": {"spread": {"blocks": 5, "min_ms": 5.8, "max_ms": 6.3}}}


def test_frame_figures_from_one_paired_run():
    ft = frame_figures(_timing())
    assert ft["dense"]["frame"]["p50_ms"] == pytest.approx(7.0) and ft["pruned"]["frame"]["p50_ms"] == pytest.approx(4.0)
    assert ft["dense"]["graph"]["p50_ms"] == 6.0 and ft["pruned"]["decode_nms"]["p50_ms"] == 0.3
    assert ft["graph_speedup"] == pytest.approx(2.0) and ft["frame_speedup"]["ratio"] == pytest.approx(7 / 4)
    html = frame_section(_report(ft))
    assert "1.75&times;" in html and "2.00&times;" in html and "median of 5 blocks" in html
    assert frame_section({"dense": {}}) == ""  # reports from before issue #13: no section


def _validation():
    stats = {"p50_ms": 9.0, "p99_ms": 12.0}
    return {"overall": [{"stats": stats, "verdict": {"passed": True}}] * 2,
            "models": [{"label": "pruned"}, {"label": "dense"}], "config": {"budget_ms": 33.3}}


def test_demo_table_uses_the_paired_frame_figures(tmp_path):
    ft = frame_figures(_timing())
    (tmp_path / "prune").mkdir()
    (tmp_path / "validate").mkdir()
    (tmp_path / "prune" / "report.json").write_text(json.dumps(_report(ft)))
    (tmp_path / "validate" / "report.json").write_text(json.dumps(_validation()))
    text = _summary(tmp_path, {"train": 1.0})
    assert "decode+NMS" in text and "1.75x" in text and "2.00x" in text  # headers may wrap
    assert "7.00" in text and "4.00" in text  # frame p50 of dense / pruned from the paired run
    # the verdict's timing (select's: report.json's dense/pruned p50) is named beside the table's
    assert "select stage's re-timing of the graph: 3.00 ms against the baseline's dense 6.00 ms (2.00x)" in " ".join(text.split())
    # a prune report without frame_timing falls back to avprune validate's frames
    old = _report(None)
    del old["frame_timing"]
    (tmp_path / "prune" / "report.json").write_text(json.dumps(old))
    assert "9.00" in _summary(tmp_path, {"train": 1.0})


def test_baseline_record_blocks_round_trip_and_old_records_load():
    from avprune.prune_job.records import ModelSummary
    from deploy.timing import LatencySummary

    rec = BaselineRecord(dense=ModelSummary(0.5, 0.8, 6.0, 7.0, 10, 0.1), latency=LatencySummary(6.0, 6.5, 7.0, 6.2, 50),
                         latency_budget_ms=4.0, map_floor=0.4, val_images=8,
                         latency_blocks_ms=(5.5, 6.0, 6.0, 6.6, 5.9))
    d = rec.to_dict()
    assert BaselineRecord.from_dict(d) == rec
    assert d["latency_spread"]["max_rel_dev"] == pytest.approx(0.1) and d["latency_spread"]["blocks"] == 5
    old = {k: v for k, v in d.items() if k not in ("latency_blocks_ms", "latency_spread")}
    back = BaselineRecord.from_dict(old)
    assert back.latency_blocks_ms == () and back.latency_spread() == {} and "latency_blocks_ms" not in back.to_dict()
