"""Peak resident memory of this process and all its descendants (a local Ray instance included).

A local Ray instance started by ``ray.init`` runs as children of the driver (GCS, raylet) and
grandchildren (workers), so summing RSS over the process tree, sampled in a thread, bounds what
the whole job holds. For a remote cluster only the driver's share is seen.
"""

from __future__ import annotations

import threading
from types import TracebackType


class PeakRSS:
    """Context manager sampling the tree's total RSS every ``interval_s``; ``.peak_bytes`` after."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        import psutil

        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:  # exited between listing and reading
                continue
        self.peak_bytes = max(self.peak_bytes, total)
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> PeakRSS:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
