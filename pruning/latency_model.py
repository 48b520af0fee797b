"""Per-layer latency lookup table for a target runtime (HALP-style).

HALP (Shen et al., "Structural Pruning via Latency-Saliency Knapsack", NeurIPS 2022) predicts a
pruned network's latency from a table of per-layer latencies keyed by the layer's shape and
measured on the target device. We key entries by ``(type, in, out, kernel, stride, groups,
input H×W, batch)``, fill them with a measuring callable the caller supplies for its runtime
(``measure_fn(module, input_shape) -> ms``: ONNX Runtime, TensorRT, eager PyTorch ...), measure a
grid of channel fractions per layer, and interpolate bilinearly in (in, out) channels between
grid points. Whole-model latency = scale · Σ layers + a constant overhead (elementwise ops, memory
traffic, runtime dispatch). With one measured model (the full one) only the overhead is fitted;
with two or more (e.g. the full model and one uniformly thinned copy) scale and overhead are
fitted by least squares. The scale matters on CPU runtimes: a layer timed alone runs from cold
caches with its own dispatch, so Σ layers overstates the whole graph by a factor, not a constant
(measured on SSDlite320 in ONNX Runtime: Σ layers 6.1 ms for a 4.7 ms graph, 3.5 ms for 3.2 ms).

Input channels of a layer follow the output channels of the layers that produce them; the table
records those producers once (with Torch-Pruning's dependency graph), so ``predict`` accepts the
pruner's ``channel_config()`` (kept output channels per layer) directly.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pruning.groups import flatten_tensors, run_forward

log = logging.getLogger(__name__)

FORMAT = "avprune-latency-table"
MeasureFn = Callable[[nn.Module, tuple[int, ...]], float]


@dataclass(frozen=True)
class LayerSpec:
    """A Conv2d/Linear as measured: shape at full width plus where its input channels come from."""

    type: str  # "conv" | "linear"
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    input_hw: tuple[int, int]
    batch: int
    in_sources: tuple[tuple[str, int], ...] = ()  # (producer layer, channels it contributes)
    grid_in: tuple[int, ...] = ()
    grid_out: tuple[int, ...] = ()

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels

    def key(self, cin: int, cout: int) -> str:
        """The lookup-table key of this layer at ``cin``/``cout`` channels."""
        g = cin if self.depthwise else self.groups
        return (
            f"{self.type}|in={cin}|out={cout}|k={self.kernel[0]}x{self.kernel[1]}|s={self.stride[0]}x{self.stride[1]}"
            f"|g={g}|hw={self.input_hw[0]}x{self.input_hw[1]}|b={self.batch}"
        )

    def build(self, cin: int, cout: int) -> nn.Module:
        """A standalone layer of this shape at ``cin``/``cout`` channels (random weights)."""
        if self.type == "linear":
            return nn.Linear(cin, cout)
        groups = cin if self.depthwise else self.groups
        return nn.Conv2d(cin, cout, self.kernel, self.stride, self.padding, groups=groups)

    def input_shape(self, cin: int) -> tuple[int, ...]:
        if self.type == "linear":
            return (self.batch, cin)
        return (self.batch, cin, *self.input_hw)


def _grid(full: int, fractions: Sequence[float], multiple: int) -> tuple[int, ...]:
    vals = {max(1, min(full, int(round(full * f / multiple)) * multiple or multiple)) for f in fractions}
    vals.add(full)
    return tuple(sorted(vals))


def _interp1(xs: Sequence[int], x: float) -> tuple[int, int, float]:
    """Bracketing grid indices and weight; outside the grid, extrapolate from the nearest pair."""
    if len(xs) == 1:
        return 0, 0, 0.0
    i = 0
    while i < len(xs) - 2 and x > xs[i + 1]:
        i += 1
    return i, i + 1, (x - xs[i]) / (xs[i + 1] - xs[i])


@dataclass
class LatencyTable:
    """Per-layer latency lookup table tagged with the runtime and device it was measured on."""

    runtime: str
    device: str
    layers: dict[str, LayerSpec] = field(default_factory=dict)
    entries: dict[str, float] = field(default_factory=dict)
    overhead_ms: float = 0.0
    scale: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)
    # Per-layer factor on top of ``scale`` (in-graph calibration, :mod:`pruning.graph_calibration`):
    # a layer timed alone pays its own layout conversions, so its share of the graph is not its share
    # of the isolated sum. Missing layers: 1.0.
    layer_scale: dict[str, float] = field(default_factory=dict)

    # ------------------------------------------------------------------ building
    @classmethod
    def measure(
        cls,
        model: nn.Module,
        example_input: Any,
        measure_fn: MeasureFn,
        *,
        runtime: str,
        device: str,
        fractions: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
        multiple: int = 8,
        layer_names: Sequence[str] | None = None,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        model_latency_ms: float | None = None,
    ) -> LatencyTable:
        """Measure every Conv2d/Linear of ``model`` on a grid of channel fractions.

        ``example_input`` fixes feature-map sizes and batch; ``model_latency_ms`` (the full model
        measured on the same runtime) calibrates the constant overhead. Identical layer shapes
        are measured once.
        """
        from pruning.filters import detector_core_forward, is_detector

        if forward_fn is None and is_detector(model):
            forward_fn = detector_core_forward
        table = cls(runtime=runtime, device=device)
        table.layers = _trace_layers(model, example_input, forward_fn, layer_names, fractions, multiple)
        t0 = time.perf_counter()
        for spec in table.layers.values():
            pairs = [(c, c) for c in spec.grid_out] if spec.depthwise else [
                (ci, co) for ci in spec.grid_in for co in spec.grid_out
            ]
            for ci, co in pairs:
                key = spec.key(ci, co)
                if key not in table.entries:
                    table.entries[key] = float(measure_fn(spec.build(ci, co).eval(), spec.input_shape(ci)))
        log.info("latency table: %d layers, %d entries in %.1f s", len(table.layers), len(table.entries),
                 time.perf_counter() - t0)
        if model_latency_ms is not None:
            table.calibrate(model_latency_ms)
        return table

    def calibrate(self, model_latency_ms: float, config: Mapping[str, int] | None = None) -> float:
        """Set the constant overhead so the prediction for ``config`` (default: full width) matches."""
        self.overhead_ms = float(model_latency_ms) - self.scale * self.layer_sum(config or {})
        return self.overhead_ms

    def calibrate_points(self, points: Sequence[tuple[Mapping[str, int], float]]) -> tuple[float, float]:
        """Fit ``scale`` and ``overhead_ms`` to measured ``(channel_config, latency_ms)`` points.

        Two or more points of different widths fit both by least squares; one point fits the
        overhead only. Returns ``(scale, overhead_ms)``.
        """
        if not points:
            raise ValueError("calibrate_points needs at least one (config, latency_ms) point")
        xs = [self.layer_sum(cfg) for cfg, _ in points]
        ys = [float(ms) for _, ms in points]
        spread = max(xs) - min(xs)
        if len(points) == 1 or spread <= 1e-9:
            self.scale = 1.0
            self.overhead_ms = statistics.fmean(ys) - statistics.fmean(xs)
            return self.scale, self.overhead_ms
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        scale = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
        if scale <= 0:
            raise ValueError(f"calibration points give a non-positive latency scale ({scale:.3f}): "
                             "a thinner model measured slower; re-measure on a quieter machine")
        self.scale, self.overhead_ms = float(scale), float(my - scale * mx)
        return self.scale, self.overhead_ms

    def smooth(self) -> int:
        """Replace each layer's grid entries by a robust fit ``a + b·cin·cout + c·cin + d·cout``.

        A table timed on a shared machine carries outliers (one grid point caught behind another
        job); a knapsack then "saves" milliseconds that only exist in the noise, cutting the layer
        whose full-width entry happened to be slow. The fit keeps the shape runtimes follow (MACs,
        plus input and output traffic) and drops the noise. Depthwise layers fit ``a + b·c``.
        Entries never go below 0. Returns the number of layers refitted.
        """
        done = 0
        for spec in self.layers.values():
            if spec.depthwise:
                pairs = [(c, c) for c in spec.grid_out]
                rows = [[1.0, float(c)] for c, _ in pairs]
            else:
                pairs = [(ci, co) for ci in spec.grid_in for co in spec.grid_out]
                rows = [[1.0, float(ci * co), float(ci), float(co)] for ci, co in pairs]
            if len(pairs) <= len(rows[0]):
                continue  # too few points to fit without reproducing them exactly
            a = torch.tensor(rows, dtype=torch.float64)
            y = torch.tensor([self.entries[spec.key(ci, co)] for ci, co in pairs], dtype=torch.float64)
            w = torch.ones_like(y)
            for _ in range(8):  # iteratively reweighted (Cauchy): an outlier loses its pull on the fit
                sw = w.sqrt().unsqueeze(1)
                coef = torch.linalg.lstsq(a * sw, y.unsqueeze(1) * sw).solution
                r = y - (a @ coef).squeeze(1)
                scale = float(r.abs().median()) * 1.5 + 1e-3 * float(y.abs().mean()) + 1e-12
                w = 1.0 / (1.0 + (r / scale) ** 2)
            for (ci, co), v in zip(pairs, (a @ coef).squeeze(1).tolist(), strict=True):
                self.entries[spec.key(ci, co)] = max(0.0, float(v))
            done += 1
        self.meta["smoothed"] = True
        return done

    # ------------------------------------------------------------------ prediction
    def layer_latency(self, name: str, cin: int, cout: int) -> float:
        """One layer's latency at ``cin``/``cout`` channels (bilinear in the grid), times its ``layer_scale``."""
        return self.layer_scale.get(name, 1.0) * self.isolated_latency(name, cin, cout)

    def isolated_latency(self, name: str, cin: int, cout: int) -> float:
        """Bilinear interpolation of one layer's latency (as timed alone) at ``cin``/``cout`` channels."""
        spec = self.layers[name]
        if spec.depthwise:
            i, j, w = _interp1(spec.grid_out, cout)
            a, b = self.entries[spec.key(spec.grid_out[i], spec.grid_out[i])], self.entries[
                spec.key(spec.grid_out[j], spec.grid_out[j])]
            return max(0.0, a + (b - a) * w)
        i0, i1, wi = _interp1(spec.grid_in, cin)
        o0, o1, wo = _interp1(spec.grid_out, cout)
        gi, go = spec.grid_in, spec.grid_out

        def e(i: int, o: int) -> float:
            return self.entries[spec.key(gi[i], go[o])]

        low = e(i0, o0) + (e(i0, o1) - e(i0, o0)) * wo
        high = e(i1, o0) + (e(i1, o1) - e(i1, o0)) * wo
        return max(0.0, low + (high - low) * wi)

    def resolve_one(self, name: str, config: Mapping[str, int | tuple[int, int]]) -> tuple[int, int]:
        """(in, out) channels of one measured layer for a config of kept output channels (or (in, out) pairs).

        Input channels follow the kept fraction of each producer recorded in ``in_sources`` (the next
        layer's input change HALP counts in a channel group's marginal latency).
        """
        spec = self.layers[name]
        v = config.get(name)
        if isinstance(v, (tuple, list)):
            return int(v[0]), int(v[1])
        cout = spec.out_channels if v is None else int(v)
        if spec.depthwise:
            return cout, cout
        if not spec.in_sources:
            return spec.in_channels, cout
        frac = 0.0
        for src, n in spec.in_sources:
            full = self.layers[src].out_channels if src in self.layers else None
            kept = config.get(src, full)
            kept = kept[1] if isinstance(kept, (tuple, list)) else kept
            frac += n * ((kept / full) if full and kept is not None else 1.0)
        return max(1, int(round(frac))), cout

    def resolve(self, config: Mapping[str, int | tuple[int, int]]) -> dict[str, tuple[int, int]]:
        """(in, out) channels per measured layer for a config of kept output channels (or (in, out) pairs)."""
        return {name: self.resolve_one(name, config) for name in self.layers}

    def consumers(self) -> dict[str, tuple[str, ...]]:
        """Per producer layer, the measured layers whose input channels it feeds (from ``in_sources``)."""
        out: dict[str, list[str]] = {}
        for name, spec in self.layers.items():
            for src, _ in spec.in_sources:
                out.setdefault(src, []).append(name)
        return {k: tuple(v) for k, v in out.items()}

    def layer_sum(self, config: Mapping[str, int | tuple[int, int]]) -> float:
        """Σ of the per-layer table entries for a channel configuration (uncalibrated)."""
        return sum(self.layer_latency(n, ci, co) for n, (ci, co) in self.resolve(config).items())

    def predict(self, config: Mapping[str, int | tuple[int, int]]) -> float:
        """Predicted whole-model latency (ms) for a channel configuration (missing layers: full width)."""
        return self.overhead_ms + self.scale * self.layer_sum(config)

    __call__ = predict

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": 1, "runtime": self.runtime, "device": self.device,
            "overhead_ms": self.overhead_ms, "scale": self.scale, "meta": self.meta, "layer_scale": self.layer_scale,
            "layers": {k: asdict(v) for k, v in self.layers.items()}, "entries": self.entries,
        }

    @classmethod
    def load(cls, path: str | Path, *, runtime: str | None = None, device: str | None = None) -> LatencyTable:
        """Read a table; if ``runtime``/``device`` are given they must match the table's tags."""
        d = json.loads(Path(path).read_text())
        if d.get("format") != FORMAT:
            raise ValueError(f"{path}: not an avprune latency table (format={d.get('format')!r})")
        for tag, want in (("runtime", runtime), ("device", device)):
            if want is not None and d[tag] != want:
                raise ValueError(f"{path}: table measured on {tag}={d[tag]!r}, not {want!r}; re-measure it")
        layers = {}
        for name, s in d["layers"].items():
            s = dict(s)
            for k in ("kernel", "stride", "padding", "input_hw", "grid_in", "grid_out"):
                s[k] = tuple(s[k])
            s["in_sources"] = tuple((a, int(b)) for a, b in s["in_sources"])
            layers[name] = LayerSpec(**s)
        return cls(runtime=d["runtime"], device=d["device"], layers=layers,
                   entries={k: float(v) for k, v in d["entries"].items()},
                   overhead_ms=float(d["overhead_ms"]), scale=float(d.get("scale", 1.0)),
                   meta=dict(d.get("meta", {})),
                   layer_scale={k: float(v) for k, v in d.get("layer_scale", {}).items()})


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _trace_layers(
    model: nn.Module,
    example_input: Any,
    forward_fn: Callable[[nn.Module, Any], Any] | None,
    layer_names: Sequence[str] | None,
    fractions: Sequence[float],
    multiple: int,
) -> dict[str, LayerSpec]:
    """Record each Conv2d/Linear's input shape (hooks) and its input-channel producers (DepGraph)."""
    import torch_pruning as tp

    mods = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    if layer_names is not None:
        mods = {n: mods[n] for n in layer_names}
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:  # returns None: inputs untouched
            shapes.setdefault(name, tuple(args[0].shape))

        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in mods.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(
                model, example_inputs=example_input, forward_fn=lambda m, x: run_forward(m, x, forward_fn),
                output_transform=flatten_tensors, verbose=False)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    names = {m: n for n, m in model.named_modules()}
    specs: dict[str, LayerSpec] = {}
    for n, m in mods.items():
        if n not in shapes:
            continue  # not on the traced path (e.g. unused branch)
        shape = shapes[n]
        is_conv = isinstance(m, nn.Conv2d)
        cin, cout = (m.in_channels, m.out_channels) if is_conv else (m.in_features, m.out_features)
        sources: list[tuple[str, int]] = []
        depthwise = is_conv and m.groups > 1 and m.groups == cin == cout
        if not depthwise and (not is_conv or m.groups == 1) and m in dg.module2node:
            fn = tp.prune_conv_in_channels if is_conv else tp.prune_linear_in_channels
            covered: set[int] = set()
            for item in dg.get_pruning_group(m, fn, list(range(cin))):
                tgt = item.dep.target.module
                if tgt is m or not isinstance(tgt, (nn.Conv2d, nn.Linear)) or not dg.is_out_channel_pruning_fn(item.dep.handler):
                    continue
                roots = set(item.root_idxs)
                if roots <= covered:
                    continue  # residual partner of a producer already counted
                covered |= roots
                sources.append((names[tgt], len(roots)))
        specs[n] = LayerSpec(
            type="conv" if is_conv else "linear", in_channels=cin, out_channels=cout,
            kernel=_pair(m.kernel_size) if is_conv else (1, 1), stride=_pair(m.stride) if is_conv else (1, 1),
            padding=_pair(m.padding) if is_conv else (0, 0), groups=m.groups if is_conv else 1,
            input_hw=(int(shape[-2]), int(shape[-1])) if is_conv else (1, 1), batch=int(shape[0]),
            in_sources=tuple(sources),
            grid_in=(cin,) if depthwise else _grid(cin, fractions, multiple if cin > multiple else 1),
            grid_out=_grid(cout, fractions, multiple if cout > multiple else 1),
        )
    return specs


def torch_measure_fn(repeats: int = 20, warmup: int = 3) -> MeasureFn:
    """A measuring callable for eager PyTorch on the current device (median of ``repeats`` runs)."""

    def measure(module: nn.Module, input_shape: tuple[int, ...]) -> float:
        x = torch.randn(input_shape)
        times = []
        with torch.inference_mode():
            for i in range(warmup + repeats):
                t = time.perf_counter()
                module(x)
                if i >= warmup:
                    times.append((time.perf_counter() - t) * 1e3)
        return float(sorted(times)[len(times) // 2])

    return measure


def macs_measure_fn() -> MeasureFn:
    """A cost callable that counts multiply-accumulates (millions) instead of timing.

    A table built with it ranks layers by compute alone: noise-free and machine-independent, for
    runtimes whose latency tracks MACs once channel counts are aligned to their blocks (issue #12:
    ONNX Runtime's NCHWc convs on this CPU, where isolated-layer timings mislead a knapsack). Scale
    it to milliseconds proportionally: ``table.scale = dense_ms / table.layer_sum({})`` with
    ``overhead_ms = 0`` (:meth:`LatencyTable.calibrate` at scale 1 would put almost all of the dense
    latency into the fixed overhead, since the entries are in millions of MACs, not ms).
    """

    def measure(module: nn.Module, input_shape: tuple[int, ...]) -> float:
        with torch.no_grad():
            out = module(torch.zeros(input_shape))
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            per_output = (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            per_output = module.in_features
        else:
            raise TypeError(f"macs_measure_fn counts Conv2d and Linear layers; got {type(module).__name__}")
        return float(out.numel() * per_output) / 1e6

    return measure


def macs_table(model: nn.Module, example_input: Any, *, dense_ms: float, multiple: int = 8, runtime: str = "macs",
               fractions: Sequence[float] = (0.125, 0.25, 0.5, 0.75, 1.0)) -> LatencyTable:
    """A table of per-layer multiply-accumulates (:func:`macs_measure_fn`) on counts aligned to
    ``multiple``, scaled so the dense model predicts ``dense_ms``: proportional, no fixed part (a
    measured correction covers the rest)."""
    if not dense_ms > 0:
        raise ValueError(f"dense_ms must be > 0 (the dense model's measured latency); got {dense_ms!r}")
    table = LatencyTable.measure(model, example_input, macs_measure_fn(), runtime=runtime, device="analytic",
                                 fractions=fractions, multiple=multiple)
    table.scale, table.overhead_ms = float(dense_ms) / table.layer_sum({}), 0.0
    return table

