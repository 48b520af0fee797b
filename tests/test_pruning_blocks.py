"""Depth pruning: residual-block discovery on three detectors, gates, finalize, resume, ONNX export."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from pruning.block_gates import BlockGates
from pruning.blocks import (
    block_latency,
    block_sensitivity,
    blocks_removed,
    discover_blocks,
    remove_blocks,
    require_blocks,
)
from pruning.filters import detector_core_forward

SIZE = 320


def _ssd() -> nn.Module:
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    torch.manual_seed(0)
    return ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3).eval()


def _frcnn() -> nn.Module:
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    torch.manual_seed(0)
    return fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=3).eval()


def _r18() -> nn.Module:
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, returned_layers=[2, 3, 4],
                                   extra_blocks=LastLevelP6P7(256, 256))
    return RetinaNet(backbone, num_classes=3).eval()


def _calibrated(build, size: int = SIZE):  # noqa: ANN001, ANN202
    """Untrained BN statistics (mean 0, var 1) make activations vanish (~1e-15 outputs), so any
    tolerance would pass; a few train-mode batches give the model realistic O(1) outputs."""

    def build_calibrated() -> nn.Module:
        model = build()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = None  # cumulative average over the calibration batches
        model.train()
        with torch.no_grad():
            for _ in range(2):
                detector_core_forward(model, torch.randn(2, 3, size, size))
        return model.eval()

    return build_calibrated


RAW = {"ssdlite": _ssd, "frcnn_mnv3": _frcnn, "retinanet_r18": _r18}
BUILDERS = {"ssdlite": _calibrated(_ssd), "retinanet_r18": _calibrated(_r18, 192)}
SIZES = {"ssdlite": SIZE, "retinanet_r18": 192}  # ResNet-18 at 320 costs ~4x the CPU time for the same checks


def _expected_residuals(model: nn.Module) -> set[str]:
    """Independent oracle from torchvision's own attributes (discovery itself never reads them)."""
    from torchvision.models.mobilenetv3 import InvertedResidual
    from torchvision.models.resnet import BasicBlock, Bottleneck

    out = set()
    for name, m in model.named_modules():
        if isinstance(m, InvertedResidual) and m.use_res_connect:
            out.add(name)
        if isinstance(m, (BasicBlock, Bottleneck)) and m.downsample is None:
            out.add(name)
    return out


@pytest.fixture(scope="module")
def ssd() -> nn.Module:
    return BUILDERS["ssdlite"]()


def _core(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = detector_core_forward(model.eval(), x)
    return [out[k] for k in sorted(out)] if isinstance(out, dict) else list(out)


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a, b, strict=True))


# -- discovery ------------------------------------------------------------------------------
@pytest.mark.parametrize("which,count", [("ssdlite", 10), ("frcnn_mnv3", 10), ("retinanet_r18", 5)])
def test_discovery_finds_exactly_the_identity_skip_blocks(which: str, count: int) -> None:
    model = RAW[which]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = discover_blocks(model)
    names = [b.name for b in blocks]
    assert set(names) == _expected_residuals(model)
    assert len(names) == count  # MobileNetV3-Large: 10 residual inverted residuals; ResNet-18: 5 identity blocks
    for b in blocks:
        m = model.get_submodule(b.name)
        assert b.cls == type(m).__name__ and b.shape[1] > 0
    # discovery leaves the model as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class AddRes(nn.Module):
    def __init__(self, c: int, how: str) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 1))
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "torch.add":
            return torch.add(self.f(x), x)
        if self.how == "method":
            return x.add(self.f(x))
        if self.how == "relu_after":  # the skip alone gives relu(x) != x when x can be negative
            return torch.relu(x + self.f(x))
        if self.how == "bias":  # adds a parameter, not a branch of x
            return self.f(x) + self.f[0].bias.view(1, -1, 1, 1)
        return x + self.f(x)


class Wrap(nn.Module):
    """Nests a residual block inside another: each module is judged by its own forward only."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.inner = AddRes(c, "plus")
        self.g = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.g(self.inner(x))


def test_discovery_is_structural_not_by_class() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # output can be negative
        AddRes(8, "torch.add"), AddRes(8, "method"), AddRes(8, "relu_after"), AddRes(8, "bias"),
        Wrap(8), nn.Conv2d(8, 16, 3, stride=2),
    )
    x = torch.randn(2, 3, 16, 16)
    names = [b.name for b in discover_blocks(net, x)]
    assert sorted(names) == ["1", "2", "5", "5.inner"]
    # removing an outer block together with the one nested in it: the outer one's identity wins
    net.eval()
    with torch.no_grad():
        want = net[6](net[4](net[3](net[0](x))))
        assert torch.equal(remove_blocks(net, ["5.inner", "1", "5", "2"])(x), want)


def test_no_removable_block_empty_and_refused() -> None:
    class PlainNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x) + 1.0

    net, x = PlainNet(), torch.randn(1, 3, 16, 16)
    assert discover_blocks(net, x) == []
    with pytest.raises(ValueError, match="PlainNet"):
        require_blocks(net, x)
    with pytest.raises(ValueError, match="PlainNet"):
        BlockGates(net, example_inputs=x)


# -- gates and finalize ---------------------------------------------------------------------
@pytest.mark.parametrize("which", ["ssdlite", "retinanet_r18"])
def test_gated_off_equals_finalized_and_restore_is_exact(which: str) -> None:
    model = BUILDERS[which]()
    x = torch.randn(1, 3, SIZES[which], SIZES[which])
    dense = _core(model, x)
    keys = list(model.state_dict())
    gates = BlockGates(model, example_inputs=x, ramp_steps=4)
    assert list(model.state_dict()) == keys  # the hooks leave the checkpoint layout alone
    assert _core(model, x)[0].equal(dense[0])
    off = gates.names[1::2]
    gates.set_targets(remove=off)
    for _ in range(2):
        gates.step()
    half = _core(model, x)
    assert gates.ramping() == off and _max_diff(half, dense) > 1e-4
    for _ in range(2):
        gates.step()
    assert gates.removed() == off and not gates.ramping()
    gated = _core(model, x)
    assert _max_diff(gated, dense) > 1e-4

    # bring two back: the same ramp up, then bit-exact original outputs once all are back
    gates.set_targets(remove=[])
    for _ in range(4):
        gates.step()
    assert all(torch.equal(a, b) for a, b in zip(_core(model, x), dense, strict=True))
    assert [e.event for e in gates.history if e.block == off[0]] == ["fading", "removed", "restoring", "restored"]

    gates.set_targets(remove=off)
    for _ in range(4):
        gates.step()
    small = gates.finalize()
    for n in off:
        assert isinstance(small.get_submodule(n), nn.Identity)
        assert not any(k.startswith(n + ".") for k in small.state_dict())
    assert _max_diff(_core(small, x), gated) <= 1e-5
    # a dense model rebuilt with the same blocks removed loads the finalized checkpoint
    rebuilt = remove_blocks(BUILDERS[which](), off)
    rebuilt.load_state_dict(small.state_dict())
    assert _max_diff(_core(rebuilt, x), gated) <= 1e-5


def test_finalize_refuses_mid_ramp(ssd: nn.Module) -> None:
    model = copy.deepcopy(ssd)
    gates = BlockGates(model, ramp_steps=10)
    gates.set_targets(remove=gates.names[:1])
    gates.step()
    with pytest.raises(ValueError, match="mid-ramp"):
        gates.finalize()
    with pytest.raises(ValueError, match="unknown blocks"):
        gates.set_targets(remove=["backbone.nope"])


def test_resume_mid_ramp_round_trips(ssd: nn.Module, tmp_path) -> None:
    x = torch.randn(1, 3, SIZE, SIZE)
    a_model = copy.deepcopy(ssd)
    a = BlockGates(a_model, ramp_steps=5)
    a.set_targets(remove=a.names[:3])
    for _ in range(2):
        a.step()
    a.set_sensitivity(a.names[0], 0.012)
    a.importance = {n: float(i) for i, n in enumerate(a.names)}
    torch.save({"model": a_model.state_dict(), "gates": a.state_dict()}, tmp_path / "ckpt.pt")

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    b_model = BUILDERS["ssdlite"]()
    b_model.load_state_dict(ckpt["model"])
    b = BlockGates(b_model, ramp_steps=5)
    b.load_state_dict(ckpt["gates"])
    assert b.gates == a.gates and b.steps == a.steps and b.importance == a.importance
    assert b.sensitivity == a.sensitivity and b.history == a.history
    assert 0.0 < b.gate(b.names[0]) < 1.0
    assert _max_diff(_core(b_model, x), _core(a_model, x)) == 0.0
    for _ in range(3):
        a.step(), b.step()
    assert b.gates == a.gates and b.removed() == a.names[:3]
    other = BlockGates(_frcnn(), ramp_steps=5)
    with pytest.raises(ValueError, match="blocks"):
        other.load_state_dict(ckpt["gates"])


def test_taylor_importance_is_the_gate_derivative() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), AddRes(8, "plus"), AddRes(8, "plus"), nn.Conv2d(8, 2, 1))
    x, target = torch.randn(4, 3, 12, 12), torch.randn(4, 2, 12, 12)
    gates = BlockGates(net, example_inputs=x, ramp_steps=10, ema=0.5)
    assert gates.names == ["1", "2"]
    gates.set_gate("2", 0.6)

    def loss() -> torch.Tensor:
        return nn.functional.mse_loss(net(x), target)

    loss().backward()
    gates.step()
    eps = 1e-3
    for name in gates.names:  # finite difference of L(g) at the current gate (one-sided at g = 1)
        g0 = gates.gate(name)
        with torch.no_grad():
            gates.set_gate(name, min(1.0, g0 + eps))
            up = float(loss())
            gates.set_gate(name, g0 - eps)
            down = float(loss())
            gates.set_gate(name, g0)
        numeric = abs(up - down) / (min(1.0, g0 + eps) - (g0 - eps))
        assert gates.importance[name] == pytest.approx(numeric, rel=2e-2)
    first = dict(gates.importance)
    loss().backward()
    gates.step()  # same batch again: the EMA of equal scores stays put
    assert gates.importance == pytest.approx(first, rel=1e-4)


def test_gated_model_pickles_and_copies_follow_live_gates() -> None:
    import pickle

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), AddRes(8, "plus"), AddRes(8, "plus")).eval()
    x = torch.randn(1, 3, 8, 8)
    gates = BlockGates(net, example_inputs=x)
    twin = copy.deepcopy(net)  # e.g. the copy an exporter or a sensitivity probe makes
    gates.set_gate("2", 0.0)
    with torch.no_grad():
        assert torch.equal(twin(x), net(x)) and torch.equal(net(x), net[1](net[0](x)))
        # Serialisable (Ray ships models between processes); the copy through the same reduce
        # protocol follows the gates. No pickled bytes are loaded back.
        assert len(pickle.dumps(net)) > 0
        assert torch.equal(copy.deepcopy(net)(x), net(x))


# -- latency and sensitivity ----------------------------------------------------------------
def test_block_latency_and_sensitivity_are_paired_differences() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), AddRes(8, "plus"), AddRes(8, "plus"), AddRes(8, "plus"))
    blocks = require_blocks(net, torch.randn(1, 3, 8, 8))
    cost = {"1": 2.0, "2": 3.0, "3": 5.0}
    originals = {b.name: net.get_submodule(b.name) for b in blocks}

    def measure(model: nn.Module) -> float:  # 10 ms fixed plus each block still present
        return 10.0 + sum(c for n, c in cost.items() if not isinstance(model.get_submodule(n), nn.Identity))

    lat = block_latency(net, measure, blocks, rounds=2)
    assert {n: v.ms for n, v in lat.items()} == cost
    calls = []

    def measure_all(models: list[nn.Module]) -> list[float]:  # all variants at once, e.g. timed interleaved
        calls.append(len(models))
        return [measure(m) for m in models]

    assert block_latency(net, None, blocks, rounds=2, measure_all=measure_all) == lat and calls == [4, 4]
    with pytest.raises(ValueError, match="exactly one"):
        block_latency(net, measure, blocks, measure_all=measure_all)
    assert lat["3"].share == pytest.approx(5.0 / 20.0) and lat["3"].dense_ms == 20.0
    assert all(net.get_submodule(n) is m for n, m in originals.items())  # put back
    drops = block_sensitivity(net, lambda m: -measure(m), blocks)
    assert drops == {n: -c for n, c in cost.items()}
    with blocks_removed(net, ["2"]):
        assert isinstance(net.get_submodule("2"), nn.Identity)
    assert net.get_submodule("2") is originals["2"]


# -- export ---------------------------------------------------------------------------------
class _Core(nn.Module):
    def __init__(self, det: nn.Module) -> None:
        super().__init__()
        self.det = det

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = detector_core_forward(self.det, x)
        return tuple(out[k] for k in sorted(out))


def _onnx(model: nn.Module, x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.onnx.export(_Core(model).eval(), (x,), buf, dynamo=False, opset_version=17, input_names=["images"])
    return buf.getvalue()


def test_finalized_ssdlite_core_exports_without_removed_blocks(ssd: nn.Module) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    x = torch.randn(1, 3, SIZE, SIZE)
    dense_model = copy.deepcopy(ssd)
    gates = BlockGates(copy.deepcopy(ssd))
    off = gates.names[2:6]
    for n in off:
        gates.set_gate(n, 0.0)
    small = gates.finalize()
    dense_doc, small_doc = onnx.load_from_string(_onnx(dense_model, x)), onnx.load_from_string(_onnx(small, x))
    assert len(small_doc.graph.node) < len(dense_doc.graph.node)

    def mentions(doc, name: str) -> bool:
        # The legacy exporter scopes node names by module path ("/backbone/features.0/features.0.3/Add");
        # initializers that survive constant folding keep the parameter name ("det.backbone....weight").
        scope = "/" + name.split(".", 1)[1] + "/"
        return any(scope in n.name for n in doc.graph.node) or any(
            i.name.startswith("det." + name + ".") for i in doc.graph.initializer)

    kept = [n for n in gates.names if n not in off]
    assert all(mentions(dense_doc, n) for n in gates.names)
    assert not any(mentions(small_doc, n) for n in off)
    assert all(mentions(small_doc, n) for n in kept)

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(small_doc.SerializeToString(), so, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"images": x.numpy()})
    want = _core(small, x)
    assert max(float(abs(torch.from_numpy(g) - w).max()) for g, w in zip(got, want, strict=True)) <= 1e-4
