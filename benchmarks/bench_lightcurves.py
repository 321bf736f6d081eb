"""Light-curve benchmark: the paper's f02 scale (Xiao et al. 2025, section 4.3: ~1 million
sources x ~3000 epochs) reduced to the Fig. 12 and Fig. 14 statistics, and the cross-match
throughput of building a cube from Parquet catalogues.

(a) Reduction. A simulated cube of constant stars with the Eqs. 1-5 noise (``mag`` and
    ``magerr``, float32, 5 % missing epochs; ``--sources x --epochs``, 12 GB per variable at
    full size) is written to Zarr (4096 x 64 chunks, lz4) by
    :func:`mstdask.testing._catalogs.simulate_cube`, then reduced on a LocalCluster of
    2 workers x 1 thread with ``--memory-limit`` per worker:

    * ``library``: :func:`mstdask.lightcurves.source_statistics` (std, 1.4826 MAD, chi2/dof,
      stacked scatter for N = 1, 4, ... 100) then :func:`precision_table` and
      :func:`stacking_table` (the binned Fig. 12 / Fig. 14 curves);
    * ``command``: :func:`mstdask.jobs.precision` (the same, plus ``variability.parquet``
      for every source, the light curves and the three figures).

    Wall time and the peak RSS of each worker are measured. The peer is NumPy: the same
    statistics written with sorts (:func:`mstdask.lightcurves._lc_kernels.block_statistics`) on a
    ``--peer-sources`` slice in this process, extrapolated to the cube on two cores; the
    compiled kernel is timed on the same slice for the per-core comparison.

(b) Cross-match. ``--xm-sources`` stars x ``--xm-epochs`` exposures of synthetic
    catalogues (CATDIR layout, 90 % of the stars in the reference catalogue), built into a
    cube by :func:`mstdask.jobs.lightcurves` on the same cluster; rows per second of
    detections. Peer: astropy ``match_coordinates_sky`` of every exposure against the
    master list in one process (matching only, no cube written).

Usage::

    python benchmarks/bench_lightcurves.py --workdir /tmp/lcbench [--sources 1000000 --epochs 3000]
        [--memory-limit 2GiB] [--skip-write] [--keep]

Prints a JSON record and Markdown tables. The cube is deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from _common import cpu_model, mb, sampled


def local_cluster(memory_limit: str):
    from distributed import Client, LocalCluster

    lc = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit=memory_limit,
                      dashboard_address=None, silence_logs=logging.ERROR)
    client = Client(lc)
    return lc, client, list(client.run(os.getpid).values())


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--sources", type=int, default=1_000_000)
    p.add_argument("--epochs", type=int, default=3000)
    p.add_argument("--memory-limit", default="2GiB")
    p.add_argument("--peer-sources", type=int, default=10_000)
    p.add_argument("--xm-sources", type=int, default=100_000)
    p.add_argument("--xm-epochs", type=int, default=50)
    p.add_argument("--xm-epoch-chunk", type=int, default=16,
                   help="epochs per chunk (and per write task) of the cross-match cube")
    p.add_argument("--skip-write", action="store_true", help="reuse the cube in --workdir")
    p.add_argument("--skip-command", action="store_true", help="do not time mstdask.jobs.precision")
    p.add_argument("--skip-xmatch", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the cube")
    args = p.parse_args()

    import dask
    import xarray
    import zarr

    from mstdask.lightcurves import _lc_kernels as K
    from mstdask import __version__
    from mstdask.config import LightcurveConfig, PrecisionConfig
    from mstdask.lightcurves import open_cube, precision_table, source_statistics, stacking_table
    from mstdask.jobs import lightcurves, precision
    from mstdask.testing import simulate_cube, write_catalogs

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cube = work / "LC.zarr"
    cfg = PrecisionConfig()
    rec: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_model(),
                 "cores": os.cpu_count(), "python": platform.python_version(), "mstdask": __version__,
                 "numpy": np.__version__, "dask": dask.__version__, "xarray": xarray.__version__,
                 "zarr": zarr.__version__, "sources": args.sources, "epochs": args.epochs,
                 "memory_limit": args.memory_limit}
    lc, client, pids = local_cluster(args.memory_limit)
    try:
        # warm the numba cache on the workers (compilation is not part of a reduction)
        client.run(lambda: K.block_statistics_fast(np.ones((2, 8), np.float32), stack_n=(1, 4)))
        if not args.skip_write:
            shutil.rmtree(cube, ignore_errors=True)
            t0 = time.perf_counter()
            simulate_cube(cube, args.sources, args.epochs, client=client)
            rec["write_s"] = round(time.perf_counter() - t0, 1)
            # fresh workers for the measurement: generating the cube leaves their heaps large
            client.restart()
            pids = list(client.run(os.getpid).values())
            client.run(lambda: K.block_statistics_fast(np.ones((2, 8), np.float32), stack_n=(1, 4)))
        rec["cube_bytes_on_disk"] = du(cube)
        rec["cube_bytes_raw"] = 2 * 4 * args.sources * args.epochs

        # (a) library reduction to the Fig. 12 and Fig. 14 statistics
        with sampled(pids, driver=True) as peak:
            t0 = time.perf_counter()
            stats = source_statistics(open_cube(cube), cfg)
            prec, stack = client.compute([precision_table(stats, cfg), stacking_table(stats, cfg)], sync=True)
            rec["library_s"] = round(time.perf_counter() - t0, 1)
        rec["library_peak_rss_mb"] = {("driver" if pid == os.getpid() else f"worker{pids.index(pid)}"): mb(v)
                                      for pid, v in peak.items()}
        good = prec[prec["count"] >= 100]
        rec["fig12_std_over_theory_median"] = round(float(np.median(good["std_median"] / good["theory_total"])), 4)
        s1 = stack[stack["n_stack"] == 1].set_index("mag_center")["scatter_median"]
        s16 = stack[(stack["n_stack"] == 16) & (stack["count"] >= 100)].set_index("mag_center")["scatter_median"]
        rec["fig14_sqrtN_ratio_N16"] = round(float(np.median(s16 * 4 / s1.loc[s16.index])), 4)
        if not args.skip_command:
            with sampled(pids, driver=True) as peak:
                t0 = time.perf_counter()
                rep = precision(cube, work / "prec", client, cfg, progress=False)
                rec["command_s"] = round(time.perf_counter() - t0, 1)
            rec["command_peak_rss_mb"] = {("driver" if pid == os.getpid() else f"worker{pids.index(pid)}"): mb(v)
                                          for pid, v in peak.items()}
            rec["command_summary"] = rep.summary().splitlines()[0]

        # the NumPy peer and the compiled kernel on a slice, in this process
        ds = open_cube(cube).isel(source=slice(0, args.peer_sources))
        m, e = ds["mag"].values, ds["magerr"].values
        t0 = time.perf_counter()
        K.block_statistics(m, e, None, min_epochs=cfg.min_epochs, stack_n=cfg.stack_n)
        peer = time.perf_counter() - t0
        K.block_statistics_fast(m[:4], e[:4], None, stack_n=cfg.stack_n)
        t0 = time.perf_counter()
        K.block_statistics_fast(m, e, None, min_epochs=cfg.min_epochs, stack_n=cfg.stack_n)
        fast = time.perf_counter() - t0
        scale = args.sources / args.peer_sources
        rec["peer_numpy_slice_s"] = round(peer, 2)
        rec["peer_numpy_extrapolated_2cores_s"] = round(peer * scale / 2, 1)
        rec["kernel_slice_s"] = round(fast, 2)
        rec["kernel_extrapolated_2cores_s"] = round(fast * scale / 2, 1)
        del m, e, ds
    finally:
        if not args.keep:
            shutil.rmtree(cube, ignore_errors=True)

    # (b) cross-match throughput
    try:
        if not args.skip_xmatch:
            cat, xcube = work / "xm_cat", work / "xm_LC.zarr"
            shutil.rmtree(cat, ignore_errors=True)
            shutil.rmtree(xcube, ignore_errors=True)
            t0 = time.perf_counter()
            write_catalogs(cat, args.xm_sources, args.xm_epochs, seed=1, n_variables=0, radius_deg=1.5,
                           refcat_fraction=0.9, spurious_per_epoch=args.xm_sources // 100)
            rec["xm_write_catalogs_s"] = round(time.perf_counter() - t0, 1)
            with sampled(pids, driver=True) as peak:
                t0 = time.perf_counter()
                rep = lightcurves(cat, xcube, client, LightcurveConfig(epoch_chunk=args.xm_epoch_chunk), progress=False)
                xm = time.perf_counter() - t0
            rec["xm_rows"] = rep.rows
            rec["xm_s"] = round(xm, 1)
            rec["xm_rows_per_s"] = round(rep.rows / xm)
            rec["xm_sources"] = rep.sources
            rec["xm_new_sources"] = rep.new_sources
            rec["xm_peak_rss_mb"] = {("driver" if pid == os.getpid() else f"worker{pids.index(pid)}"): mb(v)
                                     for pid, v in peak.items()}
            # peer: astropy, one process, matching only
            import astropy.units as u
            import pyarrow.parquet as pq
            from astropy.coordinates import SkyCoord, match_coordinates_sky

            master = open_cube(xcube)
            mcoord = SkyCoord(master["ra"].values * u.deg, master["dec"].values * u.deg)
            files = sorted((cat / "sources").rglob("*.parquet"))
            t0 = time.perf_counter()
            rows = 0
            for f in files:
                t = pq.read_table(f, columns=["ra", "dec", "mag_aper", "magerr_aper", "flags"])
                c = SkyCoord(t["ra"].to_numpy() * u.deg, t["dec"].to_numpy() * u.deg)
                idx, sep, _ = match_coordinates_sky(c, mcoord)
                rows += len(idx)
            peer_xm = time.perf_counter() - t0
            rec["xm_peer_astropy_s"] = round(peer_xm, 1)
            rec["xm_peer_astropy_rows_per_s"] = round(rows / peer_xm)
            shutil.rmtree(cat, ignore_errors=True)
            shutil.rmtree(xcube, ignore_errors=True)
    finally:
        client.close()
        lc.close()

    print(json.dumps(rec, indent=2, default=str))
    print()
    print("| cube | on disk | reduce to Fig. 12 + 14 (library) | `precision` command | peak RSS per worker | "
          "NumPy peer (extrapolated, 2 cores) | kernel alone (extrapolated, 2 cores) |")
    print("|---|---|---|---|---|---|---|")
    w = max(v for k, v in rec["library_peak_rss_mb"].items() if k.startswith("worker"))
    print(f"| {args.sources:,} x {args.epochs} float32 (mag + magerr) | {rec['cube_bytes_on_disk'] / 1e9:.1f} GB | "
          f"{rec['library_s']} s | {rec.get('command_s', '-')} s | {w} MB | "
          f"{rec['peer_numpy_extrapolated_2cores_s']} s | {rec['kernel_extrapolated_2cores_s']} s |")
    if "xm_rows" in rec:
        print()
        print("| catalogues | detections | `lightcurves` (2 workers) | rows/s | "
              "astropy match only (1 process) | rows/s |")
        print("|---|---|---|---|---|---|")
        print(f"| {args.xm_sources:,} stars x {args.xm_epochs} | {rec['xm_rows']:,} | {rec['xm_s']} s | "
              f"{rec['xm_rows_per_s']:,} | {rec['xm_peer_astropy_s']} s | {rec['xm_peer_astropy_rows_per_s']:,} |")


if __name__ == "__main__":
    main()
