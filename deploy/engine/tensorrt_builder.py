"""TensorRT engine builder: ONNX -> serialized engine, TensorRT 10.x and 11.x.

The flow follows TensorRT's Python samples: ``Builder`` -> ``create_network(0)`` ->
``OnnxParser.parse`` (every ``parser.get_error(i)`` reported) -> ``create_builder_config`` with
a workspace pool limit, precision/sparsity flags from :mod:`deploy.engine.compat`, one
optimization profile from ``--shapes`` and a timing cache (loaded, then saved back) ->
``build_serialized_network``. Only importable where ``tensorrt`` is installed; exercised by the
``gpu``-marked tests and ``benchmarks/gpu_check.py``.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from deploy.engine.compat import TrtBuildPlan, parse_version, plan_build
from deploy.engine.shapes import ShapeProfile
from perception.io import atomic_path, atomic_write_bytes

log = logging.getLogger(__name__)


def tensorrt_available() -> tuple[bool, str]:
    """(usable, reason): TensorRT must import and a CUDA device must exist."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or a broken install raising OSError on its libraries
        return False, f"TensorRT not importable ({type(e).__name__}: {e})"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, f"TensorRT {trt.__version__} imports but no CUDA device is visible"
    except Exception as e:
        return False, f"cannot query CUDA ({type(e).__name__}: {e})"
    return True, f"TensorRT {trt.__version__} on {torch.cuda.get_device_name(0)}"


def cuda_device() -> dict[str, Any]:
    """Sidecar device record of CUDA device 0 (name and compute capability)."""
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return {"kind": "cuda", "name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def _prepare_onnx(onnx_path: Path, plan: TrtBuildPlan, calib_frames: list | None, workdir: Path) -> Path:
    """Apply the plan's ONNX rewrite (fp16 conversion or Q/DQ insertion) into ``workdir``."""
    if plan.onnx_rewrite == "fp16":
        from deploy.engine.fp16 import convert_fp16

        return convert_fp16(onnx_path, workdir / "model.fp16.onnx")
    if plan.onnx_rewrite == "qdq":
        from deploy.engine.quantize import quantize_qdq

        return quantize_qdq(onnx_path, workdir / "model.qdq.onnx", calib_frames or [])
    return onnx_path


def build_trt_engine_file(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    plan: TrtBuildPlan,
    profiles: dict[str, ShapeProfile],
    workspace_mb: int = 2048,
    timing_cache: str | Path | None = None,
) -> list[str]:
    """Build one engine from an already-rewritten ONNX; returns the builder's notes."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    data = Path(onnx_path).read_bytes()
    if not parser.parse(data, str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ValueError(f"TensorRT's ONNX parser rejected {onnx_path} ({len(errors)} errors):\n  " + "\n  ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    for name, prof in profiles.items():
        profile.set_shape(name, prof.min, prof.opt, prof.max)
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else None
    blob = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    notes = [f"timing cache {'loaded' if blob else 'created'}: {cache_path}"] if cache_path else []
    if cache_path:
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    return notes


def build_tensorrt_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    precision: str,
    sparsity: bool,
    profile: ShapeProfile,
    workspace_mb: int = 2048,
    timing_cache: str | Path | None = None,
    calib_frames: list | None = None,
) -> dict[str, Any]:
    """Build ``engine_path`` (and ``ENGINE.stage2`` for Faster R-CNN); returns sidecar fields."""
    import tensorrt as trt

    from deploy.export import read_onnx_meta

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    doc = read_onnx_meta(onnx_path)
    version = parse_version(trt.__version__)
    plan = plan_build(version, precision, sparsity)
    notes = list(plan.notes)
    with tempfile.TemporaryDirectory(dir=engine_path.parent) as wd:
        src = _prepare_onnx(onnx_path, plan, calib_frames, Path(wd))
        notes += build_trt_engine_file(src, engine_path, plan=plan, profiles={"images": profile},
                                       workspace_mb=workspace_mb, timing_cache=timing_cache)
    stage2 = None
    if "stage2" in doc:
        # box head on pooled RoIs: up to post_nms_top_n proposals per image
        from deploy.engine.shapes import onnx_input_dims

        post_n = int(doc["meta"]["post_params"]["rpn._post_nms_top_n"]["testing"])
        s2_onnx = onnx_path.with_name(doc["stage2"]["file"])
        roi = tuple(int(d) for d in onnx_input_dims(s2_onnx, "box_features")[1:])
        s2_profile = ShapeProfile((1, *roi), (max(1, profile.opt[0] * post_n), *roi), (profile.max[0] * post_n, *roi))
        s2_plan = plan_build(version, "fp16" if precision == "int8" else precision, sparsity)
        s2_dest = engine_path.with_name(engine_path.name + ".stage2")
        with tempfile.TemporaryDirectory(dir=engine_path.parent) as wd:
            s2_src = _prepare_onnx(s2_onnx, s2_plan, None, Path(wd))
            build_trt_engine_file(s2_src, s2_dest, plan=s2_plan, profiles={"box_features": s2_profile},
                                  workspace_mb=workspace_mb, timing_cache=timing_cache)
        stage2 = {"file": s2_dest.name, "profile": s2_profile.to_dict()}
        if precision == "int8":
            notes.append("Faster R-CNN stage 2 (box head) built in fp16 (no RoI calibration set)")
    return {
        "backend": "tensorrt",
        "backend_version": trt.__version__,
        "device": cuda_device(),
        "builder_flags": list(plan.builder_flags),
        "strongly_typed": plan.strongly_typed,
        "onnx_rewrite": plan.onnx_rewrite,
        "workspace_mb": workspace_mb,
        "timing_cache": str(timing_cache) if timing_cache else None,
        "stage2": stage2,
        "notes": notes,
    }
