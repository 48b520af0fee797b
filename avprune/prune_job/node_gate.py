"""A node-wide gate: a trial times latency only while every other trial on its node has paused training.

Why: a prune job runs its candidates side by side, one per slot. Timed while another trial trains,
a candidate's ONNX Runtime graph (2 intra-op threads on 2 cores) waits at every operator's thread
barrier for the core the trainer holds, a cost per operator rather than per MAC. The pruned graph
has as many operators as the dense one, so the paired ratio is squeezed toward 1: measured here, a
1.55x model read 1.32x against the dense graph with one trainer at equal priority on the other core.
The allocation controller then read its table as under-predicting by ~25% and cut channels it did
not need to cut (``benchmarks/RESULTS.md``, prune_job). Pairing with the dense graph cancels load
that slows both graphs alike, not this.

The gate is two ``flock`` locks on files beside each other (released by the kernel if a holder dies):

- *main*: every trainer holds it shared while it trains; a measurement holds it exclusively.
- *turnstile*: a measurement takes it first, so trainers arriving at their next step wait behind the
  measurement instead of renewing their shared hold forever (Linux ``flock`` lets new shared holders
  past a waiting exclusive one).

A trainer calls :meth:`NodeGate.yield_to_measurements` between steps (a train hook); a measurement
runs inside :meth:`NodeGate.exclusive`. A trainer pauses for at most a measurement and its own
in-flight step; a measurement waits for at most one training step of each other trial.
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


class NodeGate:
    """Trainers hold the gate shared, measurements exclusively; one gate per job folder and node.

    ``folder`` holds ``measure.lock`` (main) and ``measure.turnstile``. Not thread-safe: one gate
    object per process.
    """

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self._main: IO[Any] = open(folder / "measure.lock", "a")  # noqa: SIM115 - held for the gate's life
        self._turn: IO[Any] = open(folder / "measure.turnstile", "a")  # noqa: SIM115
        self._training = False
        self.waited_s = 0.0  # time this process spent paused for other trials' measurements

    def start_training(self) -> None:
        """Hold the gate shared (idempotent): measurements elsewhere now wait for this trainer's step."""
        if not self._training:
            self._pass_turnstile()
            fcntl.flock(self._main, fcntl.LOCK_SH)
            self._training = True

    def stop_training(self) -> None:
        """Release the shared hold (idempotent): measurements elsewhere no longer wait for this process."""
        if self._training:
            fcntl.flock(self._main, fcntl.LOCK_UN)
            self._training = False

    def _pass_turnstile(self) -> None:
        t0 = time.perf_counter()
        fcntl.flock(self._turn, fcntl.LOCK_SH)  # blocks while a measurement holds the turnstile
        fcntl.flock(self._turn, fcntl.LOCK_UN)
        self.waited_s += time.perf_counter() - t0

    def yield_to_measurements(self, ctx: object = None) -> None:
        """Between two training steps (usable as a train hook): let a waiting measurement run first."""
        if not self._training:
            self.start_training()
            return
        fcntl.flock(self._main, fcntl.LOCK_UN)
        self._pass_turnstile()
        fcntl.flock(self._main, fcntl.LOCK_SH)

    __call__ = yield_to_measurements

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Every other trainer on the node paused, and no other measurement running, for the block."""
        was_training = self._training
        self.stop_training()  # our own shared hold would block our exclusive one
        fcntl.flock(self._turn, fcntl.LOCK_EX)
        try:
            fcntl.flock(self._main, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._main, fcntl.LOCK_UN)
        finally:
            fcntl.flock(self._turn, fcntl.LOCK_UN)
            if was_training:
                self.start_training()

    def close(self) -> None:
        self.stop_training()
        self._main.close()
        self._turn.close()

    def __enter__(self) -> NodeGate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
