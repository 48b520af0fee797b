"""Progress a person can follow: one live line per stage and per trial (rich), on stderr.

Disabled progress is a no-op object with the same methods, so stage code never branches on it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ray.tune import Callback
    from ray.tune.experiment import Trial
    from rich.progress import Progress, TaskID

log = logging.getLogger(__name__)


class JobProgress:
    """Live lines for stages and trials; use as a context manager around the job."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> JobProgress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def _line(self, key: str, description: str, total: float | None) -> None:
        if self._progress is None:
            return
        if key not in self._tasks:
            self._tasks[key] = self._progress.add_task(description, total=total)
        else:
            self._progress.update(self._tasks[key], description=description, total=total)

    # ------------------------------------------------------------------ stages
    def stage_start(self, name: str, total: int | None = None, note: str = "") -> None:
        log.info("stage %s: started %s", name, note)
        self._line(f"stage:{name}", f"[bold]{name:<14}[/] {note}", total)

    def stage_advance(self, name: str, advance: float = 1, note: str | None = None) -> None:
        if self._progress is None or f"stage:{name}" not in self._tasks:
            return
        description = None if note is None else f"[bold]{name:<14}[/] {note}"
        self._progress.update(self._tasks[f"stage:{name}"], advance=advance, description=description)

    def stage_done(self, name: str, note: str = "", *, skipped: bool = False) -> None:
        state = "[yellow]skipped (resume)[/]" if skipped else "[green]done[/]"
        log.info("stage %s: %s %s", name, "skipped" if skipped else "done", note)
        self._line(f"stage:{name}", f"[bold]{name:<14}[/] {state} {note}", None)
        if self._progress is not None:
            task = self._tasks[f"stage:{name}"]
            total = self._progress.tasks[task].total or 1
            self._progress.update(task, total=total, completed=total)

    # ------------------------------------------------------------------ trials
    def trial(self, trial_id: str, note: str, *, completed: float | None = None, total: float | None = None) -> None:
        """Create or update the line of one Tune trial."""
        self._line(f"trial:{trial_id}", f"  trial {trial_id:<10} {note}", total)
        if self._progress is not None and completed is not None:
            self._progress.update(self._tasks[f"trial:{trial_id}"], completed=completed)


def _f(v: float | None, spec: str = ".3f") -> str:
    """Format a reported metric that may be missing (None) or NaN."""
    return "-" if v is None else format(v, spec)


def tune_callback(progress: JobProgress, total_steps: int) -> Callback:
    """A Ray Tune callback that mirrors each trial's reports onto its live line (driver side)."""
    from ray.tune import Callback

    class ProgressCallback(_ProgressCallbackMixin, Callback):
        pass

    return ProgressCallback(progress, total_steps)


def _name(trial: Trial) -> str:
    return str(trial.config.get("_trial", {}).get("candidate_id", trial.trial_id))


class _ProgressCallbackMixin:
    """Trial lines from Tune's driver-side callback hooks.

    Tune pickles its run config (callbacks included) into the experiment folder for restores;
    the live display holds locks, so it is left out and a restored copy is mute.
    """

    def __init__(self, progress: JobProgress, total_steps: int) -> None:
        self.progress, self.total_steps = progress, total_steps

    def __getstate__(self) -> dict[str, int]:
        return {"total_steps": self.total_steps}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.progress, self.total_steps = JobProgress(enabled=False), state["total_steps"]

    def on_trial_result(self, iteration, trials, trial, result, **info):  # noqa: ANN001
        self.progress.trial(
            _name(trial),
            f"step {_f(result.get('step'), '>4')}  mAP {_f(result.get('map'))}  "
            f"pred {_f(result.get('latency_pred_ms'), '.2f')} ms  "
            f"meas {_f(result.get('latency_ms'), '.2f')} ms  sparsity {_f(result.get('sparsity'), '.2f')}",
            completed=result.get("step") or 0,
            total=self.total_steps,
        )

    def on_trial_error(self, iteration, trials, trial, **info):  # noqa: ANN001
        self.progress.trial(_name(trial), "[red]failed[/]")

    def on_trial_recover(self, iteration, trials, trial, **info):  # noqa: ANN001
        self.progress.trial(_name(trial), "[red]worker failed, restarting from its training checkpoint[/]")

    def on_trial_complete(self, iteration, trials, trial, **info):  # noqa: ANN001
        last = trial.last_result or {}
        stopped = not last.get("done")
        self.progress.trial(
            _name(trial),
            f"[{'yellow' if stopped else 'green'}]{'stopped early (ASHA)' if stopped else 'done'}[/]  "
            f"mAP {_f(last.get('map'))}  meas {_f(last.get('latency_ms'), '.2f')} ms",
            completed=last.get("step") or 0,
            total=self.total_steps,
        )
