"""Ingest benchmark on full-size MST frames (9576 x 6388 uint16, 122 MB each).

Measures, in one run on the same files:

* ``cp``: copying the FITS files (the floor for any file-to-file step);
* ``astropy``: reading every file with ``astropy.io.fits.getdata`` (plain, serial) and the
  same read spread over the same number of processes as the Dask workers;
* ``mstdask``: ``mstdask.jobs.ingest`` on a LocalCluster (N workers x 1 thread), time from
  submission to the store being complete and synced to disk (cluster start-up excluded), and
  the peak resident memory of each worker process, sampled every 50 ms.

``cp`` and ``mstdask`` both end with ``sync``; the astropy reads come from the page cache
(the files were just written or copied), so they are the floor of "just reading".

Usage (full frames are 122 MB each: 20 frames need ~5 GB of disk, cleaned up afterwards)::

    python benchmarks/bench_ingest.py --frames 20 --workers 2 [--keep] [--workdir /tmp/mstdask_bench]

Prints a JSON record and a Markdown table row for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from _common import RssSampler

FULL = (6388, 9576)


def make_frames(folder: Path, n: int, shape: tuple[int, int], seed: int) -> list[Path]:
    """Simulated science frames (stars, sky, cosmic rays) written as camera-like FITS files."""
    from datetime import timedelta

    from mstdask.testing import DEFAULT_FIELD, CameraModel, fits_header, make_camera, make_star_catalog, write_fits

    folder.mkdir(parents=True, exist_ok=True)
    model = CameraModel(shape=shape)
    camera = make_camera(model, seed=seed)
    rng = np.random.default_rng(seed)
    ra0, dec0 = DEFAULT_FIELD
    scale = model.pixel_scale_arcsec / 3600
    stars = make_star_catalog(ra0, dec0, shape[1] * scale * 1.05, shape[0] * scale * 1.05, rng=rng)
    start = datetime(2023, 1, 18, 12, 0, 0)
    paths = []
    for i in range(n):
        data, _ = camera.science(300.0, ra0, dec0, stars, rng, masks=False)
        header = fits_header(model, "science", start + timedelta(seconds=330 * i), 300.0, ra=ra0, dec=dec0)
        paths.append(write_fits(folder / f"bench_{i:04d}.fits", data, header))
    return paths


def _read_one(path: str) -> int:
    from astropy.io import fits

    # getdata returns a lazy memory map: np.array() makes astropy actually read and scale
    # the pixels into memory, which is what "reading the file" means here.
    return int(np.array(fits.getdata(path)).shape[0])


def time_cp(paths: list[Path], dest: Path) -> float:
    dest.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    subprocess.run(["cp", *map(str, paths), str(dest)], check=True)
    subprocess.run(["sync"], check=True)
    dt = time.perf_counter() - t0
    shutil.rmtree(dest)
    return dt


def time_astropy(paths: list[Path], processes: int) -> float:
    t0 = time.perf_counter()
    if processes == 1:
        for p in paths:
            _read_one(str(p))
    else:
        with ProcessPoolExecutor(processes) as pool:
            list(pool.map(_read_one, map(str, paths)))
    return time.perf_counter() - t0


def time_mstdask(paths: list[Path], store: Path, workers: int, compressor: str) -> tuple[float, dict[int, int], dict]:
    from distributed import Client, LocalCluster

    from mstdask.config import IngestConfig, StoreLayout
    from mstdask.jobs import ingest

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, memory_limit="4GiB",
                      dashboard_address=":0", silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        pids = list(client.run(os.getpid).values())
        sampler = RssSampler(pids)
        idle = {p.pid: p.memory_info().rss for p in sampler.procs}
        sampler.start()
        t0 = time.perf_counter()
        report = ingest(paths, store, client, IngestConfig(layout=StoreLayout(compressor=compressor)), progress=False)
        os.sync()  # like the cp figure: the data is on disk, not only in the page cache
        dt = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
    assert report.ok and len(report.written) == len(paths), report.summary()
    return dt, sampler.peak, idle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="repetitions; medians are reported")
    ap.add_argument("--shape", default="6388x9576")
    ap.add_argument("--workdir", default="/tmp/mstdask_bench")
    ap.add_argument("--keep", action="store_true", help="keep the simulated FITS files")
    ap.add_argument("--compressors", default="lz4,none", help="store compressors to measure (first is the default)")
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split("x"))
    work = Path(args.workdir)
    raw = work / "fits"
    try:
        t0 = time.perf_counter()
        paths = sorted(raw.glob("bench_*.fits"))[: args.frames]
        if len(paths) < args.frames:
            shutil.rmtree(raw, ignore_errors=True)
            paths = make_frames(raw, args.frames, shape, seed=1)
        sim_s = time.perf_counter() - t0
        nbytes = sum(p.stat().st_size for p in paths)
        comps = args.compressors.split(",")
        res: dict[str, list[float]] = {"cp": [], "astropy_serial": [], "astropy_parallel": []}
        res.update({f"mstdask_{c}": [] for c in comps})
        peaks: list[int] = []
        idles: list[int] = []
        store_bytes: dict[str, int] = {}
        for _ in range(args.repeat):
            res["cp"].append(time_cp(paths, work / "copy"))
            res["astropy_serial"].append(time_astropy(paths, 1))
            res["astropy_parallel"].append(time_astropy(paths, args.workers))
            for comp in comps:
                store = work / "bench.zarr"
                shutil.rmtree(store, ignore_errors=True)
                dt, peak, idle = time_mstdask(paths, store, args.workers, comp)
                res[f"mstdask_{comp}"].append(dt)
                peaks.extend(peak.values())
                idles.extend(idle.values())
                store_bytes[comp] = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
                shutil.rmtree(store)
        med = {k: statistics.median(v) for k, v in res.items()}
        record = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores "
                       f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
            "frames": len(paths), "shape": list(shape), "workers": args.workers, "repeat": args.repeat,
            "fits_bytes": nbytes, "store_bytes": store_bytes, "simulate_s": round(sim_s, 1),
            "median_s": {k: round(v, 3) for k, v in med.items()},
            "MB_per_s": {k: round(nbytes / 1e6 / v, 1) for k, v in med.items()},
            "ratio_to_astropy_serial": {c: round(med[f"mstdask_{c}"] / med["astropy_serial"], 2) for c in comps},
            "ratio_to_cp": {c: round(med[f"mstdask_{c}"] / med["cp"], 2) for c in comps},
            "peak_worker_rss_MB": round(max(peaks) / 1e6),
            "idle_worker_rss_MB": round(max(idles) / 1e6),
        }
        print(json.dumps(record, indent=2))
        mb = record["MB_per_s"]
        print(f"| {record['date'][:10]} | {len(paths)} x {shape[1]}x{shape[0]} | {args.workers} | {mb['cp']} | "
              f"{mb['astropy_serial']} | " + " | ".join(str(mb[f"mstdask_{c}"]) for c in comps)
              + f" | {record['ratio_to_cp'][comps[0]]} | {record['peak_worker_rss_MB']} |")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
