"""Per-layer 2:4 (N:M) structured-sparsity report for an ONNX graph, with TensorRT eligibility.

TensorRT's layout for a convolution (FIELD_NOTES; TensorRT developer guide, "Structured
Sparsity"): for every output channel and every kernel position, each group of 4 consecutive
*input* channels holds at least 2 zeros. A fully connected layer is the 1x1 case (groups of 4
along the input features). TensorRT only considers sparse kernels for such layers when
``SPARSE_WEIGHTS`` is set, and in practice picks them for 3x3 convolutions with >= 256 input and
output channels; everything else runs dense whatever its weights hold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

MIN_CHANNELS = 256


@dataclass(frozen=True)
class LayerSparsity:
    name: str
    op: str  # "Conv" or "Gemm"/"MatMul"
    weight: str
    out_channels: int
    in_channels: int  # per group
    kernel: tuple[int, ...]
    groups: int
    zero_fraction: float
    pattern_2to4: bool  # every group of 4 input channels has >= 2 zeros
    trt_eligible: bool  # dense 3x3 conv with >= 256 in and out channels

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def holds_2to4(weight: np.ndarray) -> bool:
    """True when ``weight`` ([O, I, *k] conv or [O, I] linear) follows TensorRT's 2:4 layout.

    Input channels are grouped in fours per (output channel, kernel position); a trailing
    partial group is padded with zeros (TensorRT pads channels the same way).
    """
    w = np.asarray(weight)
    if w.ndim < 2:
        return False
    w = np.moveaxis(w.reshape(w.shape[0], w.shape[1], -1), 1, -1)  # [O, k, I]
    pad = (-w.shape[-1]) % 4
    if pad:
        w = np.concatenate([w, np.zeros((*w.shape[:-1], pad), w.dtype)], axis=-1)
    groups = w.reshape(*w.shape[:-1], -1, 4)
    return bool(((groups == 0).sum(-1) >= 2).all())


def trt_eligible(op: str, kernel: tuple[int, ...], groups: int, in_channels: int, out_channels: int) -> bool:
    """Whether TensorRT would consider a sparse kernel for this layer (see module doc)."""
    return (
        op == "Conv" and groups == 1 and tuple(kernel) == (3, 3)
        and in_channels >= MIN_CHANNELS and out_channels >= MIN_CHANNELS
    )


def sparsity_report(onnx_path: str | Path) -> list[LayerSparsity]:
    """One entry per Conv / Gemm / MatMul whose weight is an initializer."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(onnx_path))
    inits = {t.name: t for t in proto.graph.initializer}
    layers: list[LayerSparsity] = []
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            groups = int(attrs.get("group", 1))
            kernel = tuple(int(k) for k in w.shape[2:])
        else:
            groups, kernel = 1, ()
            if node.op_type == "MatMul" or not attrs.get("transB", 0):
                w = w.T  # stored [in, out]: bring it to [out, in]
        if w.ndim < 2:
            continue
        out_c, in_c = int(w.shape[0]), int(w.shape[1])
        layers.append(
            LayerSparsity(
                name=node.name or node.output[0], op=node.op_type, weight=node.input[1], out_channels=out_c,
                in_channels=in_c, kernel=kernel, groups=groups, zero_fraction=float((w == 0).mean()),
                pattern_2to4=holds_2to4(w) if groups == 1 else False,
                trt_eligible=trt_eligible(node.op_type, kernel, groups, in_c, out_c),
            )
        )
    return layers


def summarize(layers: list[LayerSparsity]) -> dict[str, int]:
    """Counts for a CLI line / sidecar: layers, eligible, 2:4, eligible and 2:4."""
    return {
        "layers": len(layers),
        "trt_eligible": sum(x.trt_eligible for x in layers),
        "pattern_2to4": sum(x.pattern_2to4 for x in layers),
        "eligible_and_2to4": sum(x.trt_eligible and x.pattern_2to4 for x in layers),
    }
