"""The prune job's own failures: a budget pair no candidate meets (CLI exit code 2), and an output
folder that cannot be used as asked. Messages name the problem and the values; the CLI adds its flags."""

from __future__ import annotations

from pathlib import Path


class InfeasibleBudgetError(RuntimeError):
    """No candidate meets both the latency budget and the mAP floor.

    Carries the best trade-off reached and the nearest budgets that would have been feasible,
    so the message can tell the user what to ask for instead.
    """

    def __init__(
        self,
        *,
        latency_budget_ms: float,
        map_floor: float,
        best_latency_ms: float,
        best_map: float,
        nearest_latency_ms: float | None,
        nearest_map_floor: float | None,
    ) -> None:
        self.latency_budget_ms = latency_budget_ms
        self.map_floor = map_floor
        self.best_latency_ms = best_latency_ms
        self.best_map = best_map
        self.nearest_latency_ms = nearest_latency_ms
        self.nearest_map_floor = nearest_map_floor
        options = []
        if nearest_latency_ms is not None:
            options.append(f"latency_ms >= {nearest_latency_ms:.2f} at mAP floor {map_floor:.3f}")
        if nearest_map_floor is not None:
            options.append(f"map_floor <= {nearest_map_floor:.3f} at {latency_budget_ms:.2f} ms")
        # nothing measured meets either target alone (a floor above the dense model's own mAP, e.g. a
        # dense shadow that fine-tuned past the starting checkpoint, with a budget nobody reached)
        none = (f"none found (no measured model, the dense one included, keeps mAP >= {map_floor:.3f}, and none "
                f"runs within {latency_budget_ms:.2f} ms)")
        super().__init__(
            f"infeasible budget: no candidate reaches {latency_budget_ms:.2f} ms at mAP >= {map_floor:.3f}; "
            f"best trade-off reached: {best_latency_ms:.2f} ms at mAP {best_map:.3f}; "
            f"nearest feasible budget: {' or '.join(options) if options else none}"
        )

    def to_dict(self) -> dict[str, float | None]:
        return {
            "latency_budget_ms": self.latency_budget_ms,
            "map_floor": self.map_floor,
            "best_latency_ms": self.best_latency_ms,
            "best_map": self.best_map,
            "nearest_latency_ms": self.nearest_latency_ms,
            "nearest_map_floor": self.nearest_map_floor,
        }


class JobFolderInUseError(ValueError):
    """The output folder already holds finished stages of a job and resuming was not asked for."""

    def __init__(self, out_dir: Path, finished: list[str]) -> None:
        self.out_dir, self.finished = out_dir, finished
        super().__init__(f"{out_dir} already holds a prune job ({', '.join(finished)} done); resume it, "
                         "or write the new job to another output folder")


class JobConfigMismatchError(ValueError):
    """Resuming a folder whose finished stages were computed under another job config."""

    def __init__(self, out_dir: Path, stored: str, requested: str) -> None:
        self.out_dir, self.stored, self.requested = out_dir, stored, requested
        super().__init__(f"cannot resume {out_dir}: it was started with a different job config (fingerprint "
                         f"{stored} vs {requested}); write this job to another output folder")


class BudgetUnreachableError(ValueError):
    """The latency budget is below what the latency table predicts at the widest allowed pruning.

    Raised by the latency-table stage, before any fine-tuning; a ValueError, so the CLI exits 2
    (the job file must change). Carries the nearest feasible budget.
    """

    def __init__(self, message: str, *, latency_budget_ms: float, nearest_latency_ms: float) -> None:
        self.latency_budget_ms, self.nearest_latency_ms = latency_budget_ms, nearest_latency_ms
        super().__init__(message)


class UntrustedJobFolderError(ValueError):
    """An output folder this job will not read: another user's, or not one it started (resuming
    restores Ray Tune state by unpickling, so the folder is trusted like code)."""

    def __init__(self, out_dir: Path, reason: str) -> None:
        self.out_dir, self.reason = out_dir, reason
        super().__init__(f"refusing to use {out_dir}: {reason}; resuming restores Ray Tune state by unpickling, "
                         "so only folders this user's own job wrote are resumed; write the job to a new output folder")
