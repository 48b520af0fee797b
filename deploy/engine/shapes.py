"""``--shapes MIN/OPT/MAX`` (trtexec's vocabulary) parsed and checked against the ONNX input."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ShapeProfile:
    """An optimization profile for the ``images`` input."""

    min: Shape
    opt: Shape
    max: Shape

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def parse_shape(text: str) -> Shape:
    if not re.fullmatch(r"\d+(x\d+)*", text.strip()):
        raise ValueError(f"bad shape {text!r}: expected NxCxHxW, e.g. 4x3x320x320")
    return tuple(int(v) for v in text.strip().split("x"))


def parse_shapes(text: str) -> ShapeProfile:
    """``"1x3x320x320/4x3x320x320/8x3x320x320"`` (or one shape for all three)."""
    parts = text.split("/")
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise ValueError(f"bad --shapes {text!r}: expected MIN/OPT/MAX, e.g. 1x3x320x320/4x3x320x320/8x3x320x320")
    lo, opt, hi = (parse_shape(p) for p in parts)
    if not len(lo) == len(opt) == len(hi):
        raise ValueError(f"--shapes {text!r}: MIN, OPT and MAX must have the same rank")
    if not all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
        raise ValueError(f"--shapes {text!r}: need MIN <= OPT <= MAX in every dimension")
    if min(lo) < 1:
        raise ValueError(f"--shapes {text!r}: every dimension must be >= 1")
    return ShapeProfile(lo, opt, hi)


def onnx_input_dims(onnx_path: str | Path, name: str = "images") -> tuple[int | None, ...]:
    """Static dims of input ``name`` (None where the dimension is dynamic)."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    for inp in proto.graph.input:
        if inp.name == name:
            return tuple(d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim)
    raise ValueError(f"{onnx_path}: no input named {name!r} (inputs: {[i.name for i in proto.graph.input]})")


def default_profile(dims: tuple[int | None, ...], max_batch: int = 8) -> ShapeProfile:
    """1 / max_batch/2 / max_batch on a dynamic batch axis, the static size otherwise."""
    if any(d is None for d in dims[1:]):
        raise ValueError("only the batch axis may be dynamic; give --shapes explicitly")
    rest = tuple(int(d) for d in dims[1:])
    if dims[0] is not None:
        return ShapeProfile((dims[0], *rest), (dims[0], *rest), (dims[0], *rest))
    return ShapeProfile((1, *rest), (max(1, max_batch // 2), *rest), (max_batch, *rest))


def check_profile(profile: ShapeProfile, dims: tuple[int | None, ...], onnx_path: str | Path) -> None:
    """Raise naming the mismatch when the profile does not fit the model's input."""
    want = "x".join("N" if d is None else str(d) for d in dims)
    for label, shape in (("MIN", profile.min), ("OPT", profile.opt), ("MAX", profile.max)):
        if len(shape) != len(dims):
            raise ValueError(f"--shapes {label} {shape}: rank {len(shape)} but {onnx_path} takes {want}")
        for axis, (got, need) in enumerate(zip(shape, dims, strict=True)):
            if need is not None and got != need:
                raise ValueError(
                    f"--shapes {label} {'x'.join(map(str, shape))} does not fit {onnx_path} (input {want}): "
                    f"axis {axis} must be {need}"
                    + ("; the full graph has a fixed batch of 1 (export the core form for batching)" if axis == 0 else "")
                )
