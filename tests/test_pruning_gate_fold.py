"""pruning.gate_fold: squeeze-excitation gates found from the forward, folded exactly as their mean scale."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.ops.misc import SqueezeExcitation

from pruning.filters import detector_core_forward
from pruning.gate_fold import find_gates, fold_gates

ASSETS = Path(__file__).resolve().parents[1] / "avprune" / "assets"


def _toy(shared: bool = False) -> nn.Module:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.se = SqueezeExcitation(16, 8)
            self.project = nn.Conv2d(16, 8, 1, bias=False)
            self.side = nn.Conv2d(16, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.se(torch.relu(self.stem(x)))
            out = self.project(y)
            return out + self.side(y) if shared else out

    torch.manual_seed(0)
    return Net().eval()


def test_calibrated_on_one_image_the_fold_reproduces_that_image_exactly() -> None:
    """With one calibration image the mean scale is that image's scale: the folded model (gate gone,
    its scale in the consumer's weights) equals the original there, and differs on another image."""
    net = _toy()
    assert find_gates(net, torch.randn(2, 3, 12, 12)) == {"se": "project"}
    ref = copy.deepcopy(net)
    x = torch.randn(1, 3, 12, 12)
    folds = fold_gates(net, [x, x.clone()])
    assert [(f.gate, f.consumer, f.channels) for f in folds] == [("se", "project", 16)]
    assert isinstance(net.se, nn.Identity) and folds[0].scale_spread < 1e-6
    torch.testing.assert_close(net(x), ref(x), rtol=1e-5, atol=1e-5)
    other = torch.randn(1, 3, 12, 12)
    assert not torch.allclose(net(other), ref(other), atol=1e-6)
    affine = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)).eval()
    assert find_gates(affine, torch.randn(2, 3, 6, 6)) == {}  # a BatchNorm scales every input alike: no gate


def test_an_input_dependent_gate_becomes_its_mean_and_a_shared_gate_is_not_folded() -> None:
    net = _toy()
    batches = [torch.randn(2, 3, 12, 12) for _ in range(4)]
    ref = copy.deepcopy(net)
    folds = fold_gates(net, batches)
    assert folds[0].scale_spread > 0  # the gate did depend on its input: that is what the fold gives up
    x = batches[0]
    assert not torch.allclose(net(x), ref(x), atol=1e-6)  # not the original function ...
    mean = torch.stack([ref.se.scale_activation(ref.se.fc2(ref.se.activation(ref.se.fc1(
        ref.se.avgpool(torch.relu(ref.stem(b))))))) for b in batches]).mean(dim=(0, 1))
    with torch.no_grad():
        held = ref.project(torch.relu(ref.stem(x)) * mean)  # ... but the gate held at its mean
    torch.testing.assert_close(net(x), held, rtol=1e-4, atol=1e-5)
    assert find_gates(_toy(shared=True), torch.randn(1, 3, 8, 8)) == {}  # two readers: folding would change one


def test_a_saturated_gate_is_still_a_gate_and_a_layer_scale_is_not() -> None:
    """A gate whose activation sits at its ceiling for every input (scale 1) is found and folds to
    the identity scale; a learned per-channel scale (no submodule computes it) is never a gate."""
    net = _toy()
    with torch.no_grad():
        net.se.fc2.bias.fill_(50.0)  # hardsigmoid(50) == 1 whatever the input
    x = torch.randn(2, 3, 12, 12)
    assert find_gates(net, x) == {"se": "project"}
    ref = copy.deepcopy(net)
    folds = fold_gates(net, [x])
    assert folds[0].mean_scale == pytest.approx(1.0) and folds[0].scale_spread < 1e-6
    torch.testing.assert_close(net(x), ref(x), rtol=1e-5, atol=1e-5)

    class LayerScale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gamma = nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return t * self.gamma

    scaled = nn.Sequential(nn.Conv2d(3, 4, 1), LayerScale(), nn.Conv2d(4, 2, 1)).eval()
    assert find_gates(scaled, torch.randn(2, 3, 6, 6)) == {}


def test_ssdlite_gates_are_its_squeeze_excitations_and_the_folded_model_round_trips(tmp_path) -> None:
    from perception.models import drop_blocks, load_detector, save_checkpoint

    model = load_detector(ASSETS / "ssdlite320_synthdrive.pt").eval()  # trained: an untrained net's activations fade
    se = sorted(n for n, m in model.named_modules() if isinstance(m, SqueezeExcitation))
    batches = [torch.randn(2, 3, 320, 320) for _ in range(2)]
    gates = find_gates(model, batches[0], forward_fn=detector_core_forward)
    assert sorted(gates) == se and len(se) == 8
    for g, consumer in gates.items():  # MobileNetV3: the block's project conv reads the gate
        assert consumer.rsplit(".", 2)[0] == g.rsplit(".", 1)[0] and consumer.endswith(".0")
    folds = fold_gates(model, batches, forward_fn=detector_core_forward)  # checks itself against the held-at-mean model
    assert [f.gate for f in folds] == list(gates)
    assert not any(isinstance(m, SqueezeExcitation) for m in model.modules())
    drop_blocks(model, [f.gate for f in folds])  # what a checkpoint records, as for removed residual blocks
    save_checkpoint(tmp_path / "folded.pt", model)
    again = load_detector(tmp_path / "folded.pt").eval()
    with torch.no_grad():
        torch.testing.assert_close(detector_core_forward(again, batches[1]), detector_core_forward(model, batches[1]))


@pytest.mark.parametrize("gate_first", [True, False])
def test_a_block_removed_whole_takes_its_folded_gate_with_it(tmp_path, gate_first: bool) -> None:
    """channel+block on a gate-folded start: the checkpoint records the folded gate and the block
    around it, and must rebuild (a real job's select stage failed here), in either order."""
    from perception.models import drop_blocks, load_detector, save_checkpoint

    model = load_detector(ASSETS / "ssdlite320_synthdrive.pt").eval()
    gate, block = "backbone.features.0.6.block.2", "backbone.features.0.6"
    assert isinstance(model.get_submodule(gate), SqueezeExcitation)
    for names in ([[gate], [block]] if gate_first else [[block], [gate]]):
        drop_blocks(model, names)
    assert isinstance(model.get_submodule(block), nn.Identity)
    assert model.avprune_meta["removed_blocks"] == [block, gate]
    save_checkpoint(tmp_path / "cut.pt", model)
    again = load_detector(tmp_path / "cut.pt").eval()
    assert isinstance(again.get_submodule(block), nn.Identity)
    x = torch.randn(1, 3, 320, 320)
    with torch.no_grad():
        torch.testing.assert_close(detector_core_forward(again, x), detector_core_forward(model, x))
    with pytest.raises(ValueError, match="'backbone.features.0.7.nope' is not a submodule"):
        drop_blocks(again, ["backbone.features.0.7.nope"])


def test_bad_input_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="calibration batches"):
        fold_gates(_toy(), [])
    with pytest.raises(ValueError, match="not foldable channel gates.*found: \\['se'\\]"):
        fold_gates(_toy(), [torch.randn(1, 3, 8, 8)], gates=["stem"])
