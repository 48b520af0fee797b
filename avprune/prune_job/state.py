"""Stage checkpoints in the job's output folder: what makes `--resume` skip finished work.

Layout::

    OUT/job.json               the validated config, its fingerprint and owner (written first)
    OUT/stages/NAME.json       one file per finished stage, written atomically when it is done
    OUT/failed.json            only after a failure that left finished stages: the error

A job that fails before any stage finished removes what it wrote (the folder itself when it
created it), so a failed start leaves nothing behind and blocks no rerun.

Trust: ``--resume`` restores Ray Tune's experiment state, which Tune unpickles, so a folder is
only resumed when this job wrote it for the same config under the same user (see
:func:`check_trusted`); the check runs before any stage, so before Tune reads anything.

A stage file exists only once its stage has finished and every artifact it names is on disk,
so a driver killed at any moment leaves either a finished stage or none.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

from avprune.prune_job.errors import JobConfigMismatchError, JobFolderInUseError, UntrustedJobFolderError
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
        if self.entries():  # anything already there is read by later stages (Tune unpickles its state)
            check_trusted(self.out_dir)
        if job_file.is_file():
            stored = json.loads(job_file.read_text())
            if not resume and self.finished():
                raise JobFolderInUseError(self.out_dir, self.finished())
            if resume and stored.get("fingerprint") != fingerprint:
                raise JobConfigMismatchError(self.out_dir, str(stored.get("fingerprint")), fingerprint)
            if "owner_uid" in stored and stored["owner_uid"] != _uid():
                raise UntrustedJobFolderError(self.out_dir, f"job.json names owner uid {stored['owner_uid']}, "
                                              f"this user is uid {_uid()}")
        elif self.entries() & {"stages", "search"}:  # what later stages read back, without a job.json
            raise UntrustedJobFolderError(self.out_dir, "it holds job results but no job.json (not a prune job "
                                          "folder this user started)")
        atomic_write_json(
            job_file,
            {"version": STATE_VERSION, "fingerprint": fingerprint, "owner_uid": _uid(), "config": dict(config)},
        )

    def entries(self) -> set[str]:
        """Names in the output folder now (empty when it does not exist)."""
        return {p.name for p in self.out_dir.iterdir()} if self.out_dir.is_dir() else set()

    # ------------------------------------------------------------------ failure
    def fail(self, error: BaseException, *, keep: set[str]) -> None:
        """Leave nothing wrong behind after ``error``: without a finished stage, remove what this run
        added (``keep``: the names that were there before; the folder too when it was created);
        with finished stages, keep them for ``--resume`` and mark the folder failed."""
        finished = self.finished()
        if not finished:
            for name in self.entries() - keep:
                target = self.out_dir / name
                shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
            if not keep and self.out_dir.is_dir() and not any(self.out_dir.iterdir()):
                self.out_dir.rmdir()
            return
        atomic_write_json(self.out_dir / "failed.json", {
            "failed_at": time.time(), "error": type(error).__name__, "message": str(error)[:2000],
            "finished_stages": finished, "resume": "run the same job with --resume to continue"})

    def clear_failed(self) -> None:
        """A run that finished supersedes an earlier failure's marker."""
        (self.out_dir / "failed.json").unlink(missing_ok=True)

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


def _uid() -> int | None:
    return os.getuid() if hasattr(os, "getuid") else None  # no uids on Windows


def check_trusted(out_dir: Path) -> None:
    """Refuse a folder another user could have written: every entry must be owned by this user and
    none writable by everyone (``o+w``). Checked without following links, before anything is read."""
    uid = _uid()
    if uid is None:
        return
    for root, dirs, files in os.walk(out_dir):
        for name in [".", *dirs, *files]:
            path = Path(root) / name if name != "." else Path(root)
            st = path.lstat()
            if st.st_uid != uid:
                raise UntrustedJobFolderError(out_dir, f"{path} is owned by uid {st.st_uid}, not by this user "
                                              f"(uid {uid})")
            if st.st_mode & 0o002 and not path.is_symlink():
                raise UntrustedJobFolderError(out_dir, f"{path} is writable by every user")
