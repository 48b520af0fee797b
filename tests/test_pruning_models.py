"""Pruner on real architectures: mobilenet_v3_large, resnet18 and the SSDlite320 detector.

Cheap on purpose (64x64 inputs, one step): the dependency graph is traced once per architecture
and shared by every case through ``coupling=``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from pruning import CRITERIA, GRANULARITIES, Pruner, build_controller
from pruning.filters import (
    detector_core_forward,
    detector_default_filter,
    detector_output_layers,
    followed_by_batchnorm,
)
from pruning.groups import Coupling, flatten_tensors

X = torch.randn(1, 3, 64, 64)  # eval-mode BN: batch 1 is fine and halves the cost


def _ssdlite() -> nn.Module:
    from perception.models import build_detector  # tests only: pruning/ never imports perception

    return build_detector("ssdlite320_mobilenet_v3_large")


BUILDERS = {
    "mobilenet_v3_large": lambda: torchvision.models.mobilenet_v3_large(),
    "resnet18": lambda: torchvision.models.resnet18(),
    "ssdlite320": _ssdlite,
}


@pytest.fixture(scope="module")
def arch() -> dict[str, tuple[nn.Module, Coupling]]:
    """Each architecture once (eval mode, seeded), with its channel coupling traced once."""
    out = {}
    for name, build in BUILDERS.items():
        torch.manual_seed(0)
        model = build().eval()
        probe = Pruner(copy.deepcopy(model), granularity="channel", example_inputs=X,
                       controller=build_controller("fixed", sparsity=0.0))
        out[name] = (model, Coupling(groups=probe.groups, skipped=probe.skipped))
    return out


def _forward(model: nn.Module, pruner: Pruner) -> list[torch.Tensor]:
    with torch.no_grad():
        return flatten_tensors(pruner.forward_fn(model, X) if pruner.forward_fn else model(X))


@pytest.mark.parametrize("granularity", GRANULARITIES.names())
@pytest.mark.parametrize("importance", CRITERIA.names())
@pytest.mark.parametrize("name", list(BUILDERS))
def test_every_criterion_and_granularity(arch, name: str, importance: str, granularity: str) -> None:
    base, coupling = arch[name]
    model = copy.deepcopy(base)
    kw = {}
    if importance == "bn_scale":
        kw["layer_filter"] = followed_by_batchnorm(model, X)
    pruner = Pruner(model, importance=importance, granularity=granularity, example_inputs=X,
                    controller=build_controller("fixed", sparsity=0.5),
                    coupling=coupling if importance != "bn_scale" else None, **kw)
    if importance == "activation":
        pruner.observe_activations([X])
    if importance == "taylor":  # gradients in eval mode: batch 1 cannot train BN on 1x1 maps
        loss = sum(t.float().pow(2).mean() for t in flatten_tensors(
            pruner.forward_fn(model, X) if pruner.forward_fn else model(X)))
        loss.backward()
    pruner.step()
    assert len(pruner.history) == 1 and pruner.history[0].layers
    assert 0.15 < pruner.masked_fraction() < 0.75
    assert all(torch.isfinite(t).all() for t in _forward(model, pruner))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_channel_finalize_matches_masked_model(arch, name: str) -> None:
    base, coupling = arch[name]
    model = copy.deepcopy(base)
    pruner = Pruner(model, importance="magnitude", granularity="channel", example_inputs=X, round_to=8,
                    controller=build_controller("fixed", sparsity=0.5), coupling=coupling)
    pruner.step()
    y_masked = _forward(model, pruner)
    n_before = sum(p.numel() for p in base.parameters())
    config = pruner.channel_config()
    plain = pruner.finalize()
    y_final = _forward(plain, pruner)
    for a, b in zip(y_final, y_masked, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert sum(p.numel() for p in plain.parameters()) < 0.7 * n_before
    changed = 0
    for layer, mod in plain.named_modules():
        if isinstance(mod, nn.Conv2d) and mod.out_channels != dict(base.named_modules())[layer].out_channels:
            changed += 1
            assert mod.out_channels == config[layer] and mod.out_channels % 8 == 0, (layer, mod.out_channels)
    assert changed > 10


def test_detector_filter_never_prunes_output_convs(arch) -> None:
    base, coupling = arch["ssdlite320"]
    outputs = detector_output_layers(base)
    assert len(outputs) == 12  # 6 feature maps x (class, box)
    assert all(".module_list." in n and n.endswith(".1") for n in outputs)
    keep = detector_default_filter(base)
    assert not any(keep(n, base.get_submodule(n)) for n in outputs)
    assert keep("backbone.features.0.0.0", base.get_submodule("backbone.features.0.0.0"))
    assert any(keep(n, m) for n, m in base.named_modules() if n.startswith("backbone.extra"))
    model = copy.deepcopy(base)
    pruner = Pruner(model, granularity="channel", example_inputs=X, coupling=coupling,
                    controller=build_controller("fixed", sparsity=0.7))
    pruner.step()
    plain = pruner.finalize()
    for n in outputs:
        assert plain.get_submodule(n).out_channels == base.get_submodule(n).out_channels
    # The full detector (pre/post-processing included) still runs on the pruned model.
    plain.eval()
    with torch.no_grad():
        dets = plain([torch.rand(3, 96, 128)])
    assert set(dets[0]) == {"boxes", "scores", "labels"}
    assert detector_core_forward(plain, X)["bbox_regression"].shape[-1] == 4
