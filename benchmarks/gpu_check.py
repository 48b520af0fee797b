"""One prepared check for a lent GPU: dense vs channel-pruned vs 2:4-sparse latency, with correctness.

    python -m benchmarks.gpu_check            # on the GPU machine; about 1-3 minutes
    python -m benchmarks.gpu_check --budget-s 60   # tighter global time guard

* TensorRT (when ``tensorrt`` imports): SSDlite320 core graph built as fp16 dense and fp16 +
  ``SPARSE_WEIGHTS`` from a 2:4-masked copy, timed with the TensorRT runtime, outputs compared.
* PyTorch CUDA fp16 (always, when CUDA is there): SSDlite320 core (backbone + heads) dense vs
  Torch-Pruning one-shot 50% channel-pruned backbone vs 2:4 semi-structured
  (``torch.sparse.to_sparse_semi_structured``) on every 1x1 conv it supports, run as a GEMM; plus
  one large GEMM (the kernel-level ceiling). Correctness: max |diff| vs the dense model with the
  same 2:4 mask.
* ONNX Runtime CUDA EP on the core graph, when that provider loads.

Every part runs in try/except and prints its reason when skipped or failed; a global deadline
(``--budget-s``) skips what no longer fits and a watchdog kills a hung process. The summary table
is printed LAST; JSON + markdown go to ``$OUT`` (else ``benchmarks/results/``). On a machine
without CUDA every GPU part is skipped with its reason.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import platform
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks._results import ASSETS

MODEL = "ssdlite320_mobilenet_v3_large"
BATCH = 8


class Budget:
    def __init__(self, seconds: float) -> None:
        self.t0 = time.monotonic()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.t0)


def cuda_latency(fn, x, *, warmup: int = 10, iters: int = 50) -> dict[str, float]:
    """p50/p99/mean of ``fn(x)`` in ms with CUDA events (device time, synchronised); wall
    clock on CPU (the --cpu-dry-run path)."""
    import numpy as np
    import torch

    cuda = torch.cuda.is_available()
    with torch.inference_mode():
        for _ in range(warmup):
            fn(x)
        if cuda:
            torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            if not cuda:
                t0 = time.perf_counter()
                fn(x)
                times.append((time.perf_counter() - t0) * 1e3)
                continue
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn(x)
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
    a = np.asarray(times)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}


def mask_2to4_(w) -> None:
    """Keep the 2 largest of every 4 consecutive input features per row ([out, in] or [out, in, 1, 1])."""
    import torch

    with torch.no_grad():
        flat = w.data.reshape(w.shape[0], -1)
        g = flat.reshape(flat.shape[0], -1, 4).clone()
        g.scatter_(-1, g.abs().argsort(dim=-1)[..., :2], 0)
        w.data.copy_(g.reshape(w.shape))


def _core(model):
    from deploy.core_graph import CoreModule, model_meta

    return CoreModule(model, model_meta(model)).eval()


def _live(model):
    """Untrained BatchNorm statistics leave SSDlite's deep features ~0, which would make every
    correctness check vacuous: one cumulative train-mode pass on random canvases fixes them."""
    import torch

    torch.manual_seed(0)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.momentum = None
    model.backbone.train()
    with torch.no_grad():
        model.backbone(torch.randn(4, 3, 320, 320))
    for m in bns:
        m.momentum = 0.1
    return model.eval()


def part_env(res: dict) -> None:
    import torch

    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.cuda.is_available()}
    if env["cuda"]:
        env["gpu"] = torch.cuda.get_device_name(0)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        env["cusparselt"] = bool(getattr(torch.backends, "cusparselt", None) and torch.backends.cusparselt.is_available())
    try:
        import onnxruntime as ort

        env["onnxruntime"] = ort.__version__
        env["ort_providers"] = ort.get_available_providers()
    except Exception as e:
        env["onnxruntime"] = f"unavailable ({e})"
    try:
        import tensorrt as trt

        env["tensorrt"] = trt.__version__
    except Exception as e:
        env["tensorrt"] = f"not importable ({type(e).__name__})"
    res["env"] = env


def part_torch(res: dict, rows: list, budget: Budget, iters: int, dry_run: bool = False) -> None:
    """Dense vs channel-pruned vs 2:4 semi-structured SSDlite core, fp16, batch 8.

    ``dry_run``: the same code on CPU in fp32 with a dense stand-in for the semi-structured
    conversion (which is CUDA-only), so the script's logic is tested where there is no GPU."""
    import torch
    import torch.nn.functional as F

    from perception.models import build_detector

    dev, dt = ("cpu", torch.float32) if dry_run else ("cuda", torch.half)
    tag = "torch cpu fp32 (dry run)" if dry_run else "torch fp16"
    batch = 2 if dry_run else BATCH
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 320, 320, device=dev, dtype=dt)
    dense = _live(build_detector(MODEL))
    core = _core(dense).to(dev, dt)
    lat = cuda_latency(core, x, iters=iters)
    rows.append((tag, "dense", lat, "-"))
    res["torch_dense"] = lat

    if budget.left() > 30:
        try:
            import torch_pruning as tp

            pruned = _live(build_detector(MODEL))
            pcore = _core(pruned)
            pruner = tp.pruner.MetaPruner(
                pcore, torch.randn(1, 3, 320, 320), importance=tp.importance.MagnitudeImportance(p=2),
                pruning_ratio=0.5, ignored_layers=[pruned.head], round_to=8,
            )
            pruner.step()
            n_params = sum(p.numel() for p in pcore.parameters())
            pcore = pcore.to(dev, dt).eval()
            lat = cuda_latency(pcore, x, iters=iters)
            rows.append((tag, "channel-pruned 50% (Torch-Pruning, backbone)", lat, f"{n_params / 1e6:.2f} M params"))
            res["torch_channel_pruned"] = {**lat, "params": n_params}
        except Exception as e:
            res["torch_channel_pruned"] = {"error": f"{type(e).__name__}: {e}"}
            print(f"[gpu_check] channel-pruned part failed: {e}")

    if budget.left() < 30:
        res["torch_2to4"] = {"skipped": "time budget"}
        return
    from torch.sparse import to_sparse_semi_structured

    if dry_run:
        def to_sparse_semi_structured(w):  # noqa: F811 - CUDA-only; a dense stand-in exercises the rest
            return w

    class Sparse1x1(torch.nn.Module):
        """A 1x1 conv as a GEMM with a 2:4 semi-structured weight ([out, in], 2:4 along in)."""

        def __init__(self, conv: torch.nn.Conv2d) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(to_sparse_semi_structured(conv.weight.detach()[:, :, 0, 0].contiguous()),
                                             requires_grad=False)
            self.bias = conv.bias

        def forward(self, t):
            n, c, h, w = t.shape
            y = F.linear(t.permute(0, 2, 3, 1).reshape(-1, c), self.weight, self.bias)
            return y.reshape(n, h, w, -1).permute(0, 3, 1, 2)

    masked = _live(build_detector(MODEL))
    mcore = _core(masked).to(dev, dt)
    eligible = [
        (name, m) for name, m in mcore.named_modules()
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1
        and m.in_channels % 64 == 0 and m.out_channels % 32 == 0 and m.in_channels >= 64
    ]
    for _, m in eligible:
        mask_2to4_(m.weight)
    ref = mcore(x)
    lat_masked = cuda_latency(mcore, x, iters=iters)
    converted = 0
    for name, m in eligible:
        parent = mcore.get_submodule(name.rsplit(".", 1)[0]) if "." in name else mcore
        try:
            setattr(parent, name.rsplit(".", 1)[-1], Sparse1x1(m))
            converted += 1
        except Exception as e:  # some shapes are refused by the sparse kernels
            print(f"[gpu_check] {name}: not converted ({e})")
    got = mcore(x)
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(ref, got, strict=True))
    scale = max(float(a.float().abs().max()) for a in ref)
    lat = cuda_latency(mcore, x, iters=iters)
    rows.append((tag, "dense with 2:4 mask (reference)", lat_masked, f"{len(eligible)} 1x1 convs masked"))
    rows.append((tag, "2:4 semi-structured 1x1 convs", lat, f"{converted} converted, max|diff| {diff:.2e} (outputs up to {scale:.1f})"))
    res["torch_2to4"] = {"masked_dense": lat_masked, "sparse": lat, "converted": converted, "max_abs_diff": diff,
                         "output_scale": scale}

    # the kernel-level ceiling: one large fp16 GEMM, dense vs the same 2:4 weight
    m_rows, k = (256, 512) if dry_run else (8192, 4096)
    w = torch.randn(k, k, device=dev, dtype=dt)
    mask_2to4_(w)
    a = torch.randn(m_rows, k, device=dev, dtype=dt)
    ws = to_sparse_semi_structured(w)
    d_lat = cuda_latency(lambda t: F.linear(t, w), a, iters=iters)
    s_lat = cuda_latency(lambda t: F.linear(t, ws), a, iters=iters)
    gdiff = float((F.linear(a, w).float() - F.linear(a, ws).float()).abs().max())
    rows.append((tag, f"GEMM {m_rows}x{k}x{k} dense (2:4-masked)", d_lat, "-"))
    rows.append((tag, f"GEMM {m_rows}x{k}x{k} 2:4 sparse", s_lat, f"max|diff| {gdiff:.2e}"))
    res["gemm"] = {"dense": d_lat, "sparse": s_lat, "max_abs_diff": gdiff}


def part_tensorrt(res: dict, rows: list, workdir: Path, iters: int) -> None:
    """fp16 dense vs fp16 + SPARSE_WEIGHTS engines of the SSDlite core graph."""
    import torch

    from deploy.engine.build import build_engine
    from deploy.export import export_onnx
    from deploy.runtimes import open_runtime
    from perception.models import build_detector

    torch.manual_seed(0)
    model = _live(build_detector(MODEL))
    dense_onnx = export_onnx(model, workdir / "dense.onnx", exporter="legacy").path
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.groups == 1 and m.in_channels % 4 == 0:
            w = m.weight.data
            g = w.permute(0, 2, 3, 1).reshape(-1, 4).clone()
            g.scatter_(-1, g.abs().argsort(dim=-1)[..., :2], 0)
            m.weight.data.copy_(g.reshape(w.shape[0], w.shape[2], w.shape[3], w.shape[1]).permute(0, 3, 1, 2))
    sparse_onnx = export_onnx(model, workdir / "sparse.onnx", exporter="legacy").path
    shapes = f"1x3x320x320/{BATCH}x3x320x320/{BATCH}x3x320x320"
    cache = workdir / "timing.cache"
    x = torch.randn(BATCH, 3, 320, 320)
    from deploy.runtimes.base import Prepared

    prep = Prepared(batch=x, original_sizes=((320, 320),) * BATCH, input_sizes=((320, 320),) * BATCH)
    variants = (("fp16 dense", dense_onnx, False), ("fp16 2:4 + SPARSE_WEIGHTS", sparse_onnx, True),
                ("fp16 2:4 weights, sparsity off", sparse_onnx, False))
    for i, (label, src, sparse) in enumerate(variants):
        r = build_engine(src, workdir / f"variant{i}.engine", precision="fp16", sparsity=sparse,
                         backend="tensorrt", shapes=shapes, timing_cache=cache, workspace_mb=2048)
        with open_runtime(r.engine_path) as rt:
            lat = cuda_latency(lambda p, rt=rt: rt.run(p), prep, iters=iters)
        rows.append((f"TensorRT {r.sidecar['backend_version']}", label, lat,
                     f"{r.sidecar['sparsity_summary']['eligible_and_2to4']} eligible 2:4 layers"))
        res.setdefault("tensorrt", {})[label] = {**lat, "sparsity_summary": r.sidecar["sparsity_summary"]}


def part_ort_cuda(res: dict, rows: list, workdir: Path, iters: int) -> None:
    import numpy as np
    import onnxruntime as ort
    import torch

    from deploy.export import export_onnx
    from deploy.runtimes.ort_session import make_session
    from perception.models import build_detector

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError(f"no CUDAExecutionProvider in this onnxruntime ({ort.get_available_providers()})")
    torch.manual_seed(0)
    model = _live(build_detector(MODEL))
    path = export_onnx(model, workdir / "ort_core.onnx", exporter="legacy").path
    sess = make_session(path, threads=None, device="cuda")
    if sess.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"CUDA EP did not load (providers: {sess.get_providers()})")
    x = np.random.default_rng(0).standard_normal((BATCH, 3, 320, 320)).astype(np.float32)
    for _ in range(5):
        out = sess.run(None, {"images": x})
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sess.run(None, {"images": x})  # returns host arrays: synchronised
        times.append((time.perf_counter() - t0) * 1e3)
    with torch.no_grad():
        ref = _core(model)(torch.from_numpy(x))
    diff = max(float(np.abs(o - r.numpy()).max()) for o, r in zip(out, ref, strict=True))
    lat = {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)), "mean_ms": float(np.mean(times))}
    rows.append(("ORT CUDA EP fp32", "dense core graph (host I/O)", lat, f"max|diff| vs torch {diff:.1e}"))
    res["ort_cuda"] = {**lat, "max_abs_diff": diff}


def _markdown(res: dict, rows: list) -> str:
    env = res.get("env", {})
    lines = [
        f"GPU check on **{env.get('gpu', 'no CUDA device')}** (sm {env.get('capability', '-')}), torch {env.get('torch')}, "
        f"cuSPARSELt {env.get('cusparselt', '-')}, TensorRT {env.get('tensorrt')}, onnxruntime {env.get('onnxruntime')}. "
        f"{MODEL} core graph, batch {BATCH}, 320x320.",
        "",
        "| runtime | model | p50 ms | p99 ms | note |",
        "|---|---|---:|---:|---|",
    ]
    for rt, name, lat, note in rows:
        lines.append(f"| {rt} | {name} | {lat['p50_ms']:.3f} | {lat['p99_ms']:.3f} | {note} |")
    for part, why in res.get("skipped", {}).items():
        lines.append(f"\n- {part} skipped: {why}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-s", type=float, default=210.0, help="global time guard (seconds)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="no GPU: run the PyTorch part on CPU in fp32 (dense stand-in for 2:4) to test the script")
    args = ap.parse_args(argv)
    budget = Budget(args.budget_s)
    # a hung CUDA call cannot be interrupted from Python: dump stacks and exit instead of hanging
    faulthandler.dump_traceback_later(args.budget_s + 60, exit=True)
    out_dir = Path(os.environ.get("OUT") or ASSETS)
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = out_dir / "gpu_check_work"
    workdir.mkdir(exist_ok=True)
    res: dict[str, Any] = {"skipped": {}, "errors": {}}
    rows: list = []

    def run_part(name: str, fn, *a, need_s: float = 20.0) -> None:
        if budget.left() < need_s:
            res["skipped"][name] = f"time budget ({budget.left():.0f} s left)"
            print(f"[gpu_check] {name}: skipped, time budget")
            return
        t0 = time.monotonic()
        try:
            fn(*a)
            print(f"[gpu_check] {name}: done in {time.monotonic() - t0:.1f} s", flush=True)
        except Exception as e:
            res["errors"][name] = f"{type(e).__name__}: {e}"
            print(f"[gpu_check] {name}: FAILED {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}", flush=True)

    run_part("env", part_env, res, need_s=0)
    cuda = res.get("env", {}).get("cuda", False)
    trt_ok = not str(res.get("env", {}).get("tensorrt", "not")).startswith("not")
    if not cuda:
        for name in ("tensorrt", "torch_cuda", "ort_cuda"):
            res["skipped"][name] = "no CUDA device (torch.cuda.is_available() is False)"
        if args.cpu_dry_run:
            run_part("torch_cpu_dry_run", part_torch, res, rows, budget, args.iters, True, need_s=0)
    else:
        if trt_ok:
            run_part("tensorrt", part_tensorrt, res, rows, workdir, args.iters, need_s=90)
        else:
            res["skipped"]["tensorrt"] = f"tensorrt {res['env']['tensorrt']}"
        run_part("torch_cuda", part_torch, res, rows, budget, args.iters, need_s=40)
        run_part("ort_cuda", part_ort_cuda, res, rows, workdir, args.iters, need_s=20)
    res["elapsed_s"] = round(budget.seconds - budget.left(), 1)
    md = _markdown(res, rows)
    from perception.io import atomic_write_json, atomic_write_text

    atomic_write_json(out_dir / "gpu_check.json", {**res, "rows": [list(r) for r in rows]})
    atomic_write_text(out_dir / "gpu_check.md", md + "\n")
    faulthandler.cancel_dump_traceback_later()
    print(f"\n[gpu_check] wrote {out_dir / 'gpu_check.json'} and gpu_check.md ({res['elapsed_s']} s)")
    print(json.dumps(res.get("errors", {})) if res.get("errors") else "[gpu_check] no part failed")
    print("\n" + md)  # the table LAST
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
