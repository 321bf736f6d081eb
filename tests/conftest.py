"""Shared fixtures: one embedded Dask cluster per test session, real data paths, FITS makers."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MSTDASK_SHARED_DATA", REPO.parent / "shared" / "data"))
SHEFFIELD = SHARED_DATA / "sheffield_qsi532_m51"
HUNTSMAN = SHARED_DATA / "huntsman_asi183mm"


def need_shared(path: Path) -> Path:
    """Skip (loudly) when the shared real frames are not beside the checkout."""
    if not path.exists():
        pytest.skip(f"real test data not found at {path} (set MSTDASK_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def client():
    """A 2-worker, 1-thread-per-worker LocalCluster shared by the whole session."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="3GiB",
                           dashboard_address=None, silence_logs=logging.ERROR)
    with Client(cluster) as c:
        yield c
    cluster.close()


def write_frame(path: Path, data: np.ndarray, **header) -> Path:
    """Write a minimal camera-like FITS frame (uint16 -> BITPIX 16 + BZERO 32768)."""
    hdr = fits.Header()
    defaults = {"IMAGETYP": "Light Frame", "DATE-OBS": "2023-01-18T13:00:00.000000", "EXPTIME": 300.0,
                "FILTER": "g", "TELESCOP": "MST2", "INSTRUME": "ZWO ASI6200MM Pro"}
    for key, value in {**defaults, **header}.items():
        if value is not None:
            hdr[key] = value
    fits.PrimaryHDU(data=data, header=hdr).writeto(path, overwrite=True)
    return path


@pytest.fixture(scope="session")
def static_night(client, tmp_path_factory):
    """A simulated night (4 science frames, 900 x 1400) ingested, calibrated, reduced and
    measured by `mstdask photometry`: ``(root, truth, rc)`` with ``root/raw``, ``root/raw.zarr``,
    ``root/cal``, ``root/red/reduced.zarr`` and the catalogue folder ``root/cat``. Shared by
    the photometry, coadd and light-curve tests (treat it as read-only)."""
    from mstdask.cli import main
    from mstdask.jobs import calibrate, ingest, reduce
    from mstdask.testing import write_survey

    root = tmp_path_factory.mktemp("static")
    truth = write_survey(root / "raw", nights=1, shape=(900, 1400), n_bias=5, n_flat=6, n_dark=3, n_science=4,
                         n_ps_bias=30, track_probability=0.0, star_density=12000.0,
                         mag_range=(11.0, 18.0), seed=21)
    assert ingest([root / "raw"], root / "raw.zarr", client, progress=False).ok
    assert calibrate(root / "raw.zarr", root / "cal", client, progress=False).ok
    assert reduce(root / "raw.zarr", root / "cal", root / "red" / "reduced.zarr", client, progress=False).ok
    rc = main(["photometry", str(root / "red" / "reduced.zarr"), "--refcat", str(truth.refcat_path),
               "--out", str(root / "cat"), "--quiet", "--cluster", client.scheduler.address])
    return root, truth, rc


@pytest.fixture
def frames(tmp_path):
    """Eight small good frames of one night (2 bias, 2 flats, 4 science) and their pixels."""
    rng = np.random.default_rng(42)
    folder = tmp_path / "raw"
    folder.mkdir()
    truth = {}
    kinds = ["Bias Frame"] * 2 + ["Flat Field"] * 2 + ["Light Frame"] * 4
    for i, kind in enumerate(kinds):
        data = rng.integers(400, 60000, size=(64, 96), dtype=np.uint16)
        data[0, 0], data[-1, -1] = 0, 65535  # the extremes must survive exactly
        path = write_frame(folder / f"f{i:02d}.fits", data, IMAGETYP=kind,
                           **{"DATE-OBS": f"2023-01-18T{12 + i // 4:02d}:{(i * 7) % 60:02d}:00.000000",
                              "EXPTIME": 0.0 if "Bias" in kind else 300.0})
        truth[str(path)] = data
    return folder, truth


def stack_frames(frames: list[np.ndarray], kind: str, night: str = "2023-01-18", exptime: float = 0.0):
    """Frames as a lazy ``(frame, y, x)`` DataArray with the coordinates a store gives
    (imagetyp, path, time, night, exptime), one frame per chunk."""
    import dask.array
    import pandas as pd
    import xarray as xr

    n = len(frames)
    return xr.DataArray(
        dask.array.from_array(np.stack(frames), chunks=(1, *frames[0].shape)), dims=("frame", "y", "x"),
        coords={"imagetyp": ("frame", [kind] * n),
                "path": ("frame", [f"/sim/{night}/{kind}_{i:03d}.fits" for i in range(n)]),
                "time": ("frame", pd.date_range(f"{night}T10:40", periods=n, freq="15s").values),
                "night": ("frame", [night] * n), "exptime": ("frame", [exptime] * n)}, name="raw")


def start_process(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start a scheduler or worker process in a session of its own (so that stopping its
    group also stops a nanny's worker process), logging to ``log``."""
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=log.parent, start_new_session=True)


def stop_processes(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """SIGTERM every process group (last started first), SIGKILL what is still there after
    ``grace_s`` seconds (at once when 0)."""
    if grace_s > 0:
        for p in reversed(procs):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in reversed(procs):
        if grace_s > 0:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        # Also when the leader has exited: a worker process of its nanny may still be there.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)
