"""Night-calibration benchmark on full-size MST frames (6388 x 9576 uint16, 122 MB each).

One simulated night (``mstdask.testing.write_survey``: 10 bias, 20 twilight flats, 3 darks and
the 100-frame pepper-and-salt bias sequence, no science) is written once and used for three
measurements, each beside a peer measured in the same run on the same frames:

1. **Master bias of the 10 nightly bias frames**: ``mstdask.stir.calib.master_bias`` (3-sigma
   clipped mean, median centre, up to 5 iterations) on the frames of the ingested store,
   computed on the cluster (time from graph submission to the NumPy result), against
   ``ccdproc.combine`` (average, 3-sigma clip with ``np.ma.median``/``np.ma.std``) on
   ``CCDData`` read from the FITS files, and against plain NumPy (``np.mean`` and
   ``np.median`` over the in-memory stack). The mstdask master is checked against an
   astropy ``sigma_clip`` reference and a pure-NumPy clipped mean on a cut-out.
2. **PS map of the 100-frame bias sequence** (12 GB of raw pixels):
   ``mstdask.stir.calib.ps_map`` + ``ps_summary`` on the cluster, peak RSS per worker, against
   ``numpy.std`` over an in-memory cut-out stack (100 x cutout x cutout), extrapolated to
   the full frame by pixel count (a full in-memory stack would need 12 GB as uint16, 49 GB as
   float64). The PS map is checked against the simulator's truth map and the std against
   NumPy's on the cut-out.
3. **The whole night end to end**: ``mstdask.jobs.ingest`` + ``mstdask.jobs.calibrate``
   from the FITS folder (simulation excluded, reported separately), peak RSS per worker and
   of the driver, the time between calibrate's successive ``client.compute`` calls (which
   product the time goes to) and the workers' compute time per task prefix.

The night's store (from the last repetition of 3) is the store of 1 and 2. Every mstdask
measurement gets a fresh LocalCluster (N workers x 1 thread, ``memory_limit`` 4 GiB;
start-up excluded); the peers run in this process while no cluster is up.

Usage (133 full frames: ~16 GB of FITS + ~10 GB of store; on 2 cores ~37 min with
--night-repeat 2, ~23 min with one night; the work folder is removed at the end unless --keep)::

    python benchmarks/bench_calib.py [--repeat 3] [--night-repeat 1] [--workdir /tmp/mstdask_bench_calib]

Prints a JSON record and Markdown table rows for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from _common import cluster, mb, med, sampled

FULL = (6388, 9576)
GiB = 2**30


# ----------------------------------------------------------------------------- helpers
def fits_paths(truth, **criteria) -> list[str]:
    return [str(p) for p in truth.paths(**criteria)]


def read_stack(paths: list[str], cut: tuple[slice, slice] | None = None) -> np.ndarray:
    """Frames (or one cut-out of each, read through ``section``) as a uint16 stack."""
    from astropy.io import fits

    out = None
    for i, p in enumerate(paths):
        with fits.open(p, memmap=False) as hdul:  # BZERO-scaled data cannot be memory-mapped
            data = np.asarray(hdul[0].section[cut] if cut is not None else hdul[0].data, dtype=np.uint16)
        if out is None:
            out = np.empty((len(paths), *data.shape), dtype=np.uint16)
        out[i] = data
    return out


def store_frames(store: Path, sequence: str):
    """Bias frames of the store: the nightly ones (``_bias_``) or the PS sequence (``_psbias_``)."""
    from mstdask.store import open_store

    ds = open_store(store)
    tag = "_psbias_" if sequence == "ps" else "_bias_"
    sel = (ds.imagetyp.values == "bias") & np.array([tag in os.path.basename(str(p)) for p in ds.path.values])
    return ds.raw.isel(frame=np.flatnonzero(sel))


def numpy_clipped_mean(stack: np.ndarray, sigma: float, maxiters: int) -> np.ndarray:
    """Independent reference: iterative per-pixel clip (median centre, std, keep
    centre - sigma*std <= x <= centre + sigma*std), then the mean of the kept values."""
    x = stack.astype(np.float64)
    keep = np.ones(x.shape, dtype=bool)
    for _ in range(maxiters):
        xm = np.where(keep, x, np.nan)
        c = np.nanmedian(xm, axis=0)
        s = np.nanstd(xm, axis=0)
        new = keep & (x >= c - sigma * s) & (x <= c + sigma * s)
        if (new == keep).all():
            break
        keep = new
    return np.nanmean(np.where(keep, x, np.nan), axis=0)


def float32_ulps(a: np.ndarray, b: np.ndarray) -> float:
    """Largest difference in units of float32 spacing at the values' magnitude."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.spacing(np.abs(b).astype(np.float32)).astype(np.float64)))


# ----------------------------------------------------------------------------- 0. simulate
def simulate(folder: Path, shape: tuple[int, int], n_ps_bias: int, seed: int):
    from mstdask.testing import write_survey

    t0 = time.perf_counter()
    truth = write_survey(folder, nights=1, shape=shape, n_bias=10, n_flat=20, n_dark=3, n_science=0,
                         ps_bias_night=0, n_ps_bias=n_ps_bias, seed=seed)
    sim_s = time.perf_counter() - t0
    cam = truth.cameras[truth.telescopes[0]]
    ps_truth = cam.ps_map
    cam.clear_cache()
    return truth, sim_s, ps_truth


# ----------------------------------------------------------------------------- 3. the night
def night(fits_dir: Path, store: Path, out: Path, workers: int) -> dict:
    from distributed import get_task_stream
    from distributed.utils import key_split

    from mstdask.jobs import calibrate, ingest

    with cluster(workers) as (client, pids):
        calls: list[tuple[float, str]] = []
        orig = client.compute

        def compute(obj, *args, **kwargs):  # note when calibrate submits each product's graph
            objs = obj if isinstance(obj, (list, tuple)) else [obj]
            calls.append((time.perf_counter(), "+".join(sorted({key_split(getattr(o, "name", "?")) for o in objs}))))
            return orig(obj, *args, **kwargs)

        with sampled(pids, driver=True) as peak, get_task_stream(client) as ts:
            t0 = time.perf_counter()
            irep = ingest([fits_dir], store, client, progress=False)
            t1 = time.perf_counter()
            client.compute = compute
            crep = calibrate(store, out, client, progress=False, argv=["bench_calib"])
            t2 = time.perf_counter()
            client.compute = orig
    assert irep.ok, irep.summary()
    # time from each compute call to the next (graph + compute + gather + writing the product)
    names = ["master_bias", "ps_mask", "bad_pixel_mask", "flat_levels", "small_scale_flat", "master_flat"]
    marks = [t for t, _ in calls] + [t2]
    steps = {}
    for i, (t, label) in enumerate(calls):
        name = names[i] if len(calls) == len(names) else f"{i}:{label}"
        steps[name] = round(marks[i + 1] - t, 1)
    steps["before_first_compute"] = round(calls[0][0] - t1, 1) if calls else None
    busy: dict[str, float] = {}
    for task in ts.data:
        for ss in task.get("startstops", []):
            if ss.get("action") == "compute":
                k = key_split(task["key"])
                busy[k] = busy.get(k, 0.0) + ss["stop"] - ss["start"]
    worker_peaks = [v for p, v in peak.items() if p != os.getpid()]
    ps_entry = next((p for p in crep.products if p["kind"] == "ps_mask"), {})
    return {
        "ingest_s": t1 - t0, "calibrate_s": t2 - t1, "total_s": t2 - t0,
        "frames_written": len(irep.written), "ingest_MB_per_s": round(irep.bytes_written / 1e6 / (t1 - t0), 1),
        "products": sorted(p["kind"] for p in crep.products), "skipped": crep.skipped, "notes": crep.notes,
        "calibrate_steps_s": steps,
        "worker_compute_s_by_prefix": {k: round(v, 1) for k, v in sorted(busy.items(), key=lambda kv: -kv[1])},
        "worker_busy_fraction": round(sum(busy.values()) / (workers * (t2 - t0)), 2),
        "peak_worker_rss": worker_peaks, "peak_driver_rss": peak.get(os.getpid(), 0),
        "ps_fraction": ps_entry.get("ps_fraction"), "ps_frames": ps_entry.get("n_inputs"),
        "master_bias_frames": next((p["n_inputs"] for p in crep.products if p["kind"] == "master_bias"), None),
    }


# ----------------------------------------------------------------------------- 1. master bias
def bias_mstdask(store: Path, workers: int):
    from mstdask.stir.calib import master_bias

    with cluster(workers) as (client, pids):
        frames = store_frames(store, "nightly")
        g0 = time.perf_counter()
        mb_ = master_bias(frames)
        graph_s = time.perf_counter() - g0
        with sampled(pids) as peak:
            t0 = time.perf_counter()
            arr = client.compute(mb_.data).result()
            dt = time.perf_counter() - t0
    return dt, graph_s, list(peak.values()), arr, int(frames.sizes["frame"]), mb_.data.chunksize


def bias_ccdproc(paths: list[str], mem_limit: float):
    import ccdproc
    from astropy.nddata import CCDData

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        ccds = [CCDData.read(p, unit="adu") for p in paths]
        read_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        out = ccdproc.combine(ccds, method="average", sigma_clip=True, sigma_clip_low_thresh=3,
                              sigma_clip_high_thresh=3, sigma_clip_func=np.ma.median, sigma_clip_dev_func=np.ma.std,
                              mem_limit=mem_limit)
        combine_s = time.perf_counter() - t1
    return read_s, combine_s, np.asarray(out.data)


# ----------------------------------------------------------------------------- 2. PS map
def ps_mstdask(store: Path, workers: int, cut: tuple[slice, slice]):
    from mstdask.stir.calib import ps_map, ps_summary

    with cluster(workers) as (client, pids):
        frames = store_frames(store, "ps")
        ps = ps_map(frames)
        summ = ps_summary(ps)
        wanted = [ps["ps"].data, summ["fraction"].data, summ["group_fraction"].data, summ["agreement"].data,
                  ps["std"].data[cut]]
        with sampled(pids) as peak:
            t0 = time.perf_counter()
            res = client.gather(client.compute(wanted))
            dt = time.perf_counter() - t0
    return dt, list(peak.values()), res, int(frames.sizes["frame"]), ps["std"].data.chunksize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="repetitions of measurements 1 and 2 (medians)")
    ap.add_argument("--night-repeat", type=int, default=1, help="repetitions of the whole night (3)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shape", default="6388x9576", help="frame shape NYxNX")
    ap.add_argument("--n-ps-bias", type=int, default=100)
    ap.add_argument("--cutout", type=int, default=1000, help="edge of the cut-out of the checks and numpy peers")
    ap.add_argument("--ccdproc-mem-limit", type=float, default=4e9, help="ccdproc.combine mem_limit (bytes)")
    ap.add_argument("--workdir", default="/tmp/mstdask_bench_calib")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the work folder (FITS, store, products)")
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.lower().split("x"))
    ny, nx = shape
    work = Path(args.workdir)
    n_frames = 10 + 20 + 3 + args.n_ps_bias
    frame_bytes = ny * nx * 2
    # FITS + store (<= raw size) + products and slack
    need = n_frames * frame_bytes * 2 + 2 * GiB
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, this run needs ~{need / 1e9:.1f} GB; "
                         "lower --n-ps-bias or use another --workdir")
    c = min(args.cutout, ny, nx)
    cut = (slice(0, c), slice(0, c))  # the corner: PS pixels are densest near the edges
    load = {"start": [round(v, 2) for v in os.getloadavg()]}
    record: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GiB:.0f} GiB",
        "shape": list(shape), "workers": args.workers, "repeat": args.repeat, "night_repeat": args.night_repeat,
        "disk_free_GB_before": round(free / 1e9, 1),
    }
    try:
        # 0. simulate the night once
        truth, sim_s, ps_truth = simulate(work / "night", shape, args.n_ps_bias, args.seed)
        fits_bytes = sum(Path(p).stat().st_size for p in fits_paths(truth))
        record.update(simulate_s=round(sim_s, 1), fits_frames=len(truth.frames), fits_bytes=fits_bytes,
                      ps_truth_fraction=float(ps_truth.mean()))
        print(f"simulated {len(truth.frames)} frames ({fits_bytes / 1e9:.1f} GB) in {sim_s:.0f} s", flush=True)

        # 3. the night, end to end (its last store is the store of 1 and 2)
        store, out = work / "raw.zarr", work / "products"
        nights = []
        for r in range(args.night_repeat):
            shutil.rmtree(store, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            nights.append(night(work / "night", store, out, args.workers))
            print(f"night {r + 1}: ingest {nights[-1]['ingest_s']:.0f} s + calibrate {nights[-1]['calibrate_s']:.0f} s",
                  flush=True)
        store_bytes = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        last = nights[-1]
        record["night"] = {
            "frames": len(truth.frames),
            "median_s": {k: med([n[k] for n in nights]) for k in ("ingest_s", "calibrate_s", "total_s")},
            "all_total_s": [round(n["total_s"], 1) for n in nights],
            "peak_worker_rss_MB": mb(max(max(n["peak_worker_rss"]) for n in nights)),
            "peak_driver_rss_MB": mb(max(n["peak_driver_rss"] for n in nights)),
            "store_bytes": store_bytes,
            **{k: last[k] for k in ("frames_written", "ingest_MB_per_s", "products", "skipped", "notes",
                                    "calibrate_steps_s", "worker_compute_s_by_prefix", "worker_busy_fraction",
                                    "ps_fraction", "ps_frames", "master_bias_frames")},
        }
        load["after_night"] = [round(v, 2) for v in os.getloadavg()]

        # 1. master bias of the 10 nightly frames
        bias_paths = fits_paths(truth, kind="bias", sequence="nightly")
        t_m, t_graph, peaks_m, t_cr, t_cc, t_read, t_mean, t_median = [], [], [], [], [], [], [], []
        master = ccd = None
        for _ in range(args.repeat):
            dt, gs, pk, master, nb, tile = bias_mstdask(store, args.workers)
            t_m.append(dt), t_graph.append(gs), peaks_m.extend(pk)
        for _ in range(args.repeat):
            rs, cs, ccd = bias_ccdproc(bias_paths, args.ccdproc_mem_limit)
            t_cr.append(rs), t_cc.append(cs)
            ccd = ccd[cut].copy()
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            stack = read_stack(bias_paths)
            t_read.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            np.mean(stack, axis=0)
            t_mean.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            np.median(stack, axis=0)
            t_median.append(time.perf_counter() - t0)
            del stack
        from astropy.stats import sigma_clip

        from mstdask.config import CalibConfig

        cfg = CalibConfig()
        sub = read_stack(bias_paths, cut)
        ref_astropy = sigma_clip(sub, sigma=cfg.clip_sigma, maxiters=cfg.clip_maxiters, axis=0, cenfunc="median",
                                 stdfunc="std", masked=True).mean(axis=0).filled(np.nan)
        ref_numpy = numpy_clipped_mean(sub, cfg.clip_sigma, cfg.clip_maxiters)
        mcut = master[cut]
        m = med(t_m)
        record["master_bias"] = {
            "frames": nb, "stack_tile": list(tile),
            "median_s": {"mstdask": m, "mstdask_graph_build": med(t_graph), "ccdproc_combine": med(t_cc),
                         "ccdproc_read": med(t_cr), "ccdproc_read_plus_combine": med([a + b for a, b in zip(t_cr, t_cc)]),
                         "numpy_read": med(t_read), "numpy_mean": med(t_mean), "numpy_median": med(t_median)},
            "all_s": {"mstdask": [round(v, 2) for v in t_m], "ccdproc_combine": [round(v, 2) for v in t_cc]},
            "ratio_mstdask_to": {"ccdproc_combine": round(m / med(t_cc), 3),
                                 "ccdproc_read_plus_combine": round(m / med([a + b for a, b in zip(t_cr, t_cc)]), 3),
                                 "numpy_mean": round(m / med(t_mean), 2), "numpy_median": round(m / med(t_median), 2)},
            "peak_worker_rss_MB": mb(max(peaks_m)),
            "check_cutout": {
                "pixels": int(mcut.size),
                "max_abs_diff_vs_astropy_sigma_clip": float(np.nanmax(np.abs(mcut - ref_astropy))),
                "max_float32_ulps_vs_astropy": float32_ulps(mcut, ref_astropy),
                "equal_to_float32_astropy": bool(np.array_equal(mcut, ref_astropy.astype(np.float32))),
                "max_abs_diff_vs_numpy_clip": float(np.nanmax(np.abs(mcut - ref_numpy))),
                "max_float32_ulps_vs_numpy_clip": float32_ulps(mcut, ref_numpy),
                "max_abs_diff_vs_ccdproc (1 clip iteration)": float(np.max(np.abs(mcut - ccd))),
                "fraction_differing_from_ccdproc_gt_0.01adu": float(np.mean(np.abs(mcut - ccd) > 0.01)),
            },
        }
        del master, sub
        print("master bias:", json.dumps(record["master_bias"]["median_s"]), flush=True)

        # 2. PS map of the PS bias sequence
        ps_paths = fits_paths(truth, kind="bias", sequence="ps")
        t_ps, peaks_ps = [], []
        res = None
        for _ in range(args.repeat):
            dt, pk, res, nps, tile = ps_mstdask(store, args.workers, cut)
            t_ps.append(dt), peaks_ps.extend(pk)
        ps_np, frac, gfrac, agree, std_cut = res
        t0 = time.perf_counter()
        sub = read_stack(ps_paths, cut)
        read_cut_s = time.perf_counter() - t0
        groups = np.array_split(np.arange(sub.shape[0]), cfg.ps_groups)
        t_std, t_grp = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            ref_std = np.std(sub, axis=0, ddof=1)
            t_std.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for g in groups:  # like for like: each group's mean and std, and the all-frame mean and std
                np.mean(sub[g], axis=0), np.std(sub[g], axis=0, ddof=1)
            np.mean(sub, axis=0), np.std(sub, axis=0, ddof=1)
            t_grp.append(time.perf_counter() - t0)
        scale = (ny * nx) / sub[0].size
        m = med(t_ps)
        tp = int((ps_np & ps_truth).sum())
        record["ps_map"] = {
            "frames": nps, "raw_GB": round(nps * frame_bytes / 1e9, 2), "stack_tile": list(tile),
            "median_s": {"mstdask": m, "numpy_std_cutout": med(t_std), "numpy_std_extrapolated": round(med(t_std) * scale, 1),
                         "numpy_groups_cutout": med(t_grp), "numpy_groups_extrapolated": round(med(t_grp) * scale, 1),
                         "numpy_read_cutout (not timed in peer)": round(read_cut_s, 2)},
            "cutout": list(sub.shape), "extrapolation_factor": round(scale, 2),
            "all_s": {"mstdask": [round(v, 2) for v in t_ps]},
            "ratio_mstdask_to": {"numpy_std_extrapolated": round(m / (med(t_std) * scale), 3),
                                 "numpy_groups_extrapolated": round(m / (med(t_grp) * scale), 3)},
            "mstdask_GB_per_s": round(nps * frame_bytes / 1e9 / m, 2),
            "peak_worker_rss_MB": mb(max(peaks_ps)),
            "ps_fraction": float(frac), "ps_truth_fraction": float(ps_truth.mean()),
            "group_fraction": [float(v) for v in gfrac], "agreement": [float(v) for v in agree],
            "recall_vs_truth": round(tp / max(1, int(ps_truth.sum())), 4),
            "false_positive_fraction": round(1 - tp / max(1, int(ps_np.sum())), 5),
            "std_cutout_max_rel_diff_vs_numpy": float(np.max(np.abs(std_cut - ref_std) / np.maximum(ref_std, 1e-3))),
        }
        del sub, ps_np
        print("ps map:", json.dumps(record["ps_map"]["median_s"]), flush=True)
        load["end"] = [round(v, 2) for v in os.getloadavg()]
        record["loadavg_1_5_15"] = load
        print(json.dumps(record, indent=2, default=str))
        b, p, n = record["master_bias"], record["ps_map"], record["night"]
        print(f"| master bias, {b['frames']} frames | {b['median_s']['mstdask']} s | ccdproc {b['median_s']['ccdproc_combine']} s "
              f"({b['ratio_mstdask_to']['ccdproc_combine']}) | np.mean {b['median_s']['numpy_mean']} s, np.median "
              f"{b['median_s']['numpy_median']} s | {b['peak_worker_rss_MB']} MB |")
        print(f"| PS map, {p['frames']} frames | {p['median_s']['mstdask']} s | np.std extrapolated "
              f"{p['median_s']['numpy_std_extrapolated']} s ({p['ratio_mstdask_to']['numpy_std_extrapolated']}) | "
              f"| {p['peak_worker_rss_MB']} MB |")
        print(f"| night, {n['frames']} frames | {n['median_s']['total_s']} s (ingest {n['median_s']['ingest_s']} + "
              f"calibrate {n['median_s']['calibrate_s']}) | paper 310 s on 64 cores | | {n['peak_worker_rss_MB']} MB |")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
