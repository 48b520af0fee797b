"""benchmarks.stage_multiple: cuts by stage and channel multiple, read from the traced graph."""

from __future__ import annotations

import pytest
from torch import nn

from benchmarks.stage_multiple import cut_model, main, markdown, multiple_for, parse_cut

SIZE = 160  # strides are relative to the input, so a smaller frame traces the same stages faster


def test_a_cut_spec_parses_and_later_parts_override_their_stage() -> None:
    cut = parse_cut("all@16+early@8")
    assert cut == (("all", 16), ("early", 8))
    assert multiple_for(cut, early=True) == 8 and multiple_for(cut, early=False) == 16
    assert multiple_for(parse_cut("early@8"), early=False) is None  # a stage no part names stays dense
    assert multiple_for(parse_cut("late@16"), early=True) is None
    assert multiple_for(parse_cut("early@8+all@32"), early=True) == 32
    for bad in ("all", "mid@8", "all@0", "all@x", "all@16+"):
        with pytest.raises(ValueError, match="STAGE@MULTIPLE"):
            parse_cut(bad)


def _widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@pytest.fixture(scope="module")
def dense() -> nn.Module:
    import torch

    from perception.models import build_detector

    torch.manual_seed(0)
    return build_detector("ssdlite320_mobilenet_v3_large").eval()


def test_only_the_named_stage_is_cut_at_its_multiple(dense: nn.Module) -> None:
    before = _widths(dense)
    model, counts = cut_model(dense, parse_cut("early@8"), 0.5, 8, SIZE)
    after = _widths(model)
    early = {r for r, (s, _, _) in counts.items() if s <= 8}
    late = set(counts) - early
    assert "backbone.features.0.0.0" in early and "backbone.features.1.0.1.0" in late  # stem early, stride 16+ late
    # an early block's squeeze-excitation (1x1 map) is early; the extras' last convs (1x1 maps) are late
    assert "backbone.features.0.4.block.2.fc1" in early and "backbone.features.1.0.2.fc1" in late
    assert "backbone.extra.3.1.0" in late
    assert all(counts[r][2] == counts[r][1] for r in late) and all(after[r] == before[r] for r in late)
    assert after["backbone.features.0.0.0"] == 8  # the 16-channel stem group loses one group of 8
    for r in early:
        _, n, kept = counts[r]
        assert after[r] == kept and (kept == n or kept % 8 == 0) and kept < n
    assert _widths(dense) == before  # the dense model is copied, not pruned


def test_the_mixed_cut_aligns_each_stage_to_its_own_multiple(dense: nn.Module) -> None:
    model, counts = cut_model(dense, parse_cut("all@16+early@8"), 0.5, 8, SIZE)
    after = _widths(model)
    for r, (stride, n, kept) in counts.items():
        mult = 8 if stride <= 8 else 16
        assert after[r] == kept
        assert kept == n or kept % mult == 0
    # 72 -> 40 at 8 where 16 would keep 48; 40 -> 24 where 16 would keep 32
    assert counts["backbone.features.0.3.block.1.0"][1:] == (72, 40)
    assert any(counts[r][2] % 16 for r in counts if counts[r][0] <= 8)  # some early count is off the 16 block
    assert all(counts[r][2] % 16 == 0 or counts[r][2] == counts[r][1] for r in counts if counts[r][0] > 8)


def test_markdown_lists_every_cut_with_its_interval() -> None:
    rows = [{"cut": "dense", "macs_m": 400.0, "mac_ratio": 1.0, "params_m": 2.3, "graph_p50_ms": 7.0, "speedup": 1.0,
             "speedup_ci": None, "early_channels": {}, "groups_cut": 0},
            {"cut": "early@8", "macs_m": 320.0, "mac_ratio": 1.25, "params_m": 2.2, "graph_p50_ms": 6.3,
             "speedup": 1.11, "speedup_ci": [1.09, 1.12], "early_channels": {"backbone.features.0.0.0": [16, 8]},
             "groups_cut": 11}]
    text = markdown({"machine": "m", "ratio": 0.5, "early_stride": 8, "blocks": 20, "threads": 2, "input": 320,
                     "rows": rows, "seconds": 60})
    assert "| early@8 | 11 | 320 | 1.25x | 2.20 | 6.30 | 1.11x [1.09, 1.12] |" in text
    assert "`early@8`: 0.0.0 16->8" in text and "| dense | 0 |" in text


@pytest.mark.parametrize("argv, msg", [
    (["--cuts", "mid@8"], "STAGE@MULTIPLE"),
    (["--cuts", " , "], "at least one cut"),
    (["--ratio", "0.95"], "--ratio"),
    (["--blocks", "1"], "--blocks"),
])
def test_the_command_line_refuses_bad_input_in_one_line(argv: list[str], msg: str) -> None:
    with pytest.raises(SystemExit, match=msg):
        main(argv)
