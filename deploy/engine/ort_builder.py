"""ONNX Runtime "engine": the graph-optimised model ORT saves to disk, fp32 or INT8 QDQ.

ORT applies its graph optimisations (constant folding, Conv+BN/activation fusions, ...) at
session creation; ``SessionOptions.optimized_model_filepath`` saves the result so loading the
engine skips that work. We stop at ``ORT_ENABLE_EXTENDED``: the ``ALL`` level adds layout
transforms tied to the build machine's CPU, which would make the file non-portable.
"""

from __future__ import annotations

import logging
from pathlib import Path

from deploy.runtimes.ort_session import make_session
from perception.io import atomic_path

log = logging.getLogger(__name__)

ORT_PRECISIONS = ("fp32", "int8")


def check_ort_precision(precision: str) -> None:
    """ORT's CPU provider has no fp16 convolution kernels on x86: refuse rather than run slowly."""
    if precision not in ORT_PRECISIONS:
        raise ValueError(
            f"precision {precision!r} is not available on the ONNX Runtime backend (it can do "
            f"{', '.join(ORT_PRECISIONS)}); use --precision fp32 or int8, or build with --backend tensorrt on a GPU"
        )


def optimize_to(src: str | Path, dest: str | Path, *, threads: int | None = None) -> Path:
    """Save ORT's optimised form of ``src`` to ``dest`` atomically."""
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        make_session(src, threads=threads, optimization="extended", optimized_model_path=tmp)
        if tmp.stat().st_size == 0:
            raise RuntimeError(f"ONNX Runtime did not write the optimised model for {src}")
    return dest


def build_ort_engine(
    onnx_path: str | Path, engine_path: str | Path, *, precision: str, calib_frames: list | None = None,
    threads: int | None = None,
) -> dict:
    """Optimise (and for int8 first quantize) ``onnx_path`` into ``engine_path``.

    Returns the backend-specific part of the sidecar. Faster R-CNN's stage-2 graph (box head)
    is optimised beside it as ``ENGINE.stage2`` and stays fp32 (its calibration would need RoI
    features from the first stage).
    """
    import onnxruntime as ort

    from deploy.export import read_onnx_meta

    check_ort_precision(precision)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    doc = read_onnx_meta(onnx_path)
    notes: list[str] = []
    src = onnx_path
    qdq_path = None
    if precision == "int8":
        from deploy.engine.quantize import quantize_qdq

        qdq_path = engine_path.with_name(engine_path.name + ".qdq.onnx")
        with atomic_path(qdq_path) as tmp:
            # uint8 activations: ORT's x86 kernels run U8S8 QDQ ~2x faster than TensorRT's S8S8 form
            quantize_qdq(onnx_path, tmp, calib_frames or [], symmetric=False)
        src = qdq_path
        notes.append(
            f"INT8 static QDQ (uint8 activations, per-channel int8 weights) calibrated on {len(calib_frames or [])} "
            "frames; the TensorRT backend quantizes the same way with symmetric int8 activations"
        )
    optimize_to(src, engine_path, threads=threads)
    stage2 = None
    if "stage2" in doc:
        s2_src = onnx_path.with_name(doc["stage2"]["file"])
        s2_dest = engine_path.with_name(engine_path.name + ".stage2")
        optimize_to(s2_src, s2_dest, threads=threads)
        stage2 = {"file": s2_dest.name}
        if precision == "int8":
            notes.append("Faster R-CNN stage 2 (box head) kept in fp32")
    return {
        "backend": "onnxruntime",
        "backend_version": ort.__version__,
        "graph_optimization_level": "ORT_ENABLE_EXTENDED",
        "qdq_onnx": qdq_path.name if qdq_path else None,
        "stage2": stage2,
        "notes": notes,
    }
