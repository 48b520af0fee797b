"""What a stage and a Ray trial see: :class:`StageContext` (the driver's stages) and
:class:`TrialSpec` (one Tune trial, picklable; a dict only at the Tune boundary).

The latency budget keeps its one name, ``latency_budget_ms``, from the baseline record through
the trial spec to :class:`pruning.BudgetController`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from avprune.prune_job.records import Candidate, JSONDict, StageRecord

if TYPE_CHECKING:
    from avprune.config.prune import PruneJobConfig
    from avprune.prune_job.env import JobEnv
    from avprune.prune_job.progress import JobProgress

R = TypeVar("R", bound=StageRecord)


@dataclass(frozen=True)
class StageContext:
    """What a stage sees: the config, the process's job environment, where to write, live progress,
    and the records of the stages before it (by stage name)."""

    config: PruneJobConfig
    env: JobEnv
    out_dir: Path
    progress: JobProgress
    results: Mapping[str, StageRecord] = field(default_factory=dict)

    def record(self, kind: type[R]) -> R:
        """The record of an earlier stage, e.g. ``ctx.record(BaselineRecord)``."""
        rec = self.find(kind)
        if rec is None:
            stage = getattr(kind, "STAGE", kind.__name__)
            raise ValueError(f"stage {stage!r} has no record yet (records: {', '.join(self.results) or 'none'}); "
                             "it must run before this stage")
        return rec

    def find(self, kind: type[R]) -> R | None:
        """The record of an earlier stage, or None when that stage is not part of this job."""
        rec = self.results.get(getattr(kind, "STAGE", ""))
        if rec is not None and not isinstance(rec, kind):
            raise TypeError(f"record {getattr(kind, 'STAGE', '')!r} is a {type(rec).__name__}, not a {kind.__name__}")
        return rec


@dataclass(frozen=True)
class TrialSpec:
    """Everything one Ray Tune trial needs, picklable; crosses the Tune boundary as ``to_dict()``
    (Tune stores trial configs as plain data in its experiment state for restores)."""

    candidate: Candidate
    job: JSONDict  # the validated job config as JSON (rebuilt in the worker)
    out_dir: str
    latency_table: str
    latency_budget_ms: float  # what the trial aims at: the budget less budget.latency_margin
    map_floor: float
    dense_map: float
    sensitivity: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # unit -> (sparsity, drop)
    channel_multiple: int = 8  # resolved by the latency-table stage (8: jobs before issue #12 used round_to 8)
    block_ms: dict[str, float] = field(default_factory=dict)  # removable block -> its latency (block granularity)
    # The dense shadow's mAP per step (search.shadow_dense): the floor at a measurement is its mAP at that
    # step minus ``max_map_drop``. Empty: the floor is the constant ``map_floor``.
    floor_curve: list[tuple[int, float]] = field(default_factory=list)
    max_map_drop: float | None = None
    shadow: bool = False  # this trial IS the dense shadow (nothing pruned)
    # The baseline's dense p50 (ms): a trial times its candidate paired with the dense model and
    # scales by it, so another trial's training on the node does not read as latency. None: timed
    # alone (trials of jobs started before the pairing).
    dense_latency_ms: float | None = None
    # The in-graph calibration's held-out pruned model, (predicted, measured) ms in the table's units:
    # the allocation controller's saving scale (how much of a predicted saving the runtime delivers).
    holdout_ms: tuple[float, float] | None = None

    @property
    def candidate_id(self) -> str:
        return self.candidate.candidate_id

    def floor_at(self, step: int) -> float:
        """The mAP floor a measurement at ``step`` is judged against."""
        if not self.floor_curve or self.max_map_drop is None:
            return self.map_floor
        at = [m for s, m in self.floor_curve if s <= step] or [self.floor_curve[0][1]]
        return max(0.0, at[-1] - self.max_map_drop)

    def to_dict(self) -> JSONDict:
        d = asdict(self)
        d["candidate_id"] = self.candidate_id  # the live progress lines name trials by it
        return d

    @classmethod
    def from_dict(cls, d: JSONDict) -> TrialSpec:
        if "base" in d:  # a Tune experiment started before TrialSpec (its trials restored on --resume)
            base = d["base"]
            sens = {k: [(c["sparsity"], c["drop"]) for c in v["curve"]] for k, v in base.get("sensitivity", {}).items()}
            d = {**d, **{k: base[k] for k in ("latency_budget_ms", "map_floor", "dense_map")}, "sensitivity": sens}
        return cls(candidate=Candidate.from_dict(d["candidate"]), job=dict(d["job"]), out_dir=str(d["out_dir"]),
                   latency_table=str(d["latency_table"]), latency_budget_ms=float(d["latency_budget_ms"]),
                   map_floor=float(d["map_floor"]), dense_map=float(d["dense_map"]),
                   sensitivity={k: [(float(s), float(m)) for s, m in v] for k, v in d.get("sensitivity", {}).items()},
                   channel_multiple=int(d.get("channel_multiple", 8)),
                   block_ms={k: float(v) for k, v in d.get("block_ms", {}).items()},
                   floor_curve=sorted((int(s), float(m)) for s, m in d.get("floor_curve") or ()),
                   max_map_drop=None if d.get("max_map_drop") is None else float(d["max_map_drop"]),
                   shadow=bool(d.get("shadow", False)),
                   dense_latency_ms=None if d.get("dense_latency_ms") is None else float(d["dense_latency_ms"]),
                   holdout_ms=None if d.get("holdout_ms") is None else (float(d["holdout_ms"][0]),
                                                                        float(d["holdout_ms"][1])))
