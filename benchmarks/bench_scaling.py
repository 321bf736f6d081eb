"""Strong and weak scaling of ``calibrate`` and ``reduce`` (issue 9) on full MST frames.

A simulated night of full 9576 x 6388 frames (``--bias`` bias, a PS bias sequence of
``--ps`` frames per worker of the largest cluster, ``--flats`` twilight flats, ``--science``
science frames; ``calibrate`` makes the master bias, PS mask, bad-pixel mask and master
flat) is ingested once. Then, each on a fresh LocalCluster of
W workers x 1 thread (``memory_limit`` 4 GiB):

* **strong scaling**: the same night on 1 and on 2 workers (and more with ``--workers``);
  efficiency ``E(W) = T(1) / (W T(W))``;
* **weak scaling**: a night with frames proportional to the workers (W = 1: a ``1/W_max``
  share of the bias, PS, flat and science frames; W = W_max: all of them, the strong run);
  efficiency ``T(1) / T(W)``.

For every run: the wall time of ``calibrate`` and ``reduce`` (start-up of the cluster not
counted), the peak resident memory of each worker and of the driver, the products checked
identical between runs on the same night, and a Dask performance report (HTML) per step in
``--reports``. With ``--repeat N`` the strong-scaling runs alternate (1, 2, 1, 2, ...
workers) N times and the medians are quoted: on a shared virtual machine one run varies by
~10 %. It ends with per-frame costs and a projection to a 3000-exposure field.

Run by hand (never in CI); ~20 min and ~11 GB of disk at the peak with the defaults::

    python benchmarks/bench_scaling.py [--bias 10 --flats 10 --science 8] [--workers 1,2] \\
        [--repeat 3] [--workdir /tmp/mstdask_bench_scaling] [--reports scaling_reports]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cluster, cpu_model, mb, sampled  # noqa: E402

SHAPE = (6388, 9576)


def simulate(folder: Path, n_bias: int, n_ps: int, n_flat: int, n_science: int, seed: int) -> float:
    """Write one simulated night of ``SHAPE`` frames; returns the seconds it took."""
    from mstdask.testing import write_survey

    t0 = time.perf_counter()
    write_survey(folder, nights=1, shape=SHAPE, n_bias=n_bias, n_flat=n_flat, n_dark=0, n_science=n_science,
                 ps_bias_night=0, n_ps_bias=n_ps, track_probability=0.25, seed=seed)
    return time.perf_counter() - t0


def one_run(store: Path, out: Path, workers: int, reports: Path, tag: str) -> dict:
    """calibrate + reduce of ``store`` on a fresh cluster of ``workers`` workers."""
    from distributed import performance_report

    from mstdask.jobs import calibrate, reduce

    with cluster(workers) as (client, pids), sampled(pids, driver=True) as peak:
        with performance_report(filename=str(reports / f"{tag}_calibrate.html")):
            t0 = time.perf_counter()
            crep = calibrate(store, out, client, progress=False, argv=["bench_scaling"])
            t1 = time.perf_counter()
        with performance_report(filename=str(reports / f"{tag}_reduce.html")):
            rrep = reduce(store, out, out / "reduced.zarr", client, progress=False, argv=["bench_scaling"])
            t2 = time.perf_counter()
    assert crep.ok, crep.summary()
    assert rrep.ok, rrep.summary()
    workers_peak = [v for p, v in peak.items() if p != os.getpid()]
    return {"workers": workers, "calibrate_s": round(t1 - t0, 1), "reduce_s": round(t2 - t1, 1),
            "frames_reduced": len(rrep.reduced),
            "peak_worker_rss_MB": [mb(v) for v in workers_peak], "peak_driver_rss_MB": mb(peak.get(os.getpid(), 0))}


def same_products(a: Path, b: Path) -> bool:
    """The master calibrations and the reduced frames of two runs are identical."""
    import xarray as xr

    ra, rb = xr.open_zarr(a / "reduced.zarr"), xr.open_zarr(b / "reduced.zarr")
    ok = bool(np.array_equal(ra["data"].values, rb["data"].values, equal_nan=True)
              and np.array_equal(ra["mask"].values, rb["mask"].values))
    for f in sorted(a.glob("*.fits")):
        from astropy.io import fits

        ok &= bool(np.array_equal(fits.getdata(f), fits.getdata(b / f.name), equal_nan=True))
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bias", type=int, default=10)
    ap.add_argument("--ps", type=int, default=30,
                    help="PS bias frames per worker of the largest cluster (30 is the fewest the PS map takes)")
    ap.add_argument("--flats", type=int, default=10)
    ap.add_argument("--science", type=int, default=8)
    ap.add_argument("--workers", default="1,2", help="worker counts, comma-separated (default 1,2)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="strong-scaling runs per worker count, alternating; medians are quoted")
    ap.add_argument("--workdir", default="/tmp/mstdask_bench_scaling")
    ap.add_argument("--reports", default="scaling_reports", help="folder for the Dask performance reports (HTML)")
    ap.add_argument("--phot-s", type=float, default=None,
                    help="photometry seconds per frame per core (bench_photometry.py) for the projection")
    ap.add_argument("--exposures-per-night", type=float, default=30.0,
                    help="science exposures of the field per night, for the calibrations in the projection")
    ap.add_argument("--shape", type=int, nargs=2, default=None, metavar=("NY", "NX"),
                    help="smaller frames, to try the script (default: full MST frames)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--ingest-s", type=float, nargs=2, default=None, metavar=("SECONDS", "FRAMES"),
                    help="ingest time of the full night on 2 workers, when its store is reused")
    ap.add_argument("--keep", action="store_true",
                    help="keep the ingested stores (a later run with the same --workdir reuses them)")
    args = ap.parse_args()
    from mstdask.jobs import ingest

    global SHAPE
    if args.shape:
        SHAPE = tuple(args.shape)
    counts = [int(w) for w in args.workers.split(",")]
    wmax = max(counts)
    work, reports = Path(args.workdir), Path(args.reports)
    reports.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": f"{cpu_model()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d %H:%M"),
                    "shape": list(SHAPE), "strong": [], "weak": []}
    try:
        # the full night and the 1/wmax share of it (weak scaling), each ingested once
        nights = {"full": (args.bias, args.ps * wmax, args.flats, args.science),
                  "share": (max(3, args.bias // wmax), args.ps, max(3, args.flats // wmax),
                            max(1, args.science // wmax))}
        stores = {}
        for name, (nb, nps, nf, ns) in nights.items():
            if (work / f"{name}.zarr").exists() and not (work / f"fits_{name}").exists():
                # a store ingested by an earlier, interrupted run of this script (--keep)
                stores[name] = work / f"{name}.zarr"
                result[f"{name}_night"] = {"reused": True, "bias": nb, "ps_bias": nps, "flats": nf, "science": ns}
                print(f"{name} night: reusing {stores[name]}", flush=True)
                continue
            shutil.rmtree(work / f"fits_{name}", ignore_errors=True)
            shutil.rmtree(work / f"{name}.zarr", ignore_errors=True)
            sim_s = simulate(work / f"fits_{name}", nb, nps, nf, ns, args.seed)
            with cluster(2) as (client, _):
                t0 = time.perf_counter()
                irep = ingest([work / f"fits_{name}"], work / f"{name}.zarr", client, progress=False)
                ing_s = time.perf_counter() - t0
            assert irep.ok, irep.summary()
            shutil.rmtree(work / f"fits_{name}")  # the store is the input from here on
            stores[name] = work / f"{name}.zarr"
            result[f"{name}_night"] = {"frames": len(irep.written), "simulate_s": round(sim_s, 1),
                                       "ingest_s_2_workers": round(ing_s, 1), "bias": nb, "ps_bias": nps,
                                       "flats": nf, "science": ns}
            print(f"{name} night: {len(irep.written)} frames, simulated {sim_s:.0f} s, ingested {ing_s:.0f} s",
                  flush=True)
        runs: dict[int, list[dict]] = {w: [] for w in counts}
        for k in range(args.repeat):
            for w in counts:
                shutil.rmtree(work / f"out_full_{w}", ignore_errors=True)
                tag = f"strong_{w}w" + (f"_run{k + 1}" if args.repeat > 1 else "")
                r = one_run(stores["full"], work / f"out_full_{w}", w, reports, tag)
                runs[w].append(r)
                print(f"strong, {w} workers, run {k + 1}: {r}", flush=True)
        for w in counts:
            rs = runs[w]
            result["strong"].append({
                "workers": w, "runs": len(rs),
                "calibrate_s": round(float(np.median([r["calibrate_s"] for r in rs])), 1),
                "reduce_s": round(float(np.median([r["reduce_s"] for r in rs])), 1),
                "calibrate_runs_s": [r["calibrate_s"] for r in rs], "reduce_runs_s": [r["reduce_s"] for r in rs],
                "frames_reduced": rs[0]["frames_reduced"],
                "peak_worker_rss_MB": [max(v) for v in zip(*(r["peak_worker_rss_MB"] for r in rs))],
                "peak_driver_rss_MB": max(r["peak_driver_rss_MB"] for r in rs)})
        shutil.rmtree(work / "out_share_1", ignore_errors=True)
        share = one_run(stores["share"], work / "out_share_1", 1, reports, "weak_1w")
        result["weak"] = [share, next(r for r in result["strong"] if r["workers"] == wmax)]
        print(f"weak, 1 worker (1/{wmax} of the night): {share}", flush=True)
        base = work / f"out_full_{counts[0]}"
        result["identical_products"] = all(same_products(base, work / f"out_full_{w}") for w in counts[1:])

        s1 = next(r for r in result["strong"] if r["workers"] == 1)
        for r in result["strong"]:
            for step in ("calibrate", "reduce"):
                r[f"{step}_efficiency"] = round(s1[f"{step}_s"] / (r["workers"] * r[f"{step}_s"]), 3)
        wk = result["weak"][1]
        result["weak_efficiency"] = {step: round(share[f"{step}_s"] / wk[f"{step}_s"], 3)
                                     for step in ("calibrate", "reduce")}
        # per-frame costs (worker-seconds) and the projection to a 3000-exposure field
        ing = result["full_night"]
        if args.ingest_s is not None:
            ing.update(ingest_s_2_workers=args.ingest_s[0], frames=int(args.ingest_s[1]))
        costs = {"ingest_s_per_frame": 2 * ing["ingest_s_2_workers"] / ing["frames"],
                 "reduce_s_per_frame": s1["reduce_s"] / args.science,
                 "calibrate_s_per_night": s1["calibrate_s"]}
        if args.phot_s:
            costs["photometry_s_per_frame"] = args.phot_s
        result["costs_worker_s"] = {k: round(v, 2) for k, v in costs.items()}
        eff = min(result["strong"][-1]["reduce_efficiency"], 1.0)
        per_frame = costs["ingest_s_per_frame"] + costs["reduce_s_per_frame"] + costs.get("photometry_s_per_frame", 0)
        nights = 3000 / args.exposures_per_night
        proj = {}
        for n in (2, 16, 64, 256):
            proj[n] = round((3000 * per_frame + nights * costs["calibrate_s_per_night"]) / (n * eff) / 3600, 2)
        result["projection_3000_hours"] = {"assumed_efficiency": eff, "worker_s_per_frame": round(per_frame, 1),
                                           "nights": nights, "hours_by_workers": proj}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
