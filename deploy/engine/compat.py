"""TensorRT 10.x vs 11.x: every version difference the builder cares about, as pure functions.

* 10.x (DriveOS / JetPack targets may still be here): weakly typed networks; precision through
  ``BuilderFlag.FP16`` / ``BuilderFlag.INT8``. INT8 uses explicit Q/DQ nodes in the ONNX (the
  QDQ model ONNX Runtime's static quantizer writes): calibrators are deprecated since 10.1.
* 11.x: networks are always strongly typed; ``BuilderFlag.FP16/INT8/BF16/FP8`` and the
  calibrator API are gone. Precision must come from the ONNX itself: an FP16-converted graph
  (fp16 weights and compute, fp32 I/O) or the Q/DQ graph.
* Both: ``BuilderFlag.SPARSE_WEIGHTS`` lets TensorRT pick 2:4 sparse kernels where the weights
  already follow the pattern; ``create_network(0)`` (explicit batch is the only mode since 10.0).

Nothing here imports tensorrt, so the logic is unit-tested on any machine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class TrtBuildPlan:
    """What to do for one TensorRT version / precision / sparsity."""

    version: tuple[int, int, int]
    strongly_typed: bool
    builder_flags: tuple[str, ...]  # names of tensorrt.BuilderFlag members to set
    onnx_rewrite: str | None  # None, "fp16" (convert weights/compute) or "qdq" (insert Q/DQ)
    notes: tuple[str, ...] = ()


def parse_version(text: str) -> tuple[int, int, int]:
    """'10.8.0.43' or '11.0.0' -> (major, minor, patch)."""
    m = re.match(r"^\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(text))
    if not m:
        raise ValueError(f"cannot parse a TensorRT version from {text!r}")
    return int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)


def plan_build(version: tuple[int, ...], precision: str, sparsity: bool) -> TrtBuildPlan:
    """Decide flags and ONNX rewrites for ``precision`` on TensorRT ``version``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    v = tuple(version) + (0,) * (3 - len(version))
    major = v[0]
    if major < 10:
        raise ValueError(f"TensorRT {'.'.join(map(str, v))} is too old: avprune needs TensorRT 10 or newer")
    flags: list[str] = []
    notes: list[str] = []
    if major >= 11:
        rewrite = {"fp32": None, "fp16": "fp16", "int8": "qdq"}[precision]
        if precision != "fp32":
            notes.append(f"TensorRT {major}.x is strongly typed: {precision} comes from the ONNX ({rewrite} rewrite)")
        strongly_typed = True
    else:
        strongly_typed = False
        rewrite = "qdq" if precision == "int8" else None
        if precision == "fp16":
            flags.append("FP16")
        elif precision == "int8":
            # Q/DQ decides what runs in int8; FP16 lets the rest pick fp16 kernels
            flags += ["INT8", "FP16"]
            if v >= (10, 1, 0):
                notes.append("INT8 calibrators are deprecated since TensorRT 10.1: using explicit Q/DQ nodes")
    if sparsity:
        flags.append("SPARSE_WEIGHTS")
    return TrtBuildPlan(v, strongly_typed, tuple(flags), rewrite, tuple(notes))


def network_creation_flags(version: tuple[int, ...]) -> int:
    """The ``create_network`` flag bits: 0 on both (explicit batch is the default since 10.0;
    11.x is strongly typed without asking)."""
    if version[0] < 10:
        raise ValueError("TensorRT 10 or newer is required")
    return 0


def has_workspace_pool_api(version: tuple[int, ...]) -> bool:
    """``config.set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes)`` (``max_workspace_size``
    was removed in 10.0): true for every supported version, kept here so a future change has a home."""
    return version[0] >= 10
