"""Detector-characterisation benchmark: per-pixel gain and read-noise maps (camera paper
Eqs. 2-3) from 144 full-size flats at one exposure time and 100 bias frames.

A lab set of the simulated MST camera (``mstdask.testing``: 100 bias, 144 flats at 2 s,
plus a short flat ladder and a few darks so ``characterize`` can run end to end) is
written as FITS in batches, each batch ingested into a store and its FITS files removed
(244 full frames are 30 GB of FITS; the store keeps ~65 % of that). Then:

1. **Per-pixel maps**: ``mstdask.lab.detector.frame_moments`` (bias) + ``pixel_gain`` (flats)
   on the store, computed on a fresh LocalCluster (N workers x 1 thread, ``memory_limit``
   4 GiB): time from graph submission to the NumPy maps and medians, peak RSS per worker and
   of the driver (which receives the two float32 maps).
2. **Plain NumPy peer**: the same formulae (``np.mean``, ``np.var(ddof=1)`` over the frame
   axis of in-memory float64 stacks, then Eqs. 2-3) on a cut-out of every frame, timed
   in this process (stacks already in memory), with its peak RSS; extrapolated to the full
   frame by pixel count (a full in-memory float64 stack of the 144 flats would need
   144 x 8 x NY x NX bytes).
3. **Check**: the mstdask maps on the cut-out against the NumPy maps, and the medians
   against the simulator's truth.
4. With ``--characterize``: the whole ``mstdask.jobs.characterize`` on the store (all
   measurements, FITS, figures), time and peak RSS.

Usage (full size, 266 frames: ~20 GB of store and up to ~3 GB of FITS at a time; the work
folder is removed at the end unless --keep)::

    python benchmarks/bench_detector.py [--shape 6388x9576] [--repeat 3] [--characterize]
    python benchmarks/bench_detector.py --shape 600x900 --n-bias 20 --n-flats 24   # a quick check

Prints a JSON record and Markdown table rows for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from _common import cluster, mb, med, sampled

FULL = (6388, 9576)
GiB = 2**30


# ----------------------------------------------------------------------------- helpers
# ----------------------------------------------------------------------------- 0. the lab set
def simulate_and_ingest(work: Path, shape: tuple[int, int], n_bias: int, n_flats: int, batch: int,
                        cut: tuple[slice, slice], workers: int, seed: int) -> dict:
    """Write the lab set as FITS in batches, ingest each batch, delete its FITS.

    Returns the cut-outs of the bias frames and of the flats at 2 s (uint16 stacks), the
    truth maps on the cut-out, and timings.
    """
    from mstdask.jobs import ingest
    from mstdask.testing import CameraModel, fits_header, make_camera, write_fits

    cam = make_camera(CameraModel(shape=shape, telescope="MST3", filter="r"), seed=seed)
    rate = 12500.0  # ADU/s: 25000 ADU at 2 s (paper: 20000-40000)
    plan = [("bias", 0.0, 0.0)] * n_bias + [("flat", 2.0, rate * 2.0)] * n_flats
    plan += [("flat", t, rate * t) for t in (0.2, 0.5, 1.0, 1.5, 2.5, 3.0, 3.5) for _ in range(2)]
    plan += [("dark", t, 0.0) for t in (1.0, 10.0, 60.0, 120.0, 300.0, 600.0)]
    store = work / "lab.zarr"
    fits_dir = work / "fits"
    cuts = {"bias": [], "flat": []}
    t = datetime(2024, 3, 5, 6, 0, 0)
    sim_s = ingest_s = 0.0
    ingested = 0
    with cluster(workers) as (client, _):
        for b0 in range(0, len(plan), batch):
            fits_dir.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            for i, (kind, exptime, level) in enumerate(plan[b0:b0 + batch], start=b0):
                rng = np.random.default_rng([seed, i])
                if kind == "bias":
                    data = cam.bias(rng)[0]
                elif kind == "dark":
                    data = cam.dark(exptime, rng, masks=False)[0]
                else:
                    data = cam.flat(level * (1 + 5e-4 * rng.standard_normal()), 0, rng, exptime=exptime,
                                    gradient=(0.003, -0.002), vignetting=False, masks=False)[0]
                if kind == "bias" or (kind == "flat" and exptime == 2.0):
                    cuts[kind].append(data[cut].copy())
                write_fits(fits_dir / f"MST3_{kind}_{i:04d}.fits", data,
                           fits_header(cam.model, kind, t, exptime, observatory="NAOC detector lab"))
                t += timedelta(seconds=exptime + 3.0)
            sim_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            rep = ingest([fits_dir], store, client, progress=False)
            ingest_s += time.perf_counter() - t0
            if not rep.ok:
                raise SystemExit(rep.summary())
            ingested += len(rep.written)
            shutil.rmtree(fits_dir)
            print(f"  {ingested}/{len(plan)} frames ingested", flush=True)
    truth = {"gain": cam.gain_map[cut].copy(), "read_noise_e": (cam.bias_std_map * cam.gain_map)[cut].copy(),
             "gain_median": float(np.median(cam.gain_map)), "model_gain": cam.model.gain,
             "read_noise_median_e": float(np.median(cam.bias_std_map * cam.gain_map))}
    cam.clear_cache()
    return {"store": store, "frames": len(plan), "simulate_s": sim_s, "ingest_s": ingest_s,
            "bias_cut": np.stack(cuts["bias"]), "flat_cut": np.stack(cuts["flat"]), "truth": truth}


# ----------------------------------------------------------------------------- 1. mstdask maps
def maps_mstdask(store: Path, workers: int, cut: tuple[slice, slice]):
    from mstdask.lab import detector as D
    from mstdask.config import DetectorConfig
    from mstdask.store import open_store

    cfg = DetectorConfig()
    with cluster(workers) as (client, pids):
        ds = open_store(store)
        bias = ds.raw.isel(frame=np.flatnonzero(ds.imagetyp.values == "bias"))
        flats = ds.raw.isel(frame=np.flatnonzero((ds.imagetyp.values == "flat") & (ds.exptime.values == 2.0)))
        g0 = time.perf_counter()
        bm = D.frame_moments(bias, cfg)
        pg = D.pixel_gain(flats, bm, cfg)
        graph_s = time.perf_counter() - g0
        with sampled(pids, driver=True) as peak:
            t0 = time.perf_counter()
            gain, rn, summary = client.gather(client.compute([pg["gain"].data, pg["read_noise"].data,
                                                              pg["summary"]]))
            dt = time.perf_counter() - t0
        tasks = len(pg["gain"].data.__dask_graph__()) + len(pg["summary"].__dask_graph__())
    workers_peak = [v for p, v in peak.items() if p != os.getpid()]
    return {"s": dt, "graph_s": graph_s, "peak_worker_rss": workers_peak, "peak_driver_rss": peak[os.getpid()],
            "gain_cut": gain[cut].copy(), "rn_cut": rn[cut].copy(), "summary": summary,
            "n_bias": int(bias.sizes["frame"]), "n_flats": int(flats.sizes["frame"]), "graph_tasks": tasks,
            "chunks": [list(c[:2]) for c in bm["mean"].data.chunks]}


# ----------------------------------------------------------------------------- 2. numpy peer
def maps_numpy(flat_cut: np.ndarray, bias_cut: np.ndarray):
    """Eqs. 2-3 in plain NumPy on in-memory stacks (float64 means and variances)."""
    fm = np.mean(flat_cut, axis=0, dtype=np.float64)
    fv = np.var(flat_cut, axis=0, ddof=1, dtype=np.float64)
    bmean = np.mean(bias_cut, axis=0, dtype=np.float64)
    bv = np.var(bias_cut, axis=0, ddof=1, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        gain = (fm - bmean) / (fv - bv)
        rn = gain * np.sqrt(bv)
    return gain, rn


# ----------------------------------------------------------------------------- 4. characterize
def characterize_all(store: Path, out: Path, workers: int) -> dict:
    from mstdask.jobs import characterize

    with cluster(workers) as (client, pids):
        with sampled(pids, driver=True) as peak:
            t0 = time.perf_counter()
            rep = characterize(store, out, client, progress=False, argv=["bench_detector"])
            dt = time.perf_counter() - t0
    r = rep.results
    return {"s": round(dt, 1), "products": len(rep.products), "skipped": rep.skipped,
            "peak_worker_rss_MB": mb(max(v for p, v in peak.items() if p != os.getpid())),
            "peak_driver_rss_MB": mb(peak[os.getpid()]),
            **{k: r.get(k) for k in ("gain_e_per_adu", "read_noise_e", "pixel_gain_median_e_per_adu",
                                     "pixel_read_noise_median_e", "dark_current_e_per_pix_s")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="6388x9576", help="frame shape NYxNX")
    ap.add_argument("--n-bias", type=int, default=100)
    ap.add_argument("--n-flats", type=int, default=144, help="flats at 2 s (the series of Eqs. 2-3)")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions of measurements 1 and 2 (medians)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cutout", type=int, default=1000, help="edge of the cut-out of the numpy peer and checks")
    ap.add_argument("--batch", type=int, default=24, help="frames written as FITS before each ingest")
    ap.add_argument("--characterize", action="store_true", help="also time the whole `characterize` (4)")
    ap.add_argument("--workdir", default="/tmp/mstdask_bench_detector")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the work folder (store, products)")
    args = ap.parse_args()
    try:
        shape = tuple(int(v) for v in args.shape.lower().split("x"))
        ny, nx = shape
    except ValueError:
        raise SystemExit(f"--shape must look like 6388x9576, not {args.shape!r}") from None
    work = Path(args.workdir)
    frame_bytes = ny * nx * 2
    n_frames = args.n_bias + args.n_flats + 14 + 6
    need = n_frames * frame_bytes + args.batch * frame_bytes + GiB  # store (<= raw) + one FITS batch + products
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, this run needs ~{need / 1e9:.1f} GB; "
                         "lower --n-flats/--n-bias or use another --workdir")
    c = min(args.cutout, ny, nx)
    y0, x0 = (ny - c) // 2, (nx - c) // 2
    cut = (slice(y0, y0 + c), slice(x0, x0 + c))
    load = {"start": [round(v, 2) for v in os.getloadavg()]}
    record: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GiB:.0f} GiB",
        "shape": list(shape), "workers": args.workers, "repeat": args.repeat, "cutout": [c, c],
        "disk_free_GB_before": round(free / 1e9, 1),
    }
    try:
        # 0. the lab set, in batches
        lab = simulate_and_ingest(work, shape, args.n_bias, args.n_flats, args.batch, cut, args.workers, args.seed)
        store = lab["store"]
        store_bytes = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        record.update(frames=lab["frames"], simulate_s=round(lab["simulate_s"], 1), ingest_s=round(lab["ingest_s"], 1),
                      store_bytes=store_bytes)
        print(f"lab set: {lab['frames']} frames simulated in {lab['simulate_s']:.0f} s, ingested in "
              f"{lab['ingest_s']:.0f} s ({store_bytes / 1e9:.1f} GB store)", flush=True)

        # 1. mstdask
        runs = []
        for _ in range(args.repeat):
            runs.append(maps_mstdask(store, args.workers, cut))
            print(f"mstdask maps: {runs[-1]['s']:.1f} s", flush=True)
        last = runs[-1]
        t_m = med([r["s"] for r in runs])
        load["after_mstdask"] = [round(v, 2) for v in os.getloadavg()]

        # 2. numpy on the cut-out (stacks in memory; reading them is not timed)
        flat_cut, bias_cut = lab["flat_cut"], lab["bias_cut"]
        t_np, peaks_np = [], []
        gain_np = rn_np = None
        for _ in range(args.repeat):
            with sampled([], driver=True) as peak:
                t0 = time.perf_counter()
                gain_np, rn_np = maps_numpy(flat_cut, bias_cut)
                t_np.append(time.perf_counter() - t0)
            peaks_np.append(peak[os.getpid()])
        scale = (ny * nx) / (c * c)
        t_n = med(t_np)

        # 3. checks
        truth = lab["truth"]
        ok = np.isfinite(gain_np) & np.isfinite(last["gain_cut"])
        s = last["summary"]
        record["pixel_maps"] = {
            "bias_frames": last["n_bias"], "flat_frames": last["n_flats"],
            "raw_GB_read": round((last["n_bias"] + last["n_flats"]) * frame_bytes / 1e9, 2),
            "moment_tiles": last["chunks"], "graph_tasks": last["graph_tasks"],
            "median_s": {"mstdask": t_m, "mstdask_graph_build": med([r["graph_s"] for r in runs]),
                         "numpy_cutout": t_n, "numpy_extrapolated": round(t_n * scale, 1)},
            "all_s": {"mstdask": [round(r["s"], 2) for r in runs], "numpy_cutout": [round(v, 3) for v in t_np]},
            "extrapolation_factor": round(scale, 2),
            "ratio_mstdask_to_numpy_extrapolated": round(t_m / (t_n * scale), 3),
            "mstdask_GB_per_s": round((last["n_bias"] + last["n_flats"]) * frame_bytes / 1e9 / t_m, 2),
            "peak_worker_rss_MB": mb(max(max(r["peak_worker_rss"]) for r in runs)),
            "peak_driver_rss_MB": mb(max(r["peak_driver_rss"] for r in runs)),
            "numpy_peak_rss_MB (process, stacks in memory)": mb(max(peaks_np)),
            "numpy_cutout_stack_MB": {"uint16": mb(flat_cut.nbytes + bias_cut.nbytes),
                                      "float64 temporaries (one stack)": mb(flat_cut.size * 8)},
            "numpy_full_frame_float64_stack_GB": round(last["n_flats"] * ny * nx * 8 / 1e9, 1),
            "check_cutout": {
                "pixels": int(c * c), "both_valid_fraction": float(ok.mean()),
                "gain_max_rel_diff_vs_numpy": float(np.max(np.abs(last["gain_cut"][ok] - gain_np[ok])
                                                           / np.abs(gain_np[ok]))),
                "read_noise_max_rel_diff_vs_numpy": float(np.nanmax(np.abs(last["rn_cut"][ok] - rn_np[ok])
                                                                    / np.abs(rn_np[ok]))),
                "gain_corr_with_truth": float(np.corrcoef(last["gain_cut"][ok], truth["gain"][ok])[0, 1]),
            },
            "gain_median_e_per_adu": s["gain_median"], "truth_gain_median": truth["gain_median"],
            "read_noise_median_e": s["read_noise_median"], "truth_read_noise_median_e": truth["read_noise_median_e"],
            "valid_fraction": s["valid_fraction"],
        }
        print("pixel maps:", json.dumps(record["pixel_maps"]["median_s"]), flush=True)

        # 4. the whole command
        if args.characterize:
            record["characterize"] = characterize_all(store, work / "char", args.workers)
            print("characterize:", json.dumps(record["characterize"]), flush=True)
        load["end"] = [round(v, 2) for v in os.getloadavg()]
        record["loadavg_1_5_15"] = load
        print(json.dumps(record, indent=2, default=str))
        p = record["pixel_maps"]
        print(f"| per-pixel gain + read noise, {p['flat_frames']} flats + {p['bias_frames']} bias, {nx}x{ny} | "
              f"{p['median_s']['mstdask']} s ({p['mstdask_GB_per_s']} GB/s) | numpy on {c}x{c} cut-out "
              f"{p['median_s']['numpy_cutout']} s, extrapolated {p['median_s']['numpy_extrapolated']} s "
              f"({p['ratio_mstdask_to_numpy_extrapolated']}) | workers {p['peak_worker_rss_MB']} MB, driver "
              f"{p['peak_driver_rss_MB']} MB; numpy full frame needs {p['numpy_full_frame_float64_stack_GB']} GB |")
        if args.characterize:
            ch = record["characterize"]
            print(f"| characterize, {record['frames']} frames | {ch['s']} s | | workers {ch['peak_worker_rss_MB']} MB, "
                  f"driver {ch['peak_driver_rss_MB']} MB |")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
