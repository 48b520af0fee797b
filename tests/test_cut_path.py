"""benchmarks.cut_path: the three paths to one channel cut, on a small conv net."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from benchmarks.cut_path import CutPath, fade_scale, markdown, parse_paths, shrink_factor
from pruning import Pruner, build_controller
from tests.conftest import X, small_net


def cut_pruner(seed: int = 0) -> Pruner:
    pruner = Pruner(small_net(seed), importance="magnitude", granularity="channel",
                    controller=build_controller("fixed", sparsity=0.5), example_inputs=X)
    pruner.update()
    return pruner


def masks(pruner: Pruner) -> dict:
    return {k: wm.mask.clone() for k, wm in pruner.masks.items()}


def step(path: CutPath, i: int) -> None:
    path(SimpleNamespace(step=i))


def test_the_schedules_end_at_the_cut() -> None:
    assert [fade_scale(t, 4) for t in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert fade_scale(0, 0) == 0.0
    for n in (1, 7, 150):
        factors = [shrink_factor(t, n) for t in range(1, n + 1)]
        assert math.prod(factors) == pytest.approx(1e-3, rel=1e-9)
        assert all(a > b for a, b in zip(factors, factors[1:], strict=False))  # the rate grows
    assert shrink_factor(8, 7) == 1.0  # past the path: no more decay
    with pytest.raises(ValueError, match="floor"):
        shrink_factor(1, 5, floor=1.0)


def test_paths_parse_and_bad_ones_are_named() -> None:
    assert parse_paths("hard, fade:150,shrink:20") == [("hard", 0), ("fade", 150), ("shrink", 20)]
    for bad in ("soft:3", "hard:3", "fade", "fade:0", "shrink:x", ""):
        with pytest.raises(ValueError, match="--paths"):
            parse_paths(bad)


def test_hard_path_is_the_cut_from_the_start() -> None:
    pruner = cut_pruner()
    cut = masks(pruner)
    path = CutPath(pruner, "hard", 0)
    step(path, 0)
    assert all(torch.equal(pruner.masks[k].mask, m) for k, m in cut.items())
    assert any((m == 0).any() for m in cut.values())


def test_fade_scales_only_the_batchnorm_of_cut_channels_then_cuts() -> None:
    pruner = cut_pruner()
    cut = masks(pruner)
    path = CutPath(pruner, "fade", 4)
    step(path, 0)  # one step done: scale 0.75
    for k, m in cut.items():
        now = pruner.masks[k].mask
        if isinstance(pruner.modules[k[0]], _BatchNorm):
            assert torch.allclose(now, m + (1 - m) * 0.75)
        else:  # filters and input slices stay open while the channel fades
            assert torch.all(now == 1)
    with path.cut():  # a read sees the cut ...
        assert all(torch.equal(pruner.masks[k].mask, m) for k, m in cut.items())
    assert not all(torch.equal(pruner.masks[k].mask, m) for k, m in cut.items())  # ... and the path is back after
    for i in range(1, 4):
        step(path, i)
    assert all(torch.equal(pruner.masks[k].mask, m) for k, m in cut.items())


def test_a_finished_fade_computes_what_the_hard_cut_does() -> None:
    hard, fade = cut_pruner(), cut_pruner()
    CutPath(hard, "hard", 0)
    path = CutPath(fade, "fade", 3)
    with torch.no_grad():
        assert not torch.allclose(hard.model(X), fade.model(X))
        for i in range(3):
            step(path, i)
        assert torch.allclose(hard.model(X), fade.model(X))


def test_shrink_decays_every_slice_of_a_cut_channel_and_nothing_else() -> None:
    pruner = cut_pruner()
    cut = masks(pruner)
    originals = {k: getattr(pruner.modules[k[0]].parametrizations, k[1]).original for k in cut}
    before = {k: t.detach().clone() for k, t in originals.items()}
    path = CutPath(pruner, "shrink", 5)
    assert all(torch.all(pruner.masks[k].mask == 1) for k in cut)  # open while the weights decay
    for i in range(5):
        step(path, i)
    for k, m in cut.items():
        expect = before[k] * (m + (1 - m) * 1e-3)
        assert torch.allclose(originals[k], expect, rtol=1e-4, atol=1e-12), k
        assert torch.equal(pruner.masks[k].mask, m)  # masked once the path ends
    step(path, 5)  # past the path: no further decay
    assert all(torch.allclose(originals[k], before[k] * (m + (1 - m) * 1e-3), rtol=1e-4, atol=1e-12)
               for k, m in cut.items())


def test_paths_refuse_what_they_cannot_do() -> None:
    pruner = cut_pruner()
    with pytest.raises(ValueError, match="kind"):
        CutPath(pruner, "soft", 3)
    with pytest.raises(ValueError, match="steps >= 1"):
        CutPath(pruner, "fade", 0)


def test_markdown_compares_each_path_with_the_hard_cut_and_reruns_the_same_rows() -> None:
    def row(name: str, path: str | None, n: int, m: float) -> dict:
        return {"name": name, "path": path, "path_steps": n, "ratio": 0.5 if path else 0.0, "params_m": 1.0,
                "graph_p50_ms": 5.0 if path else 9.0, "graph_speedup": 1.8 if path else 1.0, "graph_speedup_ci": [1.7, 1.9], "frame_speedup": 1.5,
                "map": m, "map_drop_points": 100 * (0.645 - m), "curve": [[0, 0.01], [400, m]], "train_s": 1.0}

    rec = {"tag": "cut_path", "quick": False, "checkpoint": "c.pt", "data": "d", "ratio": 0.5, "steps": 400,
           "lr": 1e-3, "eval_every": 100, "val_images": 480, "seed": 0, "machine": "m", "wall_s": 60.0,
           "rows": [row("dense as long", None, 0, 0.645), row("50% hard cut", "hard", 0, 0.602),
                    row("50% fade over 150 steps", "fade", 150, 0.596)]}
    md = markdown(rec, "cut_path.png")
    assert md.startswith("## cut_path: ")
    assert "--ratio 0.5 --paths hard,fade:150 --steps 400" in md
    assert "50% fade over 150 steps -0.6." in md
    assert "--seed" not in md and "--seed 1" in markdown({**rec, "seed": 1}, "x.png")
    assert "no verdict" in markdown({**rec, "quick": True}, "x.png")


def test_bad_command_lines_are_one_line_refusals_that_write_nothing() -> None:
    from benchmarks._results import ASSETS
    from benchmarks.cut_path import main

    before = sorted(p.name for p in ASSETS.iterdir())
    for argv, words in ((["--paths", "soft:3"], "--paths 'soft:3'"), (["--ratio", "0.95"], "--ratio 0.95"),
                        (["--steps", "100", "--paths", "fade:150"], "must end before"),
                        (["--tag", "no_such_run_xyz", "--report-only"], "no earlier run")):
        with pytest.raises(SystemExit, match=words) as e:
            main(argv)
        assert "\n" not in str(e.value)
    assert sorted(p.name for p in ASSETS.iterdir()) == before
