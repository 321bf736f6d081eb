"""Helpers shared by the benchmark scripts (run as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import threading
import time


class RssSampler(threading.Thread):
    """Samples the resident memory of a set of processes; keeps each one's peak."""

    def __init__(self, pids: list[int], every: float = 0.05) -> None:
        super().__init__(daemon=True)
        import psutil

        self.procs = [psutil.Process(p) for p in pids]
        self.peak = {p.pid: 0 for p in self.procs}
        self.every = every
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for p in self.procs:
                try:
                    self.peak[p.pid] = max(self.peak[p.pid], p.memory_info().rss)
                except Exception:  # noqa: BLE001 - a worker may be restarting
                    pass
            time.sleep(self.every)
