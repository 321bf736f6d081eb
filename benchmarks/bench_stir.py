"""Per-frame STIR benchmark on a full-size MST science frame (9576 x 6388), one core.

For each simulated science frame (``mstdask.testing``: stars of a 10000 per square degree
catalogue, sky, pepper & salt, bad pixels, three satellite tracks of 4-40 sigma per pixel,
cosmic rays at the given rate), the kernels of ``mstdask.stir._stir_kernels`` are timed one
after the other, as one task runs them:

* ``reduce_frame`` ((raw - bias) / flat, the camera's truth bias and small-scale flat);
* ``estimate_background`` (shared by the two detectors);
* ``detect_tracks`` (2x2 binning, matched filter, skeletons, Hough, verification, band);
* ``detect_cosmic_rays`` (astroscrappy with the MST parameters, on candidate cut-outs).

The step's memory is reported as the peak RSS of the process (sampled every 20 ms) and as
the peak of the arrays it allocates (tracemalloc, one more untimed run; the inputs, raw
frame, bias, flat and mask, are not counted there).

Beside them, on the same frame, the peers (each run once):

* ``skimage.transform.hough_line`` + ``hough_line_peaks`` on the plain 2x2-binned frame
  thresholded at median + 3 sigma, default 180 angles (the paper's "bin 2 and Hough");
* ``astroscrappy.detect_cosmics`` with its default parameters (4 iterations) on the whole
  frame, and with the MST parameters on the whole frame (``cr_region="full"``, checked
  equal to the candidate run).

Accuracy on the same frame against simulator truth: per-track recall of the truth track
pixels, flagged pixels farther than 15 px from every track, cosmic-ray event and pixel
recall, star cores (unsaturated, peak > 5 sigma) with a false cosmic-ray flag, for ours and
for default astroscrappy. Peak resident memory is sampled every 20 ms during the STIR step
(the simulator's maps are dropped first); see above for tracemalloc.

Threads: ``--threads 1`` (default) sets OMP/BLAS/numba threads to 1 before numpy loads.

Usage (~3-6 min per frame with the peers; ~6 GB of memory while simulating)::

    python benchmarks/bench_stir.py [--repeat 3] [--cr-rates 4e-9,default] [--peer-frames 1]

Prints a JSON record and Markdown table rows (for BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import sys


def _set_threads(n: int) -> None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(n)


if __name__ == "__main__":  # before numpy is imported anywhere
    _threads = 1
    for i, a in enumerate(sys.argv):
        if a == "--threads" and i + 1 < len(sys.argv):
            _threads = int(sys.argv[i + 1])
        elif a.startswith("--threads="):
            _threads = int(a.split("=", 1)[1])
    _set_threads(_threads)

import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402

import numpy as np  # noqa: E402
from _common import RssSampler, cpu_model  # noqa: E402

FULL = (6388, 9576)
MB = 1e6




def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def simulate(shape: tuple[int, int], rate: float | None, seed: int) -> dict:
    """One science frame with its calibration, mask and the truth needed for the checks."""
    from mstdask.testing import DEFAULT_FIELD, CameraModel, make_camera, make_star_catalog, random_track

    model = CameraModel(shape=shape) if rate is None else CameraModel(shape=shape, cosmic_ray_rate=rate)
    cam = make_camera(model, seed=seed)
    rng = np.random.default_rng(seed)
    ra0, dec0 = DEFAULT_FIELD
    scale = model.pixel_scale_arcsec / 3600
    stars = make_star_catalog(ra0, dec0, shape[1] * scale * 1.05, shape[0] * scale * 1.05, rng=rng)
    tracks = [random_track(shape, rng, amplitude_range=amp) for amp in ((4.0, 4.05), (8.0, 12.0), (30.0, 40.0))]
    t0 = time.perf_counter()
    raw, truth = cam.science(300.0, ra0, dec0, stars, rng, tracks=tracks, cosmic_rays=True)
    sim_s = time.perf_counter() - t0
    sigma = math.sqrt(truth.sky_e + model.read_noise_e**2) / model.gain
    st = truth.stars
    ok = np.asarray(st["in_frame"] & ~st["saturated"] & (st["peak_adu"] > 5 * sigma))
    frame = {
        "raw": raw,
        "bias": cam.expected_bias_map.astype(np.float32),
        "flat": cam.flat_response(0, vignetting=False).astype(np.float32),
        "mask": cam.bad_pixel_map | cam.ps_map | truth.saturated_mask,
        "gain": model.gain, "read_noise_e": model.read_noise_e, "sigma_adu": sigma,
        "tracks": truth.tracks, "track_masks": [t.mask(shape) for t in truth.tracks],
        "cr_mask": truth.cosmic_ray_mask, "n_cr_events": len(truth.cosmic_rays),
        "star_yx": (np.rint(np.asarray(st["y"])[ok]).astype(int), np.rint(np.asarray(st["x"])[ok]).astype(int)),
        "n_stars": int(np.asarray(st["in_frame"]).sum()), "simulate_s": sim_s,
        "cr_rate": model.cosmic_ray_rate,
    }
    cam.clear_cache()
    return frame


def near_tracks(tracks, shape, dist: float) -> np.ndarray:
    """Pixels within ``dist`` of any track's (infinite) centre line, row block by row block."""
    out = np.zeros(shape, dtype=bool)
    xx = np.arange(shape[1], dtype=np.float32)[None, :]
    for r0 in range(0, shape[0], 512):
        yy = np.arange(r0, min(shape[0], r0 + 512), dtype=np.float32)[:, None]
        for t in tracks:
            dx, dy = t.x1 - t.x0, t.y1 - t.y0
            out[r0:r0 + yy.shape[0]] |= np.abs((yy - t.y0) * dx - (xx - t.x0) * dy) / math.hypot(dx, dy) <= dist
    return out


def cr_scores(crmask: np.ndarray, frame: dict) -> dict:
    from scipy import ndimage as ndi

    truth, mask = frame["cr_mask"], frame["mask"]
    labels, _ = ndi.label(truth, structure=np.ones((3, 3), dtype=bool))
    visible_ev = np.unique(labels[truth & ~mask])
    visible_ev = visible_ev[visible_ev > 0]
    hit = np.intersect1d(np.unique(labels[crmask & truth]), visible_ev)
    vis = truth & ~mask
    iy, ix = frame["star_yx"]
    keep = (iy >= 0) & (iy < crmask.shape[0]) & (ix >= 0) & (ix < crmask.shape[1])
    iy, ix = iy[keep], ix[keep]
    false = crmask & ~truth
    # a star core is flagged when a false cosmic-ray pixel lies within 1 px of its centre
    near_false = ndi.maximum_filter(false.view(np.uint8), size=3)[iy, ix] > 0
    flagged = int(near_false.sum())
    return {
        "event_recall": round(len(hit) / max(1, len(visible_ev)), 4),
        "pixel_recall": round(float((crmask & vis).sum() / max(1, vis.sum())), 4),
        "flagged_pixels": int(crmask.sum()), "false_pixels": int(false.sum()),
        "star_cores_flagged": flagged, "star_cores": int(iy.size),
        "star_core_fraction": round(flagged / max(1, iy.size), 5),
    }


def run_frame(frame: dict, repeat: int, peers: bool) -> dict:
    import dataclasses

    from mstdask.stir._stir_kernels import detect_cosmic_rays, detect_tracks, estimate_background, reduce_frame
    from mstdask.config import StirConfig

    cfg = StirConfig()
    raw, bias, flat, mask = frame["raw"], frame["bias"], frame["flat"], frame["mask"]
    g, rn = frame["gain"], frame["read_noise_e"]
    # warm-up on a cut-out: imports, numba/skimage first calls
    sub = (slice(0, 600), slice(0, 900))
    red = reduce_frame(raw[sub], bias[sub], flat[sub])
    detect_tracks(red, mask[sub])
    detect_cosmic_rays(red, mask[sub], g, rn)
    del red
    gc.collect()

    steps: dict[str, list[float]] = {k: [] for k in ("reduce", "background", "tracks", "cosmic_rays", "total")}
    base = rss()
    sampler = RssSampler([os.getpid()], every=0.02)
    sampler.start()
    for _ in range(repeat):
        t0 = time.perf_counter()
        reduced = reduce_frame(raw, bias, flat)
        t1 = time.perf_counter()
        bkg = estimate_background(reduced, mask, cfg)
        t2 = time.perf_counter()
        track_mask, lines = detect_tracks(reduced, mask, cfg, background=bkg)
        t3 = time.perf_counter()
        crmask = detect_cosmic_rays(reduced, mask, g, rn, cfg, background=bkg)
        t4 = time.perf_counter()
        for k, v in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
            steps[k].append(v)
        if _ < repeat - 1:
            del reduced, track_mask, crmask, lines
            gc.collect()
    sampler.stop.set()
    sampler.join()
    peak = sampler.peak[os.getpid()]

    # Peak memory of the step's arrays (numpy reports to tracemalloc), in one more, untimed run:
    # the RSS above also holds freed heap that the allocator keeps.
    import tracemalloc

    del reduced, track_mask, crmask, lines
    gc.collect()
    tracemalloc.start()
    reduced = reduce_frame(raw, bias, flat)
    bkg = estimate_background(reduced, mask, cfg)
    track_mask, lines = detect_tracks(reduced, mask, cfg, background=bkg)
    crmask = detect_cosmic_rays(reduced, mask, g, rn, cfg, background=bkg)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    # accuracy against truth
    near = near_tracks(frame["tracks"], raw.shape, 15.0)
    track_rec = [round(float((track_mask & m).sum() / m.sum()), 4) for m in frame["track_masks"]]
    truth_track = np.zeros(raw.shape, dtype=bool)
    for m in frame["track_masks"]:
        truth_track |= m
    rec = {
        "median_s": {k: round(statistics.median(v), 2) for k, v in steps.items()},
        "all_total_s": [round(v, 2) for v in steps["total"]],
        "peak_rss_MB": int(peak / MB), "rss_before_MB": int(base / MB),
        "stir_rss_increment_MB": int((peak - base) / MB),
        "traced_peak_MB": int(traced_peak / MB),
        "tracks": {
            "injected": [{"amplitude_sigma": round(t.amplitude_sigma, 2), "width_px": round(t.width, 2),
                          "angle_deg": round(t.angle_deg, 2), "length_px": round(math.hypot(t.x1 - t.x0, t.y1 - t.y0))}
                         for t in frame["tracks"]],
            "found": len(lines), "recall_per_track": track_rec,
            "flagged_pixels": int(track_mask.sum()), "truth_pixels": int(truth_track.sum()),
            "flagged_farther_than_15px": int((track_mask & ~near).sum()),
            "lines": [{k: round(v, 3) for k, v in ln.items() if k in ("direction_deg", "snr", "peak_sigma", "fwhm_px",
                                                                         "halfwidth_px", "coverage", "length_px")}
                      for ln in lines],
        },
        "cosmic_rays": {"events": frame["n_cr_events"], "rate_per_px_s": frame["cr_rate"], **cr_scores(crmask, frame)},
    }
    if not peers:
        return rec

    import astroscrappy
    from skimage.transform import hough_line, hough_line_peaks

    # Peer 1: the plain paper recipe: bin 2x2, threshold, hough_line + hough_line_peaks.
    t0 = time.perf_counter()
    ny, nx = reduced.shape
    binned = reduced[:ny // 2 * 2, :nx // 2 * 2].reshape(ny // 2, 2, nx // 2, 2).mean(axis=(1, 3))
    med = np.nanmedian(binned[::4, ::4])
    sig = 1.4826 * np.nanmedian(np.abs(binned[::4, ::4] - med))
    edges = binned > med + 3 * sig
    t1 = time.perf_counter()
    h, th, di = hough_line(edges)
    t2 = time.perf_counter()
    _, angles, dists = hough_line_peaks(h, th, di, num_peaks=10)
    t3 = time.perf_counter()
    del h, edges, binned
    rec["peer_hough"] = {"bin_threshold_s": round(t1 - t0, 2), "hough_line_s": round(t2 - t1, 2),
                         "hough_line_peaks_s": round(t3 - t2, 2), "total_s": round(t3 - t0, 2),
                         "peaks": len(angles)}

    # Peer 2: astroscrappy defaults on the whole frame (4 iterations, objlim 5, sigclip 4.5).
    t0 = time.perf_counter()
    default, _ = astroscrappy.detect_cosmics(np.nan_to_num(reduced), inmask=mask, gain=g, readnoise=rn,
                                             satlevel=np.inf)
    t1 = time.perf_counter()
    rec["peer_astroscrappy_default"] = {"s": round(t1 - t0, 2), **cr_scores(default, frame)}
    del default
    gc.collect()

    # Peer 3: astroscrappy with our parameters on the whole frame: same answer, time.
    t0 = time.perf_counter()
    full = detect_cosmic_rays(reduced, mask, g, rn, dataclasses.replace(cfg, cr_region="full"))
    t1 = time.perf_counter()
    rec["peer_astroscrappy_mst_full_frame"] = {"s": round(t1 - t0, 2),
                                               "equal_to_candidate_run": bool(np.array_equal(full, crmask)),
                                               "pixels_differing": int((full ^ crmask).sum())}
    return rec


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of the STIR step per frame (median)")
    ap.add_argument("--shape", default="6388x9576", help="frame shape NYxNX")
    ap.add_argument("--cr-rates", default="4e-9,default",
                    help="cosmic-ray rates (events/px/s), comma-separated; 'default' is the simulator's "
                         "(~100x the ground-level muon rate, ~12000 events per frame)")
    ap.add_argument("--peer-frames", type=int, default=1, help="run the peers on the first N frames")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.lower().split("x"))
    rates = [None if r.strip() == "default" else float(r) for r in args.cr_rates.split(",")]
    record = {
        "benchmark": "stir_per_frame",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "numpy": np.__version__},
        "threads": args.threads, "shape": list(shape), "repeat": args.repeat, "frames": [],
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
    }
    import astroscrappy
    import scipy
    import skimage

    record["machine"].update(scipy=scipy.__version__, skimage=skimage.__version__,
                             astroscrappy=astroscrappy.__version__)
    for k, rate in enumerate(rates):
        frame = simulate(shape, rate, args.seed + k)
        print(f"simulated frame {k} (cr rate {frame['cr_rate']:.2g}, {frame['n_cr_events']} events, "
              f"{frame['n_stars']} stars) in {frame['simulate_s']:.0f} s", flush=True)
        rec = run_frame(frame, args.repeat, peers=k < args.peer_frames)
        rec["stars_in_frame"] = frame["n_stars"]
        record["frames"].append(rec)
        print(json.dumps(rec, indent=1), flush=True)
        del frame
        gc.collect()
    record["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(record, indent=2))
    print()
    print("| cosmic rays / frame | reduce | background | tracks | cosmic rays | STIR total | peak RSS (+STIR) "
          "| arrays peak | hough_line peer | astroscrappy default | astroscrappy MST, whole frame |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for rec in record["frames"]:
        m = rec["median_s"]
        ph = rec.get("peer_hough", {}).get("total_s", "")
        pd = rec.get("peer_astroscrappy_default", {}).get("s", "")
        pf = rec.get("peer_astroscrappy_mst_full_frame", {}).get("s", "")
        print(f"| {rec['cosmic_rays']['events']} | {m['reduce']} s | {m['background']} s | {m['tracks']} s | "
              f"{m['cosmic_rays']} s | **{m['total']} s** | "
              f"{rec['peak_rss_MB']} MB (+{rec['stir_rss_increment_MB']}) | "
              f"{rec['traced_peak_MB']} MB | "
              f"{ph} s | {pd} s | {pf} s |")
    return record


if __name__ == "__main__":
    main()
