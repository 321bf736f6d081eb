"""Helpers shared by the benchmark scripts (run as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import statistics
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


@contextlib.contextmanager
def cluster(workers: int):
    """A fresh LocalCluster (workers x 1 thread, 4 GiB each) and its client; yields
    ``(client, worker_pids)``."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, memory_limit="4GiB",
                      dashboard_address=":0", silence_logs=logging.ERROR) as lc, Client(lc) as client:
        yield client, list(client.run(os.getpid).values())


@contextlib.contextmanager
def sampled(pids: list[int], driver: bool = False):
    """Sample the peak RSS of ``pids`` (and of this process when ``driver``) while inside."""
    sampler = RssSampler(pids + ([os.getpid()] if driver else []))
    sampler.start()
    try:
        yield sampler.peak
    finally:
        sampler.stop.set()
        sampler.join()


def mb(x: float) -> int:
    """Bytes as whole megabytes."""
    return int(round(x / 1e6))


def med(values: list[float]) -> float:
    """Median, rounded to the millisecond."""
    return round(statistics.median(values), 3)


def cpu_model() -> str:
    """The CPU's model name."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
