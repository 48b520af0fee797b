"""ONNX export of any factory detector (dense or pruned), in two forms.

* ``core`` (default; what TensorRT prefers): backbone + heads on the normalised canvas
  ``images`` [N, 3, H, W] with a dynamic batch axis; outputs named by meaning (see
  :mod:`deploy.core_graph`). Static shapes, no data-dependent loops; decoding + NMS run in our
  post-processing. Faster R-CNN also writes ``<stem>.stage2.onnx`` (box head on pooled RoIs).
* ``full``: the core plus torchvision's own decoding and NMS traced into the graph, outputs
  ``boxes`` (canvas coordinates), ``scores``, ``labels`` – always in that order, whatever order
  the detector family returns them in. Batch is 1: torchvision's per-image loops unroll at trace
  time (and its per-class loops make SSDlite's 91-class full graph ~3x slower in ONNX Runtime).

The exporter: ``dynamo`` (torch.export) is tried for the core graph under ``auto``; a failure or
an output mismatch falls back to the legacy TorchScript exporter (``dynamo=False``), which is
the one known to handle torchvision's NMS. The one used is logged and returned.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from deploy.core_graph import (
    FULL_OUTPUTS,
    INPUT_NAME,
    STAGE2_INPUT,
    STAGE2_OUTPUTS,
    CoreModule,
    FullModule,
    ModelMeta,
    Stage2Module,
    model_meta,
)
from perception.io import atomic_path, sha256_file

log = logging.getLogger(__name__)

META_KEY = "avprune"  # ONNX metadata_props key holding the JSON below
Form = Literal["core", "full"]
Exporter = Literal["auto", "dynamo", "legacy"]


@dataclass(frozen=True)
class ExportResult:
    path: Path
    form: str
    exporter_used: str  # "dynamo" or "legacy"
    input_name: str
    output_names: tuple[str, ...]
    input_hw: tuple[int, int]
    dynamic_batch: bool = True
    stage2_path: Path | None = None  # Faster R-CNN core only
    fallback_reason: str | None = None  # why dynamo was not used, when it was tried


def _as_model(model: nn.Module | str | Path) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    from perception.models import load_detector

    return load_detector(model)


def _export_once(
    module: nn.Module, example: torch.Tensor, dest: Path, *, input_name: str, output_names: tuple[str, ...],
    batch_axis: dict[str, dict[int, str]], opset: int, exporter: str,
) -> None:
    """One torch.onnx.export call into ``dest`` (overwritten)."""
    if exporter == "legacy":
        torch.onnx.export(
            module, (example,), str(dest), dynamo=False, opset_version=opset, input_names=[input_name],
            output_names=list(output_names), dynamic_axes=batch_axis or None, do_constant_folding=True,
        )
        return
    dyn = None
    if input_name in batch_axis:
        dyn = {input_name: {0: torch.export.Dim("batch", min=1, max=1024)}}
    prog = torch.onnx.export(
        module, (example,), dynamo=True, opset_version=max(opset, 18), input_names=[input_name],
        output_names=list(output_names), dynamic_shapes=dyn, external_data=False, verbose=False,
    )
    prog.save(str(dest), external_data=False)


def _finish(tmp: Path, meta_json: str) -> None:
    """Attach our metadata, check the model, and rewrite ``tmp`` in place."""
    import onnx

    proto = onnx.load(str(tmp))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, meta_json
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))


def _ort_matches(path: Path, module: nn.Module, example: torch.Tensor, names: tuple[str, ...]) -> str | None:
    """None when ONNX Runtime reproduces the module on ``example``; else the reason."""
    from deploy.runtimes.ort_session import make_session

    sess = make_session(path, threads=None)
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {INPUT_NAME: example.numpy()}), strict=True))
    with torch.no_grad():
        ref = module(example)
    for name, r in zip(names, ref, strict=True):
        if name not in got:
            return f"output {name!r} missing (graph outputs: {sorted(got)})"
        if got[name].shape != tuple(r.shape) or not np.allclose(got[name], r.numpy(), rtol=1e-3, atol=1e-3):
            return f"output {name!r} differs from PyTorch"
    return None


def export_onnx(
    model: nn.Module | str | Path,
    out_path: str | Path,
    *,
    form: Form = "core",
    opset: int = 17,
    dynamic_batch: bool = True,
    exporter: Exporter = "auto",
) -> ExportResult:
    """Export ``model`` (a factory detector or a checkpoint path) to ``out_path`` atomically.

    The file carries a ``metadata_props['avprune']`` JSON (model metadata, form, exporter) that
    runtimes and the engine builder read, so the ONNX alone is enough to run it.
    """
    if form not in ("core", "full"):
        raise ValueError(f"form must be 'core' or 'full', got {form!r}")
    if exporter not in ("auto", "dynamo", "legacy"):
        raise ValueError(f"exporter must be 'auto', 'dynamo' or 'legacy', got {exporter!r}")
    model = _as_model(model)
    out_path = Path(out_path)
    was_training = model.training
    model.eval()
    try:
        meta = model_meta(model)
        return _export(model, meta, out_path, form=form, opset=opset, dynamic_batch=dynamic_batch, exporter=exporter)
    finally:
        model.train(was_training)


def _export(
    model: nn.Module, meta: ModelMeta, out_path: Path, *, form: str, opset: int, dynamic_batch: bool, exporter: str
) -> ExportResult:
    H, W = meta.image_size
    gen = torch.Generator().manual_seed(0)
    if form == "full":
        if dynamic_batch:
            log.info("full graph: batch fixed at 1 (torchvision's per-image loops unroll at trace time)")
        dynamic_batch = False
        module: nn.Module = FullModule(model, meta).eval()
        names = FULL_OUTPUTS
        axes = {n: {0: "num_detections"} for n in names}
        if exporter == "auto":
            log.info("full graph: using the legacy exporter (dynamo fails inside torchvision's batched NMS)")
            exporter = "legacy"
    else:
        module = CoreModule(model, meta).eval()
        names = meta.core_output_names()
        axes = {n: {0: "batch"} for n in (INPUT_NAME, *names)} if dynamic_batch else {}
    # a random canvas (not zeros) so the traced NMS branch sees non-empty candidates
    example = torch.randn(2 if dynamic_batch else 1, 3, H, W, generator=gen)

    meta_doc = {"meta": json.loads(meta.to_json()), "form": form, "dynamic_batch": dynamic_batch}
    stage2_path = None
    if meta.family == "faster_rcnn" and form == "core":
        stage2_path = out_path.with_name(out_path.stem + ".stage2.onnx")
    tried: str | None = None
    used = "legacy"
    with atomic_path(out_path) as tmp:
        if exporter in ("auto", "dynamo"):
            try:
                _export_once(module, example, tmp, input_name=INPUT_NAME, output_names=names, batch_axis=axes,
                             opset=opset, exporter="dynamo")
                tried = _ort_matches(tmp, module, example, names)
            except Exception as e:  # torch.export raises many types; the reason is what matters
                tried = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            if tried is None:
                used = "dynamo"
            elif exporter == "dynamo":
                raise RuntimeError(f"dynamo export of {meta.name} ({form}) failed: {tried}; use exporter='legacy'")
            else:
                log.warning("dynamo exporter failed (%s); falling back to the legacy exporter", tried)
        if used == "legacy":
            _export_once(module, example, tmp, input_name=INPUT_NAME, output_names=names, batch_axis=axes,
                         opset=opset, exporter="legacy")
        if stage2_path is not None:
            _export_stage2(model, meta, stage2_path, opset)
            meta_doc["stage2"] = {"file": stage2_path.name, "sha256": sha256_file(stage2_path)}
        meta_doc["exporter"] = used
        _finish(tmp, json.dumps(meta_doc))
    log.info("exported %s (%s form, %s exporter) to %s", meta.name, form, used, out_path)
    return ExportResult(
        path=out_path, form=form, exporter_used=used, input_name=INPUT_NAME, output_names=tuple(names),
        input_hw=(H, W), dynamic_batch=dynamic_batch, stage2_path=stage2_path, fallback_reason=tried,
    )


def _export_stage2(model: nn.Module, meta: ModelMeta, dest: Path, opset: int) -> None:
    """Faster R-CNN's box head as its own graph: pooled RoI features [K, C, 7, 7] -> logits, deltas."""
    pool = model.roi_heads.box_roi_pool
    channels = int(model.backbone.out_channels)
    size = pool.output_size if isinstance(pool.output_size, tuple | list) else (pool.output_size,) * 2
    example = torch.randn(4, channels, *size, generator=torch.Generator().manual_seed(1))
    with atomic_path(dest) as tmp:
        _export_once(
            Stage2Module(model).eval(), example, tmp, input_name=STAGE2_INPUT, output_names=STAGE2_OUTPUTS,
            batch_axis={n: {0: "rois"} for n in (STAGE2_INPUT, *STAGE2_OUTPUTS)}, opset=opset, exporter="legacy",
        )
        _finish(tmp, json.dumps({"stage2_of": meta.name}))


def read_onnx_meta(path: str | Path) -> dict:
    """The ``avprune`` metadata of an exported ONNX file (raises naming the file if absent)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ValueError(f"{path}: not an ONNX model ({type(e).__name__}: {e})") from e
    props = {p.key: p.value for p in proto.metadata_props}
    if META_KEY not in props:
        raise ValueError(f"{path}: no avprune metadata; export it with deploy.export.export_onnx (or avprune build-engine MODEL.pt)")
    return json.loads(props[META_KEY])


def onnx_meta(doc: dict) -> ModelMeta:
    return ModelMeta.from_json(json.dumps(doc["meta"]))
