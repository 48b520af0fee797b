"""``build_engine``: choose the backend, check the inputs, build, write the sidecar.

The TensorRT backend is used when ``tensorrt`` imports and a CUDA device exists; ONNX Runtime
everywhere else. Inputs are checked before anything is written, and every file is written
atomically, so a failed build leaves no partial engine behind.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.engine.shapes import ShapeProfile, check_profile, default_profile, onnx_input_dims, parse_shapes
from perception.io import sha256_file

log = logging.getLogger(__name__)

BACKEND_CHOICES = ("auto", "tensorrt", "onnxruntime")


@dataclass(frozen=True)
class EngineResult:
    engine_path: Path
    sidecar_path: Path
    backend: str
    reason: str  # why this backend was chosen, for the CLI to print
    sidecar: dict[str, Any]


def choose_backend(requested: str) -> tuple[str, str]:
    """(backend, reason). ``auto`` prefers TensorRT when it is usable."""
    if requested not in BACKEND_CHOICES:
        raise ValueError(f"--backend must be one of {', '.join(BACKEND_CHOICES)}, got {requested!r}")
    from deploy.engine.tensorrt_builder import tensorrt_available

    if requested == "onnxruntime":
        return "onnxruntime", "ONNX Runtime requested (--backend onnxruntime)"
    ok, why = tensorrt_available()
    if requested == "tensorrt":
        if not ok:
            raise ValueError(f"--backend tensorrt: {why}; use --backend onnxruntime (or auto)")
        return "tensorrt", f"TensorRT requested: {why}"
    if ok:
        return "tensorrt", f"TensorRT usable: {why}"
    return "onnxruntime", f"{why}: using ONNX Runtime (CPU)"


def check_onnx_file(path: Path) -> dict[str, Any]:
    """A readable ONNX file exported by avprune (its metadata), or a clear error."""
    from deploy.export import read_onnx_meta

    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not an ONNX file")
    with open(path, "rb") as f:
        head = f.read(64)
    if not head or head.lstrip()[:1] in (b"{", b"<", b"#") or b"PK" == head[:2]:
        raise ValueError(f"{path} is not an ONNX file (looks like text or a zip archive); pass MODEL.onnx or a .pt checkpoint")
    return read_onnx_meta(path)


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    precision: str = "fp32",
    sparsity: bool = False,
    shapes: str | None = None,
    timing_cache: str | Path | None = None,
    workspace_mb: int = 2048,
    calib: str | Path | None = None,
    calib_frames: int = 32,
    backend: str = "auto",
    threads: int | None = None,
) -> EngineResult:
    """Build an engine for ``onnx_path`` at ``engine_path`` with its ``ENGINE.json`` sidecar."""
    from deploy.engine.sidecar import sidecar_path, write_sidecar
    from deploy.engine.sparsity_check import sparsity_report, summarize

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    doc = check_onnx_file(onnx_path)
    if engine_path.resolve() == onnx_path.resolve():
        raise ValueError(f"--out {engine_path} would overwrite the source model; pick another path")
    if workspace_mb < 1:
        raise ValueError(f"--workspace must be a positive number of MB, got {workspace_mb}")
    backend, reason = choose_backend(backend)
    dims = onnx_input_dims(onnx_path)
    profile: ShapeProfile = parse_shapes(shapes) if shapes else default_profile(dims)
    check_profile(profile, dims, onnx_path)
    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"--precision must be fp32, fp16 or int8, got {precision!r}")
    if backend == "onnxruntime":
        from deploy.engine.ort_builder import check_ort_precision

        check_ort_precision(precision)
    frames = None
    if precision == "int8":
        if calib is None:
            raise ValueError("--precision int8 needs --calib DATA (a COCO root or a recorded stream) to calibrate on")
        from deploy.engine.quantize import calibration_frames

        frames = calibration_frames(calib, calib_frames)
    layers = sparsity_report(onnx_path)
    counts = summarize(layers)
    if sparsity and counts["eligible_and_2to4"] == 0:
        log.warning("--sparsity enable: no TensorRT-eligible layer holds the 2:4 pattern; the engine will be dense")
    t0 = time.perf_counter()
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    # files a build writes besides the engine: removed again if the build fails part-way
    side_files = [engine_path.with_name(engine_path.name + s) for s in ("", ".stage2", ".qdq.onnx")]
    existed = {p for p in side_files if p.exists()}
    try:
        part = _build(backend, onnx_path, engine_path, precision=precision, sparsity=sparsity, profile=profile,
                      workspace_mb=workspace_mb, timing_cache=timing_cache, frames=frames, threads=threads)
    except BaseException:
        for p in side_files:
            if p not in existed:
                p.unlink(missing_ok=True)
        raise
    sidecar = {
        **part,
        "precision": precision,
        "sparsity": "enable" if sparsity else "disable",
        "input_shapes": {"images": profile.to_dict()},
        "source_onnx": {"path": str(onnx_path), "sha256": sha256_file(onnx_path)},
        "export": {"form": doc["form"], "exporter": doc.get("exporter"), "dynamic_batch": doc.get("dynamic_batch")},
        "model_meta": doc["meta"],
        "sparsity_summary": counts,
        "layers": [x.to_dict() for x in layers],
        "engine_file": engine_path.name,
        "engine_sha256": sha256_file(engine_path),
        "build_seconds": round(time.perf_counter() - t0, 2),
        "backend_reason": reason,
    }
    try:
        write_sidecar(engine_path, sidecar)
    except BaseException:
        engine_path.unlink(missing_ok=True)  # an engine without its sidecar cannot be loaded safely
        raise
    return EngineResult(engine_path, sidecar_path(engine_path), backend, reason, sidecar)


def _build(
    backend: str, onnx_path: Path, engine_path: Path, *, precision: str, sparsity: bool, profile: ShapeProfile,
    workspace_mb: int, timing_cache: str | Path | None, frames: list | None, threads: int | None,
) -> dict[str, Any]:
    """Run the chosen backend's builder; returns its part of the sidecar."""
    from deploy.engine.sidecar import cpu_device

    if backend == "tensorrt":
        from deploy.engine.tensorrt_builder import build_tensorrt_engine

        return build_tensorrt_engine(
            onnx_path, engine_path, precision=precision, sparsity=sparsity, profile=profile,
            workspace_mb=workspace_mb, timing_cache=timing_cache, calib_frames=frames,
        )
    from deploy.engine.ort_builder import build_ort_engine

    part = build_ort_engine(onnx_path, engine_path, precision=precision, calib_frames=frames, threads=threads)
    part["device"] = cpu_device()
    if sparsity:
        part["notes"].append("ONNX Runtime has no 2:4 sparse kernels: sparsity recorded per layer only")
    if timing_cache:
        part["notes"].append("--timing-cache applies to TensorRT only: ignored")
    return part
