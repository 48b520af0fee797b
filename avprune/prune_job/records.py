"""Typed stage records of the prune job, one frozen dataclass per stage, and what a stage sees.

Each record is what its stage returns and what ``OUT/stages/NAME.json`` holds under
``"result"``: ``to_dict`` writes the JSON the job has always written (same keys, plus new
optional ones), ``from_dict`` reads it back, including records written before these types
existed (missing optional keys get their defaults), so ``--resume`` of an older job folder works.

The latency budget has one name throughout, ``latency_budget_ms``: the baseline record's
attribute, the :class:`~avprune.prune_job.context.TrialSpec` a Ray trial receives, the keyword of
:class:`pruning.BudgetController` and its attribute.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Protocol, TypeVar

from deploy.timing import LatencySummary

#: A record as JSON: the on-disk boundary, the only place values are untyped.
JSONDict = dict[str, Any]
F = TypeVar("F")


def _opt_float(v: float | str | None) -> float | None:
    return None if v is None else float(v)


def _opt_int(v: int | str | None) -> int | None:
    return None if v is None else int(v)


def _flat(cls: type[F], d: JSONDict) -> F:
    """A flat dataclass from its JSON: every field by name; absent optional ones keep their defaults."""
    return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def latency_from_dict(d: JSONDict) -> LatencySummary:
    """A :class:`deploy.timing.LatencySummary`; records written before it carried no ``p90_ms``."""
    return LatencySummary(p50_ms=float(d["p50_ms"]), p90_ms=float(d.get("p90_ms", math.nan)),
                          p99_ms=float(d["p99_ms"]), mean_ms=float(d["mean_ms"]), n=int(d["n"]))


# ----------------------------------------------------------------------------- shared pieces


@dataclass(frozen=True)
class ModelSummary:
    """One model's numbers: one row of the final table (dense or pruned)."""

    map: float
    map50: float
    p50_ms: float
    p99_ms: float
    params: int
    gmacs: float

    def to_dict(self) -> JSONDict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: JSONDict) -> ModelSummary:
        return _flat(cls, d)


@dataclass(frozen=True)
class Candidate:
    """One point of the search grid: how a trial prunes."""

    candidate_id: str
    index: int
    importance: str
    controller: str
    ramp: float
    seed: int

    def to_dict(self) -> JSONDict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: JSONDict) -> Candidate:
        return _flat(cls, d)


@dataclass(frozen=True)
class Point:
    """One (latency, mAP) trade-off: a re-measured candidate, a trial report or the dense model."""

    latency_ms: float
    map: float
    map50: float = 0.0
    source: str = ""  # candidate id, "c0 step 40", "dense"
    index: int = -1  # candidate index for final candidates, -1 otherwise

    def to_dict(self) -> JSONDict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: JSONDict) -> Point:
        return cls(latency_ms=float(d["latency_ms"]), map=float(d["map"]), map50=float(d.get("map50") or 0.0),
                   source=str(d.get("source", "")), index=int(d.get("index", -1)))


# ----------------------------------------------------------------------------- stage records


class StageRecord(Protocol):
    """What every stage record offers the runner."""

    def to_dict(self) -> JSONDict: ...

    @property
    def note(self) -> str: ...


@dataclass(frozen=True)
class BaselineRecord:
    """Stage 1: the dense model and the budget in absolute terms (every later stage reads these)."""

    STAGE: ClassVar[str] = "baseline"

    dense: ModelSummary
    latency: LatencySummary
    latency_budget_ms: float
    map_floor: float
    val_images: int
    # p50 of each timed block; latency.p50_ms is their median (records before issue #13: one run, none)
    latency_blocks_ms: tuple[float, ...] = ()

    @property
    def note(self) -> str:
        return (f"mAP {self.dense.map:.3f}, p50 {self.latency.p50_ms:.2f} ms -> budget {self.latency_budget_ms:.2f} ms, "
                f"floor {self.map_floor:.3f}")

    def latency_spread(self) -> JSONDict:
        """How far one block's p50 strays from the median the budget uses (empty for older records)."""
        b = self.latency_blocks_ms
        if not b:
            return {}
        med = self.latency.p50_ms
        return {"blocks": len(b), "median_ms": med, "min_ms": min(b), "max_ms": max(b),
                "max_rel_dev": max(abs(x - med) for x in b) / med if med > 0 else math.nan}

    def to_dict(self) -> JSONDict:
        d = {"dense": self.dense.to_dict(), "latency": self.latency.to_dict(),
             "latency_budget_ms": self.latency_budget_ms, "map_floor": self.map_floor,
             "val_images": self.val_images, "note": self.note}
        if self.latency_blocks_ms:
            d.update(latency_blocks_ms=list(self.latency_blocks_ms), latency_spread=self.latency_spread())
        return d

    @classmethod
    def from_dict(cls, d: JSONDict) -> BaselineRecord:
        return cls(dense=ModelSummary.from_dict(d["dense"]), latency=latency_from_dict(d["latency"]),
                   latency_budget_ms=float(d["latency_budget_ms"]), map_floor=float(d["map_floor"]),
                   val_images=int(d["val_images"]),
                   latency_blocks_ms=tuple(float(x) for x in d.get("latency_blocks_ms", ())))


@dataclass(frozen=True)
class FoldedGate:
    """One squeeze-excitation gate folded into its consumer conv (:class:`pruning.gate_fold.GateFold`)."""

    gate: str
    consumer: str
    channels: int
    mean_scale: float
    scale_spread: float  # how much input dependence the fold gave up (std of the scale over images)

    def to_dict(self) -> JSONDict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: JSONDict) -> FoldedGate:
        return _flat(cls, d)


@dataclass(frozen=True)
class GateFoldRecord:
    """Stage 1b: the channel gates folded before pruning (``pruning.fold_gates``), or why none were.

    Every later stage prunes ``checkpoint`` (the folded model) where it is set; dense figures (the
    baseline, the shadow, the teacher) stay those of the unfolded checkpoint, so the job's speed-up
    and mAP drop include what the fold cost and gave."""

    STAGE: ClassVar[str] = "gate_fold"

    images: int  # calibration images (0: off)
    reason: str = ""  # why nothing was folded
    checkpoint: str | None = None
    gates: tuple[FoldedGate, ...] = ()
    map: float | None = None  # the folded model before any fine-tuning
    p50_ms: float | None = None  # timed paired with dense, in the baseline's conditions
    seconds: float = 0.0

    @property
    def note(self) -> str:
        if not self.gates:
            return self.reason or "nothing folded"
        lat = f", p50 {self.p50_ms:.2f} ms" if self.p50_ms is not None else ""
        return f"{len(self.gates)} gates folded on {self.images} images: mAP {self.map:.3f}{lat}"

    def to_dict(self) -> JSONDict:
        return {**asdict(self), "gates": [g.to_dict() for g in self.gates], "note": self.note}

    @classmethod
    def from_dict(cls, d: JSONDict) -> GateFoldRecord:
        return _flat(cls, {**d, "gates": tuple(FoldedGate.from_dict(g) for g in d.get("gates", ()))})


@dataclass(frozen=True)
class LatencyTableRecord:
    """Stage 2: where the calibrated per-layer latency table is, and how it was obtained."""

    STAGE: ClassVar[str] = "latency_table"

    path: str
    cache: str
    source: str  # "cache", "measured" or "macs" (pruning.latency_costs: macs, computed)
    entries: int
    overhead_ms: float
    # Resolved once here (``auto`` probed on the runtime); None in records written before issue #12,
    # whose jobs pruned with ``round_to`` 8.
    channel_multiple: int | None = None
    channel_multiple_reason: str = ""
    widest_reach_ms: float | None = None  # predicted latency at the widest allowed pruning (feasibility bound)
    blocks: tuple[str, ...] = ()  # removable residual blocks (granularity block / channel+block)
    block_ms: dict[str, float] = field(default_factory=dict)  # measured saving of removing each block alone
    # In-graph calibration (avprune.prune_job.in_graph; off, with no fields, in records before it):
    # whether the per-layer costs were re-fitted to whole-graph probes, why, and how well they fit.
    in_graph: bool = False
    in_graph_reason: str = ""
    in_graph_source: str = ""  # "cache" or "measured"
    in_graph_cache: str = ""
    in_graph_probes: int = 0
    in_graph_residual_rms_ms: float | None = None
    in_graph_holdout_predicted_ms: float | None = None  # every group at 50%: predicted vs measured
    in_graph_holdout_measured_ms: float | None = None
    in_graph_s: float | None = None  # the calibration's wall time in this stage
    in_graph_timing: dict[str, float] = field(default_factory=dict)  # probes / export / timing seconds
    # Saving fit (avprune.prune_job.saving_fit; off, with no fields, in records before it): the table's
    # slope fitted to the start model timed whole, dense and thinned uniformly.
    saving_fit: bool = False
    saving_fit_reason: str = ""
    saving_fit_source: str = ""  # "cache" or "measured"
    saving_fit_cache: str = ""  # the cached fit (beside the table file)
    saving_fit_scale: float | None = None  # fitted slope over the slope before (< 1: the table over-predicted savings)
    saving_fit_points: tuple[tuple[float, float, float], ...] = ()  # (uniform sparsity, predicted, measured) ms
    saving_fit_before: tuple[float, ...] = ()  # each point's prediction before the fit
    saving_fit_residual_rms_ms: float | None = None
    saving_fit_s: float | None = None

    @property
    def note(self) -> str:
        mult = f", channel multiple {self.channel_multiple}" if self.channel_multiple else ""
        ig = f", in-graph ({self.in_graph_probes} probes, {self.in_graph_source})" if self.in_graph else ""
        sf = (f", saving fit x{self.saving_fit_scale:.2f} ({self.saving_fit_source})"
              if self.saving_fit and self.saving_fit_scale is not None else "")
        return f"{self.entries} entries ({self.source}), overhead {self.overhead_ms:.2f} ms{mult}{ig}{sf}"

    def to_dict(self) -> JSONDict:
        return {**asdict(self), "note": self.note}

    @classmethod
    def from_dict(cls, d: JSONDict) -> LatencyTableRecord:
        return _flat(cls, {**d, "blocks": tuple(d.get("blocks", ())),
                           "saving_fit_points": tuple(tuple(float(v) for v in p) for p in d.get("saving_fit_points", ())),
                           "saving_fit_before": tuple(float(v) for v in d.get("saving_fit_before", ()))})


@dataclass(frozen=True)
class CurvePoint:
    sparsity: float
    value: float  # the scan's metric with only this unit pruned (mAP, or minus the detection loss)
    drop: float  # the dense value on the scan's images minus ``value`` (higher: more damage)


@dataclass(frozen=True)
class LayerSensitivity:
    """One unit's sensitivity curve, and the Ray worker process that scanned it (None: older records)."""

    curve: tuple[CurvePoint, ...]
    worker_pid: int | None = None

    def to_dict(self, metric: str = "map") -> JSONDict:
        # mAP curves keep the key they had before the loss metric ("map"), so older readers still read them
        d: JSONDict = {"curve": [{**asdict(c), **({"map": c.value} if metric == "map" else {})} for c in self.curve]}
        if self.worker_pid is not None:
            d["worker_pid"] = self.worker_pid
        return d

    @classmethod
    def from_dict(cls, d: JSONDict) -> LayerSensitivity:
        curve = tuple(CurvePoint(float(c["sparsity"]), float(c["value"] if "value" in c else c["map"]), float(c["drop"]))
                      for c in d["curve"])
        return cls(curve=curve, worker_pid=_opt_int(d.get("worker_pid")))

    @property
    def worst_drop(self) -> float:
        return max((c.drop for c in self.curve), default=0.0)


@dataclass(frozen=True)
class SensitivityRecord:
    """Stage 3: per-unit sensitivity curves (the allocation knapsack's damage, ``layer_adaptive``'s profile).

    ``metric`` is what was measured: ``map`` (values are mAP) or ``loss`` (values are minus the
    detection loss, so that for both a higher value is better and a drop is damage).
    """

    STAGE: ClassVar[str] = "sensitivity"

    dense_value: float
    layers: dict[str, LayerSensitivity]
    metric: str = "map"

    @property
    def note(self) -> str:
        if not self.layers:
            return "0 layers"
        worst = max(self.layers, key=lambda u: self.layers[u].worst_drop)
        return f"{len(self.layers)} layers ({'detection loss' if self.metric == 'loss' else 'mAP'}), most sensitive: {worst}"

    def profile(self) -> dict[str, list[tuple[float, float]]]:
        """(sparsity, drop) per unit, as :class:`pruning.LayerAdaptiveController` and the knapsack take it."""
        return {name: [(c.sparsity, c.drop) for c in rec.curve] for name, rec in self.layers.items()}

    def to_dict(self) -> JSONDict:
        return {"metric": self.metric, "dense_value": self.dense_value,
                **({"dense_map": self.dense_value} if self.metric == "map" else {}),
                "layers": {k: v.to_dict(self.metric) for k, v in self.layers.items()}, "note": self.note}

    @classmethod
    def from_dict(cls, d: JSONDict) -> SensitivityRecord:  # records before the loss metric: mAP, "dense_map"
        return cls(dense_value=float(d["dense_value"] if "dense_value" in d else d["dense_map"]),
                   layers={k: LayerSensitivity.from_dict(v) for k, v in d["layers"].items()},
                   metric=str(d.get("metric", "map")))


@dataclass(frozen=True)
class TrialReport:
    """One Tune report of a trial (any value may be missing: Tune fills absent metrics with NaN/None)."""

    step: int | None = None
    map: float | None = None
    map50: float | None = None
    latency_ms: float | None = None
    latency_pred_ms: float | None = None
    sparsity: float | None = None
    score: float | None = None
    node_id: str | None = None  # the Ray node and worker process that made the report
    worker_pid: int | None = None
    map_floor: float | None = None  # the floor this measurement was judged against (moves with a dense shadow)
    # baseline dense p50 / dense p50 timed beside the candidate (< 1: the node was loaded; latency_ms
    # is already scaled by it). None: timed alone.
    load_factor: float | None = None

    @classmethod
    def from_dict(cls, d: JSONDict) -> TrialReport:
        node = d.get("node_id")
        return cls(step=_opt_int(d.get("step")), node_id=None if node is None else str(node),
                   worker_pid=_opt_int(d.get("worker_pid")),
                   **{f.name: _opt_float(d.get(f.name)) for f in fields(cls)
                      if f.name not in ("step", "node_id", "worker_pid")})


@dataclass(frozen=True)
class CandidateRecord:
    """How one candidate's trial ended, its reports, and the models it left (paths relative to OUT)."""

    candidate: Candidate
    status: str  # "done", "failed", "stopped early"
    error: str | None = None
    steps: int | None = None
    snapshot: str | None = None  # the best point that met both targets while fine-tuning
    snapshot_step: int | None = None
    # while no point met both: the fastest that kept the mAP floor (a deliverable when the budget is missed)
    floor_snapshot: str | None = None
    floor_snapshot_step: int | None = None
    infeasible: bool | None = None
    history: tuple[TrialReport, ...] = ()
    checkpoint: str | None = None  # the final, physically smaller model
    pruning_record: str | None = None

    @property
    def candidate_id(self) -> str:
        return self.candidate.candidate_id

    def to_dict(self) -> JSONDict:
        # flat, as the job has always written it: the candidate's keys beside the outcome's
        d = {**self.candidate.to_dict(), **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "candidate"}}
        d["history"] = [asdict(h) for h in self.history]
        return d

    @classmethod
    def from_dict(cls, d: JSONDict) -> CandidateRecord:
        inf = d.get("infeasible")
        return cls(candidate=Candidate.from_dict(d), status=str(d["status"]), error=d.get("error"),
                   steps=_opt_int(d.get("steps")), snapshot=d.get("snapshot"), snapshot_step=_opt_int(d.get("snapshot_step")),
                   floor_snapshot=d.get("floor_snapshot"), floor_snapshot_step=_opt_int(d.get("floor_snapshot_step")),
                   infeasible=None if inf is None else bool(inf),
                   history=tuple(TrialReport.from_dict(h) for h in d.get("history") or ()),
                   checkpoint=d.get("checkpoint"), pruning_record=d.get("pruning_record"))


@dataclass(frozen=True)
class ShadowPoint:
    """The dense shadow's mAP at one fine-tune step (step 0: the starting checkpoint, as the baseline scored it)."""

    step: int
    map: float
    map50: float = 0.0


@dataclass(frozen=True)
class ShadowRecord:
    """The dense model trained alongside the candidates (``search.shadow_dense``): same recipe, seed and
    steps, nothing pruned. A relative floor (``budget.max_map_drop``) is judged against its curve."""

    curve: tuple[ShadowPoint, ...]
    max_map_drop: float
    seed: int
    steps: int
    status: str = "done"
    path: str = ""  # its work folder, relative to OUT

    def map_at(self, step: int) -> float:
        """The shadow's mAP at ``step``: its last measurement at or before it (step 0 at the latest)."""
        pts = [p for p in self.curve if p.step <= step] or list(self.curve[:1])
        if not pts:
            raise ValueError("the shadow record has no measurement")
        return max(pts, key=lambda p: p.step).map

    def floor_at(self, step: int) -> float:
        """The floor at ``step``: the shadow's mAP there minus the drop (never below 0)."""
        return max(0.0, self.map_at(step) - self.max_map_drop)

    @property
    def final_map(self) -> float:
        return max(self.curve, key=lambda p: p.step).map

    @property
    def final_floor(self) -> float:
        return max(0.0, self.final_map - self.max_map_drop)

    def to_dict(self) -> JSONDict:
        return {**asdict(self), "curve": [asdict(p) for p in self.curve], "final_map": self.final_map,
                "final_floor": self.final_floor}

    @classmethod
    def from_dict(cls, d: JSONDict) -> ShadowRecord:
        return cls(curve=tuple(ShadowPoint(int(p["step"]), float(p["map"]), float(p.get("map50") or 0.0))
                               for p in d["curve"]),
                   max_map_drop=float(d["max_map_drop"]), seed=int(d["seed"]), steps=int(d["steps"]),
                   status=str(d.get("status", "done")), path=str(d.get("path", "")))


@dataclass(frozen=True)
class SearchRecord:
    """Stage 4: every candidate, in candidate order, and the dense shadow when one was trained."""

    STAGE: ClassVar[str] = "search"

    candidates: tuple[CandidateRecord, ...]
    shadow: ShadowRecord | None = None  # None: no shadow (absolute floor, switched off, or an older record)

    @property
    def note(self) -> str:
        done = sum(c.status == "done" for c in self.candidates)
        return f"{done}/{len(self.candidates)} candidates finished"

    def candidate(self, candidate_id: str) -> CandidateRecord:
        """The record of ``c0`` (also for a snapshot id such as ``c0@60``)."""
        base = candidate_id.split("@")[0]
        for c in self.candidates:
            if c.candidate_id == base:
                return c
        raise ValueError(f"candidate {candidate_id!r} is not in the search record "
                         f"(candidates: {', '.join(c.candidate_id for c in self.candidates)})")

    def to_dict(self) -> JSONDict:
        return {"candidates": [c.to_dict() for c in self.candidates],
                "shadow": None if self.shadow is None else self.shadow.to_dict(), "note": self.note}

    @classmethod
    def from_dict(cls, d: JSONDict) -> SearchRecord:
        sh = d.get("shadow")
        return cls(candidates=tuple(CandidateRecord.from_dict(c) for c in d["candidates"]),
                   shadow=None if not sh else ShadowRecord.from_dict(sh))


@dataclass(frozen=True)
class Deliverable:
    """A model the search produced that selection may ship: a final model or a trial's snapshot."""

    candidate_id: str  # "c0", or "c0@60" for c0's snapshot at step 60
    index: int  # deterministic order (ties in selection break on it)
    checkpoint: str  # relative to OUT


@dataclass(frozen=True)
class MeasuredModel:
    """A deliverable re-measured by selection, beside the dense model."""

    candidate_id: str
    index: int
    checkpoint: str
    map: float
    map50: float
    p50_ms: float  # the paired ratio to the dense model, at the baseline's dense latency
    p99_ms: float
    raw_p50_ms: float  # as timed, unscaled
    dense_p50_ms_beside: float  # the dense model timed right before it
    params: int
    gmacs: float

    def summary(self) -> ModelSummary:
        return ModelSummary(map=self.map, map50=self.map50, p50_ms=self.p50_ms, p99_ms=self.p99_ms,
                            params=self.params, gmacs=self.gmacs)

    def point(self) -> Point:
        return Point(self.p50_ms, self.map, self.map50, self.candidate_id, self.index)

    def to_dict(self) -> JSONDict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: JSONDict) -> MeasuredModel:
        return _flat(cls, d)


@dataclass(frozen=True)
class Infeasible:
    """Why the budget pair was not met (the fields of :class:`InfeasibleBudgetError`, and its message)."""

    latency_budget_ms: float
    map_floor: float
    best_latency_ms: float
    best_map: float
    nearest_latency_ms: float | None
    nearest_map_floor: float | None
    message: str

    def to_dict(self) -> JSONDict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: JSONDict) -> Infeasible:
        return cls(**{f.name: d.get(f.name) for f in fields(cls)})  # older records: no nearest_* keys

    def error_fields(self) -> JSONDict:
        """Keyword arguments of :class:`~avprune.prune_job.errors.InfeasibleBudgetError`."""
        return {k: v for k, v in self.to_dict().items() if k != "message"}


@dataclass(frozen=True)
class SelectRecord:
    """Stage 5: the chosen model, every re-measured deliverable and the Pareto front."""

    STAGE: ClassVar[str] = "select"

    candidate_id: str
    checkpoint: str
    selected: MeasuredModel
    measured: tuple[MeasuredModel, ...]
    pareto: tuple[Point, ...]
    infeasible: Infeasible | None = None
    # The floor selection judged against, and its reference: "shadow" (the dense shadow's final mAP minus
    # budget.max_map_drop), "checkpoint" (the baseline's dense mAP minus the drop) or "absolute"
    # (budget.map_floor). None / "": records written before the shadow (their floor is the baseline's).
    map_floor: float | None = None
    floor_reference: str = ""
    reference_map: float | None = None  # the mAP the drop was taken from (None: absolute floor)

    @property
    def feasible(self) -> bool:
        return self.infeasible is None

    @property
    def note(self) -> str:
        s = self.selected
        budget = f" (budget {self.infeasible.latency_budget_ms:.2f})" if self.infeasible else ""
        return f"{self.candidate_id}: mAP {s.map:.3f}, p50 {s.p50_ms:.2f} ms{budget}"

    def to_dict(self) -> JSONDict:
        return {"candidate_id": self.candidate_id, "checkpoint": self.checkpoint, "selected": self.selected.to_dict(),
                "measured": [m.to_dict() for m in self.measured], "pareto": [p.to_dict() for p in self.pareto],
                "feasible": self.feasible, "infeasible": None if self.infeasible is None else self.infeasible.to_dict(),
                "map_floor": self.map_floor, "floor_reference": self.floor_reference,
                "reference_map": self.reference_map, "note": self.note}

    @classmethod
    def from_dict(cls, d: JSONDict) -> SelectRecord:
        inf = d.get("infeasible")
        return cls(candidate_id=str(d["candidate_id"]), checkpoint=str(d["checkpoint"]),
                   selected=MeasuredModel.from_dict(d["selected"]),
                   measured=tuple(MeasuredModel.from_dict(m) for m in d["measured"]),
                   pareto=tuple(Point.from_dict(p) for p in d["pareto"]),
                   infeasible=None if not inf else Infeasible.from_dict(inf),
                   map_floor=_opt_float(d.get("map_floor")), floor_reference=str(d.get("floor_reference") or ""),
                   reference_map=_opt_float(d.get("reference_map")))


@dataclass(frozen=True)
class FinalizeRecord:
    """Stage 6: the artifacts (names relative to OUT) and the shipped model's numbers."""

    STAGE: ClassVar[str] = "finalize"

    pruned: ModelSummary
    checkpoint: str
    onnx: str
    report_json: str
    report_html: str
    speedup: float = math.nan

    @property
    def note(self) -> str:
        faster = "" if math.isnan(self.speedup) else f"{self.speedup:.2f}x faster, "  # older records: no speedup
        return f"{faster}pruned mAP {self.pruned.map:.3f}, p50 {self.pruned.p50_ms:.2f} ms"

    def to_dict(self) -> JSONDict:
        return {"pruned": self.pruned.to_dict(), "checkpoint": self.checkpoint, "onnx": self.onnx,
                "report_json": self.report_json, "report_html": self.report_html, "speedup": self.speedup,
                "note": self.note}

    @classmethod
    def from_dict(cls, d: JSONDict) -> FinalizeRecord:
        return cls(pruned=ModelSummary.from_dict(d["pruned"]), checkpoint=str(d["checkpoint"]), onnx=str(d["onnx"]),
                   report_json=str(d["report_json"]), report_html=str(d["report_html"]),
                   speedup=float(d.get("speedup", math.nan)))


#: The stage record type of each default stage, by stage name (how ``StageStore`` reads them back).
RECORD_TYPES: dict[str, type] = {
    r.STAGE: r for r in (BaselineRecord, GateFoldRecord, LatencyTableRecord, SensitivityRecord, SearchRecord, SelectRecord,
                         FinalizeRecord)
}
