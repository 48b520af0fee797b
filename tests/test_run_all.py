"""benchmarks.run_all (`make bench`): every benchmark has a smoke run, and smoke runs leave RESULTS.md alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import run_all

ROOT = Path(__file__).resolve().parents[1]


def test_every_benchmark_script_has_a_smoke_run() -> None:
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py") if "\ndef main(" in p.read_text()}
    assert scripts - {"run_all"} == set(run_all.BENCHMARKS)


def test_smoke_output_goes_to_the_quick_folder_not_results_md(tmp_path: Path) -> None:
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_bytes() if results.exists() else None
    code = ("from benchmarks._results import ASSETS, write_section; "
            "print(write_section('pruner_overhead', '## smoke')); print(ASSETS)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AVPRUNE_BENCH_OUT": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True,
                         timeout=60).stdout.split()
    assert out == [str(tmp_path / "RESULTS.md"), str(tmp_path / "results")]
    text = (tmp_path / "RESULTS.md").read_text()
    assert "<!-- BEGIN pruner_overhead -->\n## smoke\n<!-- END pruner_overhead -->" in text
    assert (results.read_bytes() if results.exists() else None) == before


def test_a_rewritten_section_keeps_its_notes(tmp_path: Path) -> None:
    code = ("from benchmarks._results import NOTES_MARK, RESULTS, write_section; "
            "write_section('engine', '## engine\\nrun 1'); "
            "RESULTS.write_text(RESULTS.read_text().replace('run 1', 'run 1\\n' + NOTES_MARK + '\\n**Note:** kept')); "
            "write_section('engine', '## engine\\nrun 2'); write_section('depth', '## depth')")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AVPRUNE_BENCH_OUT": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True, timeout=60)
    text = (tmp_path / "RESULTS.md").read_text()
    engine = text.split("<!-- BEGIN engine -->")[1].split("<!-- END engine -->")[0]
    assert "run 2" in engine and "run 1" not in engine  # the generated part is replaced ...
    assert engine.strip().endswith("**Note:** kept")  # ... the notes below the mark stay, once
    assert engine.count("**Note:** kept") == 1 and "<!-- BEGIN depth -->\n## depth\n" in text


def test_train_default_judges_the_8_minute_target_only_on_time_sized_runs() -> None:
    from benchmarks.train_default import target_verdict

    assert target_verdict(True, None, 50 * 60) == "met"  # a time-sized run stops at its limit
    assert target_verdict(False, None, 8 * 60) == "NOT met"
    assert target_verdict(True, 400, 7 * 60) == "met"  # a --steps run within the 8 minutes counts
    long_run = target_verdict(True, 3000, 53.6 * 60)
    assert long_run.startswith("not judged") and "3000" in long_run and "53.6 min" in long_run


def test_oneshot_recovery_section_is_named_by_its_tag_and_judges_the_required_point() -> None:
    from benchmarks.oneshot_recovery import markdown

    def row(name: str, ratio: float, speedup: float, drop: float) -> dict:
        return {"name": name, "ratio": ratio, "params_m": 2.0 - ratio, "graph_p50_ms": 8.0 / speedup,
                "graph_speedup": speedup, "graph_speedup_ci": [speedup - 0.02, speedup + 0.02],
                "frame_speedup": speedup * 0.9, "map": 0.6 - drop / 100, "map_drop_points": drop,
                "curve": [[0, 0.5], [1000, 0.6 - drop / 100]]}

    fast = row("one-shot 30%", 0.3, 1.52, 0.8)
    rec = {"tag": "oneshot_recovery_ckpt4000", "quick": False, "checkpoint": "c.pt", "data": "d", "steps": 1000,
           "lr": 1e-3, "val_images": 480, "seed": 0, "machine": "m", "wall_s": 60.0,
           "rows": [row("dense as long", 0.0, 1.0, 0.0), fast], "best_within_drop": fast}
    md = markdown(rec, "oneshot_recovery_ckpt4000.png")
    assert md.startswith("## oneshot_recovery_ckpt4000: ") and "--tag oneshot_recovery_ckpt4000 " in md
    assert "--checkpoint c.pt --data d --ratios" in md  # the command reruns the same rows on the same data
    assert "Wall time 1.0 min." in md  # rows trained in this run: no cache note
    cached = [{**r, "train_s": 1800.0} for r in rec["rows"]]
    assert "Wall time 1.0 min (rows reused from the cache; their fine-tunes took 60 min in all)." in markdown(
        {**rec, "rows": cached}, "x.png")
    assert "--feature-weight" not in md and "attention transfer" not in md
    assert "**met** by one-shot 30% (1.52x at +0.8)" in md
    slow = row("one-shot 20%", 0.2, 1.31, 0.4)
    md = markdown({**rec, "rows": [rec["rows"][0], slow], "best_within_drop": slow}, "x.png")
    assert "**not met**" in md and "1.31x at +0.4" in md
    md = markdown({**rec, "feature_weight": 1000.0}, "x.png")
    assert "--feature-weight 1000" in md and "attention transfer" in md and "(weight 1000)" in md


def test_oneshot_recovery_depth_rows_parse_name_and_report_the_blocks_they_removed() -> None:
    from benchmarks.oneshot_recovery import _row_name, markdown, parse_depth

    assert parse_depth("7:0, 4:0.1,2") == [(7, 0.0), (4, 0.1), (2, 0.0)]
    for bad in ("0:0.1", "3:0.95", "x:0.1", "3:-0.1"):
        with pytest.raises(ValueError, match="BLOCKS:SHARE"):
            parse_depth(bad)
    assert [_row_name(7, 0.0, ""), _row_name(1, 0.1, ""), _row_name(0, 0.3, " +feat 5")] == [
        "one-shot 7 blocks", "one-shot 1 block + 10%", "one-shot 30% +feat 5"]
    ranking = [{"name": "b.6", "ms": 0.8, "loss_up": 0.12}, {"name": "b.1", "ms": 0.6, "loss_up": 3.0},
               {"name": "b.9", "ms": -0.1, "loss_up": 0.01}]
    depth_row = {"name": "one-shot 1 block + 10%", "ratio": 0.1, "blocks": ["b.6"], "params_m": 1.4,
                 "graph_p50_ms": 5.0, "graph_speedup": 1.6, "frame_speedup": 1.5, "map": 0.64, "map_drop_points": 0.5,
                 "curve": [[0, 0.3], [1000, 0.64]]}
    dense = {**depth_row, "name": "dense as long", "ratio": 0.0, "blocks": [], "graph_speedup": 1.0,
             "map_drop_points": 0.0}
    rec = {"tag": "oneshot_recovery_depth", "quick": False, "checkpoint": "c.pt", "data": "d", "steps": 1000,
           "lr": 1e-3, "val_images": 480, "seed": 0, "machine": "m", "wall_s": 60.0, "block_ranking": ranking,
           "rows": [dense, depth_row], "best_within_drop": depth_row}
    md = markdown(rec, "x.png")
    assert "--ratios '' --depth 1:0.1 " in md  # the command reruns the same rows
    assert "| 1 | b.6 | 0.80 | +0.120 | 0.15 | one-shot 1 block + 10% |" in md
    assert "| 2 | b.1 | 0.60 | +3.000 | 5.00 | - |" in md and "| 3 | b.9 | -0.10 | +0.010 | - | - |" in md
    assert "**met** by one-shot 1 block + 10% (1.60x at +0.5)" in md


def test_oneshot_recovery_knapsack_rows_rerun_from_the_command_and_show_their_cut() -> None:
    from benchmarks.oneshot_recovery import _is_dense, markdown

    base = {"params_m": 1.4, "graph_p50_ms": 5.0, "frame_speedup": 1.4, "curve": [[0, 0.3], [1000, 0.64]]}
    knap = {**base, "name": "one-shot knapsack 1.55x", "ratio": 0.0, "blocks": [], "graph_speedup": 1.56,
            "map": 0.63, "map_drop_points": 1.5, "recipe": {"knapsack": 1.55},
            "knapsack": {"cut_units": {"backbone.a": [32, 64]},
                         "tries": [{"budget_ms": 5.1, "measured_speedup": 1.41}, {"budget_ms": 4.6, "measured_speedup": 1.56}]}}
    dense = {**base, "name": "dense as long", "ratio": 0.0, "blocks": [], "knapsack": None, "graph_speedup": 1.0,
             "map": 0.645, "map_drop_points": 0.0}
    assert _is_dense(dense) and not _is_dense(knap)
    rec = {"tag": "t", "quick": False, "checkpoint": "c.pt", "data": "d", "steps": 1000, "lr": 1e-3,
           "val_images": 480, "seed": 0, "machine": "m", "wall_s": 60.0, "rows": [dense, knap], "best_within_drop": None}
    md = markdown(rec, "x.png")
    assert "--ratios '' --knapsack 1.55 --knapsack-cost ort --steps 1000" in md
    assert "(5.10 ms predicted -> 1.41x, 4.60 ms predicted -> 1.56x)" in md and "backbone.a 32/64" in md
    assert "**not met**" in md


def test_oneshot_recovery_reconstructed_rows_rerun_from_the_command_and_say_what_the_solve_did() -> None:
    from benchmarks.oneshot_recovery import _is_dense, markdown

    base = {"params_m": 1.4, "graph_p50_ms": 5.0, "frame_speedup": 1.4, "blocks": [], "knapsack": None}
    dense = {**base, "name": "dense as long", "ratio": 0.0, "graph_speedup": 1.0, "map": 0.645, "map_drop_points": 0.0,
             "recipe": {}, "curve": [[0, 0.645], [1000, 0.645]]}
    plain = {**base, "name": "one-shot 30%", "ratio": 0.3, "graph_speedup": 1.55, "map": 0.628, "map_drop_points": 1.7,
             "recipe": {"ratio": 0.3}, "curve": [[0, 0.002], [1000, 0.628]]}
    solved = {**plain, "name": "one-shot 30% +recon 64", "recipe": {"ratio": 0.3, "reconstruct": 64},
              "map": 0.640, "map_drop_points": 0.5, "curve": [[0, 0.596], [1000, 0.640]],
              "reconstruct": {"images": 64, "layers": 59, "seconds": 120.0, "mean_error_before": 0.466,
                              "mean_error_after": 0.02}}
    assert not _is_dense(solved)
    rec = {"tag": "t", "quick": False, "checkpoint": "c.pt", "data": "d", "steps": 1000, "lr": 1e-3,
           "val_images": 480, "seed": 0, "machine": "m", "wall_s": 60.0, "rows": [dense, plain, solved],
           "best_within_drop": solved}
    md = markdown(rec, "x.png")
    assert "--ratios '0.3' --steps 1000 --eval-every 250 --lr 0.001 --reconstruct 64`" in md
    assert "59 layers in 120 s, mean relative output error 0.466 -> 0.020; step-0 mAP 0.596." in md
    assert "one-shot 30%: cut by" not in md  # only the re-solved row gets the sentence
    assert "one-shot 30% +recon 64: cut by the prune job's pruner" in md  # a width row, not a knapsack's


def test_oneshot_recovery_folded_rows_are_named_rerun_and_say_what_was_folded() -> None:
    from benchmarks.oneshot_recovery import _suffix, markdown

    assert [_suffix(0, 0), _suffix(64, 0), _suffix(0, 64), _suffix(32, 64)] == [
        "", " +recon 64", " +fold SE 64", " +recon 32 +fold SE 64"]  # off adds nothing (was " +recon 0")
    base = {"params_m": 1.4, "graph_p50_ms": 5.0, "frame_speedup": 1.4, "blocks": [], "knapsack": None}
    dense = {**base, "name": "dense as long", "ratio": 0.0, "graph_speedup": 1.0, "map": 0.65, "map_drop_points": 0.0,
             "recipe": {}, "curve": [[0, 0.648], [1000, 0.65]]}
    folded = {**base, "name": "one-shot 30% +fold SE 64", "ratio": 0.3, "graph_speedup": 1.8, "map": 0.64,
              "map_drop_points": 1.0, "recipe": {"ratio": 0.3, "fold_gates": 64}, "curve": [[0, 0.5], [1000, 0.64]],
              "fold_gates": {"images": 64, "seconds": 6.0, "gates": ["a.se", "b.se"], "mean_scale_spread": 0.023}}
    rec = {"tag": "t", "quick": False, "checkpoint": "c.pt", "data": "d", "steps": 1000, "lr": 1e-3,
           "val_images": 480, "seed": 0, "machine": "m", "wall_s": 60.0, "rows": [dense, folded],
           "best_within_drop": folded}
    md = markdown(rec, "x.png")
    assert "--lr 0.001 --fold-gates 64`" in md
    assert ("one-shot 30% +fold SE 64: after the cut, its 2 squeeze-excitation gates folded into the convs that read "
            "them as their mean scale over 64 training images") in md and "spread of the scale across images 0.023" in md
