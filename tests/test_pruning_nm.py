"""N:M masks in TensorRT's layout: exactly M-N masked per group of M consecutive input channels."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from pruning import Pruner, build_controller
from pruning.granularity import nm_layer_mask
from pruning.nm import nm_mask, zeros_per_group


def _groups(t: torch.Tensor, m: int) -> torch.Tensor:
    """Reference grouping written independently: for each (o, kh, kw), runs of m along I."""
    o, i = t.shape[:2]
    rest = t.shape[2:]
    out = []
    for oc in range(o):
        for pos in torch.cartesian_prod(*[torch.arange(r) for r in rest]) if rest else [()]:
            pos = tuple(int(p) for p in torch.as_tensor(pos).reshape(-1))
            col = torch.stack([t[(oc, ic, *pos)] for ic in range(i)])
            out.append(col.reshape(i // m, m))
    return torch.cat(out)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("shape", [(6, 8, 3, 3), (5, 16)])
def test_exactly_m_minus_n_zeros_per_group_in_tensorrt_layout(n: int, m: int, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    w = torch.randn(shape)
    w[0].zero_()  # ties: an all-zero output channel still gets exactly M-N masked per group
    w.view(-1)[::7] = 0.0
    mask = nm_mask(w.abs(), n, m)
    groups = _groups(mask, m)
    assert torch.all((groups == 0).sum(-1) == m - n)
    # The kept entries are the N largest of their group (by |w|), checked against the reference layout.
    gw = _groups(w.abs(), m)
    kept_min = torch.where(groups == 1, gw, torch.full_like(gw, float("inf"))).min(-1).values
    dropped_max = torch.where(groups == 0, gw, torch.full_like(gw, -1.0)).max(-1).values
    assert torch.all(kept_min >= dropped_max)
    # TensorRT's requirement on the effective weight: at least M-N exact zeros per group.
    assert torch.all(zeros_per_group(w * mask, m) >= m - n)


def test_groups_run_along_input_channels_not_kernel_positions() -> None:
    w = torch.zeros(1, 4, 1, 2)
    w[0, :, 0, 0] = torch.tensor([1.0, 4.0, 2.0, 3.0])  # keep channels 1 and 3 at position (0, 0)
    w[0, :, 0, 1] = torch.tensor([5.0, 1.0, 1.5, 0.5])  # keep channels 0 and 2 at position (0, 1)
    mask = nm_mask(w, 2, 4)
    assert mask[0, :, 0, 0].tolist() == [0, 1, 0, 1]
    assert mask[0, :, 0, 1].tolist() == [1, 0, 1, 0]


def test_ramped_target_quantises_zeros_per_group() -> None:
    s = torch.rand(4, 8, 3, 3)
    assert nm_layer_mask(s, 0.1, 2, 4).sparsity == 0.0
    r = nm_layer_mask(s, 0.3, 2, 4)
    assert r.sparsity == 0.25 and torch.all(zeros_per_group(r.mask, 4) == 1)
    assert nm_layer_mask(s, 0.9, 2, 4).sparsity == 0.5


@pytest.mark.parametrize("nm", [(5, 4), (0, 4), (2, 1)])
def test_invalid_nm_raises_naming_range(nm: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match=r"1 <= N <= M"):
        nm_mask(torch.rand(2, 4), *nm)
    with pytest.raises(ValueError, match=r"1 <= N <= M"):
        Pruner(nn.Linear(8, 4), granularity="nm", nm=nm, controller=build_controller("fixed", sparsity=0.5))


def test_pruner_nm_skips_and_reports_ineligible_layers_then_finalize_squashes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3),  # in_channels 3: not a multiple of 4
        nn.Conv2d(16, 16, 3, groups=16),  # depthwise
        nn.Conv2d(16, 8, 1),
        nn.Flatten(),
        nn.Linear(8 * 5 * 5, 12),
    )
    pruner = Pruner(model, granularity="nm", controller=build_controller("fixed", sparsity=0.5))
    assert set(pruner.skipped) == {"0", "1"}
    assert "multiple of M=4" in pruner.skipped["0"] and "depthwise" in pruner.skipped["1"]
    assert pruner.units == ["2", "4"]
    pruner.step()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        y_masked = model(x)
    plain = pruner.finalize()
    assert not any(parametrize.is_parametrized(mod) for mod in plain.modules())
    assert torch.all(zeros_per_group(plain[2].weight.detach(), 4) >= 2)
    assert torch.all(zeros_per_group(plain[4].weight.detach(), 4) >= 2)
    with torch.no_grad():
        assert torch.allclose(plain(x), y_masked, atol=1e-6)



def test_unstructured_cut_is_exact_with_ties() -> None:
    from pruning.granularity import unstructured_mask

    scores = torch.zeros(10, 10)
    scores[0, :5] = 1.0  # 95 tied zeros
    res = unstructured_mask(scores, 0.5)
    assert int((res.mask == 0).sum()) == 50 and res.sparsity == 0.5
    assert torch.all(res.mask[0, :5] == 1)
