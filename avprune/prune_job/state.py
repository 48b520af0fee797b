"""Stage checkpoints in the job's output folder: what makes `--resume` skip finished work.

Layout::

    OUT/job.json               the validated config and its fingerprint (written first)
    OUT/stages/NAME.json       one file per finished stage, written atomically when it is done

A stage file exists only once its stage has finished and every artifact it names is on disk,
so a driver killed at any moment leaves either a finished stage or none.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path

from avprune.prune_job.errors import JobConfigMismatchError, JobFolderInUseError
from avprune.prune_job.records import JSONDict
from perception.io import atomic_write_json

STATE_VERSION = 1


class StageStore:
    """Reads and writes the stage records of one job output folder."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.stages_dir = self.out_dir / "stages"

    # ------------------------------------------------------------------ job identity
    def open(self, *, fingerprint: str, config: JSONDict, resume: bool) -> None:
        """Claim the folder for this job.

        Without ``resume``, a folder that already holds a job's stages is refused rather than
        silently mixed with new results; with ``resume``, the stored fingerprint must match,
        since finished stages computed under another config would be wrong.
        """
        job_file = self.out_dir / "job.json"
        if job_file.is_file():
            stored = json.loads(job_file.read_text())
            if not resume and self.finished():
                raise JobFolderInUseError(self.out_dir, self.finished())
            if resume and stored.get("fingerprint") != fingerprint:
                raise JobConfigMismatchError(self.out_dir, str(stored.get("fingerprint")), fingerprint)
        atomic_write_json(
            job_file, {"version": STATE_VERSION, "fingerprint": fingerprint, "config": dict(config)}
        )

    # ------------------------------------------------------------------ stages
    def path(self, name: str) -> Path:
        return self.stages_dir / f"{name}.json"

    def done(self, name: str) -> bool:
        return self.path(name).is_file()

    def finished(self) -> list[str]:
        """Names of finished stages, in the order they finished."""
        if not self.stages_dir.is_dir():
            return []
        recs = [(json.loads(p.read_text()).get("finished_at", 0.0), p.stem) for p in self.stages_dir.glob("*.json")]
        return [name for _, name in sorted(recs)]

    def load(self, name: str) -> JSONDict:
        """The result a finished stage recorded, as JSON (the runner reads it into its record type)."""
        return json.loads(self.path(name).read_text())["result"]

    def save(self, name: str, result: Mapping[str, object], *, wall_s: float) -> None:
        """Record a finished stage (atomic: the file appears whole or not at all)."""
        atomic_write_json(
            self.path(name),
            {"stage": name, "finished_at": time.time(), "wall_s": round(wall_s, 3), "result": dict(result)},
        )

    def wall_s(self, name: str) -> float:
        return float(json.loads(self.path(name).read_text()).get("wall_s", 0.0))
