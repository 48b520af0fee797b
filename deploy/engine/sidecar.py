"""The engine sidecar ``ENGINE.json``: what was built, from what, for which device.

A loader compares the sidecar's device with the one it runs on, because a TensorRT engine is
only valid for the GPU (compute capability) and TensorRT version it was built with.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from perception.io import atomic_write_json

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "avprune-engine"
SIDECAR_VERSION = 1
REQUIRED_KEYS = (
    "format", "version", "backend", "backend_version", "device", "precision", "sparsity",
    "input_shapes", "source_onnx", "export", "model_meta", "layers", "engine_file", "engine_sha256",
)


def sidecar_path(engine: str | Path) -> Path:
    return Path(f"{engine}.json")


def write_sidecar(engine: str | Path, doc: dict[str, Any]) -> Path:
    """Validate and atomically write ``ENGINE.json``."""
    doc = {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, **doc}
    validate_sidecar(doc, sidecar_path(engine))
    dest = sidecar_path(engine)
    atomic_write_json(dest, doc)
    return dest


def validate_sidecar(doc: dict[str, Any], where: str | Path = "sidecar") -> None:
    missing = [k for k in REQUIRED_KEYS if k not in doc]
    if missing:
        raise ValueError(f"{where}: sidecar lacks {', '.join(missing)}; rebuild the engine with avprune build-engine")
    if doc["format"] != SIDECAR_FORMAT:
        raise ValueError(f"{where}: not an avprune engine sidecar (format={doc['format']!r})")
    if doc["device"].get("kind") not in ("cpu", "cuda"):
        raise ValueError(f"{where}: device.kind must be 'cpu' or 'cuda', got {doc['device'].get('kind')!r}")


def read_sidecar(engine: str | Path) -> dict[str, Any]:
    """Read and validate the sidecar of ``engine``; a clear error when it is missing."""
    path = sidecar_path(engine)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: an engine needs the sidecar written beside it by avprune build-engine"
        )
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    validate_sidecar(doc, path)
    return doc


def check_device(doc: dict[str, Any], current: dict[str, Any], engine: str | Path) -> None:
    """Refuse an engine built for another device (TensorRT: GPU name and compute capability)."""
    built = doc["device"]
    if built["kind"] != current["kind"]:
        raise ValueError(
            f"{engine}: built for {built['kind']} ({built.get('name')}) but this runtime is on "
            f"{current['kind']} ({current.get('name')}); rebuild it here with avprune build-engine"
        )
    if built["kind"] == "cuda" and built.get("compute_capability") != current.get("compute_capability"):
        raise ValueError(
            f"{engine}: built for {built.get('name')} (sm_{built.get('compute_capability')}) but this GPU is "
            f"{current.get('name')} (sm_{current.get('compute_capability')}); TensorRT engines do not "
            "move between GPU architectures: rebuild it on this machine"
        )
    if built["kind"] == "cuda" and built.get("name") != current.get("name"):
        log.warning("%s: built on %s, running on %s (same compute capability)", engine, built.get("name"), current.get("name"))


def cpu_device() -> dict[str, Any]:
    from deploy.runtimes.base import cpu_name

    return {"kind": "cpu", "name": cpu_name(), "compute_capability": None}
